"""The Transformer trunk both towers use: timm ViT blocks (pre-norm, no causal mask)."""
import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn


def transformer_blocks(width: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                       drop_path: float = 0.0) -> nn.Sequential:
    """``depth`` timm Blocks with xavier-uniform Linear weights and zero biases (MAE/timm)."""
    blocks = nn.Sequential(*[
        Block(width, heads, mlp_ratio, qkv_bias=True, drop_path=drop_path,
              norm_layer=nn.LayerNorm) for _ in range(depth)])
    for m in blocks.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return blocks


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """x (B, L, D) through the blocks; with checkpointing, activations are recomputed in
    backward instead of stored."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint_seq(blocks, x)
    return blocks(x)
