"""MAE pixel reconstruction as an auxiliary pre-training term (paper Table 1f).

FLIP §4 (Table 1f): "The reconstruction head follows the design in MAE: it has a small
decoder and reconstructs normalized image pixels. The reconstruction loss is added to the
contrastive loss." The paper gives no decoder size or loss weight; the defaults here are
MAE's (``mae_vit_large_patch16``: decoder 512 wide, 8 blocks, 16 heads, for ViT-B/L/H
alike; ``norm_pix_loss``) and weight 1 (a plain sum). The official FLIP code has no
decoder.

The decoder (MAE's ``forward_decoder``): a Linear from the encoder width to the decoder
width, a learned mask token in every dropped patch's place (the kept tokens unshuffled
by the encoder's kept indices), its own fixed 2-D sin-cos position embedding with a zero
slot for the class token, a few timm blocks, LayerNorm and a Linear to the p·p·3 pixels
of each patch. The loss is the MSE to the per-patch normalised pixels, averaged over the
*masked* patches of each sample: per sample, so gradient caching replays it exactly.

It lives in the objective (``objective.auxiliary.reconstruction``), not in the model:
evaluation and export never build it, and loading a checkpoint into the model reports
its tensors as unused.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from flip.models.clip import Features
from flip.models.transformer import transformer_blocks


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p·p·3), patches in row-major order (the ViT's), pixels
    (row, column, channel) within a patch as MAE's ``patchify``."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def normalized_pixels(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: each patch minus its mean, over sqrt(var + eps)
    (unbiased variance, as ``Tensor.var``)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """pred, target (B, N, P); masked (B, N) 1 where the patch was dropped -> (B,) the mean
    squared error per patch averaged over each sample's masked patches (0 if none)."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    return (per_patch * masked).sum(1) / masked.sum(1).clamp(min=1)


class PixelReconstruction(nn.Module):
    def __init__(
        self,
        encoder_width: int,  # the image tower's token width
        image_size: int,
        patch_size: int,
        width: int = 512,  # MAE's decoder_embed_dim
        depth: int = 8,  # MAE's decoder_depth
        heads: int = 16,  # MAE's decoder_num_heads
        mlp_ratio: float = 4.0,
        weight: float = 1.0,  # loss weight next to the contrastive loss
        norm_pix_loss: bool = True,  # MAE: per-patch normalised pixels as the target
    ):
        super().__init__()
        self.weight, self.patch_size, self.norm_pix_loss = weight, patch_size, norm_pix_loss
        grid = image_size // patch_size
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        pos = build_sincos2d_pos_embed([grid, grid], dim=width)  # (N, D), fixed
        pos = torch.cat([torch.zeros(1, width), pos])  # class-token slot: zeros, as MAE
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.blocks = transformer_blocks(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_size * patch_size * 3)
        nn.init.normal_(self.mask_token, std=0.02)  # MAE
        for m in (self.embed, self.pred):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.pos_embed.shape[1] - 1

    def decode(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Encoder tokens (B, [1 +] k, D) and the kept patch indices (B, k) (None: all)
        -> predicted pixels (B, N, p·p·3) of every patch."""
        B, N = tokens.shape[0], self.num_patches
        x = self.embed(tokens)  # (B, T, Dd)
        k = N if keep is None else keep.shape[1]
        cls = x[:, :-k]  # (B, 1, Dd) with a class token, (B, 0, Dd) without
        if keep is None:
            patches = x[:, -k:]
        else:  # unshuffle: kept tokens to their patch positions, the mask token elsewhere
            patches = (
                self.mask_token.to(x.dtype)
                .expand(B, N, -1)
                .scatter(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, -k:])
            )  # (B, N, Dd)
        pos = self.pos_embed if cls.shape[1] else self.pos_embed[:, 1:]
        x = torch.cat([cls, patches], dim=1) + pos
        x = self.pred(self.norm(self.blocks(x)))
        return x[:, cls.shape[1] :]  # (B, N, p·p·3), class token dropped

    def forward(
        self, features: Features, images: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """(B,) per-sample loss on the masked patches of ``images`` (B, 3, H, W)."""
        pred = self.decode(features.image_tokens, features.image_keep)
        dtype = torch.promote_types(pred.dtype, torch.float32)  # the loss in fp32 at least
        target = patchify(images, self.patch_size).to(dtype)
        if self.norm_pix_loss:
            target = normalized_pixels(target)
        masked = torch.zeros(pred.shape[:2], dtype=dtype, device=pred.device)  # (B, N)
        if features.image_keep is not None:  # 1 = dropped; no mask: nothing to reconstruct
            masked = (1 - masked).scatter(1, features.image_keep, 0.0)
        return masked_patch_loss(pred.to(dtype), target, masked)
