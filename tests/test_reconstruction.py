"""MAE pixel reconstruction as an auxiliary objective term (paper Table 1f,
flip.reconstruction): the loss against a NumPy computation, masked patches only, the
decoder's unshuffling, a train() run through objective=reconstruction, and its tensors
staying out of the model."""

import copy

import numpy as np
import pytest
import torch

from flip.checkpoint import build_model, load_checkpoint, load_weights, model_state
from flip.errors import ConfigError
from flip.models.clip import Features
from flip.reconstruction import PixelReconstruction, normalized_pixels, patchify

SMALL = [
    "objective=reconstruction",
    "objective.auxiliary.reconstruction.width=16",
    "objective.auxiliary.reconstruction.depth=1",
    "objective.auxiliary.reconstruction.heads=2",
]


def _term(encoder_width=8, image_size=4, patch_size=2, **kw):
    torch.manual_seed(0)
    return PixelReconstruction(
        encoder_width, image_size, patch_size, width=8, depth=1, heads=2, **kw
    ).double()


def _features(tokens, keep):
    return Features(None, None, tokens, keep, None, None)


def _numpy_loss(image, pred, masked, p=2, norm=True):
    """Per-patch normalised pixel MSE averaged over the masked patches, by hand: patch
    (i, j) is image[:, p i : p i + p, p j : p j + p] as (row, column, channel)."""
    C, H, W = image.shape
    losses = []
    for n in masked:
        i, j = divmod(n, W // p)
        t = image[:, p * i : p * i + p, p * j : p * j + p].transpose(1, 2, 0).reshape(-1)
        if norm:
            t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
        losses.append(np.mean((pred[n] - t) ** 2))
    return np.mean(losses)


def test_loss_equals_a_numpy_computation_on_a_2x2_patch_toy():
    """A 4x4 image of 2x2 patches (N = 4, 12 pixels each); patches 0 and 3 kept."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 4, 4))
    pred = rng.normal(size=(2, 4, 12))
    keep = torch.tensor([[0, 3], [2, 1]])
    term = _term()
    term.decode = lambda tokens, keep: torch.from_numpy(pred)  # the decoder's output, fixed
    for norm in (True, False):
        term.norm_pix_loss = norm
        loss = term(_features(None, keep), torch.from_numpy(images), None)
        want = [
            _numpy_loss(images[0], pred[0], [1, 2], norm=norm),
            _numpy_loss(images[1], pred[1], [0, 3], norm=norm),
        ]
        np.testing.assert_allclose(loss.numpy(), want, rtol=1e-12)


def test_zero_for_a_perfect_prediction_and_only_masked_patches_count():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    keep = torch.tensor([[0, 3], [1, 2]])
    term = _term()
    target = normalized_pixels(patchify(images, 2))
    term.decode = lambda tokens, keep: target
    assert torch.equal(term(_features(None, keep), images, None), torch.zeros(2))
    term.decode = lambda tokens, keep: torch.zeros_like(target)
    base = term(_features(None, keep), images, None)
    assert (base > 0).all()
    visible = images.clone()
    visible[0, :, 0:2, 0:2] += 5 * torch.randn(
        3, 2, 2, generator=g, dtype=torch.float64
    )  # patch 0: kept
    torch.testing.assert_close(term(_features(None, keep), visible, None), base)
    hidden = images.clone()
    hidden[0, :, 0:2, 2:4] += 5 * torch.randn(
        3, 2, 2, generator=g, dtype=torch.float64
    )  # patch 1: masked
    changed = term(_features(None, keep), hidden, None)
    assert changed[0] != base[0] and changed[1] == base[1]
    # no mask at all: nothing is reconstructed
    assert torch.equal(
        term(_features(torch.randn(2, 5, 8, dtype=torch.float64), None), images, None),
        torch.zeros(2),
    )


def test_patchify_matches_the_vit_patch_order():
    """Patch n of patchify is what the ViT's patch embedding (a stride-p conv) reads as token n."""
    conv = torch.nn.Conv2d(3, 5, 2, 2, bias=False).double()
    images = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    tokens = conv(images).flatten(2).transpose(1, 2)  # (B, N, 5)
    w = conv.weight.permute(0, 2, 3, 1).reshape(5, -1)  # (out, row, column, channel)
    torch.testing.assert_close(patchify(images, 2) @ w.T, tokens)


@pytest.mark.parametrize("class_token", [True, False])
def test_decoder_unshuffles_kept_tokens_and_fills_the_mask_token(class_token):
    term = _term(image_size=8)  # N = 16
    B, k = 2, 4
    keep = torch.stack(
        [torch.randperm(16, generator=torch.Generator().manual_seed(b))[:k] for b in range(B)]
    )
    tokens = torch.randn(B, int(class_token) + k, 8, dtype=torch.float64)
    seen = []
    hook = term.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    pred = term.decode(tokens, keep)
    hook.remove()
    assert pred.shape == (B, 16, 12)
    x, pos, c = seen[0], term.pos_embed[0], int(class_token)
    assert x.shape == (B, c + 16, 8)
    embedded = term.embed(tokens)
    if class_token:  # the class token in its slot with a zero position embedding
        torch.testing.assert_close(x[:, 0], embedded[:, 0])
        assert torch.equal(pos[0], torch.zeros(8))
    for b in range(B):
        for j, n in enumerate(keep[b].tolist()):
            torch.testing.assert_close(x[b, c + n], embedded[b, c + j] + pos[1 + n])
        for n in set(range(16)) - set(keep[b].tolist()):
            torch.testing.assert_close(x[b, c + n], term.mask_token[0, 0] + pos[1 + n])


def test_reconstruction_needs_image_masking(fast_cfg):
    from flip.run import train

    with pytest.raises(
        ConfigError,
        match="objective.auxiliary.reconstruction reconstructs the "
        "masked patches, but mask=0 masks none",
    ):
        train(fast_cfg(*SMALL, "mask=0"))


def test_train_logs_the_reconstruction_loss_of_the_first_batch(
    fast_cfg, tmp_path, monkeypatch, caplog
):
    """One step of objective=reconstruction through the real configs: the logged
    train/loss_reconstruction equals the term recomputed on that batch with the step's
    weights and masks; the checkpoint's decoder tensors are reported as unused by the model."""
    from flip.run import train
    from flip.tasks.pretrain import PretrainModule

    seen = {}
    original = PretrainModule._backward

    def backward(self, images, tokens, masks, micro, optimizer):
        seen.update(
            model=copy.deepcopy(self.model),
            objective=copy.deepcopy(self.objective),
            images=images.clone(),
            tokens=tokens.clone(),
            masks=masks,  # the masks the step drew
        )
        return original(self, images, tokens, masks, micro, optimizer)

    monkeypatch.setattr(PretrainModule, "_backward", backward)
    metrics = train(fast_cfg(*SMALL, "schedule.total_samples=16", "mask=0.75"))
    model, objective = seen["model"], seen["objective"]
    with torch.no_grad():
        features = model.forward_features(seen["images"], seen["tokens"], *seen["masks"])
        _, parts = objective(features, model.scale(), seen["images"], seen["tokens"])
    assert features.image_keep.shape == (16, 16)  # 16 of 64 patches kept
    assert metrics["train/loss_reconstruction"] == pytest.approx(
        parts["reconstruction"].item(), rel=1e-5
    )
    assert metrics["train/loss_reconstruction"] > 0
    assert metrics["train/loss"] == pytest.approx(
        parts["reconstruction"].item() + parts["contrastive"].item(), rel=1e-5
    )

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = model_state(load_checkpoint(ckpt))
    decoder = {k for k in state if k.startswith("objective.auxiliary.reconstruction.")}
    assert "objective.auxiliary.reconstruction.mask_token" in decoder
    unused = load_weights(build_model(ckpt), state, "test")  # the model builds without it
    assert set(unused) == decoder
    assert "not used by this model (modules: objective)" in caplog.text
