"""The base of the evaluation LightningModules: a frozen model, its own test loader, and
the sampling that shows every sample exactly once over all processes."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from flip.data.indexed import Indexed, IndexedStream


class StridedSampler(Sampler[int]):
    """Indices rank, rank + world, … : every sample exactly once over all processes
    (no padding, unlike ``DistributedSampler``; evaluation metrics stay exact)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return max(0, math.ceil((self.size - self.rank) / self.world))


def first_item(dataset):
    """The first sample of a map-style or streamed dataset (None if it is empty)."""
    if isinstance(dataset, IterableDataset):
        return next(iter(dataset), None)
    return dataset[0] if len(dataset) else None


class EvalModule(L.LightningModule):
    """Base of the evaluation modules: a frozen model and its own test loader."""

    def __init__(
        self, model: nn.Module, dataset: Dataset, batch_size: int = 256, num_workers: int = 0
    ):
        super().__init__()
        self.model, self.dataset = model, dataset
        self.batch_size, self.num_workers = batch_size, num_workers
        self.model.requires_grad_(False)
        self.results: dict[str, float] = {}

    def collate(self, batch):
        return torch.utils.data.default_collate(batch)

    def test_dataloader(self) -> DataLoader:
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self._trainer else (0, 1)
        )
        loader = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "collate_fn": self.collate,
            "persistent_workers": False,
        }
        if isinstance(self.dataset, IterableDataset):
            return DataLoader(IndexedStream(self.dataset, rank, world), **loader)
        ds = Indexed(self.dataset)
        return DataLoader(ds, sampler=StridedSampler(len(ds), rank, world), **loader)

    def publish(self, results: dict[str, float]) -> None:
        """Keep the final numbers (identical on every process) and log them."""
        self.results = {k: float(v) for k, v in results.items()}
        for k, v in self.results.items():
            self.log(f"test/{k}", v, rank_zero_only=True)
