"""Your own captioned images as a folder, and an image-folder zero-shot set.

``FolderCaptions(root)``: every image under ``root`` (recursively; any suffix in
``flip.data.images.IMAGE_EXTENSIONS``, any case) whose caption is the UTF-8 text file
next to it with the same stem (``cat.jpg`` + ``cat.txt``). Same behaviour as
``CsvCaptions`` (it is one): bad images and missing (``missing_caption``) or blank
(``empty_caption``) captions are skipped, counted and replaced by the next readable item,
so batches stay full.

``ImageFolderZeroShot(root)``: ``root/<class name>/*.jpg`` (the torchvision ImageFolder
layout, e.g. ImageNet val); class names are the folder names with ``_`` read as spaces
(or given by ``classnames``), labels are their sorted order, images get the evaluation
transform (resize + centre crop). An unreadable image is logged, counted in ``skipped``
and evaluated as a blank (mean-colour) image rather than stopping a training run at validation.
"""

import logging
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

from flip.data.csv_dataset import CsvCaptions
from flip.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadSample,
    decode_caption,
    decode_image,
)
from flip.data.transforms import eval_transform
from flip.errors import DataPathError

log = logging.getLogger(__name__)
DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}."]


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted, as paths relative to ``root``."""
    return sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


class FolderCaptions(CsvCaptions):
    """(image (3, S, S) float, caption str) for ``root/**/x.jpg`` with ``x.txt``."""

    def __init__(
        self,
        root,
        image_size: int = 224,
        transform=None,
        max_consecutive_bad: int = 100,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.root = self.path = Path(root)
        if not self.root.is_dir():
            raise DataPathError(f"image folder not found: {self.root}")
        self.rows = [(str(p), str(p.with_suffix(".txt"))) for p in list_images(self.root)]
        if not self.rows:
            raise DataPathError(
                f"{self.root}: no images ({' '.join(IMAGE_EXTENSIONS)}) in this folder or below it"
            )
        self._init_counters(image_size, transform, max_consecutive_bad, max_pixels)

    def _caption(self, index: int) -> str | None:
        image, text = self.rows[index]
        try:
            return decode_caption((self.root / text).read_bytes())
        except FileNotFoundError:
            self._skip("missing_caption", f"{self.root / text} (for {image})", index)
        except BadSample as bad:
            self._skip(bad.reason, f"{self.root / text}", index)
        return None


class ImageFolderZeroShot(Dataset):
    """(image (3, S, S) float, label int) from ``root/<class>/*``."""

    def __init__(
        self,
        root,
        image_size: int = 224,
        classnames=None,
        templates=None,
        transform=None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataPathError(f"zero-shot image folder not found: {self.root}")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise DataPathError(f"{self.root}: expected one sub-folder of images per class")
        self.classnames = (
            list(classnames) if classnames is not None else [f.replace("_", " ") for f in folders]
        )
        if len(self.classnames) != len(folders):
            raise DataPathError(
                f"{self.root}: {len(folders)} class folders but {len(self.classnames)} classnames"
            )
        self.templates = list(templates) if templates is not None else list(DEFAULT_TEMPLATES)
        self.items = [
            (folder + "/" + str(p), label)
            for label, folder in enumerate(folders)
            for p in list_images(self.root / folder)
        ]
        if not self.items:
            raise DataPathError(f"{self.root}: the class folders hold no images")
        self.image_size, self.max_pixels = image_size, max_pixels
        self.transform = transform if transform is not None else eval_transform(image_size)
        self.skipped = Counter()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            img, _ = decode_image(self.root / path, self.max_pixels)
        except (OSError, BadSample) as err:
            self.skipped[getattr(err, "reason", "missing_image")] += 1
            log.error(
                "zero-shot image %s unreadable (%s); evaluated as a blank image",
                self.root / path,
                err,
            )
            return torch.zeros(3, self.image_size, self.image_size), label
        return self.transform(img), label
