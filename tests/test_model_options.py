"""Memory/speed options leave the numbers unchanged: activation checkpointing, compile."""
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


def test_compile_option_compiles_both_encoders_in_place():
    module = PretrainModule(tiny_flip(), global_batch=8, total_samples=8, warmup_samples=0,
                            compile=True)
    names = [n for n, _ in module.named_parameters()]
    module.configure_model()
    assert module.model.visual._compiled_call_impl is not None
    assert module.model.text._compiled_call_impl is not None
    assert [n for n, _ in module.named_parameters()] == names  # checkpoints stay compatible
