"""One way through every run: prepare → build → fit or test → record.

``train(cfg)`` (``flip-train``, ``python train.py``) runs pre-training or a downstream task;
``evaluate(cfg)`` (``flip-eval``, ``python eval.py``) evaluates a checkpoint. Each:

1. prepares: the accelerator is there, the console quiet (``flip.console``), the seed set;
2. builds the job's part — ``flip.train.Pretraining``, a task's
   ``flip.tasks.transfer.Transfer`` (their checks, the model, the Trainer's length; the
   data follows an ``init_from`` checkpoint) or ``flip.eval.runner`` — then one Trainer
   with the configured logger and callbacks, the datamodule with the per-device batch and
   the LightningModule;
3. fits (then ``last.ckpt`` is written, whatever the checkpoint interval, and the job's
   closing evaluation prints its line) or tests (evaluation);
4. records: ``<output_dir>/result.json`` of a training run (final metrics and the resolved
   config; ``experiments/collect.py`` reads it), ``results.json``/``results.md`` of an
   evaluation with its metrics sent to the logger; a W&B run is finished, so the next job of
   a multirun starts its own.

A training job is an object with ``trainer_args()`` (the Trainer's length),
``module(data)`` (the LightningModule), ``report(trainer, module, data)`` (closing metrics,
printed) and ``then(last_ckpt)`` (a run that follows, or None); its constructor checks the
config and settles what follows a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from flip.callbacks.progress import StepProgressBar
from flip.config import check_hardware, per_device_batch
from flip.console import quiet_console
from flip.errors import CheckpointError
from flip.eval import runner as evaluation
from flip.resume import AUTO, LIGHTNING_KEYWORDS, resume_path
from flip.tasks.transfer import Transfer, is_transfer_task
from flip.train import Pretraining


def prepare(cfg: DictConfig) -> None:
    check_hardware(cfg.trainer.accelerator)
    quiet_console(cfg.trainer.accelerator, cfg.get("verbose", False))
    L.seed_everything(cfg.seed, workers=True)


def build_logger(cfg: DictConfig) -> Logger | None:
    return hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else None


def build_trainer(cfg: DictConfig, logger: Logger | None, **overrides) -> L.Trainer:
    """``cfg.trainer`` with the configured callbacks (and the step progress bar)."""
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    return hydra.utils.instantiate(
        cfg.trainer, logger=logger or False, callbacks=callbacks, **overrides
    )


def finish(logger: Logger | None, trainer: L.Trainer) -> None:
    if isinstance(logger, WandbLogger) and trainer.is_global_zero:
        logger.experiment.finish()  # the next job of a multirun starts its own W&B run


def train(cfg: DictConfig) -> dict[str, float]:
    """Pre-train (or, with ``task=finetune|captioning|vqa``, train a downstream task), then
    the job's closing evaluation; returns the final metrics."""
    prepare(cfg)
    if cfg.ckpt_path not in (None, AUTO, *LIGHTNING_KEYWORDS) and not Path(cfg.ckpt_path).is_file():
        raise CheckpointError(f"ckpt_path={cfg.ckpt_path} does not exist")
    job = Transfer(cfg) if is_transfer_task(cfg) else Pretraining(cfg)
    logger = build_logger(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if logger:  # the whole resolved run config, next to the metrics
        logger.log_hyperparams(resolved)
    trainer = build_trainer(cfg, logger, **job.trainer_args())
    data = hydra.utils.instantiate(cfg.data, batch_size=per_device_batch(cfg, trainer.world_size))
    module = job.module(data)

    resume = resume_path(cfg.ckpt_path, trainer, module, job.model_config)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    last = None
    if trainer.checkpoint_callback is not None:  # the final weights, whatever the interval
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(last, weights_only=False)  # resumable: optimiser, loops too
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(job.report(trainer, module, data))

    if trainer.is_global_zero:  # one record per run, read by experiments/collect.py
        record = {"metrics": metrics, "config": resolved}
        (Path(cfg.output_dir) / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    finish(logger, trainer)
    follow = job.then(last)
    if follow is None:
        return metrics
    return {**train(follow), **{f"pretrain/{k}": v for k, v in metrics.items()}}


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.eval_data`` (``flip.eval.runner``); returns flat
    metrics ``<dataset>/<protocol>/<metric>``."""
    prepare(cfg)
    logger = build_logger(cfg)
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=False, callbacks=[], use_distributed_sampler=False
    )
    metrics, rows = evaluation.evaluate(cfg, trainer)
    if trainer.is_global_zero:
        evaluation.report(cfg, rows)
        if logger:  # the final metrics, once
            logger.log_hyperparams(
                {
                    "ckpt_path": str(cfg.ckpt_path),
                    "eval_task": cfg.eval_task.name,
                    "eval_data": list(cfg.eval_data),
                }
            )
            logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
            logger.finalize("success")
    finish(logger, trainer)
    return metrics
