"""Image-caption pairs listed in a CSV file (bring-your-own data).

The CSV has the header ``image_path,caption`` (extra columns are ignored); paths are
relative to ``image_root`` or, by default, to the CSV's own folder (absolute paths work
too). Errors in the CSV itself are raised at construction: a missing file, a header
without both columns, or no rows at all.

A bad *image* does not crash training and does not shrink the batch (every step must
contrast exactly the global batch, and DDP gathers equal-sized batches): ``__getitem__``
counts it in ``skipped`` (a Counter with keys "missing" and "corrupt"), logs the first
few, and returns the next readable row instead. If ``max_consecutive_bad`` rows in a row
are unreadable, it raises naming the CSV (a wrong ``image_root`` must not train on
nothing). The counter lives in the process that loaded the sample, i.e. in each
DataLoader worker when num_workers > 0; ``check()`` scans every image once in the
calling process for exact totals.
"""
import csv
import logging
from collections import Counter
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from flip.data.transforms import train_transform

log = logging.getLogger(__name__)
COLUMNS = ("image_path", "caption")
_MAX_WARNINGS = 5  # per process; later skips are only counted


class CsvCaptions(Dataset):
    """(image (3, S, S) float, caption str); unreadable rows are replaced by the next one.

    transform: PIL -> tensor; default ``train_transform(image_size)``.
    """

    def __init__(self, path, image_root=None, image_size: int = 224, transform=None,
                 max_consecutive_bad: int = 100):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"caption CSV not found: {self.path}")
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if not set(COLUMNS) <= set(header):
                raise ValueError(
                    f"{self.path}: expected a header with columns {','.join(COLUMNS)!r}, "
                    f"got {','.join(header)!r}"
                )
            self.rows = [(row["image_path"], row["caption"]) for row in reader]
        if not self.rows:
            raise ValueError(f"{self.path}: no image-caption rows below the header")
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self.transform = transform if transform is not None else train_transform(image_size)
        self.skipped = Counter()  # reason ("missing" | "corrupt") -> rows skipped
        self.max_consecutive_bad = max_consecutive_bad

    def __len__(self) -> int:
        return len(self.rows)

    def _open(self, index: int) -> Image.Image | None:
        """The RGB image of row ``index``, or None (counted in ``skipped``)."""
        file = self.root / self.rows[index][0]
        try:
            with Image.open(file) as im:
                return im.convert("RGB")  # forces the full decode inside the try
        except FileNotFoundError:
            reason = "missing"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            reason = "corrupt"  # includes PIL.UnidentifiedImageError, truncated files
        self.skipped[reason] += 1
        if sum(self.skipped.values()) <= _MAX_WARNINGS:
            log.warning("skipping %s image %s (row %d of %s)", reason, file, index, self.path)
        return None

    def __getitem__(self, index: int):
        for offset in range(min(self.max_consecutive_bad, len(self))):
            row = (index + offset) % len(self)
            img = self._open(row)
            if img is not None:
                return self.transform(img), self.rows[row][1]
        raise RuntimeError(
            f"{self.path}: {min(self.max_consecutive_bad, len(self))} consecutive rows from "
            f"row {index} have no readable image (looked under {self.root}); "
            f"skipped so far: {dict(self.skipped)}")

    def check(self) -> Counter:
        """Open every image once; Counter(ok=..., missing=..., corrupt=...). Slow on big sets."""
        before, self.skipped = self.skipped, Counter()
        ok = sum(self._open(i) is not None for i in range(len(self)))
        counts, self.skipped = Counter(ok=ok, **self.skipped), before  # leave skipped as is
        return counts
