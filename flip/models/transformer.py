"""The Transformer trunk both towers use: timm ViT blocks (pre-norm, no causal mask).

``norm_eps`` and ``gelu_approximate`` default to torch's LayerNorm (eps 1e-5) and exact
(erf) GELU. The official FLIP model uses Flax's values: t5x ``LayerNorm(epsilon=1e-6)`` and
``flax.linen.gelu`` (tanh approximation by default) in ``models_flip.MlpBlock``; the
``vit_*`` configs set them so that the released weights compute the official function.
"""

from functools import partial

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn


def transformer_blocks(
    width: int,
    depth: int,
    heads: int,
    mlp_ratio: float = 4.0,
    drop_path: float = 0.0,
    norm_eps: float = 1e-5,
    gelu_approximate: str = "none",
) -> nn.Sequential:
    """``depth`` timm Blocks with xavier-uniform Linear weights and zero biases (MAE/timm).
    drop_path: the stochastic-depth rate of the last block; block i drops at
    ``drop_path * i / (depth - 1)`` (timm's and MAE's linear rule, used by fine-tuning).
    gelu_approximate: "none" (exact erf) or "tanh", as ``torch.nn.GELU``."""
    if gelu_approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_approximate must be 'none' or 'tanh', got {gelu_approximate!r}")
    blocks = nn.Sequential(
        *[
            Block(
                width,
                heads,
                mlp_ratio,
                qkv_bias=True,
                drop_path=rate,
                norm_layer=partial(nn.LayerNorm, eps=norm_eps),
                act_layer=partial(nn.GELU, approximate=gelu_approximate),
            )
            for rate in torch.linspace(0, drop_path, depth, device="cpu").tolist()
        ]
    )
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
