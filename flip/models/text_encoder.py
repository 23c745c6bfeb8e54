"""FLIP text encoder: a non-causal Transformer over WordPiece tokens.

As in the official code: learned position embedding, no causal mask and no padding
mask (every token attends to every token), final LayerNorm, and the first token's
output as the sentence feature. ``pool="mean"`` averages non-padding tokens instead.

Text masking takes the same ``Mask`` as the image tower (random tokens kept after the
position embedding). First-token pooling is not defined on a masked sequence (position 0
may be dropped), so masking needs ``pool="mean"``.
"""
from typing import Literal

import torch
from torch import nn

from flip.masking import Mask
from flip.models.transformer import run_blocks, transformer_blocks

PAD_ID = 0  # [PAD] in the BERT vocabulary


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
        mask_ratio: float = 0.0,  # fraction of tokens dropped in training (needs pool="mean")
        grad_checkpointing: bool = False,  # activation checkpointing: memory for compute
        norm_eps: float = 1e-5,  # LayerNorm epsilon (official Flax/t5x: 1e-6)
        gelu_approximate: str = "none",  # "none" (erf) | "tanh" (official flax nn.gelu)
    ):
        super().__init__()
        if pool not in ("first", "mean"):
            raise ValueError(f"pool must be 'first' or 'mean', got {pool!r}")
        self.width, self.pool, self.context_length = width, pool, context_length
        self.mask_ratio = Mask(mask_ratio).ratio
        self._check_pool(self.mask_ratio)
        self.grad_checkpointing = grad_checkpointing
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = transformer_blocks(width, depth, heads, mlp_ratio,
                                         norm_eps=norm_eps, gelu_approximate=gelu_approximate)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def _check_pool(self, ratio: float) -> None:
        if ratio > 0 and self.pool == "first":
            raise ValueError(f"text masking (ratio {ratio}) needs pool='mean': the first "
                             "token may be masked out")

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
        if mask is None:
            mask = Mask(self.mask_ratio if self.training else 0.0)
        self._check_pool(mask.ratio)
        x = self.token_embed(tokens) + self.pos_embed  # (B, L, D)
        x, keep = mask.apply(x)  # (B, k, D)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing)), keep

    def forward_head(self, x: torch.Tensor, tokens: torch.Tensor,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
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
