"""Datasets that prepend each sample's index to it: evaluation and caption validation keep
per-sample results (references, masks drawn from the index) by dataset index; and
``unpair``, which breaks the image-text pairing of a batch (the transfer controls)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


def unpair(images: torch.Tensor) -> torch.Tensor:
    """Each sample of a (shuffled) batch gets the next sample's image, the last the first's:
    no sample keeps its own, and every image is used once. Training on these pairs is
    training without the image (a question-only VQA model, a caption prior), the control
    that shows a transfer task reads the image."""
    return images.roll(1, dims=0)


class Indexed(Dataset):
    """Prepend the sample index to every item: (index, *item)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (i, *item) if isinstance(item, tuple) else (i, item)


class IndexedStream(IterableDataset):
    """(index, *item) of a streamed dataset (a webdataset export), this process's share.

    Every process reads the whole stream and keeps the samples at positions ``rank``,
    ``rank + world``, …; the loader workers of a process read disjoint shards
    (webdataset's split by worker), so a sample's index is its position in its worker's
    stream times the number of workers plus the worker id: unique, and the same on every
    process."""

    def __init__(self, stream, rank: int = 0, world_size: int = 1):
        self.stream, self.rank, self.world = stream, rank, world_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, item in enumerate(self.stream):
            if i % self.world == self.rank:
                yield (i * workers + worker, *item)
