"""Masked inference and complementary masked views (paper Table 1d) for evaluation.

``views="single"``: every image is encoded once with ``k = int(N (1 - ratio))`` of its N
patches, chosen at random (``mask=0.5`` in ``eval.py``).

``views="ensemble"``: ``V = N / k`` complementary views (``1 / (1 - ratio)``: 2 at 50 %,
4 at 75 %). One random permutation of the N patches per image is split into V
consecutive chunks of k; view v encodes chunk v, so together the views hold every patch
exactly once. The image embedding is the normalised mean of the V normalised view
embeddings (as a zero-shot class embedding is of its prompts). When k does not divide N
(e.g. N = 64 at ratio 0.3: k = 44) no equal-size views cover every patch exactly once:
:func:`num_views` refuses the ratio with one sentence rather than repeat or drop patches.

The noise is deterministic: sample ``i`` of a dataset draws its N uniforms from
``numpy.random.default_rng([seed, i])`` (``seed`` is ``eval.py``'s ``seed``), so the
masks do not depend on batch size, order or the number of devices.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from flip.errors import ConfigError
from flip.masking import Mask, num_visible

VIEWS = ("single", "ensemble")


def check_views(views: str) -> None:
    """``masked_views`` names one of ``VIEWS``, or a ConfigError saying which it may be."""
    if views not in VIEWS:
        raise ConfigError(f"masked_views={views!r} is invalid: use one of {', '.join(VIEWS)}")


def num_views(num_patches: int, ratio: float) -> int:
    """How many complementary views of k = int(N (1 - ratio)) patches cover the N patches
    exactly once: N / k, or a ConfigError if k does not divide N."""
    k = num_visible(num_patches, ratio)
    if num_patches % k:
        raise ConfigError(
            f"masked_views=ensemble at mask={ratio} keeps k={k} of the model's {num_patches} "
            f"patches and {k} does not divide {num_patches}, so no set of such views covers "
            "every patch exactly once; choose a mask whose kept count divides it (e.g. 0.5, 0.75)"
        )
    return num_patches // k


def sample_noise(index: torch.Tensor, num_patches: int, seed: int = 0) -> torch.Tensor:
    """(B, N) uniform noise, row b from ``numpy.random.default_rng([seed, index[b]])``."""
    rows = [np.random.default_rng([seed, i]).random(num_patches) for i in index.tolist()]
    return torch.from_numpy(np.stack(rows)).float()


def complementary_masks(noise: torch.Tensor, ratio: float) -> list[Mask]:
    """noise (B, N) -> the V = N / k masks whose kept patches are the consecutive chunks
    of k of each row's permutation ``argsort(noise)``: view v keeps the patches of rank
    v k … v k + k - 1 (its noise is the rank shifted by v k, modulo N)."""
    N = noise.shape[1]
    k, V = num_visible(N, ratio), num_views(N, ratio)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # (B, N) place in the permutation
    return [Mask(ratio, ((rank - v * k) % N).float()) for v in range(V)]


@torch.no_grad()
def encode_image_views(
    model,
    images: torch.Tensor,
    index: torch.Tensor,
    ratio: float = 0.0,
    views: str = "single",
    seed: int = 0,
) -> torch.Tensor:
    """(B, E) normalised image embeddings of ``images`` (B, 3, H, W), sample ids ``index``
    (B,), with masked inference at ``ratio`` (``views``: "single" or "ensemble")."""
    check_views(views)
    if ratio == 0 and views == "single":
        return model.encode_image(images)
    noise = sample_noise(index, model.visual.num_patches, seed).to(images.device)
    if views == "single":
        return model.encode_image(images, Mask(ratio, noise))
    embeddings = [model.encode_image(images, mask) for mask in complementary_masks(noise, ratio)]
    return F.normalize(torch.stack(embeddings).mean(0), dim=-1)
