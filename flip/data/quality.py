"""Bad input never kills a run and never passes silently: skip, count, report, log, enforce.

How the counts travel
---------------------
A bad sample is skipped where it is read, usually inside a DataLoader worker process,
and counted there in a ``LoaderStats`` (good samples, shards opened, skips per reason,
non-RGB images converted by mode, one recent example per reason). Counters in a worker
cannot be read from the main process, so each reader adds its counts to a
``SharedStats``: a small table in shared memory (one row per DataLoader worker, row 0
without workers) that the DataModule creates in ``train_dataloader()`` and hands to the
dataset (``ShardStream``) or the collate function (map-style sets) that runs in the
workers. A reader adds its new counts just before it hands over each batch, and once
more when a finite pass ends; the main process reads the sum of the rows whenever it
wants (``datamodule.loader_stats``). Batches stay plain ``(images, tokens)`` tuples, so
``data.pin_memory`` can be on. Nothing is queued: counts are visible as soon as they are
added, need no draining, are not lost when workers stop (persistent or not), and travel
the same way with fork or spawn workers (torch shares the memory) and in-process.

``flip.callbacks.data_quality.DataQualityCallback`` (``conf/callbacks/default.yaml``) then, every
``trainer.log_every_n_steps`` batches, sums the counts over ranks, logs
``data/skipped_<reason>``, ``data/samples_read``, ``data/skip_rate`` and friends, stops the
run with ``DataError`` when a skip rate exceeds ``data.max_skip_rate`` (after
``data.skip_rate_min_samples`` samples, so one bad first shard does not end a run), and
logs a one-paragraph summary when training ends.

Two rates are enforced, both against ``max_skip_rate``:
* sample skip rate = skipped samples / (good + skipped samples);
* shard failure rate = failed shard reads (unreadable or corrupt) / shard reads.

Counts are of the *readers*, in whole batches: they include the batches the loader has
prefetched but training has not used yet (at most ``num_workers x prefetch_factor`` plus
the one Lightning fetches ahead), and, in an endless stream, not the skips a reader met
after its latest batch (they come with its next one).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from flip.errors import ConfigError

SHARD_REASONS = ("unreadable_shard", "corrupt_shard")
SAMPLE_REASONS = (
    "missing_image",
    "empty_image",
    "corrupt_image",
    "large_image",
    "missing_caption",
    "empty_caption",
)
REASONS = SHARD_REASONS + SAMPLE_REASONS
MODES = (*Image.MODES, "other")  # original modes of converted images; "other": any new one
EXAMPLE_BYTES = 512  # kept of each example in shared memory (UTF-8)
_ALIASES = {"missing": "missing_image", "corrupt": "corrupt_image"}  # CsvCaptions' keys


@dataclass
class LoaderStats:
    """Counts of what a loader read; add them up with ``+=``."""

    samples: int = 0  # good samples produced
    shards: int = 0  # shard reads started (webdataset); 0 for map-style sets
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    converted: Counter = field(default_factory=Counter)  # original image mode -> count
    examples: dict = field(default_factory=dict)  # reason -> one recent "where: why"

    def skip(self, reason: str, example: str = "") -> None:
        self.skipped[reason] += 1
        if example:
            self.examples[reason] = example

    def __iadd__(self, other: LoaderStats | None) -> LoaderStats:
        if other is not None:
            self.samples += other.samples
            self.shards += other.shards
            self.skipped.update(other.skipped)
            self.converted.update(other.converted)
            self.examples.update(other.examples)
        return self

    def take(self) -> LoaderStats:
        """The counts so far, and reset to zero (a worker's delta since its last batch)."""
        out = LoaderStats(self.samples, self.shards, self.skipped, self.converted, self.examples)
        self.samples, self.shards = 0, 0
        self.skipped, self.converted, self.examples = Counter(), Counter(), {}
        return out

    @property
    def sample_skips(self) -> int:
        return sum(self.skipped[r] for r in SAMPLE_REASONS)

    @property
    def shard_failures(self) -> int:
        return sum(self.skipped[r] for r in SHARD_REASONS)

    @property
    def samples_read(self) -> int:
        return self.samples + self.sample_skips

    @property
    def skip_rate(self) -> float:
        return self.sample_skips / self.samples_read if self.samples_read else 0.0

    @property
    def shard_failure_rate(self) -> float:
        return self.shard_failures / self.shards if self.shards else 0.0

    # ---- checkpoints: plain types only -------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "samples": self.samples,
            "shards": self.shards,
            "skipped": dict(self.skipped),
            "converted": dict(self.converted),
            "examples": dict(self.examples),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LoaderStats:
        return cls(
            d["samples"],
            d["shards"],
            Counter(d["skipped"]),
            Counter(d["converted"]),
            dict(d["examples"]),
        )

    # ---- shared memory and sums over DDP ranks: a fixed-order vector --------------------
    def to_tensor(self, device=None, dtype=torch.float64) -> torch.Tensor:
        """samples, shards, skips per ``REASONS``, conversions per ``MODES``."""
        unknown = set(self.skipped) - set(REASONS)
        if unknown:
            raise ValueError(
                f"skip reasons {sorted(unknown)} are not in "
                "flip.data.quality.REASONS; add them there"
            )
        modes = [self.converted[m] for m in MODES[:-1]]
        other = sum(self.converted.values()) - sum(modes)
        values = [self.samples, self.shards, *(self.skipped[r] for r in REASONS), *modes, other]
        return torch.tensor(values, dtype=dtype, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, examples: dict | None = None) -> LoaderStats:
        """The counts of a ``to_tensor`` vector (or a sum of them), with these examples."""
        v = [int(x) for x in t.tolist()]
        n = 2 + len(REASONS)
        skipped = Counter({r: c for r, c in zip(REASONS, v[2:n]) if c})
        converted = Counter({m: c for m, c in zip(MODES, v[n:]) if c})
        return cls(v[0], v[1], skipped, converted, dict(examples or {}))

    def metrics(self) -> dict[str, float]:
        out = {f"data/skipped_{r}": float(self.skipped[r]) for r in REASONS}
        out.update(
            {
                "data/samples_read": float(self.samples_read),
                "data/skip_rate": self.skip_rate,
                "data/converted_to_rgb": float(sum(self.converted.values())),
            }
        )
        if self.shards:
            out.update(
                {
                    "data/shards_read": float(self.shards),
                    "data/shard_failure_rate": self.shard_failure_rate,
                }
            )
        return out

    def summary(self) -> str:
        lines = [
            f"data: {self.samples:,} good samples, {self.sample_skips:,} skipped "
            f"({100 * self.skip_rate:.2f}% of {self.samples_read:,} read)"
        ]
        if self.shards:
            lines.append(
                f"  shards read: {self.shards:,}, failed: {self.shard_failures:,} "
                f"({100 * self.shard_failure_rate:.2f}%)"
            )
        for r in REASONS:
            if self.skipped[r]:
                example = self.examples.get(r)
                lines.append(
                    f"  skipped {r}: {self.skipped[r]:,}"
                    + (f"  (e.g. {example})" if example else "")
                )
        if self.converted:
            modes = ", ".join(f"{m} {n:,}" for m, n in sorted(self.converted.items()))
            lines.append(f"  converted to RGB (kept): {modes}")
        return "\n".join(lines)


class SharedStats:
    """The ``LoaderStats`` of one loader's readers, in shared memory: readers ``add``, any
    process ``read``s their sum.

    ``readers``: rows, one per DataLoader worker (1 when loading in-process). A reader adds
    to its own row only (``get_worker_info().id``, 0 in-process), so writers never race; a
    ``read`` during an ``add`` may see that batch's counts half added. Pickled into
    spawned workers, the tensors stay shared (torch's multiprocessing reductions).
    """

    def __init__(self, readers: int):
        width = len(LoaderStats().to_tensor())
        self.counts = torch.zeros(readers, width, dtype=torch.int64).share_memory_()
        self.examples = torch.zeros(
            readers, len(REASONS), EXAMPLE_BYTES, dtype=torch.uint8
        ).share_memory_()

    def add(self, stats: LoaderStats) -> None:
        """Add ``stats`` (a reader's counts since its last ``add``) to the caller's row."""
        info = get_worker_info()
        row = info.id if info is not None else 0
        self.counts[row] += stats.to_tensor(dtype=torch.int64)
        for reason, example in stats.examples.items():
            text = np.zeros(EXAMPLE_BYTES, np.uint8)
            data = example.encode()[:EXAMPLE_BYTES]
            text[: len(data)] = np.frombuffer(data, np.uint8)
            self.examples[row, REASONS.index(reason)] = torch.from_numpy(text)

    def read(self) -> LoaderStats:
        """The sum over readers, with each reason's example from the last reader that has one."""
        examples = {}
        for i, reason in enumerate(REASONS):
            for row in self.examples[:, i].numpy():
                text = row.tobytes().rstrip(b"\0").decode(errors="ignore")
                if text:
                    examples[reason] = text
        return LoaderStats.from_tensor(self.counts.sum(0), examples)


def stats_of_dataset(dataset, samples: int) -> LoaderStats:
    """The delta of a map-style dataset's ``skipped`` Counter since the last call.

    Call it where the dataset lives (in the DataLoader worker: the collate function), with
    the number of good samples in the batch, and ``SharedStats.add`` the result. Datasets
    without ``skipped`` count nothing.
    """
    skipped = getattr(dataset, "skipped", None)
    stats = LoaderStats(samples=samples)
    if skipped is None:
        return stats
    reported = getattr(dataset, "_skips_reported", Counter())
    for reason, n in (skipped - reported).items():
        stats.skipped[_ALIASES.get(reason, reason)] += n
    dataset._skips_reported = Counter(skipped)
    for reason, example in getattr(dataset, "examples", {}).items():
        stats.examples[_ALIASES.get(reason, reason)] = example
    converted = getattr(dataset, "converted", None)
    if converted is not None:
        stats.converted = converted - getattr(dataset, "_converted_reported", Counter())
        dataset._converted_reported = Counter(converted)
    return stats


class QualityMixin:
    """DataModule part: the readers' ``SharedStats``, and the training batches seen.

    ``max_skip_rate``: largest tolerated fraction of skipped samples (and of failed shard
    reads); ``skip_rate_min_samples``: samples to read before the rate is enforced. The
    DataModule sets ``num_workers`` and passes ``shared_stats()`` to its training loader's
    readers.
    """

    def init_quality(self, max_skip_rate: float = 0.05, skip_rate_min_samples: int = 1000):
        if not 0 <= max_skip_rate <= 1:
            raise ConfigError(f"data.max_skip_rate={max_skip_rate!r} must be in [0, 1]")
        self.max_skip_rate, self.skip_rate_min_samples = max_skip_rate, skip_rate_min_samples
        self._shared_stats, self._shared_stats_pid = None, None
        self.batches_seen = 0  # training batches, including those before a resume

    def shared_stats(self) -> SharedStats:
        """The table this process's training loaders report to, one row per worker; made on
        first use in each process, so DDP ranks forked from one parent do not share it."""
        if self._shared_stats is None or self._shared_stats_pid != os.getpid():
            self._shared_stats = SharedStats(max(1, self.num_workers))
            self._shared_stats_pid = os.getpid()
        return self._shared_stats

    @property
    def loader_stats(self) -> LoaderStats:
        """This rank's counts since this process started, as of now."""
        return self.shared_stats().read()

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.batches_seen += 1
        return batch

    # saved in checkpoints: a resumed stream is seeded by the batches already trained on
    def state_dict(self) -> dict:
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))
