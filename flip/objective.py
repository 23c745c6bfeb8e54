"""Pre-training objectives: the contrastive loss plus optional per-sample terms.

The contrastive term couples every pair of the global batch; auxiliary terms (e.g. a
reconstruction loss on masked patches) are per sample. That split is what gradient
caching needs (``flip/grad_cache.py``): the coupled term goes through cached embedding
gradients, the per-sample terms are added in the replay pass of each micro-batch.

An auxiliary term is an ``nn.Module`` (its parameters train with the model and are
saved under ``objective.auxiliary.<name>``) with a ``weight`` attribute and
``forward(features, images, tokens) -> (B,)`` per-sample losses.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from flip.loss import global_contrastive_loss
from flip.models.clip import Features


class Objective(nn.Module):
    def __init__(self, auxiliary: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.auxiliary = nn.ModuleDict(dict(auxiliary or {}))

    def contrastive(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """This rank's share of the global-batch InfoNCE (fp32)."""
        return global_contrastive_loss(image, text, scale)

    def per_sample(
        self, features: Features, images: torch.Tensor, tokens: torch.Tensor, batch: int
    ) -> dict[str, torch.Tensor]:
        """Each auxiliary term, weighted, summed over these samples and divided by
        ``batch`` (this rank's batch size): micro-batch parts add up to the batch mean."""
        return {
            name: term.weight * term(features, images, tokens).float().sum() / batch
            for name, term in self.auxiliary.items()
        }

    def forward(
        self, features: Features, scale: torch.Tensor, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss of a whole batch and its parts (``contrastive`` and each term)."""
        parts = {"contrastive": self.contrastive(features.image, features.text, scale)}
        parts.update(self.per_sample(features, images, tokens, images.shape[0]))
        return sum(parts.values()), parts
