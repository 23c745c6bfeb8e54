"""Memory/speed options leave the numbers unchanged: activation checkpointing, compile."""

import pytest
import torch

from flip.loss import contrastive_loss
from flip.masking import Mask
from flip.tasks.pretrain import PretrainModule
from tests.test_grad_cache import batch, grads, tiny_flip


def test_activation_checkpointing_gives_the_same_gradients():
    images, tokens = batch()
    plain, checkpointed = tiny_flip(), tiny_flip()
    checkpointed.visual.grad_checkpointing = checkpointed.text.grad_checkpointing = True
    noise = torch.rand(8, plain.visual.num_patches, dtype=torch.float64)
    for model in (plain, checkpointed):
        contrastive_loss(*model(images, tokens, Mask(0.5, noise))).backward()
    expected, actual = grads(plain), grads(checkpointed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compile_option_runs_compiled_encoders_with_the_eager_numbers():
    """task.compile=true: both towers compiled in place (parameter names unchanged), and a
    training forward through the compiled graph gives the eager model's features."""
    eager = tiny_flip().float()
    module = PretrainModule(
        tiny_flip().float(), global_batch=8, total_samples=8, warmup_samples=0, compile=True
    )
    names = [n for n, _ in module.named_parameters()]
    module.configure_model()
    assert [n for n, _ in module.named_parameters()] == names  # checkpoints stay compatible
    images, tokens = batch()
    mask = Mask(0.5, torch.rand(8, eager.visual.num_patches))
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = (module.model.visual(images.float(), mask), module.model.text(tokens))
    assert counts["stats"]["unique_graphs"] >= 2  # both towers ran as compiled graphs
    expected = (eager.visual(images.float(), mask), eager.text(tokens))
    for got, want in zip(compiled, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_drop_path_rises_linearly_over_the_blocks():
    """timm's and MAE's stochastic-depth rule: block i of d drops at rate * i / (d - 1)."""
    from flip.models.transformer import transformer_blocks

    blocks = transformer_blocks(16, 5, 2, drop_path=0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert all(getattr(b.drop_path2, "drop_prob", 0.0) == r for b, r in zip(blocks, rates))
