"""Image-caption pairs listed in a CSV file (bring-your-own data).

The CSV has the header ``image_path,caption`` (extra columns are ignored); paths are
relative to ``image_root`` or, by default, to the CSV's own folder (absolute paths work
too). Errors in the CSV itself are raised at construction: a missing file, a header
without both columns, or no rows at all.

A bad *image* does not crash training: ``__getitem__`` returns ``None`` and counts it in
``skipped`` (a Counter with keys "missing" and "corrupt"); the collate function drops
the ``None`` items (``flip.data.collate.filter_valid``). The counter lives in the
process that loaded the sample, i.e. in each DataLoader worker when num_workers > 0;
``check()`` scans every image once in the calling process for exact totals.
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
    """(image (3, S, S) float, caption str), or ``None`` when the image cannot be loaded.

    transform: PIL -> tensor; default ``train_transform(image_size)``.
    """

    def __init__(self, path, image_root=None, image_size: int = 224, transform=None):
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
        self.skipped = Counter()  # reason ("missing" | "corrupt") -> samples returned as None

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
        img = self._open(index)
        return None if img is None else (self.transform(img), self.rows[index][1])

    def check(self) -> Counter:
        """Open every image once; Counter(ok=..., missing=..., corrupt=...). Slow on big sets."""
        before, self.skipped = self.skipped, Counter()
        ok = sum(self._open(i) is not None for i in range(len(self)))
        counts, self.skipped = Counter(ok=ok, **self.skipped), before  # leave skipped as is
        return counts
