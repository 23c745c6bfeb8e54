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
   Per-sample terms of the objective (``flip/objective.py``) are added in this pass.

Loss and gradients equal the one-shot full batch (tests/test_grad_cache.py). OpenCLIP's
``accum_freq`` re-draws the patch mask in step 3; this does not.
"""
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch

from flip.models.clip import FLIP
from flip.objective import Objective


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_backward(
    model: FLIP,
    objective: Objective,
    images: torch.Tensor,
    tokens: torch.Tensor,
    micro_batch: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Accumulate into ``.grad`` the gradients of the objective on the whole batch;
    return (loss, its parts, logit scale), detached.

    images (B, 3, H, W), tokens (B, L): this rank's batch, B a multiple of micro_batch.
    backward: how to backpropagate a scalar (Lightning: ``manual_backward``).
    no_sync: a context that suspends data-parallel gradient sync (all but the last
    micro-batch backward run inside it).
    """
    B, device = images.shape[0], images.device
    if B % micro_batch:
        raise ValueError(f"batch {B} is not a multiple of the micro-batch {micro_batch}")
    chunks = [slice(i, i + micro_batch) for i in range(0, B, micro_batch)]
    image_mask, text_mask = model.draw_masks(B, device)  # one mask per sample and tower

    states, image_features, text_features = [], [], []
    with torch.no_grad():  # 1. embed without graph
        for c in chunks:
            states.append(_rng_state(device))
            image_features.append(model.encode_image(images[c], image_mask[c]))
            text_features.append(model.encode_text(tokens[c], text_mask[c]))
    after = _rng_state(device)

    # 2. global contrastive loss, gradients w.r.t. the embeddings and the scale only
    image_all = torch.cat(image_features).requires_grad_()
    text_all = torch.cat(text_features).requires_grad_()
    scale = model.scale()
    contrastive = objective.contrastive(image_all, text_all, scale)
    grad_image, grad_text, grad_scale = torch.autograd.grad(
        contrastive, [image_all, text_all, scale])

    # 3. replay each micro-batch with graph, push the cached gradients through, add the
    # per-sample terms
    parts = {"contrastive": contrastive.detach()}
    for i, (c, state) in enumerate(zip(chunks, states)):
        last = i == len(chunks) - 1
        _set_rng_state(state, device)
        with nullcontext() if last else no_sync():
            features = model.forward_features(images[c], tokens[c], image_mask[c], text_mask[c])
            surrogate = (features.image * grad_image[c]).sum() + (features.text * grad_text[c]).sum()
            for name, term in objective.per_sample(features, images[c], tokens[c], B).items():
                surrogate = surrogate + term
                parts[name] = parts.get(name, 0.0) + term.detach()
            if last:  # the logit scale's gradient joins the synchronised backward
                surrogate = surrogate + model.scale() * grad_scale
            backward(surrogate)
    _set_rng_state(after, device)
    return sum(parts.values()), parts, scale.detach()
