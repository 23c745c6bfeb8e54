"""The commands, usable from any directory:

    flip-train [overrides]              # = python train.py [overrides] in the repository
    flip-eval ckpt_path=… [overrides]   # = python eval.py ckpt_path=… [overrides]
    python -m flip.cli train|eval [overrides]

Hydra mains reading the configs from the installed package (``pkg://flip.conf``: the
repository's ``conf/``, installed as ``flip.conf``); the repository's ``train.py`` and
``eval.py`` call them. One module per command, named like the scripts, so Hydra names the
job (log file, SLURM job) ``train`` or ``eval``. Each runs ``flip.run`` through
``run_or_exit``: the one place where bad input becomes one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from omegaconf import DictConfig

from flip.errors import FlipError

CONFIG_PATH = "pkg://flip.conf"
WORKER_TRACEBACK = "\nOriginal Traceback"  # torch's DataLoader re-raises a worker's error with it

T = TypeVar("T")


def user_error(err: BaseException) -> FlipError | None:
    """The ``FlipError`` behind ``err``, following the explicit causes (``raise … from``):
    Hydra's "Error in call to target" ``InstantiationException`` carries the error raised
    in a constructor as its cause; Lightning re-raises errors of ``setup`` and of the
    checkpoint restore as they are."""
    while err is not None:
        if isinstance(err, FlipError):
            return err
        err = err.__cause__
    return None


def one_line(err: FlipError) -> str:
    """The error's sentence (from a DataLoader worker: without the worker's traceback)."""
    text = str(err)
    if WORKER_TRACEBACK in text:
        text = text.rsplit("\n", 1)[-1].split(": ", 1)[-1]
    return text


def run_or_exit(run: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """``run(cfg)``; bad input (a ``flip.errors.FlipError``: a setting, data or a checkpoint)
    raised anywhere in it ends the process with ``error: <its sentence>`` and exit code 1,
    no traceback. ``verbose=true`` or ``HYDRA_FULL_ERROR=1`` keep the traceback; other
    exceptions (bugs) always keep it."""
    try:
        return run(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None or cfg.get("verbose") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: {one_line(cause)}") from None
