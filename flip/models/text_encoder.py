"""FLIP text encoder: a non-causal Transformer over WordPiece tokens.

As in the official code: learned position embedding, no causal mask and no padding
mask (every token attends to every token), final LayerNorm, and the first token's
output as the sentence feature. ``pool="mean"`` averages non-padding tokens instead.

Text masking (paper Table 1c; the official JAX code raises ``NotImplementedError`` for
it, this goes beyond it) takes the same ``Mask`` as the image tower, after the position
embedding: ``k = int(L (1 - ratio))`` tokens are encoded (50 % of 32 -> a 16-token
sequence), chosen by the mask's kind:
- ``random``: k random positions;
- ``prioritized``: padding is dropped first (noise + 1 on [PAD]), then random among the
  real tokens: with at least k real tokens no padding is kept, with fewer all are kept;
- ``truncate``: the first k positions.
Pooling under masking: with ``pool="first"`` position 0 is always kept and comes first
(its noise is pinned below every other: bias -1), so the pooled token is the same
position as without masking; ``random``/``prioritized`` draw the other k - 1 among the
rest. With ``pool="mean"`` all k are drawn and the kept non-padding tokens are averaged.
"""

from typing import Literal

import torch
from torch import nn

from flip.masking import Mask
from flip.models.transformer import run_blocks, transformer_blocks
from flip.tokenizer import PAD_ID


class TextEncoder(nn.Module):
    def __init__(
        self,
        vocab_size: int = 30522,  # BERT-uncased WordPiece
        context_length: int = 32,
        width: int = 512,
        depth: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        pool: Literal["first", "mean"] = "first",
        grad_checkpointing: bool = False,  # activation checkpointing: memory for compute
        norm_eps: float = 1e-5,  # LayerNorm epsilon (official Flax/t5x: 1e-6)
        gelu_approximate: str = "none",  # "none" (erf) | "tanh" (official flax nn.gelu)
    ):
        super().__init__()
        if pool not in ("first", "mean"):
            raise ValueError(f"pool must be 'first' or 'mean', got {pool!r}")
        self.width, self.pool, self.context_length = width, pool, context_length
        self.grad_checkpointing = grad_checkpointing
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = transformer_blocks(
            width, depth, heads, mlp_ratio, norm_eps=norm_eps, gelu_approximate=gelu_approximate
        )
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def mask_bias(self, tokens: torch.Tensor, kind: str) -> torch.Tensor:
        """(B, L) bias added to the mask noise in [0, 1) (small is kept): +1 on padding
        for ``prioritized`` (dropped before any real token), and position 0 pinned to -1
        when it is the pooled token (kept, and first among the kept)."""
        bias = (
            (tokens == PAD_ID).float()
            if kind == "prioritized"
            else torch.zeros(tokens.shape, device=tokens.device)
        )
        if self.pool == "first":
            bias[:, 0] = -1.0
        return bias

    @property
    def num_tokens(self) -> int:
        return self.context_length

    def forward_features(
        self, tokens: torch.Tensor, mask: Mask | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens (B, L), L == context_length -> tokens after the final norm (B, k, D) and
        the kept positions (B, k) (None: all, in order). mask as ``ImageEncoder``'s."""
        if tokens.shape[1] != self.context_length:
            raise ValueError(
                f"expected {self.context_length} tokens per caption, got {tokens.shape[1]}"
            )
        mask = Mask() if mask is None else mask
        x = self.token_embed(tokens) + self.pos_embed  # (B, L, D)
        bias = self.mask_bias(tokens, mask.kind) if mask.ratio > 0 else None
        x, keep = mask.apply(x, bias)  # (B, k, D)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing)), keep

    def forward_head(
        self, x: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, k, D) from ``forward_features`` of ``tokens`` (B, L) -> pooled (B, D)."""
        if self.pool == "first":
            return x[:, 0]
        ids = tokens if keep is None else torch.gather(tokens, 1, keep)  # (B, k)
        valid = (ids != PAD_ID).unsqueeze(-1).to(x.dtype)  # (B, k, 1)
        return (x * valid).sum(1) / valid.sum(1).clamp(min=1)

    def forward(self, tokens: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """tokens (B, L) -> pooled features (B, width)."""
        x, keep = self.forward_features(tokens, mask)
        return self.forward_head(x, tokens, keep)
