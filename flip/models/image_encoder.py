"""FLIP image encoder: a ViT built from timm blocks that encodes only visible patches.

Differences from a classification ViT, following the paper and the official code:
- no LayerNorm after the patch embedding (CLIP's ``ln_pre`` is absent);
- fixed (not learned) 2-D sin-cos position embedding, computed once as a buffer;
- random masking after the position embedding: given a ``Mask`` (training draws one per
  step, ``PretrainModule``), only ``k = int(N (1 - r))`` tokens enter the Transformer;
- final LayerNorm, then global average pooling. The official code keeps a class
  token and includes it in the average (``class_token=True, pool="avg"``); the
  paper's reading without class token is ``class_token=False``.

``sincos_layout`` orders the channels of the sin-cos table: ``timm`` (timm's
``build_sincos2d_pos_embed``: [sin h | sin w | cos h | cos w]) or ``official`` (the official
``posembed_util.get_2d_sincos_pos_embed``, as MAE: [sin w | cos w | sin h | cos h]). Same
frequencies; only weights trained with one layout work with it.
"""

from typing import Literal

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from torch import nn

from flip.masking import Mask
from flip.models.transformer import run_blocks, transformer_blocks


class ImageEncoder(nn.Module):
    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,  # token dimension
        depth: int = 12,  # number of Transformer blocks
        heads: int = 12,
        mlp_ratio: float = 4.0,
        class_token: bool = True,  # official: kept and averaged with the patches
        pool: Literal["avg", "token"] = "avg",
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,  # activation checkpointing: memory for compute
        norm_eps: float = 1e-5,  # LayerNorm epsilon (official Flax/t5x: 1e-6)
        gelu_approximate: str = "none",  # "none" (erf) | "tanh" (official flax nn.gelu)
        sincos_layout: Literal["timm", "official"] = "timm",  # channel order, see above
    ):
        super().__init__()
        if pool not in ("avg", "token"):
            raise ValueError(f"pool must be 'avg' or 'token', got {pool!r}")
        if pool == "token" and not class_token:
            raise ValueError("pool='token' needs class_token=True")
        if sincos_layout not in ("timm", "official"):
            raise ValueError(f"sincos_layout must be 'timm' or 'official', got {sincos_layout!r}")
        self.width, self.pool = width, pool
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, width)  # no norm layer
        grid = self.patch_embed.grid_size
        pos = build_sincos2d_pos_embed(list(grid), dim=width)  # (N, D), fixed
        if sincos_layout == "official":  # quarters [sin h, sin w, cos h, cos w] -> w first
            pos = pos.view(pos.shape[0], 4, width // 4)[:, [1, 3, 0, 2]].flatten(1)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None
        self.blocks = transformer_blocks(
            width, depth, heads, mlp_ratio, drop_path, norm_eps, gelu_approximate
        )
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self._init_weights()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def _init_weights(self) -> None:
        # MAE/timm: xavier on the flattened patch projection, normal(0.02) class token.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def forward_features(
        self, images: torch.Tensor, mask: Mask | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, 3, H, W) -> tokens after the final norm (B, [1 +] k, D), class token
        first, and the kept patch indices (B, k) into the N patches (None: all, in order).

        mask: which patches to drop (training's draw, masked inference, or a replay of a
        drawn mask); None keeps every patch.
        """
        mask = Mask() if mask is None else mask
        if mask.kind != "random":  # the kinds of Table 1c are for text
            raise ValueError(f"image masking is random only; mask kind {mask.kind!r} is for text")
        x = self.patch_embed(images) + self.pos_embed  # (B, N, D)
        x, keep = mask.apply(x)  # (B, k, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing)), keep

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, D) -> pooled features (B, D)."""
        return tokens[:, 0] if self.pool == "token" else tokens.mean(dim=1)

    def forward(self, images: torch.Tensor, mask: Mask | None = None) -> torch.Tensor:
        """images (B, 3, H, W) -> pooled features (B, width)."""
        return self.forward_head(self.forward_features(images, mask)[0])
