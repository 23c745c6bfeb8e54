"""Bad input never kills a run and never passes silently: skip, count, carry, log, enforce.

How the counts travel
---------------------
A bad sample is skipped where it is read, usually inside a DataLoader worker process,
and counted there in a ``LoaderStats`` (good samples, shards opened, skips per reason,
non-RGB images converted, one recent example per reason). Counters in a worker cannot be
read from the main process, so every batch carries the counts its worker accumulated
since that worker's previous batch: the training loader yields ``Batch`` objects, which
are 2-tuples ``(images, tokens)`` with one extra attribute ``.stats``. A ``Batch``
unpacks exactly like the plain pair, so code that iterates ``train_dataloader()``
directly sees the data protocol unchanged.

During ``Trainer.fit``, ``QualityMixin.on_before_batch_transfer`` (a LightningDataModule
hook, mixed into the repository's DataModules) adds ``batch.stats`` to
``datamodule.loader_stats`` and hands the LightningModule a plain ``(images, tokens)``
tuple. ``DataQualityCallback`` (``conf/callbacks/default.yaml``) then, every
``trainer.log_every_n_steps`` batches, sums the counts over ranks, logs
``data/skipped_<reason>``, ``data/samples_read``, ``data/skip_rate`` and friends, stops the
run with ``DataError`` when a skip rate exceeds ``data.max_skip_rate`` (after
``data.skip_rate_min_samples`` samples, so one bad first shard does not end a run), and
logs a one-paragraph summary when training ends.

Two rates are enforced, both against ``max_skip_rate``:
* sample skip rate = skipped samples / (good + skipped samples);
* shard failure rate = failed shard reads (unreadable or corrupt) / shard reads.

Counts are of the *reader*: samples that were read and counted but were still in a
shuffle buffer or a prefetched batch when training stopped are included.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import lightning as L
import torch

from flip.config import ConfigError

log = logging.getLogger(__name__)

SHARD_REASONS = ("unreadable_shard", "corrupt_shard")
SAMPLE_REASONS = ("missing_image", "empty_image", "corrupt_image", "large_image",
                  "missing_caption", "empty_caption")
REASONS = SHARD_REASONS + SAMPLE_REASONS
_ALIASES = {"missing": "missing_image", "corrupt": "corrupt_image"}  # CsvCaptions' keys


class DataError(RuntimeError):
    """The input data cannot be trained on (nothing readable, or too much of it is bad)."""


class DataPathError(DataError, ConfigError):
    """A data setting points at nothing readable (found at start-up; ``train.py`` prints
    it as one ``error:`` line, like other configuration errors)."""


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
        return {"samples": self.samples, "shards": self.shards, "skipped": dict(self.skipped),
                "converted": dict(self.converted), "examples": dict(self.examples)}

    @classmethod
    def from_dict(cls, d: dict) -> LoaderStats:
        return cls(d["samples"], d["shards"], Counter(d["skipped"]), Counter(d["converted"]),
                   dict(d["examples"]))

    # ---- summing over DDP ranks: a fixed-order vector -----------------------------------
    def to_tensor(self, device=None) -> torch.Tensor:
        values = [self.samples, self.shards, *(self.skipped[r] for r in REASONS),
                  sum(self.converted.values())]
        return torch.tensor(values, dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, like: LoaderStats) -> LoaderStats:
        """Counts from ``to_tensor`` (summed over ranks); modes and examples from ``like``."""
        v = [int(x) for x in t.tolist()]
        skipped = Counter({r: n for r, n in zip(REASONS, v[2:2 + len(REASONS)]) if n})
        return cls(v[0], v[1], skipped, Counter(like.converted), dict(like.examples))

    def metrics(self) -> dict[str, float]:
        out = {f"data/skipped_{r}": float(self.skipped[r]) for r in REASONS}
        out.update({"data/samples_read": float(self.samples_read),
                    "data/skip_rate": self.skip_rate,
                    "data/converted_to_rgb": float(sum(self.converted.values()))})
        if self.shards:
            out.update({"data/shards_read": float(self.shards),
                        "data/shard_failure_rate": self.shard_failure_rate})
        return out

    def summary(self) -> str:
        lines = [f"data: {self.samples:,} good samples, {self.sample_skips:,} skipped "
                 f"({100 * self.skip_rate:.2f}% of {self.samples_read:,} read)"]
        if self.shards:
            lines.append(f"  shards read: {self.shards:,}, failed: {self.shard_failures:,} "
                         f"({100 * self.shard_failure_rate:.2f}%)")
        for r in REASONS:
            if self.skipped[r]:
                example = self.examples.get(r)
                lines.append(f"  skipped {r}: {self.skipped[r]:,}"
                             + (f"  (e.g. {example})" if example else ""))
        if self.converted:
            modes = ", ".join(f"{m} {n:,}" for m, n in sorted(self.converted.items()))
            lines.append(f"  converted to RGB (kept): {modes}")
        return "\n".join(lines)


class Batch(tuple):
    """``(images, tokens)``, carrying the ``LoaderStats`` read since the previous batch.

    Unpacks and indexes as the plain pair (``len(batch) == 2``). Note: ``pin_memory=True``
    rebuilds tuples and would drop ``stats``; the loaders here do not pin.
    """

    def __new__(cls, images: torch.Tensor, tokens: torch.Tensor,
                stats: LoaderStats | None = None):
        self = super().__new__(cls, (images, tokens))
        self.stats = stats
        return self

    def __reduce__(self):  # survives the trip from a worker process
        return (Batch, (self[0], self[1], self.stats))


def stats_of_dataset(dataset, samples: int) -> LoaderStats:
    """The delta of a map-style dataset's ``skipped`` Counter since the last call.

    Call it where the dataset lives (in the DataLoader worker: the collate function), with
    the number of good samples in the batch. Datasets without ``skipped`` count nothing.
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
    """DataModule part: strips ``Batch.stats`` before transfer and accumulates them.

    ``max_skip_rate``: largest tolerated fraction of skipped samples (and of failed shard
    reads); ``skip_rate_min_samples``: samples to read before the rate is enforced.
    """

    def init_quality(self, max_skip_rate: float = 0.05, skip_rate_min_samples: int = 1000):
        if not 0 <= max_skip_rate <= 1:
            raise ValueError(f"data.max_skip_rate={max_skip_rate!r} must be in [0, 1]")
        self.max_skip_rate, self.skip_rate_min_samples = max_skip_rate, skip_rate_min_samples
        self.loader_stats = LoaderStats()  # this rank's, since this process started
        self.batches_seen = 0  # training batches, including those before a resume

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, Batch):
            self.loader_stats += batch.stats
            self.batches_seen += 1
            return tuple(batch)
        return batch

    # saved in checkpoints: a resumed stream is seeded by the batches already trained on
    def state_dict(self) -> dict:
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state: dict) -> None:
        self.batches_seen = int(state.get("batches_seen", 0))


class DataQualityCallback(L.Callback):
    """Logs ``data/*`` counts, enforces the datamodule's ``max_skip_rate``, prints a summary.

    A no-op for datamodules without ``loader_stats``. ``every``: with several ranks, the
    batches between the cross-rank sums and checks (default ``trainer.log_every_n_steps``;
    one process checks every batch); all ranks sum and check at the same batches, so a
    stop is raised on every rank together. The totals are saved in checkpoints and
    continue after a resume (as of the last sum before the checkpoint).
    """

    def __init__(self, every: int | None = None):
        self.every = every
        self.total: LoaderStats | None = None  # over all ranks, as of the last sum
        self.resumed = LoaderStats()  # the totals saved in the checkpoint a run resumed from

    @staticmethod
    def _stats(trainer) -> LoaderStats | None:
        return getattr(trainer.datamodule, "loader_stats", None) if trainer.datamodule else None

    def _reduce(self, trainer, pl_module, stats: LoaderStats) -> LoaderStats:
        total = LoaderStats.from_dict(self.resumed.to_dict())  # a copy
        if trainer.world_size == 1:
            total += stats
        else:
            summed = trainer.strategy.reduce(stats.to_tensor(pl_module.device), reduce_op="sum")
            total += LoaderStats.from_tensor(summed.cpu(), like=stats)
        return total

    # counts continue across a resume (as of the last sum before the checkpoint)
    def state_dict(self) -> dict:
        return {"total": self.total.to_dict()} if self.total is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "total" in state:
            self.resumed = LoaderStats.from_dict(state["total"])

    def check(self, datamodule, total: LoaderStats) -> None:
        limit = datamodule.max_skip_rate
        if total.samples_read < datamodule.skip_rate_min_samples:
            return
        if total.skip_rate > limit or total.shard_failure_rate > limit:
            what = (f"{100 * total.skip_rate:.1f}% of the {total.samples_read:,} samples read"
                    if total.skip_rate > limit else
                    f"{100 * total.shard_failure_rate:.1f}% of the {total.shards:,} shard reads")
            raise DataError(
                f"too much bad input: {what} failed, above data.max_skip_rate="
                f"{limit:g}; fix or remove the bad files, or raise data.max_skip_rate.\n"
                + total.summary())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stats = self._stats(trainer)
        if stats is None:
            return
        every = 1 if trainer.world_size == 1 else (self.every or trainer.log_every_n_steps or 1)
        if self.total is None or (batch_idx + 1) % every == 0:
            self.total = self._reduce(trainer, pl_module, stats)
            self.check(trainer.datamodule, self.total)
        pl_module.log_dict(self.total.metrics(), on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module):
        stats = self._stats(trainer)
        if stats is None:
            return
        self.total = self._reduce(trainer, pl_module, stats)
        if trainer.is_global_zero:
            level = logging.WARNING if self.total.sample_skips or self.total.shard_failures \
                else logging.INFO
            log.log(level, "%s", self.total.summary())
