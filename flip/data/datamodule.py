"""LightningDataModule pairing a training image-caption set with a zero-shot set.

Datasets follow one protocol (see README "Data"): a training item is
``(image (3, H, W) float, caption str)``; a zero-shot item is ``(image, label int)``
and the zero-shot dataset carries ``classnames`` and ``templates``. Captions are
tokenised here, in the collate function, with the batch tokenizer.
"""
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from flip.tokenizer import Tokenizer


class ImageTextDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: Dataset,
        zeroshot: Dataset | None = None,
        image_size: int = 224,  # what the model expects; checked against the data
        batch_size: int = 256,  # per device and loader step
        num_workers: int = 0,
        context_length: int = 32,
    ):
        super().__init__()
        self.train_set, self.zeroshot_set = train, zeroshot
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.tokenizer = Tokenizer(context_length)
        self.classnames = list(zeroshot.classnames) if zeroshot is not None else []
        self.templates = list(zeroshot.templates) if zeroshot is not None else []

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"the training set has {len(self.train_set)} samples, fewer than one "
                f"batch ({self.batch_size}); lower batch.global or add data")
        image = self.train_set[0][0]
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"data.image_size is {self.image_size} but the training set yields "
                f"{tuple(image.shape)} images")

    def collate(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions = zip(*batch)
        return torch.stack(images), self.tokenizer(list(captions))

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        # drop_last keeps every step's contrastive batch at exactly the global batch
        return self._loader(self.train_set, shuffle=True, drop_last=True,
                            collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.zeroshot_set is None else self._loader(self.zeroshot_set)
