"""Random patch masking (flip.masking) and its use in the image encoder."""

import math

import pytest
import torch

from flip.masking import Mask, num_visible, random_masking
from flip.models.image_encoder import ImageEncoder

# Tiny ViT: 32 px images, 8 px patches -> N = 16 patch tokens.
IMG, PATCH, WIDTH = 32, 8, 32
N_PATCHES = (IMG // PATCH) ** 2


def _encoder(class_token=True, seed=0):
    torch.manual_seed(seed)
    return ImageEncoder(
        image_size=IMG,
        patch_size=PATCH,
        width=WIDTH,
        depth=2,
        heads=2,
        class_token=class_token,
    )


def _images(b=3, seed=1):
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _capture_block_input(enc):
    seen = []
    handle = enc.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    return seen, handle


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize(
    "n, r, k",
    [
        (16, 0.0, 16),
        (16, 0.5, 8),
        (16, 0.75, 4),
        (196, 0.5, 98),
        (196, 0.75, 49),
        (197, 0.75, 49),
        (10, 0.33, 6),
        (50, 0.9, 4),  # 50 * (1 - 0.9) = 4.999... in floats: int() truncates, as MAE does
        (3, 0.9, 1),
        (1, 0.5, 1),
        (16, 0.99, 1),  # int(...) == 0 -> floor of one token
    ],
)
def test_kept_count_and_shape(n, r, k):
    assert k == max(1, int(n * (1 - r)))  # the table itself follows the definition
    assert num_visible(n, r) == k
    x = torch.randn(2, n, 5)
    vis, idx = random_masking(x, r)
    assert vis.shape == (2, k, 5)
    assert idx.shape == (2, k)


def test_visible_tokens_are_gathered_and_indices_distinct():
    torch.manual_seed(0)
    B, N, D = 4, 20, 7
    x = torch.randn(B, N, D)
    vis, idx = random_masking(x, 0.6)
    assert idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < N)).all()
    for b in range(B):
        assert len(set(idx[b].tolist())) == idx.shape[1]  # distinct within a sample
        for j, i in enumerate(idx[b].tolist()):
            assert torch.equal(vis[b, j], x[b, i])


def test_zero_ratio_keeps_every_token():
    x = torch.randn(2, 9, 3)
    vis, idx = random_masking(x, 0.0)
    for b in range(2):
        assert sorted(idx[b].tolist()) == list(range(9))
        assert torch.equal(vis[b], x[b, idx[b]])


def test_kept_indices_are_lowest_noise():
    # Reference: with explicit noise, the kept set is the k patches of smallest noise.
    g = torch.Generator().manual_seed(3)
    B, N, r = 3, 12, 0.5
    noise = torch.rand(B, N, generator=g)
    _, idx = random_masking(torch.randn(B, N, 2), r, noise)
    k = int(N * (1 - r))
    for b in range(B):
        ref = sorted(range(N), key=lambda i: noise[b, i].item())[:k]
        assert set(idx[b].tolist()) == set(ref)


def test_samples_get_different_subsets():
    torch.manual_seed(0)
    # P(two identical subsets of 16 out of 64) = 1 / C(64, 16) ~ 2e-15 per pair.
    x = torch.randn(8, 64, 2)
    _, idx = random_masking(x, 0.75)
    sets = {frozenset(row.tolist()) for row in idx}
    assert len(sets) == 8


def test_every_patch_equally_likely():
    torch.manual_seed(0)
    B, N, r = 20000, 16, 0.75
    x = torch.arange(N, dtype=torch.float32).expand(B, N).unsqueeze(-1).contiguous()
    vis, idx = random_masking(x, r)
    assert torch.equal(vis.squeeze(-1).long(), idx)
    counts = torch.bincount(idx.flatten(), minlength=N).double()
    freq = counts / B
    p = 1 - r  # k / N = 4 / 16
    sigma = math.sqrt(p * (1 - p) / B)  # binomial std of one patch's keep frequency
    assert counts.sum() == B * 4
    assert (freq - p).abs().max() < 5 * sigma, (freq, sigma)


def test_same_noise_same_mask():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 3)
    noise = torch.rand(4, 16)
    v1, i1 = random_masking(x, 0.75, noise)
    v2, i2 = random_masking(x, 0.75, noise.clone())
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    _, i3 = random_masking(x, 0.75, torch.rand(4, 16))  # other noise -> other mask
    assert not torch.equal(i1, i3)


@pytest.mark.parametrize("r", [1.0, -0.1, 1.5])
def test_invalid_ratio_raises(r):
    with pytest.raises(ValueError):
        random_masking(torch.randn(1, 4, 2), r)
    with pytest.raises(ValueError):
        num_visible(4, r)


# ----------------------------------------------------------------------- image encoder


def test_encoder_ratio_zero_is_identity():
    enc = _encoder().train()
    x = _images()
    out_plain = enc(x)  # no mask: every patch
    assert torch.equal(enc(x, Mask(0.0)), out_plain)
    # and 0.75 really masks (so the comparison means something)
    assert not torch.allclose(enc(x, Mask(0.75)), out_plain)


def test_encoder_ratio_zero_feeds_all_tokens_in_order():
    enc = _encoder().train()
    seen, h = _capture_block_input(enc)
    x = _images(2)
    enc(x)
    h.remove()
    ref = enc.patch_embed(x) + enc.pos_embed
    assert seen[0].shape == (2, 1 + N_PATCHES, WIDTH)
    assert torch.equal(seen[0][:, 1:], ref)


@pytest.mark.parametrize("training", [True, False])
def test_no_mask_is_no_masking_and_a_given_mask_masks_in_either_mode(training):
    enc = _encoder().train(training)
    x = _images()
    seen, h = _capture_block_input(enc)
    enc(x)
    h.remove()
    assert seen[0].shape[1] == 1 + N_PATCHES
    # a mask given masks at evaluation too (masked inference)
    seen, h = _capture_block_input(enc)
    enc(x, Mask(0.75))
    h.remove()
    assert seen[0].shape[1] == 1 + N_PATCHES // 4


@pytest.mark.parametrize("class_token", [True, False])
def test_train_mode_blocks_see_visible_tokens(class_token):
    enc = _encoder(class_token=class_token).train()
    seen, h = _capture_block_input(enc)
    x = _images(3)
    noise = torch.rand(3, N_PATCHES, generator=torch.Generator().manual_seed(5))
    out = enc(x, Mask(0.75, noise))
    h.remove()
    k = int(N_PATCHES * 0.25)
    assert seen[0].shape == (3, int(class_token) + k, WIDTH)
    assert out.shape == (3, WIDTH)
    # the tokens are the class token followed by the lowest-noise patches (pos added)
    tokens = enc.patch_embed(x) + enc.pos_embed
    keep = torch.argsort(noise, dim=1)[:, :k]
    ref = torch.stack([tokens[b, keep[b]] for b in range(3)])
    if class_token:
        ref = torch.cat([enc.cls_token.expand(3, -1, -1), ref], dim=1)
    assert torch.allclose(seen[0], ref, atol=0, rtol=0)


def test_encoder_same_noise_reproduces_output():
    enc = _encoder().train()
    x = _images(2)
    noise = torch.rand(2, N_PATCHES)
    assert torch.equal(enc(x, Mask(0.75, noise)), enc(x, Mask(0.75, noise)))
    assert not torch.allclose(
        enc(x, Mask(0.75, noise)), enc(x, Mask(0.75, torch.rand(2, N_PATCHES)))
    )
