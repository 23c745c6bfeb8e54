"""Symmetric InfoNCE over the global batch (CLIP / FLIP contrastive loss).

Under data parallelism each rank all-gathers the features of every rank *with
gradients* (``torch.distributed.nn.functional.all_gather``) so its rows are contrasted
with all ``global_batch`` negatives. Each rank computes the loss of its own rows only
(the "local loss" of OpenCLIP): its logits are (local, global) rather than
(global, global). DDP averages gradients over ranks, which makes both the loss and
the gradients equal to those of the one-process full-batch loss.
"""

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def _no_autocast(device_type: str) -> AbstractContextManager:
    """Disable autocast on ``device_type`` if it is on (meta tensors have no autocast)."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, D) from all ranks along dim 0, keeping the autograd graph."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image: torch.Tensor | None = None,
    all_text: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """InfoNCE of local rows against all columns.

    image, text: (b, D) normalised local features; all_image, all_text: (B, D) features
    of the whole global batch (default: the local ones); rows ``offset .. offset+b`` of
    the global batch are the local ones. logit_scale: the scale itself (exp already
    applied). Computed in fp32.
    """
    all_image = image if all_image is None else all_image
    all_text = text if all_text is None else all_text
    labels = torch.arange(offset, offset + image.shape[0], device=image.device)
    with _no_autocast(image.device.type):  # fp32 even under bf16 autocast
        scale = logit_scale.float()
        logits_i2t = scale * image.float() @ all_text.float().T  # (b, B)
        logits_t2i = scale * text.float() @ all_image.float().T  # (b, B)
        return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def global_contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """This rank's share of the global-batch loss (equal per-rank batch sizes)."""
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)
    rank = dist.get_rank() if all_image is not image else 0
    return contrastive_loss(image, text, logit_scale, all_image, all_text, rank * image.shape[0])
