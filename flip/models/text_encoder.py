"""FLIP text encoder: a non-causal Transformer over WordPiece tokens.

As in the official code: learned position embedding, no causal mask and no padding
mask (every token attends to every token), final LayerNorm, and the first token's
output as the sentence feature. ``pool="mean"`` averages non-padding tokens instead.
"""
from typing import Literal

import torch
from torch import nn

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
        grad_checkpointing: bool = False,  # activation checkpointing: memory for compute
    ):
        super().__init__()
        if pool not in ("first", "mean"):
            raise ValueError(f"pool must be 'first' or 'mean', got {pool!r}")
        self.width, self.pool, self.context_length = width, pool, context_length
        self.grad_checkpointing = grad_checkpointing
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = transformer_blocks(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) with L == context_length -> pooled features (B, width)."""
        if tokens.shape[1] != self.context_length:
            raise ValueError(
                f"expected {self.context_length} tokens per caption, got {tokens.shape[1]}"
            )
        x = self.token_embed(tokens) + self.pos_embed  # (B, L, D)
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
        if self.pool == "first":
            return x[:, 0]
        keep = (tokens != PAD_ID).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1)
