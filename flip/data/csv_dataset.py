"""Image-caption pairs listed in a CSV file (bring-your-own data).

The CSV has the header ``image_path,caption`` (extra columns are ignored); paths are
relative to ``image_root`` or, by default, to the CSV's own folder (absolute paths work
too). Errors in the CSV itself are raised at construction: a missing file, a header
without both columns, or no rows at all.

A bad row does not crash training and does not shrink the batch (every step must
contrast exactly the global batch, and DDP gathers equal-sized batches): ``__getitem__``
counts it in ``skipped`` (a Counter with keys "missing" and "corrupt" for missing and
undecodable images, "empty_image" for zero-byte files, "large_image" above
``max_pixels``, "empty_caption" for blank captions; ``FolderCaptions`` adds
"missing_caption"), logs the first few, and returns the next readable row instead.
Non-RGB images are converted (transparency over white, ``flip.data.images.to_rgb``) and
counted in ``converted`` by original mode. If ``max_consecutive_bad`` rows in a row are
unreadable, it raises naming the CSV (a wrong ``image_root`` must not train on nothing).
The counters live in the process that loaded the sample, i.e. in each DataLoader worker
when num_workers > 0 (the DataModule's collate ships their deltas with each batch, see
``flip.data.quality``); ``check()`` scans every image once in the calling process for
exact totals.
"""

import csv
import logging
from collections import Counter
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from flip.data.images import DEFAULT_MAX_PIXELS, BadSample, decode_caption, decode_image
from flip.data.transforms import train_transform
from flip.errors import DataError, DataPathError

log = logging.getLogger(__name__)
COLUMNS = ("image_path", "caption")
_MAX_WARNINGS = 5  # per process; later skips are only counted


class CsvCaptions(Dataset):
    """(image (3, S, S) float, caption str); unreadable rows are replaced by the next one.

    transform: PIL -> tensor; default ``train_transform(image_size)``.
    """

    def __init__(
        self,
        path,
        image_root=None,
        image_size: int = 224,
        transform=None,
        max_consecutive_bad: int = 100,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataPathError(f"caption CSV not found: {self.path}")
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if not set(COLUMNS) <= set(header):
                raise DataPathError(
                    f"{self.path}: expected a header with columns {','.join(COLUMNS)!r}, "
                    f"got {','.join(header)!r}"
                )
            self.rows = [(row["image_path"], row["caption"]) for row in reader]
        if not self.rows:
            raise DataPathError(f"{self.path}: no image-caption rows below the header")
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self._init_counters(image_size, transform, max_consecutive_bad, max_pixels)

    def _init_counters(self, image_size, transform, max_consecutive_bad, max_pixels) -> None:
        self.transform = transform if transform is not None else train_transform(image_size)
        self.skipped = Counter()  # reason ("missing" | "corrupt" | ...) -> rows skipped
        self.converted = Counter()  # original mode of non-RGB images -> count
        self.examples = {}  # reason -> a recent example
        self.max_consecutive_bad, self.max_pixels = max_consecutive_bad, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def _skip(self, reason: str, what, index: int) -> None:
        self.skipped[reason] += 1
        self.examples[reason] = f"{what} (row {index} of {self.path})"
        if sum(self.skipped.values()) <= _MAX_WARNINGS:
            log.warning("skipping %s: %s (row %d of %s)", reason, what, index, self.path)

    def _open(self, index: int) -> Image.Image | None:
        """The RGB image of row ``index``, or None (counted in ``skipped``)."""
        file = self.root / self.rows[index][0]
        try:
            img, mode = decode_image(file, self.max_pixels)
        except FileNotFoundError:
            self._skip("missing", file, index)
            return None
        except BadSample as bad:
            reason = "corrupt" if bad.reason == "corrupt_image" else bad.reason
            self._skip(reason, f"{file}: {bad.detail}", index)
            return None
        if mode != "RGB":
            self.converted[mode] += 1
        return img

    def _caption(self, index: int) -> str | None:
        """The caption of row ``index``, or None (counted in ``skipped``)."""
        try:
            return decode_caption(self.rows[index][1])
        except BadSample as bad:
            self._skip(bad.reason, f"caption of {self.rows[index][0]}", index)
            return None

    def _load(self, index: int):
        caption = self._caption(index)
        if caption is None:
            return None
        img = self._open(index)
        return None if img is None else (self.transform(img), caption)

    def __getitem__(self, index: int):
        for offset in range(min(self.max_consecutive_bad, len(self))):
            item = self._load((index + offset) % len(self))
            if item is not None:
                return item
        raise DataError(
            f"{self.path}: {min(self.max_consecutive_bad, len(self))} consecutive rows from "
            f"row {index} have no readable image (looked under {self.root}); "
            f"skipped so far: {dict(self.skipped)}"
        )

    def check(self) -> Counter:
        """Open every image once; Counter(ok=..., missing=..., corrupt=...). Slow on big sets."""
        before = self.skipped, self.converted, self.examples
        self.skipped, self.converted, self.examples = Counter(), Counter(), {}
        ok = sum(
            self._caption(i) is not None and self._open(i) is not None for i in range(len(self))
        )
        counts = Counter(ok=ok, **self.skipped)
        self.skipped, self.converted, self.examples = before  # leave the counters as they were
        return counts
