"""The FLIP model: image and text towers, bias-free projections, learnable temperature.

A plain ``nn.Module`` usable without Lightning, with OpenCLIP's interface:
``encode_image``, ``encode_text`` and ``forward`` returning normalised features and
``logit_scale.exp()``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from flip.models.image_encoder import ImageEncoder
from flip.models.text_encoder import TextEncoder


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

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms."""
        return {"visual.cls_token", "text.pos_embed", "logit_scale"}

    def encode_image(
        self, images: torch.Tensor, mask_ratio: float | None = None,
        noise: torch.Tensor | None = None, normalize: bool = True,
    ) -> torch.Tensor:
        x = self.image_proj(self.visual(images, mask_ratio, noise))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_proj(self.text(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp of the logit scale clipped to [0, log 100], i.e. a scale in [1, 100].

        Clipped after exp so the bounds are exact in fp32; no host sync (XLA-friendly)."""
        return self.logit_scale.exp().clamp(1.0, math.exp(self.max_logit_scale))

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(images, noise=noise), self.encode_text(tokens), self.scale()
