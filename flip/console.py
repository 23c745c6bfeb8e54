"""What a run prints: the progress bar (``flip.callbacks.progress``), the data summary,
warnings that matter and the result line — not Lightning's start-up chatter.

``quiet_console(accelerator, verbose)`` (called by the entry points before the Trainer is
built) silences, unless ``verbose=true``:
- Lightning's info lines (seed, "GPU available", "TPU available", the LitLogger tip,
  "`Trainer.fit` stopped") — they go to the ``lightning`` rank-zero loggers;
- torch-xla's "Defaulting to PJRT_DEVICE=CPU" on runs that do not use XLA, by naming the
  CPU runtime for them (``PJRT_DEVICE`` is left alone when set, and on TPU runs);
- Lightning's warning that ModelCheckpoint under manual optimisation saves the state
  *after* the optimiser step: that is what our checkpoints should hold (global step N =
  N optimiser steps done), so the warning is always silenced.
"""

import logging
import os
import warnings

LIGHTNING_INFO = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning.fabric.utilities.rank_zero",
)


def quiet_console(accelerator: str, verbose: bool = False) -> None:
    warnings.filterwarnings(
        "ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps"
    )
    if verbose:
        return
    for name in LIGHTNING_INFO:
        logging.getLogger(name).setLevel(logging.WARNING)
    if accelerator != "tpu":
        os.environ.setdefault("PJRT_DEVICE", "CPU")
