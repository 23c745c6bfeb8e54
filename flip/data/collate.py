"""Batch helper for datasets that return ``None`` for samples they could not load.

``CsvCaptions`` returns ``None`` for a missing or corrupt image instead of raising; the
datamodule's collate function calls ``filter_valid`` first, then tokenises and stacks
what is left. A batch may therefore come out smaller than ``batch_size`` (or empty).
"""
from collections.abc import MutableMapping, Sequence


def filter_valid(batch: Sequence, stats: MutableMapping | None = None) -> list:
    """The items of ``batch`` that are not ``None``; adds the number dropped to
    ``stats["dropped"]`` when a dict/Counter is given (per process: under DataLoader
    workers the collate function runs inside each worker)."""
    valid = [item for item in batch if item is not None]
    if stats is not None:
        stats["dropped"] = stats.get("dropped", 0) + len(batch) - len(valid)
    return valid
