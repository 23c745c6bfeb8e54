"""Random patch masking (FLIP §3, MAE's `random_masking`).

Per sample: draw uniform noise over the N patch tokens, argsort it, keep the first
``k = int(N * (1 - ratio))``. ``k`` depends only on ``N`` and the ratio, never on the
data, so shapes are static (XLA and ``torch.compile`` see one graph).
"""
import torch


def num_visible(num_patches: int, ratio: float) -> int:
    """Number of patch tokens kept at masking ratio ``ratio`` (at least one)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return max(1, int(num_patches * (1.0 - ratio)))


def random_masking(
    x: torch.Tensor, ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample.

    x: (B, N, D) patch tokens (position embedding already added).
    noise: optional (B, N) uniform noise; passing the same noise reproduces the same
        mask (gradient caching re-runs a micro-batch with its first-pass mask).
    Returns the visible tokens (B, k, D) and their indices (B, k) into N.
    """
    B, N, D = x.shape
    k = num_visible(N, ratio)
    if noise is None:
        noise = torch.rand(B, N, device=x.device)  # drawn on the device: no host sync
    keep = torch.argsort(noise, dim=1)[:, :k]  # (B, k) ascending noise is kept
    visible = torch.gather(x, 1, keep.unsqueeze(-1).expand(B, k, D))  # (B, k, D)
    return visible, keep
