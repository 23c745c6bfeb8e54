"""The data-quality callback: ``data/*`` counts logged, ``data.max_skip_rate`` enforced, a
summary at the end (how the counts travel from the loader workers: ``flip.data.quality``)."""

from __future__ import annotations

import logging

import lightning as L

from flip.data.quality import LoaderStats
from flip.errors import DataError

log = logging.getLogger(__name__)


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
            total += LoaderStats.from_tensor(summed.cpu(), examples=stats.examples)
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
            what = (
                f"{100 * total.skip_rate:.1f}% of the {total.samples_read:,} samples read"
                if total.skip_rate > limit
                else f"{100 * total.shard_failure_rate:.1f}% of the {total.shards:,} shard reads"
            )
            raise DataError(
                f"too much bad input: {what} failed, above data.max_skip_rate="
                f"{limit:g}; fix or remove the bad files, or raise data.max_skip_rate.\n"
                + total.summary()
            )

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
            level = (
                logging.WARNING
                if self.total.sample_skips or self.total.shard_failures
                else logging.INFO
            )
            log.log(level, "%s", self.total.summary())
