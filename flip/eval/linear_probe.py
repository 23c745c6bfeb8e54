"""Linear probing on frozen image features (Table 3), as LightningModules.

Features: the image encoder's global-pooled output **before** the projection into the
joint embedding (``model.visual(images)``: final LayerNorm, then the average over the
class token and the patches; width = the ViT width). This is the representation MAE and
FLIP probe; the projection is trained for the contrastive task only.

1. :class:`FeatureExtractor` (``Trainer.test``) embeds the train and test sets once,
   without augmentation (centre crops), and gathers the features from all processes.
2. :class:`LinearProbe` (``Trainer.fit`` on the cached features, then ``Trainer.test``):
   MAE's linear-probing head, ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear``
   (weights N(0, 0.01), bias 0), trained with SGD (momentum 0.9; FLIP uses SGD where
   CLIP used L-BFGS), lr = ``base_lr × batch_size / 256`` with linear warm-up and a
   cosine decay per step, weight decay 0 by default.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassStatScores

from flip.data.indexed import Indexed
from flip.eval.module import EvalModule, StridedSampler
from flip.metrics.zeroshot import Collect, dedupe_by_index


class FeatureExtractor(EvalModule):
    """Pooled pre-projection image features of a dataset: ``features`` (N, D), ``labels`` (N,)."""

    def __init__(self, model, dataset, batch_size: int = 256, num_workers: int = 0):
        super().__init__(model, dataset, batch_size, num_workers)
        self.store = Collect("index", "features", "labels")

    def test_step(self, batch, batch_idx):
        index, images, labels = batch
        if labels.ndim != 1:
            raise ValueError("linear probing needs one integer label per image")
        self.store.update(index=index, features=self.model.visual(images).float(), labels=labels)

    def on_test_epoch_end(self) -> None:
        got = self.store.compute()
        _, self.features, self.labels = dedupe_by_index(
            got["index"], got["features"], got["labels"]
        )
        self.features, self.labels = self.features.cpu(), self.labels.cpu()
        self.results = {"num_samples": float(len(self.labels))}


class LinearProbe(L.LightningModule):
    def __init__(
        self,
        train_features: torch.Tensor,
        train_labels: torch.Tensor,
        test_features: torch.Tensor,
        test_labels: torch.Tensor,
        num_classes: int,
        epochs: int = 90,
        batch_size: int = 4096,
        base_lr: float = 0.1,
        warmup_epochs: int = 10,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(
            ignore=["train_features", "train_labels", "test_features", "test_labels"]
        )
        self.train_set = TensorDataset(train_features, train_labels)
        self.test_set = TensorDataset(test_features, test_labels)
        dim = train_features.shape[1]
        self.head = nn.Sequential(
            nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes)
        )
        nn.init.normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = (
            MulticlassAccuracy(num_classes, top_k=5, average="micro") if num_classes > 5 else None
        )
        self.per_class = MulticlassStatScores(num_classes, average=None)
        self.results: dict[str, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def train_dataloader(self) -> DataLoader:
        # the Trainer runs with use_distributed_sampler=False (the test loader shards itself),
        # so the training loader shards explicitly; Lightning calls set_epoch every epoch
        world = self.trainer.world_size
        per_device = max(1, self.hparams.batch_size // world)
        sampler = (
            DistributedSampler(self.train_set, world, self.global_rank, shuffle=True, seed=0)
            if world > 1
            else RandomSampler(self.train_set)
        )
        return DataLoader(
            self.train_set,
            batch_size=per_device,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            drop_last=False,
        )

    def test_dataloader(self) -> DataLoader:
        ds = Indexed(self.test_set)
        return DataLoader(
            ds,
            batch_size=1024,
            sampler=StridedSampler(len(ds), self.global_rank, self.trainer.world_size),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("probe/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.base_lr * hp.batch_size / 256
        opt = torch.optim.SGD(
            self.head.parameters(), lr=lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        steps_per_epoch = math.ceil(len(self.train_set) / max(1, hp.batch_size))
        total, warm = hp.epochs * steps_per_epoch, hp.warmup_epochs * steps_per_epoch

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": LambdaLR(opt, factor), "interval": "step"},
        }

    def test_step(self, batch, batch_idx):
        _, x, y = batch
        logits = self(x)
        self.top1.update(logits, y)
        self.per_class.update(logits, y)
        if self.top5 is not None:
            self.top5.update(logits, y)

    def on_test_epoch_end(self) -> None:
        stats = self.per_class.compute()
        tp, support = stats[:, 0].float(), stats[:, 4].float()
        present = support > 0
        out = {
            "top1": self.top1.compute().item(),
            "mean_per_class": (tp[present] / support[present]).mean().item(),
            "num_samples": support.sum().item(),
            "num_train": float(len(self.train_set)),
        }
        if self.top5 is not None:
            out["top5"] = self.top5.compute().item()
        self.results = out
        for k, v in out.items():
            self.log(f"test/{k}", v, rank_zero_only=True)
