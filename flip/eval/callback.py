"""Periodic zero-shot validation during pre-training, as a Lightning callback.

Every ``every_n_steps`` optimiser steps it classifies a
small labelled set from text prompts alone with the model being trained and logs
``val/<name>_top1``. Each process takes a strided share of the set; the counts are
summed over processes, so the number is exact under DDP. Independent of the training
module: it only needs ``pl_module.model`` (a ``flip.models.clip.FLIP``).

Add it to any training run, e.g. on the embedded held-out set::

    python train.py +callbacks.zeroshot._target_=flip.eval.callback.ZeroShotCallback \\
        '+callbacks.zeroshot.dataset=${data.zeroshot}' +callbacks.zeroshot.every_n_steps=100
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from flip.eval.module import StridedSampler
from flip.eval.zeroshot import build_zero_shot_classifier
from flip.tokenizer import Tokenizer


class ZeroShotCallback(L.Callback):
    def __init__(
        self,
        dataset: Dataset,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        every_n_steps: int = 500,
        name: str = "heldout",
        batch_size: int = 256,
        context_length: int = 32,
    ):
        self.dataset, self.every_n_steps, self.name = dataset, every_n_steps, name
        self.classnames = list(classnames if classnames is not None else dataset.classnames)
        self.templates = list(templates if templates is not None else dataset.templates)
        self.batch_size, self.tokenizer = batch_size, Tokenizer(context_length)
        self._done_at: int | None = None
        self.history: list[tuple[int, float]] = []  # (global step, top-1) on this process

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._done_at:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module, log: bool = True) -> float:
        model = pl_module.model
        was_training = model.training
        model.eval()
        device = pl_module.device
        classifier = build_zero_shot_classifier(
            model.encode_text,
            self.tokenizer,
            self.classnames,
            self.templates,
            device,
            classes_per_batch=32,
        )
        sampler = StridedSampler(len(self.dataset), trainer.global_rank, trainer.world_size)
        counts = torch.zeros(2, device=device)  # correct, total
        for images, labels in DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler):
            logits = model.encode_image(images.to(device)) @ classifier.T
            counts[0] += (logits.argmax(1) == labels.to(device)).sum()
            counts[1] += len(labels)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        top1 = (counts[0] / counts[1].clamp(min=1)).item()
        model.train(was_training)
        self._done_at = trainer.global_step
        self.history.append((trainer.global_step, top1))
        if log:
            pl_module.log(f"val/{self.name}_top1", top1, rank_zero_only=True)
        return top1
