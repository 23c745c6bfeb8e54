"""The FLIP model: image and text towers, bias-free projections, learnable temperature.

A plain ``nn.Module`` usable without Lightning, with OpenCLIP's interface:
``encode_image``, ``encode_text`` and ``forward`` returning normalised features and
``logit_scale.exp()``. ``forward_features`` also returns each tower's tokens and kept
indices, for objectives and heads that need more than the pooled embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flip.masking import Mask
from flip.models.image_encoder import ImageEncoder
from flip.models.text_encoder import TextEncoder


@dataclass
class Features:
    """One forward pass of both towers."""

    image: torch.Tensor  # (B, E) normalised image embeddings
    text: torch.Tensor  # (B, E) normalised text embeddings
    image_tokens: torch.Tensor  # (B, T, D) after the final norm, class token first if any
    image_keep: torch.Tensor | None  # (B, k) kept patch indices; None = all patches
    text_tokens: torch.Tensor  # (B, k', D')
    text_keep: torch.Tensor | None  # (B, k') kept token positions; None = all


def no_decay_names(module: nn.Module) -> set[str]:
    """The official FLIP code's no-decay set of any module: biases, LayerNorm scales and
    position embeddings (``opt_util.filter_bias_and_norm`` and ``filter_posembed``)."""
    norms = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, nn.LayerNorm)}
    return {
        n
        for n, _ in module.named_parameters()
        if n.endswith(".bias") or n in norms or "pos_embed" in n
    }


class FLIP(nn.Module):
    def __init__(
        self,
        image: ImageEncoder,
        text: TextEncoder,
        embed_dim: int = 512,  # joint embedding size
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = math.log(100),
    ):
        super().__init__()
        self.visual, self.text = image, text
        self.image_proj = nn.Linear(image.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.width, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text.width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))
        self.max_logit_scale = max_logit_scale

    def no_weight_decay(self, official: bool = True) -> set[str]:
        """Names of the parameters AdamW must not decay.

        official (the FLIP code: t5x ``filter_bias_and_norm`` + ``filter_posembed``):
        biases, LayerNorm scales and position embeddings; the class token and the logit
        scale *are* decayed. official=False: the official config's comment ("bias, norm,
        cls, posembed"), which also spares the class token and the logit scale.
        """
        names = no_decay_names(self)
        return names if official else names | {"visual.cls_token", "logit_scale"}

    def forward_features(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        image_mask: Mask | None = None,
        text_mask: Mask | None = None,
    ) -> Features:
        return Features(
            **self.forward_image(images, image_mask), **self.forward_text(tokens, text_mask)
        )

    def forward_image(self, images: torch.Tensor, mask: Mask | None = None) -> dict:
        """The image tower's fields of ``Features`` (gradient caching runs a tower alone)."""
        tokens, keep = self.visual.forward_features(images, mask)
        image = self.image_proj(self.visual.forward_head(tokens))
        return {"image": F.normalize(image, dim=-1), "image_tokens": tokens, "image_keep": keep}

    def forward_text(self, tokens: torch.Tensor, mask: Mask | None = None) -> dict:
        """The text tower's fields of ``Features``."""
        x, keep = self.text.forward_features(tokens, mask)
        text = self.text_proj(self.text.forward_head(x, tokens, keep))
        return {"text": F.normalize(text, dim=-1), "text_tokens": x, "text_keep": keep}

    def encode_image(
        self, images: torch.Tensor, mask: Mask | None = None, normalize: bool = True
    ) -> torch.Tensor:
        x = self.image_proj(self.visual(images, mask))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, tokens: torch.Tensor, mask: Mask | None = None, normalize: bool = True
    ) -> torch.Tensor:
        x = self.text_proj(self.text(tokens, mask))
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp of the logit scale clipped to [0, log 100] (the official code's
        ``exp(clip(logit_scale, 0, log 100))``). The clip passes gradients at its bounds,
        and ``clamp_logit_scale_`` keeps the parameter within them after each step, so a
        scale that reaches the bound can come back."""
        return self.logit_scale.clamp(0.0, self.max_logit_scale).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clip the parameter itself to [0, max] (after an optimiser step): above the
        bound its gradient would be 0 for good."""
        self.logit_scale.clamp_(0.0, self.max_logit_scale)

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        image_mask: Mask | None = None,
        text_mask: Mask | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.encode_image(images, image_mask),
            self.encode_text(tokens, text_mask),
            self.scale(),
        )
