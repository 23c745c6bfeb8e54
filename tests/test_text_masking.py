"""Text masking (paper Table 1c): random, prioritized (padding dropped first) and
truncate, as a shorter sequence; the task's config keys and their start-up check."""

import pytest
import torch

from flip.config import check_task_masks
from flip.errors import ConfigError
from flip.masking import Mask
from flip.models.clip import FLIP
from flip.models.image_encoder import ImageEncoder
from flip.models.text_encoder import TextEncoder
from flip.tokenizer import PAD_ID
from tests.conftest import compose_train

L, VOCAB, WIDTH = 32, 100, 16


def _encoder(pool="mean"):
    torch.manual_seed(0)
    return TextEncoder(VOCAB, L, WIDTH, depth=1, heads=2, pool=pool).train()


def _captions(lengths, seed=0):
    """(B, L) token ids: real tokens (1..VOCAB-1) then padding."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, VOCAB, (len(lengths), L), generator=g)
    for b, n in enumerate(lengths):
        t[b, n:] = PAD_ID
    return t


def _kept(enc, tokens, mask):
    seen = []
    handle = enc.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    _, keep = enc.forward_features(tokens, mask)
    handle.remove()
    return keep, seen[0]


@pytest.mark.parametrize("kind", ["random", "prioritized", "truncate"])
@pytest.mark.parametrize("ratio, k", [(0.5, 16), (0.25, 24), (0.75, 8), (0.9, 3)])
def test_kept_length_is_int_L_times_one_minus_r_and_the_blocks_see_only_those(kind, ratio, k):
    assert k == int(L * (1 - ratio))
    enc = _encoder()
    tokens = _captions([5, 20, 32])
    keep, block_length = _kept(enc, tokens, Mask(ratio, torch.rand(3, L), kind))
    assert keep.shape == (3, k) and block_length == k  # really a shorter sequence
    for row in keep.tolist():
        assert len(set(row)) == k


def test_prioritized_drops_padding_first():
    enc = _encoder()
    lengths = [3, 16, 20, 32, 0]
    tokens = _captions(lengths, seed=1)
    noise = torch.rand(len(lengths), L, generator=torch.Generator().manual_seed(2))
    keep, _ = _kept(enc, tokens, Mask(0.5, noise, "prioritized"))
    for b, n in enumerate(lengths):
        kept = set(keep[b].tolist())
        real = set(range(n))
        if n >= 16:  # enough real tokens: no padding kept, the lowest-noise real ones
            assert kept <= real
            assert kept == set(sorted(real, key=lambda i: noise[b, i].item())[:16])
        else:  # fewer: every real token kept, the rest is the lowest-noise padding
            assert real <= kept
            pad = sorted(range(n, L), key=lambda i: noise[b, i].item())[: 16 - n]
            assert kept == real | set(pad)


def test_random_ignores_padding():
    """The same noise through random keeps the lowest-noise positions, padding or not."""
    enc = _encoder()
    tokens = _captions([3, 10], seed=3)
    noise = torch.rand(2, L, generator=torch.Generator().manual_seed(4))
    keep, _ = _kept(enc, tokens, Mask(0.5, noise, "random"))
    assert torch.equal(keep, torch.argsort(noise, dim=1)[:, :16])
    assert (tokens.gather(1, keep) == PAD_ID).any()  # 26 of 32 are padding in row 1


@pytest.mark.parametrize("pool", ["first", "mean"])
def test_truncate_keeps_the_prefix(pool):
    enc = _encoder(pool)
    tokens = _captions([30, 8])
    x, keep = enc.forward_features(tokens, Mask(0.5, kind="truncate"))
    assert torch.equal(keep, torch.arange(16).expand(2, 16))
    # the same as encoding the first 16 tokens with their position embeddings
    ref = enc.norm(enc.blocks(enc.token_embed(tokens[:, :16]) + enc.pos_embed[:, :16]))
    torch.testing.assert_close(x, ref)


@pytest.mark.parametrize("kind", ["random", "prioritized"])
def test_masks_are_replayed_by_their_noise(kind):
    enc = _encoder()
    tokens = _captions([4, 12, 25, 32])
    mask = Mask(0.5, kind=kind).drawn(4, L, "cpu")
    x1, k1 = enc.forward_features(tokens, mask)
    x2, k2 = enc.forward_features(tokens[2:], mask[2:])  # a micro-batch's part
    assert torch.equal(k1[2:], k2)
    torch.testing.assert_close(x1[2:], x2)
    _, k3 = enc.forward_features(tokens, Mask(0.5, kind=kind).drawn(4, L, "cpu"))
    assert not torch.equal(k1, k3)  # other noise, other tokens


def test_without_a_mask_every_token_is_encoded_in_training_and_eval():
    enc = _encoder()
    tokens = _captions([32, 5])
    for training in (True, False):
        keep, block_length = _kept(enc.train(training), tokens, None)
        assert keep is None and block_length == L


@pytest.mark.parametrize("kind", ["prioritized", "truncate"])
def test_image_masking_is_random_only(kind):
    torch.manual_seed(0)
    model = FLIP(ImageEncoder(32, 8, 16, 1, 2), _encoder(), embed_dim=8)
    with pytest.raises(ValueError, match=f"image masking is random only; mask kind '{kind}'"):
        model.encode_image(torch.randn(1, 3, 32, 32), Mask(0.5, kind=kind))


def test_readme_command_composes_and_the_task_draws_that_text_mask():
    """README: ``python train.py task.text_mask.ratio=0.5 task.text_mask.kind=prioritized``."""
    from hydra.utils import instantiate

    cfg = compose_train("task.text_mask.ratio=0.5", "task.text_mask.kind=prioritized")
    check_task_masks(cfg)
    module = instantiate(cfg.task, _partial_=True)(model=instantiate(cfg.model))
    assert module.text_mask == Mask(0.5, kind="prioritized")
    _, text_mask = module.draw_masks(4, "cpu")
    assert text_mask.noise.shape == (4, 32)  # drawn: the batch can be replayed
    cfg = compose_train("task.text_mask.ratio=0.25", "task.text_mask.kind=prioritized")
    assert instantiate(cfg.task, _partial_=True)(model=None).text_mask == Mask(
        0.25, kind="prioritized"
    )
    for name in ("tiny", "mini", "vit_b16", "vit_l16", "vit_l14", "vit_h14"):
        model = compose_train(f"model={name}").model  # architecture only
        assert not {"mask_ratio", "mask_kind"} & {*model.image, *model.text}
        assert compose_train(f"model={name}").task.text_mask == {"ratio": 0.0, "kind": "random"}


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "task.text_mask.kind=shuffle",
            "task.text_mask.kind='shuffle' is invalid: use one of random, prioritized, truncate",
        ),
        ("task.text_mask.ratio=1.0", "task.text_mask.ratio=1.0 is invalid"),
        (
            "task.image_mask.kind=truncate",
            "task.image_mask.kind='truncate' is invalid: use one of random",
        ),
    ],
)
def test_bad_text_mask_fails_at_start_up_in_one_sentence(override, message):
    from flip.run import train

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train(compose_train(override))


def test_train_with_prioritized_text_masking_encodes_16_of_32_tokens(fast_cfg, monkeypatch):
    import flip.models.text_encoder as text_encoder
    from flip.run import train

    lengths = []  # (training?, sequence length) of every text-tower pass

    def run_blocks(blocks, x, checkpointing):
        lengths.append((blocks.training, x.shape[1]))
        return torch.nn.Sequential.forward(blocks, x)

    monkeypatch.setattr(text_encoder, "run_blocks", run_blocks)
    metrics = train(fast_cfg("task.text_mask.ratio=0.5", "task.text_mask.kind=prioritized"))
    assert {n for training, n in lengths if training} == {16}  # 4 steps, one pass each
    assert sum(training for training, _ in lengths) == 4
    assert {n for training, n in lengths if not training} == {32}  # zero-shot prompts: all
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
