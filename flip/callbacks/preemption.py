"""Preemption: on SIGTERM (or SIGUSR1 outside SLURM) finish the step, save, exit cleanly.

Lightning turns SIGTERM into a clean stop after the current training batch (on every
rank); this callback writes ``last.ckpt`` at that point so ``ckpt_path=…/last.ckpt``
resumes at the same step, learning rate, sample count and data position. On SLURM,
Lightning's own SIGUSR1 handler checkpoints and requeues the job instead.
"""

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "last.ckpt"
        self._previous_sigusr1 = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # after Lightning registered its handlers (it restores what it found at teardown)
        if not SLURMEnvironment.detect():  # SIGUSR1 means "stop now" like SIGTERM
            self._previous_sigusr1 = signal.signal(
                signal.SIGUSR1, lambda *_: signal.raise_signal(signal.SIGTERM)
            )

    def _restore(self) -> None:
        if self._previous_sigusr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_sigusr1)
            self._previous_sigusr1 = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            if trainer.is_global_zero:
                log.warning(
                    "stopped by a signal after step %d; saved %s; resume with ckpt_path=%s",
                    trainer.global_step,
                    self.path,
                    self.path,
                )
