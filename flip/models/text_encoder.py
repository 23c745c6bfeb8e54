"""FLIP text encoder: a non-causal Transformer over WordPiece tokens.

As in the official code: learned position embedding, no causal mask and no padding
mask (every token attends to every token), final LayerNorm, and the first token's
output as the sentence feature. ``pool="mean"`` averages non-padding tokens instead.
"""
from typing import Literal

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

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
        self.blocks = nn.Sequential(
            *[Block(width, heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
              for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():  # recompute in backward
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) with L == context_length -> pooled features (B, width)."""
        if tokens.shape[1] != self.context_length:
            raise ValueError(
                f"expected {self.context_length} tokens per caption, got {tokens.shape[1]}"
            )
        x = self.token_embed(tokens) + self.pos_embed  # (B, L, D)
        x = self.norm(self._blocks(x))
        if self.pool == "first":
            return x[:, 0]
        keep = (tokens != PAD_ID).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (x * keep).sum(1) / keep.sum(1).clamp(min=1)
