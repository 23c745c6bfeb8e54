"""Token masking (FLIP §3, MAE's `random_masking`) and the mask spec both towers take.

Per sample: draw uniform noise over the N tokens, argsort it, keep the first
``k = int(N * (1 - ratio))``. ``k`` depends only on ``N`` and the ratio, never on the
data, so shapes are static (XLA and ``torch.compile`` see one graph).

A :class:`Mask` says what one forward pass of one tower drops: the ratio, the kind and,
to replay a mask exactly (gradient caching re-runs a micro-batch), the noise that drew
it. Masks are a training setting, not architecture: the task config holds them
(``task.image_mask``, ``task.text_mask``: ratio and kind), ``PretrainModule`` draws one
per tower for a whole batch and passes them to the model's forward; encoders called
without a mask keep every token. Slicing a mask by batch rows gives a micro-batch's part.

Kinds (paper Table 1c; images use ``random`` only):
- ``random``: the k tokens of lowest noise;
- ``prioritized``: the same with a bias added to the noise (the official code's
  ``random_mask(rng, x, ratio, bias)``: small is kept, large is removed): the text
  encoder gives padding tokens +1, so they are dropped before any real token;
- ``truncate``: the first k tokens (no noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("random", "prioritized", "truncate")


def num_visible(num_tokens: int, ratio: float) -> int:
    """Number of tokens kept at masking ratio ``ratio`` (at least one)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return max(1, int(num_tokens * (1.0 - ratio)))


@dataclass(frozen=True)
class Mask:
    """What one forward pass of one tower drops.

    ratio: fraction of tokens dropped; 0 keeps every token in order.
    noise: (B, N) uniform noise; the same noise gives the same mask. None: drawn afresh.
    kind: which tokens are kept (``KINDS``, see the module docstring).
    """

    ratio: float = 0.0
    noise: torch.Tensor | None = None
    kind: str = "random"

    def __post_init__(self) -> None:
        num_visible(1, self.ratio)  # validates the ratio
        if self.kind not in KINDS:
            raise ValueError(f"mask kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def __getitem__(self, rows) -> Mask:
        """The mask of a subset of the batch (e.g. ``mask[0:32]`` for a micro-batch)."""
        return self if self.noise is None else Mask(self.ratio, self.noise[rows], self.kind)

    def drawn(self, batch: int, num_tokens: int, device: torch.device | str) -> Mask:
        """This mask with its noise drawn now (a no-op at ratio 0, for truncation or
        when already drawn)."""
        if self.ratio == 0 or self.kind == "truncate" or self.noise is not None:
            return self
        return Mask(self.ratio, torch.rand(batch, num_tokens, device=device), self.kind)

    def apply(
        self, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, D) -> the kept tokens (B, k, D) and their indices (B, k) into N;
        (x, None) at ratio 0.

        bias: (B, N) added to the noise (small is kept); ``prioritized`` needs it (its
        padding bias), ``truncate`` ignores it.
        """
        if self.ratio == 0:
            return x, None
        if self.kind == "truncate":
            B, N, D = x.shape
            k = num_visible(N, self.ratio)
            keep = torch.arange(k, device=x.device).expand(B, k)  # (B, k) the prefix
            return x[:, :k], keep
        if self.kind == "prioritized" and bias is None:
            raise ValueError(
                "prioritized masking needs the padding bias of the tokens "
                "(the text encoder gives it)"
            )
        noise = self.noise
        if bias is not None:
            if noise is None:
                noise = torch.rand(bias.shape, device=x.device)
            noise = noise + bias
        return random_masking(x, self.ratio, noise)


def random_masking(
    x: torch.Tensor, ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample.

    x: (B, N, D) tokens (position embedding already added).
    noise: optional (B, N) uniform noise; passing the same noise reproduces the same
        mask (gradient caching re-runs a micro-batch with its first-pass mask).
    Returns the visible tokens (B, k, D) and their indices (B, k) into N.
    """
    B, N, D = x.shape
    k = num_visible(N, ratio)
    if noise is None:
        noise = torch.rand(B, N, device=x.device)  # drawn on the device: no host sync
    elif noise.shape != (B, N):
        raise ValueError(f"mask noise has shape {tuple(noise.shape)}, expected {(B, N)}")
    keep = torch.argsort(noise, dim=1)[:, :k]  # (B, k) ascending noise is kept
    visible = torch.gather(x, 1, keep.unsqueeze(-1).expand(B, k, D))  # (B, k, D)
    return visible, keep
