"""Gradient caching: an exact large contrastive batch from micro-batches.

The contrastive loss couples every pair of the batch, so plain gradient accumulation
over micro-batches changes the loss (fewer negatives). Gradient caching (Gao et al.,
2021) keeps it exact at the memory of one micro-batch plus the embeddings:

1. embed every micro-batch without an autograd graph, drawing its patch mask and
   recording the random-number state (dropout, drop-path);
2. compute the global-batch loss on all embeddings (gathered across ranks) and
   differentiate it w.r.t. the embeddings and the logit scale only;
3. re-run each micro-batch with autograd, *with the same mask and RNG state*, and
   backpropagate the cached embedding gradients through it (``<f, g>`` surrogate);
   gradients accumulate in ``.grad``; data-parallel sync runs on the last one only.

Loss and gradients equal the one-shot full batch (tests/test_grad_cache.py). OpenCLIP's
``accum_freq`` re-draws the patch mask in step 3; this does not.
"""
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

from flip.loss import global_contrastive_loss
from flip.models.clip import FLIP


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_contrastive_backward(
    model: FLIP,
    images: torch.Tensor,
    tokens: torch.Tensor,
    micro_batch: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate into ``.grad`` the gradients of the global-batch loss; return
    (loss, logit scale), detached.

    images (B, 3, H, W), tokens (B, L): this rank's batch, B a multiple of micro_batch.
    backward: how to backpropagate a scalar (Lightning: ``manual_backward``).
    no_sync: a context that suspends data-parallel gradient sync (all but the last
    micro-batch backward run inside it).
    """
    B, device = images.shape[0], images.device
    if B % micro_batch:
        raise ValueError(f"batch {B} is not a multiple of the micro-batch {micro_batch}")
    chunks = [slice(i, i + micro_batch) for i in range(0, B, micro_batch)]
    noise = torch.rand(B, model.visual.num_patches, device=device)  # one mask per sample

    states, image_features, text_features = [], [], []
    with torch.no_grad():  # 1. embed without graph
        for c in chunks:
            states.append(_rng_state(device))
            image_features.append(model.encode_image(images[c], noise=noise[c]))
            text_features.append(model.encode_text(tokens[c]))
    after = _rng_state(device)

    # 2. global loss, gradients w.r.t. the embeddings and the scale only
    image_all = torch.cat(image_features).requires_grad_()
    text_all = torch.cat(text_features).requires_grad_()
    scale = model.scale()
    loss = global_contrastive_loss(image_all, text_all, scale)
    grad_image, grad_text, grad_scale = torch.autograd.grad(loss, [image_all, text_all, scale])

    # 3. replay each micro-batch with graph and push the cached gradients through
    for i, (c, state) in enumerate(zip(chunks, states)):
        last = i == len(chunks) - 1
        _set_rng_state(state, device)
        with nullcontext() if last else no_sync():
            surrogate = (model.encode_image(images[c], noise=noise[c]) * grad_image[c]).sum()
            surrogate = surrogate + (model.encode_text(tokens[c]) * grad_text[c]).sum()
            if last:  # the logit scale's gradient joins the synchronised backward
                surrogate = surrogate + model.scale() * grad_scale
            backward(surrogate)
    _set_rng_state(after, device)
    return loss.detach(), scale.detach()
