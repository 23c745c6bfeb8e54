"""Resuming after any stop: atomic checkpoint writes, ``ckpt_path=auto``, resume checks.

- ``AtomicCheckpointIO`` (``conf/trainer/default.yaml``: ``trainer.plugins``) writes every
  checkpoint to a hidden ``.<name>.<pid>.partial`` file in the checkpoint's own directory,
  flushes it to disk and renames it over the final name (``os.replace``, atomic on one
  filesystem): a kill at any moment leaves either the previous file or the complete new
  one under the final name. Lightning's own local write (``_atomic_save`` through an
  fsspec transaction) stages the bytes in the system temp directory and moves them
  with ``shutil.move``, which is a copy into the final name, not a rename, when the temp
  directory is on another filesystem than the checkpoints (local ``/tmp``, checkpoints on
  a network filesystem), and leaves its staging file behind when killed.
- ``ckpt_path=auto`` resumes from the newest checkpoint of the run directory that loads
  (``checkpoints/*.ckpt`` — ``last.ckpt`` and the periodic ones — and Lightning's SLURM
  ``hpc_ckpt_<n>.ckpt``), logging every newer one it skips and why, and starts fresh when
  there is none; so the same command can be re-run after any kill. The run directory must
  be fixed (``hydra.run.dir=…``), not Hydra's new timestamped one per run.
- Any checkpoint to resume from is checked before Lightning loads it: a damaged file,
  a weights-only file, or another architecture ends in one sentence naming the file and
  the contradicting keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flip.checkpoint import architecture_differences, load_checkpoint, model_config
from flip.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"  # ckpt_path=auto, next to Lightning's own "last", "best", "hpc"
PARTIAL = ".partial"  # suffix of a checkpoint being written
LIGHTNING_KEYWORDS = ("last", "best", "hpc", "registry")  # resolved by Lightning itself
RESUMABLE_KEYS = ("state_dict", "optimizer_states", "loops")  # a full Lightning checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local writes are atomic (module docstring)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        local = isinstance(get_filesystem(path), LocalFileSystem)
        if storage_options is not None or not local:  # s3://, gs://: fsspec's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")
        try:
            with partial.open("wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)  # the rename itself reaches the disk
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def write(self, checkpoint: dict, f) -> None:
        torch.save(checkpoint, f)


def _candidates(trainer: L.Trainer) -> list[Path]:
    """The run's checkpoint files, newest first: the checkpoint callback's directory and
    Lightning's SLURM ``hpc_ckpt_<n>.ckpt`` in the run directory."""
    root = Path(trainer.default_root_dir)
    dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath]
    files = {p for d in dirs for p in d.glob("*.ckpt")} | set(root.glob("hpc_ckpt_*.ckpt"))
    return sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _remove_partials(trainer: L.Trainer) -> None:
    """Files a killed run was writing (``AtomicCheckpointIO``): never loadable."""
    dirs = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if cb.dirpath}
    for partial in sorted(
        p for d in dirs | {Path(trainer.default_root_dir)} for p in d.glob(f".*{PARTIAL}")
    ):
        log.warning("removed %s: a checkpoint a stopped run was still writing", partial)
        partial.unlink(missing_ok=True)


def check_run_dir() -> None:
    """``ckpt_path=auto`` needs a run directory the next run finds again, not one named by
    the start time (Hydra's default ``outputs/${now:…}/${now:…}``): ``hydra.run.dir`` or
    ``output_dir`` fixed. A multirun job is rerun in its own directory when requeued."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return
    hc = HydraConfig.get()
    timed = "${now:" in str(OmegaConf.to_container(hc.run)["dir"])
    output_dir = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+") == "output_dir"]
    if timed and not any("${now:" not in o for o in output_dir):
        raise ConfigError(
            f"ckpt_path={AUTO} resumes from the run directory, but this run writes to a new "
            f"timestamped one ({hc.runtime.output_dir}) that the next run will not find; "
            "name a fixed one, e.g. hydra.run.dir=runs/my-run"
        )


def missing_training_state(ckpt: Mapping) -> list[str]:
    """The keys of a full Lightning checkpoint that ``ckpt`` lacks (weights-only: some)."""
    return [k for k in RESUMABLE_KEYS if k not in ckpt]


def check_resumable(path, ckpt: Mapping, module: L.LightningModule, model_cfg: Mapping | None):
    """One sentence naming the file when ``ckpt`` cannot resume training ``module``: not a
    full training checkpoint, trained with another architecture (the contradicting model
    config keys, else the tensors that differ)."""
    absent = missing_training_state(ckpt)
    if absent:
        raise CheckpointError(
            f"checkpoint {path} cannot resume training: it lacks {', '.join(absent)} (a "
            "weights-only file); start from its weights with init_from= instead"
        )
    stored = model_config(ckpt)
    if stored is not None and model_cfg is not None:
        differences = architecture_differences(stored, model_cfg)
        if differences:
            shown = ", ".join(
                f"model.{k}={want!r} (trained: {have!r})" for k, want, have in differences[:4]
            )
            more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
            raise CheckpointError(
                f"checkpoint {path} was trained with another model than this run asks for: "
                f"{shown}{more}; resume with the model settings it was trained with, or "
                f"start a new run from its weights with init_from={path}"
            )
    have, want = ckpt["state_dict"], module.state_dict()
    differ = sorted(
        [k for k in want if k not in have]
        + [k for k in have if k not in want]
        + [k for k in want if k in have and tuple(want[k].shape) != tuple(have[k].shape)]
    )
    if differ:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run's model: {len(differ)} tensors are "
            f"absent on one side or differ in shape ({', '.join(differ[:4])}"
            f"{', …' if len(differ) > 4 else ''}); resume with the settings it was trained "
            "with"
        )


def resume_path(
    ckpt_path, trainer: L.Trainer, module: L.LightningModule, model_cfg: Mapping | None = None
) -> str | None:
    """What ``trainer.fit(ckpt_path=…)`` gets: with ``auto`` the newest checkpoint of the
    run that loads and fits the model (None: start fresh), a given path once checked (a
    damaged or unfitting file ends in ``CheckpointError``), Lightning's own keywords
    (``last``, ``hpc``, …) and None as they are."""
    if ckpt_path is None or ckpt_path in LIGHTNING_KEYWORDS:
        return ckpt_path
    if ckpt_path != AUTO:
        check_resumable(ckpt_path, load_checkpoint(ckpt_path, mmap=True), module, model_cfg)
        return str(ckpt_path)
    check_run_dir()
    _remove_partials(trainer)
    for path in _candidates(trainer):
        try:
            ckpt = load_checkpoint(path, mmap=True)
            absent = missing_training_state(ckpt)
            if absent:
                raise CheckpointError(f"{path} lacks {', '.join(absent)} (weights only)")
        except CheckpointError as err:
            log.warning("ckpt_path=%s skips %s: %s", AUTO, path.name, err)
            continue
        check_resumable(path, ckpt, module, model_cfg)  # loadable but another model: stop
        log.info("ckpt_path=%s resumes from %s (step %s)", AUTO, path, ckpt.get("global_step"))
        return str(path)
    log.info(
        "ckpt_path=%s: no checkpoint in %s yet, starting fresh", AUTO, trainer.default_root_dir
    )
    return None
