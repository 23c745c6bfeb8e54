"""Image captioning data: COCO (Karpathy split), nocaps, and a shapes miniature.

Training items are ``(image, caption)`` pairs, one per reference caption (BLIP's
``coco_karpathy_train``: every one of an image's ~5 captions is a sample); validation
items are ``(image, [references])``, one per image, scored by the COCO caption metrics.

Readers (real on-disk formats, nothing is downloaded):
- Karpathy's ``dataset_coco.json`` (``images[{filepath, filename, split: train | val |
  test | restval, sentences[{raw}], cocoid}]``), read by ``flip.eval.readers.captions_json``
  (the reader of the retrieval evaluation); images at ``<root>/<filepath>/<filename>``
  (``val2014/COCO_val2014_000000391895.jpg``). Training uses train + restval (113,287
  images), the paper's test split of [38] is ``test`` (5,000 images), ``val`` another 5,000.
- COCO-format caption annotations (``images[{id, file_name}]``, ``annotations[{image_id,
  caption}]``): nocaps' ``nocaps_val_4500_captions.json`` (images under ``<root>/val``;
  each image also has ``domain``: in-, near- or out-of-domain) and COCO's own
  ``captions_val2014.json``.

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
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from flip.config import ConfigError
from flip.data.indexed import Indexed
from flip.data.shapes import ShapesCaptions, describe, render, sample_scene
from flip.data.transforms import to_normalized_tensor
from flip.eval.caption_metrics import constant_caption
from flip.eval.readers import Captioned, DatasetNotFound, captions_json, load_image
from flip.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, VOCAB_SIZE, Tokenizer

COCO_FORMAT_LAYOUT = (
    '{root}/{ann_file}: COCO-format captions ({{"images": [{{"id", "file_name"}}], '
    '"annotations": [{{"image_id", "caption"}}]}}); images under {root}/{image_dir}'
)


# -- readers ---------------------------------------------------------------------------------
def karpathy_images(
    root,
    transform,
    splits: Sequence[str] = ("test",),
    ann_file: str = "dataset_coco.json",
    image_dir: str = "",
) -> Captioned:
    """The images of the Karpathy ``splits`` with their reference captions."""
    if isinstance(splits, str):
        splits = [splits]
    parts = [captions_json("coco", root, split, transform, ann_file, image_dir) for split in splits]
    return Captioned([item for part in parts for item in part.items], transform)


def coco_format_images(
    root, transform, ann_file: str, image_dir: str = "", name: str = "nocaps"
) -> Captioned:
    """Images with their captions from a COCO-format annotation file (nocaps,
    ``captions_val2014.json``), in the file's image order."""
    root = Path(root)
    ann = root / ann_file
    layout = [COCO_FORMAT_LAYOUT.format(root=root, ann_file=ann_file, image_dir=image_dir)]
    if not ann.is_file():
        raise DatasetNotFound(name, root, layout, why=f"no {ann}")
    data = json.loads(ann.read_text("utf-8"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ConfigError(
            f"{ann}: expected COCO-format captions ({{'images': [...], 'annotations': [...]}}}})"
        )
    refs: dict = {}
    for a in data["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    items = [(root / image_dir / im["file_name"], refs.get(im["id"], [])) for im in data["images"]]
    without = [str(p) for p, caps in items if not caps]
    if without:
        raise ConfigError(f"{ann}: {len(without)} images have no caption, e.g. {without[0]}")
    missing = [p for p, _ in items if not p.is_file()]
    if missing:
        raise DatasetNotFound(
            name, root, layout, why=f"{len(missing)} images missing, e.g. {missing[0]}"
        )
    return Captioned(items, transform)


class CaptionPairs(Dataset):
    """(transform(image), caption): one sample per reference caption of each image."""

    def __init__(self, images: Captioned):
        self.images = images
        self.pairs = [(i, j) for i, (_, caps) in enumerate(images.items) for j in range(len(caps))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        i, j = self.pairs[k]
        path, captions = self.images.items[i]
        return self.images.transform(load_image(path)), captions[j]

    @property
    def captions(self) -> list[str]:
        return [c for _, caps in self.images.items for c in caps]


# -- shapes miniature ------------------------------------------------------------------------
class ShapesTrainCaptions(ShapesCaptions):
    """Shapes scenes with one caption each, every index a new scene (all 40 colour x shape
    pairs: captioning holds nothing out)."""

    def __init__(self, size: int = 20000, image_size: int = 64, seed: int = 0):
        super().__init__("train", size, image_size, seed, heldout_fraction=0.0)

    @functools.cached_property
    def captions(self) -> list[str]:
        return [self.sample(i)[1] for i in range(len(self))]


class ShapesReferences(Dataset):
    """A fixed set of shapes scenes, each with ``references`` true captions drawn
    independently (5, as COCO): ``(image, [captions])``. Its own seed stream: no scene of
    the training stream."""

    def __init__(
        self,
        size: int = 200,
        image_size: int = 64,
        seed: int = 0,
        references: int = 5,
        split: str = "val",
    ):
        self.size, self.image_size, self.seed = size, image_size, seed
        self.references, self.split = references, split
        self.transform = to_normalized_tensor()  # no crops or flips: captions state positions

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        rng = random.Random(f"flip-shapes/captioning/{self.seed}/{self.split}/{index}")
        scene = sample_scene(rng)
        return scene, [describe(scene, rng) for _ in range(self.references)]

    def __getitem__(self, index: int):
        scene, refs = self.sample(index)
        return self.transform(render(scene, self.image_size)), refs


# -- datamodule ------------------------------------------------------------------------------
class CaptionDataModule(L.LightningDataModule):
    """Training pairs and validation images with references; tokenises in the collate."""

    def __init__(
        self,
        train: Dataset,  # (image, caption) items, with a ``captions`` list (the baseline's pool)
        val: Dataset,  # (image, [references]) items
        image_size: int = 224,  # what the model expects; checked against the data
        batch_size: int = 64,  # per device
        val_batch_size: int | None = None,  # default: batch_size
        num_workers: int = 0,
        pin_memory: bool = False,
        max_length: int = 32,  # decoder positions: [CLS] + word pieces; captions cut to max_length - 1
        output_vocab: str = "train",  # train: the word pieces of the training captions | full: all
    ):
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and one token), got {max_length}")
        if output_vocab not in ("train", "full"):
            raise ValueError(f"output_vocab must be 'train' or 'full', got {output_vocab!r}")
        self.train_set, self.val_set = train, val
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self.pin_memory, self.max_length = pin_memory, max_length
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
            raise ValueError(
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
        return torch.stack(images), self.tokens(captions)

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
            raise ValueError(
                f"the training set has {len(self.train_set)} captions, fewer than one "
                f"batch ({self.batch_size}); lower batch.global or add data"
            )
        return self._loader(self.train_set, self.batch_size, True, self._train_collate, True)

    def val_dataloader(self):
        return self._loader(
            Indexed(self.val_set), self.val_batch_size, False, self._val_collate, False
        )
