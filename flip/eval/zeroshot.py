"""Zero-shot classification (CLIP protocol): the classifier built from text prompts, the
evaluation module run by ``Trainer.test``, and the one-line report.

:func:`build_zero_shot_classifier` gives each class the normalised mean of its normalised
prompt embeddings; an image's logits are its cosine similarities to the class embeddings.
Datasets whose label space is a projection of the classifier's (ObjectNet: 113 classes,
each a set of ImageNet classes; ImageNet-Vid: 30) give ``groups``: the logit of dataset
class j is the max over the classifier rows in ``groups[j]``.

Metrics of :class:`ZeroShotClassification` (all computed; the dataset's reported one is
chosen by its ``eval_data`` entry): ``top1``, ``top5`` (more than 5 classes),
``mean_per_class`` (mean recall over the classes present in the test set), ``roc_auc``
(2 classes; score = logit of class 1 minus class 0), ``mean_top1_top5``; for multi-hot
labels ``map_11pt`` (VOC2007) and ``top1`` = the top class is one of the true ones; for
frame sets (``pmsets``) ``pm0`` and ``pm<k>``.

``mask``, ``masked_views``, ``mask_seed``: masked inference on the images
(``flip.eval.masked_views``); 0 = every patch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassStatScores

from flip.eval.masked_views import encode_image_views
from flip.eval.module import EvalModule, first_item
from flip.metrics.zeroshot import Collect, dedupe_by_index, mean_average_precision_11pt, pm_k


@torch.no_grad()
def build_zero_shot_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    classes_per_batch: int = 1,
) -> torch.Tensor:
    """(num_classes, D) class embeddings: the normalised mean of each class's
    normalised prompt embeddings (one prompt per template).

    classes_per_batch: how many classes' prompts go through ``encode_text`` at once
    (1: one forward per class; more is faster for 1000-class sets)."""
    weights = []
    for start in range(0, len(classnames), classes_per_batch):
        names = classnames[start : start + classes_per_batch]
        tokens = tokenizer([t.format(name) for name in names for t in templates]).to(device)
        prompts = F.normalize(encode_text(tokens), dim=-1)  # (c * T, D)
        prompts = prompts.view(len(names), len(templates), -1)
        weights.append(F.normalize(prompts.mean(1), dim=-1))
    return torch.cat(weights)  # (C, D)


def format_zero_shot(top1: float, num_classes: int) -> str:
    """The one-line report of a held-out zero-shot evaluation, accuracy next to chance."""
    return f"held-out zero-shot top-1: {100 * top1:.1f}% (chance {100 / num_classes:.1f}%)"


def group_max(logits: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, R) -> (B, G): column j is the max of ``logits[:, groups[j]]``."""
    width = max(len(g) for g in groups)
    index = torch.tensor(
        [list(g) + [g[0]] * (width - len(g)) for g in groups], device=logits.device
    )  # (G, width), padded by repetition
    return logits[:, index].amax(dim=-1)


class ZeroShotClassification(EvalModule):
    def __init__(
        self,
        model,
        dataset,
        classnames: Sequence[str],
        templates: Sequence[str],
        tokenizer,
        groups: Sequence[Sequence[int]] | None = None,
        pmsets: dict | None = None,
        pm_offsets: dict | None = None,
        pm_ks: Sequence[int | None] = (0, None),
        pm_names: Sequence[str] = ("pm0", "pm10"),
        classifier: torch.Tensor | None = None,
        classes_per_batch: int = 32,
        batch_size: int = 256,
        num_workers: int = 0,
        mask: float = 0.0,
        masked_views: str = "single",
        mask_seed: int = 0,
    ):
        super().__init__(model, dataset, batch_size, num_workers)
        self.mask, self.masked_views, self.mask_seed = mask, masked_views, mask_seed
        self.classnames, self.templates, self.tokenizer = (
            list(classnames),
            list(templates),
            tokenizer,
        )
        self.classifier, self.classes_per_batch = classifier, classes_per_batch  # (C, D) if given
        self.groups = [list(g) for g in groups] if groups is not None else None
        self.pmsets, self.pm_offsets = pmsets, pm_offsets
        self.pm_ks, self.pm_names = list(pm_ks), list(pm_names)
        C = len(self.groups) if self.groups is not None else len(self.classnames)
        self.num_classes = C
        self.top1 = MulticlassAccuracy(C, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(C, top_k=5, average="micro") if C > 5 else None
        self.per_class = MulticlassStatScores(C, average=None)
        self.auroc = BinaryAUROC() if C == 2 else None
        self.multi = Collect("index", "scores", "targets")
        first = first_item(dataset)  # label: an int, or multi-hot (VOC2007, video frames)
        self.multilabel = first is not None and getattr(first[1], "ndim", 0) == 1

    def on_test_start(self) -> None:
        if self.classifier is None:
            self.classifier = build_zero_shot_classifier(
                self.model.encode_text,
                self.tokenizer,
                self.classnames,
                self.templates,
                self.device,
                self.classes_per_batch,
            )
        self.classifier = self.classifier.to(self.device)

    def logits(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        image = encode_image_views(
            self.model, images, index, self.mask, self.masked_views, self.mask_seed
        )
        logits = image @ self.classifier.T  # cosine similarities
        return group_max(logits, self.groups) if self.groups is not None else logits

    def test_step(self, batch, batch_idx):
        index, images, labels = batch
        logits = self.logits(images, index).float()
        if self.multilabel:  # multi-hot (VOC2007, video frames)
            self.multi.update(index=index, scores=logits, targets=labels.bool())
            return
        self.top1.update(logits, labels)
        self.per_class.update(logits, labels)
        if self.top5 is not None:
            self.top5.update(logits, labels)
        if self.auroc is not None:
            self.auroc.update(logits[:, 1] - logits[:, 0], labels)

    def on_test_epoch_end(self) -> None:
        if self.multilabel:  # decided per dataset, the same on every process
            gathered = self.multi.compute()
            index, scores, targets = dedupe_by_index(
                gathered["index"], gathered["scores"], gathered["targets"]
            )
            return self.publish(self._multi_label_results(scores.cpu(), targets.cpu()))
        stats = self.per_class.compute()  # (C, 5): tp, fp, tn, fn, support
        tp, support = stats[:, 0].float(), stats[:, 4].float()
        present = support > 0
        out = {
            "top1": self.top1.compute().item(),
            "mean_per_class": (tp[present] / support[present]).mean().item(),
            "num_samples": support.sum().item(),
            "num_classes": float(self.num_classes),
        }
        if self.top5 is not None:
            out["top5"] = self.top5.compute().item()
            out["mean_top1_top5"] = (out["top1"] + out["top5"]) / 2
        if self.auroc is not None:
            out["roc_auc"] = self.auroc.compute().item()
        self.publish(out)

    def _multi_label_results(self, scores: torch.Tensor, targets: torch.Tensor) -> dict:
        correct = targets.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
        out = {
            "top1": correct.float().mean().item(),
            "num_samples": float(len(scores)),
            "num_classes": float(self.num_classes),
        }
        if self.pmsets is not None:
            for name, k in zip(self.pm_names, self.pm_ks):
                out[name] = pm_k(correct, self.pmsets, k, self.pm_offsets)
            out["num_samples"] = float(len(self.pmsets))
        else:
            out["map_11pt"] = mean_average_precision_11pt(scores, targets)
        return out
