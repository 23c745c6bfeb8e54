"""Image captioning data: COCO (Karpathy split), nocaps, and a shapes miniature.

Training items are ``(image, caption)`` pairs, one per reference caption (BLIP's
``coco_karpathy_train``: every one of an image's ~5 captions is a sample); validation
and test items are ``(image, [references])``, one per image, scored by the COCO caption
metrics (validation during training, the test split once at the end).

Datasets: COCO (Karpathy split) and nocaps from disk (``flip.data.coco_captions``), the
shapes miniature (``flip.data.shapes_captions``).

Captions are tokenised here, in the collate function, with the contrastive tokenizer's
WordPiece vocabulary; the decoder's start and end are BERT's ``[CLS]``/``[SEP]`` (see
``flip.models.caption_decoder``). The decoder's output vocabulary (``output_vocab``) is by
default the word pieces that occur in the training captions plus ``[PAD]``, ``[UNK]``,
``[CLS]``, ``[SEP]`` (``train``; as captioners keep the words of their training captions:
a piece never seen as a target is never generated anyway), or all 30522 (``full``). The
softmax over the vocabulary is most of a small decoder's cost: the shapes captions use 60
pieces, COCO's about a third of the table. Decoder ids index ``task_args["vocab"]``, the
list of WordPiece ids, in increasing order (so ``[PAD]``, id 0, is decoder id 0).

A training batch is ``(images, tokens)`` with ``tokens`` (B, T) = ``[CLS] w1 … wn [SEP]
[PAD] …`` in decoder ids (T <= max_length + 1: the decoder reads ``tokens[:, :-1]`` and
predicts ``tokens[:, 1:]``); a validation batch adds the references and the dataset indices
of the images: ``(images, tokens of the first reference, [references], indices)``.
``shuffle_images`` gives each training caption the image of another
(``flip.data.indexed.unpair``): the decoder then learns the captions without their images,
the control of the captioning miniature.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from flip.data.indexed import Indexed, unpair
from flip.errors import ConfigError, DataError
from flip.metrics.captions import constant_caption
from flip.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, VOCAB_SIZE, Tokenizer


class CaptionDataModule(L.LightningDataModule):
    """Training pairs and validation images with references; tokenises in the collate."""

    def __init__(
        self,
        train: Dataset,  # (image, caption) items, with a ``captions`` list (the baseline's pool)
        val: Dataset,  # (image, [references]) items, scored during training
        test: Dataset | None = None,  # (image, [references]) items, scored once after training
        image_size: int = 224,  # what the model expects; checked against the data
        batch_size: int = 64,  # per device
        val_batch_size: int | None = None,  # default: batch_size
        num_workers: int = 0,
        pin_memory: bool = False,
        max_length: int = 32,  # decoder positions: [CLS] + word pieces; captions cut to max_length - 1
        output_vocab: str = "train",  # train: the word pieces of the training captions | full: all
        shuffle_images: bool = False,  # true: train on other captions' images (the control)
    ):
        super().__init__()
        if max_length < 2:
            raise ConfigError(f"data.max_length={max_length} must be >= 2 ([CLS] and one token)")
        if output_vocab not in ("train", "full"):
            raise ConfigError(f"data.output_vocab={output_vocab!r} must be train or full")
        self.train_set, self.val_set, self.test_set = train, val, test
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self.pin_memory, self.max_length = pin_memory, max_length
        self.shuffle_images = shuffle_images
        self.tokenizer = Tokenizer(max_length - 1)
        captions = train.captions
        self.constant_caption = constant_caption(captions)
        if output_vocab == "full":
            self.vocab = list(range(VOCAB_SIZE))
        else:
            seen = {PAD_ID, UNK_ID, BOS_ID, EOS_ID}
            for i in range(0, len(captions), 65536):  # COCO: 566k captions, in chunks
                seen.update(torch.unique(self.tokenizer(captions[i : i + 65536])).tolist())
            self.vocab = sorted(seen)
        self.to_decoder = torch.full((VOCAB_SIZE,), self.vocab.index(UNK_ID), dtype=torch.long)
        self.to_decoder[self.vocab] = torch.arange(len(self.vocab))

    @property
    def task_args(self) -> dict:
        index = self.vocab.index
        return {
            "vocab": self.vocab,
            "bos_id": index(BOS_ID),
            "eos_id": index(EOS_ID),
            "pad_id": index(PAD_ID),
            "max_length": self.max_length,
            "constant_caption": self.constant_caption,
        }

    def setup(self, stage: str) -> None:
        image = self.val_set[0][0]
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise DataError(
                f"data.image_size is {self.image_size} but the validation set "
                f"yields {tuple(image.shape)} images"
            )

    def tokens(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, T) ``[CLS] w1 … wn [SEP] [PAD] …`` in decoder ids, trimmed to the
        longest."""
        ids = self.tokenizer(list(captions))  # (B, max_length - 1), [PAD]-filled
        n = (ids != PAD_ID).sum(1)
        tokens = torch.cat(
            [torch.full_like(ids[:, :1], BOS_ID), ids, torch.full_like(ids[:, :1], PAD_ID)], 1
        )
        tokens[torch.arange(len(ids)), n + 1] = EOS_ID
        return self.to_decoder[tokens[:, : int(n.max()) + 2]]

    def _train_collate(self, batch):
        images, captions = zip(*batch)
        images = torch.stack(images)
        return unpair(images) if self.shuffle_images else images, self.tokens(captions)

    def _val_collate(self, batch):
        indices, images, refs = zip(*batch)
        return (
            torch.stack(images),
            self.tokens([r[0] for r in refs]),
            [list(r) for r in refs],
            torch.tensor(indices),
        )

    def _loader(self, dataset, batch_size, shuffle, collate, drop_last):
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        if len(self.train_set) < self.batch_size:
            raise DataError(
                f"the training set has {len(self.train_set)} captions, fewer than one "
                f"batch ({self.batch_size}); lower batch.global or add data"
            )
        return self._loader(self.train_set, self.batch_size, True, self._train_collate, True)

    def val_dataloader(self):
        return self._loader(
            Indexed(self.val_set), self.val_batch_size, False, self._val_collate, False
        )

    def test_dataloader(self):
        return self._loader(
            Indexed(self.test_set), self.val_batch_size, False, self._val_collate, False
        )
