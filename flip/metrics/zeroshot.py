"""Evaluation metrics beyond torchmetrics' classification ones.

- :func:`retrieval_recall`: image->text and text->image Recall@k with several captions per
  image (a text-retrieval hit: any of the image's captions within the top k);
- :func:`pm_k`: ImageNet-Vid / YouTube-BB-Robust PM-k (anchor and every frame within k of
  it classified correctly);
- :func:`mean_average_precision_11pt`: PASCAL VOC2007 11-point interpolated mAP;
- :class:`Collect`: a torchmetrics ``Metric`` that gathers tensors from every process
  (uneven sizes allowed), for metrics that need the whole test set at once.
"""

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class Collect(Metric):
    """Concatenate named tensors over steps and (on ``compute``) over processes."""

    full_state_update = False

    def __init__(self, *names: str):
        super().__init__()
        self.names = names
        for n in names:
            self.add_state(n, default=[], dist_reduce_fx="cat")

    def update(self, **tensors: torch.Tensor) -> None:
        for n in self.names:
            getattr(self, n).append(tensors[n].detach())

    def compute(self) -> dict[str, torch.Tensor]:
        return {n: dim_zero_cat(getattr(self, n)) for n in self.names}


def dedupe_by_index(index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sort rows by ``index`` and drop repeated indices (keeps one copy of each sample)."""
    order = torch.argsort(index, stable=True)
    index = index[order]
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = index[1:] != index[:-1]
    return (index[keep], *(t[order][keep] for t in tensors))


@torch.no_grad()
def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways from embeddings (similarity = dot product).

    image_emb (I, D), text_emb (T, D), text_to_image (T,): the image each text describes.
    ``image_to_text_R@k`` (text retrieval): fraction of images with at least one of their
    captions among the k most similar texts. ``text_to_image_R@k`` (image retrieval):
    fraction of texts whose image is among the k most similar images. A candidate ranks
    ahead of the true match only if its similarity is strictly higher.
    """
    I, T = image_emb.shape[0], text_emb.shape[0]
    text_to_image = text_to_image.to(image_emb.device)
    i2t_rank = torch.empty(I, dtype=torch.long, device=image_emb.device)
    for s in range(0, I, chunk):
        sim = image_emb[s : s + chunk] @ text_emb.T  # (b, T)
        own = (
            text_to_image[None, :] == torch.arange(s, s + sim.shape[0], device=sim.device)[:, None]
        )
        best = sim.masked_fill(~own, float("-inf")).max(dim=1).values  # best caption per image
        i2t_rank[s : s + chunk] = (sim > best[:, None]).sum(dim=1)
    t2i_rank = torch.empty(T, dtype=torch.long, device=image_emb.device)
    for s in range(0, T, chunk):
        sim = text_emb[s : s + chunk] @ image_emb.T  # (b, I)
        pos = sim.gather(1, text_to_image[s : s + chunk, None])
        t2i_rank[s : s + chunk] = (sim > pos).sum(dim=1)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < k).sum().item() / I
    for k in ks:
        out[f"text_to_image_R@{k}"] = (t2i_rank < k).sum().item() / T
    return out


def pm_k(
    correct: torch.Tensor,
    pmsets: dict[int, Sequence[int]],
    k: int | None = None,
    offsets: dict[int, Sequence[int]] | None = None,
) -> float:
    """PM-k accuracy: the fraction of anchors whose frame and all neighbours within ``k``
    frames are correct. correct (N,) bool per frame; pmsets {anchor: [neighbour frames]};
    offsets {anchor: [frame distance of each neighbour]} (``None``: every neighbour is
    within k). k=0 is the anchor accuracy; k=None uses every listed neighbour."""
    if not pmsets:
        raise ValueError("no PM-k sets")
    hits = 0
    for anchor, neighbours in pmsets.items():
        ok = bool(correct[anchor])
        if ok and k != 0:
            dist = offsets[anchor] if offsets is not None else [0] * len(neighbours)
            ok = all(bool(correct[n]) for n, d in zip(neighbours, dist) if k is None or abs(d) <= k)
        hits += ok
    return hits / len(pmsets)


def average_precision_11pt(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """VOC2007 11-point interpolated AP of one class: the mean over recall thresholds
    t = 0, 0.1, …, 1 of the highest precision at recall >= t (0 when never reached)."""
    order = torch.argsort(scores, descending=True, stable=True)
    hit = targets[order].float()
    if hit.sum() == 0:
        return 0.0
    tp = torch.cumsum(hit, 0)
    precision = tp / torch.arange(1, len(hit) + 1, dtype=torch.float)
    recall = tp / hit.sum()
    ap = 0.0
    for t in torch.linspace(0, 1, 11):
        reached = recall >= t - 1e-12
        ap += precision[reached].max().item() if reached.any() else 0.0
    return ap / 11


def mean_average_precision_11pt(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over classes (columns) of :func:`average_precision_11pt`; scores, targets (N, C)."""
    return (
        sum(average_precision_11pt(scores[:, c], targets[:, c]) for c in range(scores.shape[1]))
        / scores.shape[1]
    )
