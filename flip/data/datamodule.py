"""LightningDataModule pairing a training image-caption set with a zero-shot set.

Datasets follow one protocol (see docs/data.md): a training item is
``(image (3, H, W) float, caption str)``; a zero-shot item is ``(image, label int)``
and the zero-shot dataset carries ``classnames`` and ``templates``. Captions are
tokenised here, in the collate function, with the batch tokenizer.

Skipped samples: the collate function (which runs in the DataLoader worker, next to the
dataset copy that counted them) adds the dataset's new ``skipped`` counts to the
DataModule's ``SharedStats`` (``flip.data.quality``), where ``DataQualityCallback`` reads
them; batches are plain ``(images, tokens)`` tuples.
"""

from collections import Counter
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from flip.data.quality import QualityMixin, SharedStats, stats_of_dataset
from flip.errors import DataError
from flip.tokenizer import Tokenizer


class ImageTextDataModule(QualityMixin, L.LightningDataModule):
    def __init__(
        self,
        train: Dataset,
        zeroshot: Dataset | None = None,
        image_size: int = 224,  # what the model expects; checked against the data
        batch_size: int = 256,  # per device and loader step
        num_workers: int = 0,
        pin_memory: bool = False,  # page-locked batches for faster GPU copies (accelerator=gpu)
        context_length: int = 32,
        max_skip_rate: float = 0.05,  # of samples skipped; more stops training
        skip_rate_min_samples: int = 1000,  # samples read before the rate is enforced
    ):
        super().__init__()
        self.init_quality(max_skip_rate, skip_rate_min_samples)
        self.train_set, self.zeroshot_set = train, zeroshot
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.pin_memory = pin_memory
        self.tokenizer = Tokenizer(context_length)
        self.classnames = list(zeroshot.classnames) if zeroshot is not None else []
        self.templates = list(zeroshot.templates) if zeroshot is not None else []

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if len(self.train_set) < self.batch_size:
            raise DataError(
                f"the training set has {len(self.train_set)} samples, fewer than one "
                f"batch ({self.batch_size}); lower batch.global or add data"
            )
        image = self.train_set[0][0]
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise DataError(
                f"data.image_size is {self.image_size} but the training set yields "
                f"{tuple(image.shape)} images"
            )
        # the probe above is not training data: do not report its skips
        self.train_set._skips_reported = Counter(getattr(self.train_set, "skipped", {}))
        self.train_set._converted_reported = Counter(getattr(self.train_set, "converted", {}))

    def collate(self, stats: SharedStats, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, S, S), tokens (B, L)); the dataset's new counts go to ``stats``."""
        images, captions = zip(*batch)
        info = get_worker_info()  # in a worker, the dataset copy that counted the skips
        dataset = info.dataset if info is not None else self.train_set
        stats.add(stats_of_dataset(dataset, len(batch)))
        return torch.stack(images), self.tokenizer(list(captions))

    def _loader(self, dataset: Dataset, loader=DataLoader, **kwargs) -> DataLoader:
        return loader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        # drop_last keeps every step's contrastive batch at exactly the global batch;
        # a stateful loader lets a resumed run continue at the same data position
        return self._loader(
            self.train_set,
            StatefulDataLoader,
            shuffle=True,
            drop_last=True,
            collate_fn=partial(self.collate, self.shared_stats()),
        )

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.zeroshot_set is None else self._loader(self.zeroshot_set)
