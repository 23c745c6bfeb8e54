"""Image / text towers and the FLIP model (flip.models)."""

import math
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from flip.masking import Mask
from flip.models.clip import FLIP
from flip.models.image_encoder import ImageEncoder
from flip.models.text_encoder import PAD_ID, TextEncoder

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

IMG, PATCH, WIDTH = 32, 8, 32  # 4 x 4 grid, N = 16
GRID = IMG // PATCH
N_PATCHES = GRID * GRID
VOCAB, CTX, TWIDTH = 50, 8, 24


def _image_encoder(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(image_size=IMG, patch_size=PATCH, width=WIDTH, depth=2, heads=2)
    args.update(kw)
    return ImageEncoder(**args).eval()


def _text_encoder(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=VOCAB, context_length=CTX, width=TWIDTH, depth=2, heads=2)
    args.update(kw)
    return TextEncoder(**args).eval()


def _flip(seed=0):
    img, txt = _image_encoder(seed), _text_encoder(seed + 1)
    torch.manual_seed(seed + 2)
    return FLIP(img, txt, embed_dim=16)


def _images(b=2, seed=1):
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _tokens(b=2, seed=2):
    return torch.randint(1, VOCAB, (b, CTX), generator=torch.Generator().manual_seed(seed))


def _hook(module, what="input"):
    seen = []

    def fn(m, inp, out):
        seen.append((inp[0] if what == "input" else out).detach())

    return seen, module.register_forward_hook(fn)


def _sincos_reference(grid: int, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding written from the definition (float64).

    Token n = (row h, column w) in row-major order; a quarter of the channels each for
    sin(h w_i), sin(w w_i), cos(h w_i), cos(w w_i) with w_i = 10000^(-i / (dim/4)).
    """
    q = dim // 4
    omega = [10000.0 ** (-i / q) for i in range(q)]
    rows = []
    for h in range(grid):
        for w in range(grid):
            rows.append(
                [math.sin(h * o) for o in omega]
                + [math.sin(w * o) for o in omega]
                + [math.cos(h * o) for o in omega]
                + [math.cos(w * o) for o in omega]
            )
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------ image tower


def test_no_norm_after_patch_embedding():
    enc = _image_encoder()
    assert isinstance(enc.patch_embed.norm, nn.Identity)
    x = _images(2)
    seen, h = _hook(enc.blocks[0])
    enc(x)
    h.remove()
    # Hand-made patch projection: flatten each 8x8x3 patch (C, kh, kw order) and apply
    # the conv weights as a matrix, patches in row-major order.
    W, b = enc.patch_embed.proj.weight, enc.patch_embed.proj.bias  # (D, 3, p, p), (D,)
    patches = x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (B, 3, g, g, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, N_PATCHES, 3 * PATCH * PATCH)
    tokens = patches @ W.reshape(WIDTH, -1).T + b + _sincos_reference(GRID, WIDTH).float()
    ref = torch.cat([enc.cls_token.expand(2, -1, -1), tokens], dim=1)
    assert seen[0].shape == (2, 1 + N_PATCHES, WIDTH)
    torch.testing.assert_close(seen[0], ref, atol=1e-5, rtol=1e-5)
    # A LayerNorm in between would give unit-variance tokens; ours are not.
    assert not torch.allclose(seen[0][:, 1:].std(-1), torch.ones(2, N_PATCHES), atol=0.1)


def test_position_embedding_is_fixed_sincos():
    enc = _image_encoder()
    names = dict(enc.named_parameters())
    assert "pos_embed" not in names
    assert "pos_embed" in dict(enc.named_buffers())
    assert not enc.pos_embed.requires_grad
    assert enc.pos_embed.shape == (1, N_PATCHES, WIDTH)
    assert torch.equal(enc.pos_embed[0], build_sincos2d_pos_embed([GRID, GRID], dim=WIDTH))
    torch.testing.assert_close(
        enc.pos_embed[0].double(), _sincos_reference(GRID, WIDTH), atol=1e-6, rtol=0
    )
    # a training step leaves it alone: no gradient reaches it
    enc.train()
    before = enc.pos_embed.clone()
    enc(_images(2)).sum().backward()
    assert enc.pos_embed.grad is None
    torch.optim.SGD(enc.parameters(), lr=1.0).step()
    assert torch.equal(enc.pos_embed, before)


def test_avg_pool_includes_class_token():
    enc = _image_encoder(class_token=True, pool="avg")
    seen, h = _hook(enc.norm, "output")
    out = enc(_images(3))
    h.remove()
    normed = seen[0]
    assert normed.shape == (3, 1 + N_PATCHES, WIDTH)
    ref = torch.stack(
        [sum(normed[b, t] for t in range(1 + N_PATCHES)) / (1 + N_PATCHES) for b in range(3)]
    )
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    # distinguishable from the patch-only mean
    assert not torch.allclose(out, normed[:, 1:].mean(1), atol=1e-4)


def test_token_pool_returns_first_token():
    enc = _image_encoder(class_token=True, pool="token")
    seen, h = _hook(enc.norm, "output")
    out = enc(_images(2))
    h.remove()
    assert torch.equal(out, seen[0][:, 0])


def test_avg_pool_without_class_token():
    enc = _image_encoder(class_token=False, pool="avg")
    assert enc.cls_token is None
    seen, h = _hook(enc.norm, "output")
    out = enc(_images(2))
    h.remove()
    assert seen[0].shape == (2, N_PATCHES, WIDTH)
    torch.testing.assert_close(out, seen[0].sum(1) / N_PATCHES, atol=1e-6, rtol=1e-6)


def test_image_encoder_rejects_bad_pool():
    with pytest.raises(ValueError):
        _image_encoder(pool="max")
    with pytest.raises(ValueError):
        _image_encoder(pool="token", class_token=False)


# ------------------------------------------------------------------------- text tower


def _text_forward(enc, tokens, is_causal):
    """The text tower written out block by block, optionally with a causal mask."""
    x = enc.token_embed(tokens) + enc.pos_embed
    for blk in enc.blocks:
        x = x + blk.ls1(blk.attn(blk.norm1(x), is_causal=is_causal))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return enc.norm(x)


def test_text_encoder_is_not_causal():
    enc = _text_encoder(pool="first")
    a = _tokens(1)
    b = a.clone()
    b[0, -1] = (a[0, -1] % (VOCAB - 1)) + 1  # change only the last token (non-pad)
    assert b[0, -1] != a[0, -1]
    out_a, out_b = enc(a), enc(b)
    # the reference written out block by block reproduces the encoder
    torch.testing.assert_close(out_a, _text_forward(enc, a, False)[:, 0], atol=1e-5, rtol=1e-5)
    assert (out_a - out_b).abs().max() > 1e-3  # the first position sees the last token
    # a causal model would not see it: the same weights with a causal mask do not change
    causal_a, causal_b = _text_forward(enc, a, True)[:, 0], _text_forward(enc, b, True)[:, 0]
    torch.testing.assert_close(causal_a, causal_b, atol=1e-6, rtol=0)


def test_mean_pool_changes_with_last_token_and_matches_hand_computation():
    enc = _text_encoder(pool="mean")
    a = _tokens(2)
    a[0, 5:] = PAD_ID  # first caption: 5 real tokens then padding
    a[1, 3:] = PAD_ID  # second: 3 real tokens
    b = a.clone()
    b[:, -1] = 7  # the last (padding) position becomes a real token
    seen, h = _hook(enc.norm, "output")
    out_a, out_b = enc(a), enc(b)
    h.remove()
    assert (out_a - out_b).abs().max() > 1e-3
    for out, toks, normed in ((out_a, a, seen[0]), (out_b, b, seen[1])):
        for i in range(2):
            rows = [normed[i, t] for t in range(CTX) if toks[i, t].item() != PAD_ID]
            torch.testing.assert_close(out[i], sum(rows) / len(rows), atol=1e-6, rtol=1e-6)
    # padding positions are excluded from the average (not the plain mean over CTX)
    assert not torch.allclose(out_a, seen[0].mean(1), atol=1e-4)


def test_first_pool_is_first_position():
    enc = _text_encoder(pool="first")
    seen, h = _hook(enc.norm, "output")
    out = enc(_tokens(3))
    h.remove()
    assert torch.equal(out, seen[0][:, 0])


def test_text_wrong_length_raises():
    enc = _text_encoder()
    with pytest.raises(ValueError):
        enc(torch.ones(2, CTX - 1, dtype=torch.long))
    with pytest.raises(ValueError):
        enc(torch.ones(2, CTX + 1, dtype=torch.long))
    with pytest.raises(ValueError):
        _text_encoder(pool="last")


# ----------------------------------------------------------------------------- FLIP


def test_flip_features_normalised_and_projections_bias_free():
    model = _flip().eval()
    x, t = _images(3), _tokens(3)
    img, txt = model.encode_image(x), model.encode_text(t)
    assert img.shape == txt.shape == (3, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    assert model.image_proj.bias is None and model.text_proj.bias is None
    # the direction is the projection of the tower output
    raw = model.visual(x) @ model.image_proj.weight.T
    torch.testing.assert_close(img, raw / raw.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.encode_image(x, normalize=False), raw, atol=1e-6, rtol=1e-5)
    raw_t = model.text(t) @ model.text_proj.weight.T
    torch.testing.assert_close(txt, raw_t / raw_t.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_logit_scale_init_and_clip():
    model = _flip()
    assert isinstance(model.logit_scale, nn.Parameter)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)  # 14.2857
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    # float32(log 100) rounds up: exp gives 100 to one float32 ulp (7.6e-6)
    assert abs(model.scale().item() - 100.0) <= torch.finfo(torch.float32).eps * 100
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    assert model.scale().item() == 1.0
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    assert model.scale().item() == pytest.approx(math.exp(2.0), rel=1e-6)  # inside: no clip


def test_logit_scale_clip_passes_gradients_at_the_bound():
    """exp(clip(s, 0, log 100)) as the official code; at the bound itself the gradient
    is not zero (else a scale clamped there could never come back), above it it is."""
    model = _flip()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
    model.scale().backward()
    assert model.logit_scale.grad.item() == pytest.approx(100.0, rel=1e-6)  # d exp(s)/ds
    model.logit_scale.grad = None
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.scale().backward()
    assert model.logit_scale.grad.item() == 0.0
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100), abs=1e-6)


def test_forward_matches_encoders_in_eval():
    model = _flip().eval()
    x, t = _images(2), _tokens(2)
    img, txt, scale = model(x, t)
    assert torch.equal(img, model.encode_image(x))
    assert torch.equal(txt, model.encode_text(t))
    assert torch.equal(scale, model.scale())


# ------------------------------------------------------------- real Hydra model configs


def _compose(model: str, image_size: int | None = 224):
    overrides = [f"model={model}", "output_dir=/tmp/x"]
    if image_size is not None:
        overrides.append(f"data.image_size={image_size}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def _vit_params(width, depth, patch, class_token=True):
    """Parameter count of the image tower from the architecture, by hand."""
    patch_proj = 3 * patch * patch * width + width
    block = (
        3 * width * width
        + 3 * width  # qkv
        + width * width
        + width  # attention output
        + 4 * width * width
        + 4 * width  # fc1
        + 4 * width * width
        + width  # fc2
        + 2 * 2 * width
    )  # two LayerNorms
    return patch_proj + int(class_token) * width + depth * block + 2 * width  # final norm


# name: nominal image params, (width, depth, heads, patch), text (width, depth, heads), embed
ARCHS = {
    "vit_b16": (86e6, (768, 12, 12, 16), (512, 12, 8), 512),
    "vit_l16": (303e6, (1024, 24, 16, 16), (768, 12, 12), 768),
    "vit_l14": (303e6, (1024, 24, 16, 14), (768, 12, 12), 768),
    "vit_h14": (632e6, (1280, 32, 16, 14), (1024, 24, 16), 1024),
}


@pytest.fixture(scope="module")
def meta_models():
    models = {}
    for name in ARCHS:
        cfg = _compose(name)
        with torch.device("meta"):
            models[name] = hydra.utils.instantiate(cfg.model)
    return models


@pytest.mark.parametrize("name", list(ARCHS))
def test_config_image_tower_size(meta_models, name):
    model = meta_models[name]
    nominal, (width, depth, heads, patch), _, _ = ARCHS[name]
    assert next(model.parameters()).device.type == "meta"
    n = sum(p.numel() for p in model.visual.parameters())
    assert n == _vit_params(width, depth, patch)
    assert abs(n - nominal) / nominal < 0.01, n
    v = model.visual
    assert v.width == width and len(v.blocks) == depth and v.blocks[0].attn.num_heads == heads
    assert tuple(v.patch_embed.patch_size) == (patch, patch)
    assert v.num_patches == (224 // patch) ** 2
    assert v.cls_token is not None and v.pool == "avg"
    # the fixed position embedding is a buffer, outside the parameter count
    assert "pos_embed" not in dict(v.named_parameters())


@pytest.mark.parametrize("name", list(ARCHS))
def test_config_text_tower_and_embedding(meta_models, name):
    model = meta_models[name]
    _, _, (width, depth, heads), embed = ARCHS[name]
    t = model.text
    assert t.width == width and len(t.blocks) == depth and t.blocks[0].attn.num_heads == heads
    assert t.context_length == 32 and t.token_embed.num_embeddings == 30522
    assert t.pool == "first"
    assert model.image_proj.out_features == model.text_proj.out_features == embed


def test_l14_and_l16_differ_only_in_patch_projection(meta_models):
    n14 = sum(p.numel() for p in meta_models["vit_l14"].visual.parameters())
    n16 = sum(p.numel() for p in meta_models["vit_l16"].visual.parameters())
    assert n16 - n14 == 3 * (16 * 16 - 14 * 14) * 1024


def test_tiny_config_runs_on_cpu():
    cfg = _compose("tiny", image_size=None)  # default data: 64 px
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model, FLIP)
    assert next(model.parameters()).device.type == "cpu"
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(1, 30522, (2, 32))
    model.train()
    seen, h = _hook(model.visual.blocks[0])
    img, txt, scale = model(images, tokens, Mask(**cfg.task.image_mask))
    h.remove()
    assert seen[0].shape[1] == 1 + int(64 * (1 - cfg.mask))  # 8x8 grid of 8 px patches
    assert img.shape == txt.shape == (2, 128)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6)


# ------------------------------------------------- token outputs and the shared mask spec


def test_image_forward_features_returns_normed_tokens_and_the_kept_indices():
    enc = _image_encoder().train()
    x = _images(2)
    noise = torch.rand(2, enc.num_patches)
    tokens, keep = enc.forward_features(x, Mask(0.75, noise))
    k = enc.num_patches // 4
    assert tokens.shape == (2, 1 + k, WIDTH)
    assert torch.equal(keep, torch.argsort(noise, dim=1)[:, :k])
    assert torch.equal(enc.forward_head(tokens), tokens.mean(1))  # avg over class + patches
    assert torch.equal(enc(x, Mask(0.75, noise)), tokens.mean(1))
    for training in (True, False):  # no mask: every patch, in order
        _, keep_all = enc.train(training).forward_features(x)
        assert keep_all is None


def test_text_forward_head_of_features_equals_forward():
    enc = _text_encoder(pool="mean")
    t = _tokens(3)
    t[:, 20:] = 0  # padding
    x, keep = enc.forward_features(t)
    assert keep is None and x.shape == (3, CTX, TWIDTH)
    torch.testing.assert_close(enc.forward_head(x, t), x[:, :20].mean(1))
    assert torch.equal(enc(t), enc.forward_head(x, t))


def test_text_masking_keeps_k_tokens_and_mean_pools_the_kept_non_padding_ones():
    enc = _text_encoder(pool="mean").train()
    t = _tokens(2)
    t[:, 24:] = 0
    noise = torch.rand(2, CTX)
    x, keep = enc.forward_features(t, Mask(0.5, noise))
    assert x.shape == (2, CTX // 2, TWIDTH)
    assert torch.equal(keep, torch.argsort(noise, dim=1)[:, : CTX // 2])
    for b in range(2):  # by hand: the kept positions that are not padding
        real = [i for i, pos in enumerate(keep[b].tolist()) if pos < 24]
        torch.testing.assert_close(enc.forward_head(x, t, keep)[b], x[b, real].mean(0))


@pytest.mark.parametrize("kind", ["random", "prioritized"])
def test_text_masking_with_first_token_pooling_keeps_position_0_first(kind):
    """pool='first' pins position 0 (noise - 1): it is kept and pooled, the other k - 1
    kept positions are the lowest-noise ones among positions 1.."""
    enc = _text_encoder(pool="first").train()
    t = _tokens(3)
    noise = torch.rand(3, CTX, generator=torch.Generator().manual_seed(4))
    x, keep = enc.forward_features(t, Mask(0.5, noise, kind))
    assert keep.shape == (3, CTX // 2) and (keep[:, 0] == 0).all()
    for b in range(3):  # no padding here: prioritized draws like random
        rest = sorted(range(1, CTX), key=lambda i: noise[b, i].item())[: CTX // 2 - 1]
        assert keep[b, 1:].tolist() == rest
    torch.testing.assert_close(enc.forward_head(x, t, keep), x[:, 0])


def test_the_task_draws_replayable_masks_for_both_towers():
    from flip.tasks.pretrain import PretrainModule

    model = FLIP(_image_encoder(), _text_encoder(pool="mean"), embed_dim=16).train()
    task = PretrainModule(
        model, 4, 4, 0, image_mask={"ratio": 0.5}, text_mask={"ratio": 0.25, "kind": "prioritized"}
    )
    torch.manual_seed(3)
    image_mask, text_mask = task.draw_masks(4, "cpu")
    torch.manual_seed(3)  # image noise first, then text noise
    image_noise, text_noise = torch.rand(4, model.visual.num_patches), torch.rand(4, CTX)
    assert (image_mask.ratio, image_mask.kind, text_mask.ratio, text_mask.kind) == (
        0.5,
        "random",
        0.25,
        "prioritized",
    )
    assert torch.equal(image_mask.noise, image_noise) and torch.equal(text_mask.noise, text_noise)
    x, t = _images(4), _tokens(4)
    full = model.forward_features(x, t, image_mask, text_mask)
    part = model.forward_features(x[2:], t[2:], image_mask[2:], text_mask[2:])
    torch.testing.assert_close(part.image, full.image[2:])  # the rows' own masks, replayed
    torch.testing.assert_close(part.text, full.text[2:])
    assert full.image_keep.shape == (4, N_PATCHES // 2) and full.text_keep.shape == (
        4,
        CTX * 3 // 4,
    )
    unmasked = PretrainModule(model, 4, 4, 0)  # no masks configured: nothing drawn
    assert unmasked.draw_masks(4, "cpu") == (Mask(0.0), Mask(0.0))
