"""Masked inference and complementary masked views (paper Table 1d,
flip.eval.masked_views), checked against hand-built masks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flip.errors import ConfigError
from flip.eval.masked_views import complementary_masks, encode_image_views, num_views, sample_noise
from flip.masking import Mask
from flip.models.clip import FLIP
from flip.models.image_encoder import ImageEncoder
from flip.models.text_encoder import TextEncoder

IMG, PATCH = 32, 8  # N = 16 patches


def _model():
    torch.manual_seed(0)
    return FLIP(
        ImageEncoder(IMG, PATCH, 32, 2, 2), TextEncoder(50, 8, 16, 1, 2), embed_dim=16
    ).eval()


def _images(b=5):
    return torch.randn(b, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _chunk_mask(chunk: torch.Tensor, num_patches: int, ratio: float) -> Mask:
    """A mask keeping exactly the patches ``chunk`` (B, k): noise 0 there, 1 elsewhere."""
    noise = torch.ones(chunk.shape[0], num_patches).scatter(1, chunk, 0.0)
    return Mask(ratio, noise)


@pytest.mark.parametrize(
    "n, ratio, views",
    [(16, 0.5, 2), (16, 0.75, 4), (196, 0.75, 4), (196, 0.5, 2), (64, 0.875, 8), (16, 0.0, 1)],
)
def test_views_cover_every_patch_exactly_once(n, ratio, views):
    noise = torch.rand(3, n, generator=torch.Generator().manual_seed(n))
    masks = complementary_masks(noise, ratio)
    assert len(masks) == views == num_views(n, ratio)
    x = torch.arange(n).expand(3, n).unsqueeze(-1)  # token = its own index
    kept = [m.apply(x)[0].squeeze(-1) if ratio else x.squeeze(-1) for m in masks]
    k = n // views
    for b in range(3):
        seen = torch.cat([v[b] for v in kept]).tolist()
        assert sorted(seen) == list(range(n))  # each patch exactly once
        perm = torch.argsort(noise[b]).tolist()  # view v = chunk v of one permutation
        for v in range(views):
            assert set(kept[v][b].tolist()) == set(perm[v * k : (v + 1) * k])


@pytest.mark.parametrize("n, ratio, k", [(64, 0.3, 44), (196, 0.6, 78), (10, 0.5, 5)])
def test_a_kept_count_that_does_not_divide_the_patches_is_refused(n, ratio, k):
    if n % k == 0:
        assert num_views(n, ratio) == n // k
        return
    with pytest.raises(
        ConfigError,
        match=f"masked_views=ensemble at mask={ratio} keeps k={k} of "
        f"the model's {n} patches and {k} does not divide {n}",
    ):
        num_views(n, ratio)


def test_noise_is_per_sample_and_seeded():
    noise = sample_noise(torch.tensor([7, 3]), 16, seed=2)
    ref = torch.tensor(np.random.default_rng([2, 3]).random(16), dtype=torch.float32)
    assert torch.equal(noise[1], ref)
    assert torch.equal(sample_noise(torch.tensor([3]), 16, seed=2)[0], ref)  # batch-independent
    assert not torch.equal(sample_noise(torch.tensor([3]), 16, seed=0)[0], ref)


def test_ensemble_of_one_view_at_ratio_0_equals_plain_inference():
    model, x = _model(), _images()
    out = encode_image_views(model, x, torch.arange(5), 0.0, "ensemble")
    torch.testing.assert_close(out, model.encode_image(x))
    assert torch.equal(
        encode_image_views(model, x, torch.arange(5), 0.0, "single"), model.encode_image(x)
    )


@pytest.mark.parametrize("ratio, k", [(0.5, 8), (0.75, 4)])
def test_masked_inference_feeds_the_blocks_1_plus_k_tokens(ratio, k):
    model, x = _model(), _images()
    seen = []
    hook = model.visual.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    index = torch.arange(10, 15)
    single = encode_image_views(model, x, index, ratio, "single", seed=3)
    ensemble = encode_image_views(model, x, index, ratio, "ensemble", seed=3)
    hook.remove()
    assert seen == [(5, 1 + k, 32)] * (1 + 16 // k)  # one single pass, N / k ensemble passes
    # single: the documented noise of each sample; the same result in any batch split
    noise = torch.tensor(
        np.stack([np.random.default_rng([3, i]).random(16) for i in range(10, 15)]),
        dtype=torch.float32,
    )
    torch.testing.assert_close(single, model.encode_image(x, Mask(ratio, noise)))
    torch.testing.assert_close(
        single[2:], encode_image_views(model, x[2:], index[2:], ratio, "single", seed=3)
    )
    assert not torch.allclose(single, model.encode_image(x), atol=1e-4)
    # ensemble: normalised mean of the normalised embeddings of the chunks of argsort(noise)
    perm = torch.argsort(noise, dim=1)
    views = [
        model.encode_image(x, _chunk_mask(perm[:, v * k : (v + 1) * k], 16, ratio))
        for v in range(16 // k)
    ]
    torch.testing.assert_close(ensemble, F.normalize(torch.stack(views).mean(0), dim=-1))


def test_unknown_views_are_refused():
    with pytest.raises(
        ConfigError, match="masked_views='all' is invalid: use one of single, ensemble"
    ):
        encode_image_views(_model(), _images(1), torch.arange(1), 0.5, "all")
