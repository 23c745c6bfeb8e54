"""Gradient caching: an exact large contrastive batch from micro-batches.

The contrastive loss couples every pair of the batch, so plain gradient accumulation
over micro-batches changes the loss (fewer negatives). Gradient caching (Gao et al.,
2021) keeps it exact at the memory of one micro-batch plus the embeddings:

1. embed every micro-batch under its rows of the batch's masks (drawn once by the
   caller, ``PretrainModule.draw_masks``), recording the random-number
   state (dropout, drop-path) of those that will be replayed. All but the last run
   without a graph (``no_grad``; not ``inference_mode``: its tensors break bf16 autocast's
   weight cache, reused by the graph passes, and XLA's tensors); the last keeps its graph, and its per-sample terms are
   computed at once: it is never replayed;
2. compute the global-batch loss on all embeddings (gathered across ranks) and
   differentiate it w.r.t. the embeddings and the logit scale only;
3. backpropagate the cached embedding gradients (``<f, g>`` surrogate) through the kept
   graph of the last micro-batch, which frees it; then re-run each other micro-batch
   with autograd, *with the same mask and RNG state*, and backpropagate likewise.
   Per-sample terms of the objective (``flip/objective.py``) join each backward.
   Gradients accumulate in ``.grad``; data-parallel sync runs on the final backward only,
   which also carries the logit scale's gradient.

Step 3 holds one micro-batch graph at a time, as plain accumulation does: the kept graph
is gone before the first replay. Cost: n forward-backward passes plus n - 1 graph-free
forwards, against n + n for replaying every micro-batch.

``keep_text_graph`` keeps the text tower's graph of every micro-batch from step 1, so
replays run the image tower only. It saves n - 1 text forwards for the memory of n text
graphs (the smaller tower: for ViT-B/16 at mask 0.5, 32 tokens x 512 against 99 x 768,
about a fifth of the image tower's activations per sample); off by default, as caching is
for when memory is short (measured in docs/performance.md).

Loss and gradients equal the one-shot full batch (tests/test_grad_cache.py). OpenCLIP's
``accum_freq`` re-draws the patch mask in step 3; this does not.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from flip.masking import Mask
from flip.models.clip import FLIP, Features
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
    masks: tuple[Mask, Mask],
    micro_batch: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    keep_text_graph: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Accumulate into ``.grad`` the gradients of the objective on the whole batch;
    return (loss, its parts, logit scale), detached.

    images (B, 3, H, W), tokens (B, L): this rank's batch, B a multiple of micro_batch.
    masks: the (image, text) masks of the whole batch, noise drawn (``Mask.drawn``):
    each micro-batch runs both its passes under its rows of them.
    backward: how to backpropagate a scalar (Lightning: ``manual_backward``).
    no_sync: a context that suspends data-parallel gradient sync (every backward but the
    final one runs inside it).
    keep_text_graph: keep each micro-batch's text graph from step 1 instead of replaying
    the text tower.
    """
    B, device = images.shape[0], images.device
    if B % micro_batch:
        raise ValueError(f"batch {B} is not a multiple of the micro-batch {micro_batch}")
    *replayed, kept = [slice(i, i + micro_batch) for i in range(0, B, micro_batch)]
    image_mask, text_mask = masks  # one mask per sample and tower

    # 1. embed the micro-batches to replay without graph (the text tower with graph when
    # kept), then the last one with graph and its per-sample terms
    states, image_features, texts = [], [], []
    for c in replayed:
        states.append(_rng_state(device))
        with torch.no_grad():
            image_features.append(model.encode_image(images[c], image_mask[c]))
            if not keep_text_graph:
                texts.append({"text": model.encode_text(tokens[c], text_mask[c])})
        if keep_text_graph:  # the text tower never runs without grad here
            texts.append(model.forward_text(tokens[c], text_mask[c]))
    # autocast caches each weight's low-precision copy for the region; one made without
    # grad would be reused by the graph passes, leaving that weight without gradient
    torch.clear_autocast_cache()
    last = model.forward_features(images[kept], tokens[kept], image_mask[kept], text_mask[kept])
    last_terms = objective.per_sample(last, images[kept], tokens[kept], B)
    after = _rng_state(device)

    # 2. global contrastive loss, gradients w.r.t. the embeddings and the scale only
    image_all = torch.cat([*image_features, last.image.detach()]).requires_grad_()
    text_all = torch.cat(
        [*(t["text"].detach() for t in texts), last.text.detach()]
    ).requires_grad_()
    scale = model.scale()
    contrastive = objective.contrastive(image_all, text_all, scale)
    grad_image, grad_text, grad_scale = torch.autograd.grad(
        contrastive, [image_all, text_all, scale]
    )

    # 3. backpropagate through the kept graph first (freeing it), then replay the others
    # with their first-pass mask and RNG state; the final backward syncs and carries the
    # logit scale's gradient
    parts = {"contrastive": contrastive.detach()}
    backwards = [(kept, None, None), *zip(replayed, states, texts)]
    for i, (c, state, text) in enumerate(backwards):
        final = i == len(backwards) - 1
        with nullcontext() if final else no_sync():
            if state is None:
                features, terms = last, last_terms
            else:
                _set_rng_state(state, device)
                features = (
                    Features(**model.forward_image(images[c], image_mask[c]), **text)
                    if keep_text_graph
                    else model.forward_features(images[c], tokens[c], image_mask[c], text_mask[c])
                )
                terms = objective.per_sample(features, images[c], tokens[c], B)
            surrogate = (features.image * grad_image[c]).sum() + (
                features.text * grad_text[c]
            ).sum()
            for name, term in terms.items():
                surrogate = surrogate + term
                parts[name] = parts.get(name, 0.0) + term.detach()
            if final:  # the logit scale's gradient joins the synchronised backward
                surrogate = surrogate + model.scale() * grad_scale
            backward(surrogate)
    _set_rng_state(after, device)
    return sum(parts.values()), parts, scale.detach()
