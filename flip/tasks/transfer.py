"""Downstream tasks on pre-trained FLIP encoders: the common contract and the run.

``python train.py task=finetune|captioning|vqa init_from=<pre-training checkpoint>``
runs a task that trains new parameters (a head, a decoder, a fusion Transformer) on top
of encoders taken from a FLIP checkpoint. The architecture is read from the checkpoint
(its stored model config); the towers run unmasked (mask ratio 0) with the task's
run-time settings (e.g. drop path).

A task is a ``TransferModule`` subclass whose constructor takes ``model_config`` (the
checkpoint's) plus the task's own hyper-parameters (``conf/task/<task>.yaml``) plus
what the data defines (``datamodule.task_args``: number of classes, answer list,
vocabulary); it names the FLIP sub-modules it initialises from the checkpoint
(``pretrained_parts``) and writes the closing line (``summary``: its metric next to a
trivial baseline). Its datamodule is ``conf/data/<dataset>.yaml``, built with the
per-device batch; its ``image_size`` (and ``context_length``, where it has one) follow the
checkpoint.

Length: ``task.epochs`` passes over the training set; validation after every
``task.eval_every`` epochs and once at the end. ``schedule`` and ``mask`` (pre-training
settings) do not apply; ``batch.global`` is the task's global batch (``batch.micro``
must be null).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from flip.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    merge_model_config,
    model_config,
    model_state,
)
from flip.config import ConfigError, check_hardware, per_device_batch
from flip.console import quiet_console
from flip.models.clip import no_decay_names
from flip.resume import resume_path

log = logging.getLogger(__name__)

TOWERS = {"visual": "image", "text": "text"}  # FLIP attribute -> model config key


def build_tower(model_config: Mapping, part: str, **runtime) -> nn.Module:
    """One tower of the pre-trained FLIP (``part``: "visual" or "text"), unmasked, with
    the task's run-time settings (``drop_path``, ``grad_checkpointing``)."""
    cfg = merge_model_config(model_config, {TOWERS[part]: {"mask_ratio": 0.0, **runtime}})
    return hydra.utils.instantiate(cfg[TOWERS[part]])


def part_param_groups(
    parts: Iterable[tuple[str, nn.Module, float]],
    weight_decay: float,
    also_no_decay: Iterable[str] = (),
) -> list[dict]:
    """AdamW groups of a task with a learning rate per part: for each (name, module, lr),
    its decayed weights and, without decay, the official no-decay set (biases, norm scales,
    position embeddings; ``no_decay_names``) plus ``also_no_decay`` (full names,
    "part.param"). Groups are named "<part>/decay" and "<part>/no_decay"; empty ones are
    left out."""
    also = set(also_no_decay)
    groups = []
    for name, module, lr in parts:
        no_decay = no_decay_names(module) | {
            n[len(name) + 1 :] for n in also if n.startswith(name + ".")
        }
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for n, p in params if (n not in no_decay) == decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": lr,
                        "name": f"{name}/{'decay' if decay else 'no_decay'}",
                        "weight_decay": weight_decay if decay else 0.0,
                    }
                )
    return groups


class TransferModule(L.LightningModule):
    """Base of the downstream tasks: loads the pre-trained parts, reports the result."""

    # FLIP sub-module name -> attribute of this module that receives its weights
    pretrained_parts: Mapping[str, str] = {"visual": "visual"}

    def load_pretrained(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Copy the checkpoint's weights of each pretrained part (every weight of the part
        must be present); the other FLIP tensors (projections, logit scale, unused
        towers) are not needed by the task."""
        for part, attribute in self.pretrained_parts.items():
            prefix = part + "."
            weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not weights:
                raise CheckpointError(f"{source} holds no weights of the {part} tower")
            load_weights(getattr(self, attribute), weights, f"{source} ({part})")

    def summary(self, metrics: Mapping[str, float]) -> str:
        """The run's closing line: the task metric beside its trivial baseline."""
        raise NotImplementedError


def is_transfer_task(cfg: DictConfig) -> bool:
    target = cfg.task.get("_target_")
    return target is not None and issubclass(hydra.utils.get_class(target), TransferModule)


def _data_follows_checkpoint(cfg: DictConfig, model_cfg: Mapping) -> None:
    follow = {
        "image_size": model_cfg["image"]["image_size"],
        "context_length": model_cfg["text"]["context_length"],
    }
    with open_dict(cfg):
        for key, value in follow.items():
            if key in cfg.data and cfg.data[key] != value:
                log.info("data.%s=%s from the init_from checkpoint", key, value)
                cfg.data[key] = value


def train_transfer(cfg: DictConfig) -> dict[str, float]:
    """Train a downstream task on the encoders of ``cfg.init_from``; validate; print the
    task's summary line; returns the final metrics."""
    task = cfg.task._target_.rsplit(".", 1)[-1]
    if not cfg.get("init_from"):
        raise ConfigError(
            f"{task} trains on pre-trained encoders: give init_from=<checkpoint> (e.g. "
            "outputs/<date>/<time>/checkpoints/last.ckpt of a `python train.py` run)"
        )
    if cfg.batch.micro is not None:
        raise ConfigError(
            f"batch.micro={cfg.batch.micro} is gradient caching for the "
            "contrastive loss; downstream tasks take batch.micro=null"
        )
    check_hardware(cfg.trainer.accelerator)
    quiet_console(cfg.trainer.accelerator, cfg.get("verbose", False))
    L.seed_everything(cfg.seed, workers=True)

    ckpt = load_checkpoint(cfg.init_from)
    model_cfg = model_config(ckpt)
    if model_cfg is None:
        raise CheckpointError(
            f"init_from={cfg.init_from} stores no model config (not a "
            "checkpoint written by flip's pre-training)"
        )
    _data_follows_checkpoint(cfg, model_cfg)
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if logger:
        logger.log_hyperparams(resolved)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_epochs=cfg.task.epochs,
        max_steps=-1,
        val_check_interval=1.0,
        check_val_every_n_epoch=cfg.task.get("eval_every", 1),
        logger=logger,
        callbacks=callbacks,
    )
    data = hydra.utils.instantiate(cfg.data, batch_size=per_device_batch(cfg, trainer.world_size))
    module: TransferModule = hydra.utils.instantiate(cfg.task, _partial_=True)(
        model_config=model_cfg, **data.task_args
    )
    module.load_pretrained(model_state(ckpt), f"init_from={cfg.init_from}")
    log.info("initialised %s from %s", ", ".join(module.pretrained_parts), cfg.init_from)

    trainer.fit(
        module, datamodule=data, ckpt_path=resume_path(cfg.ckpt_path, trainer, module, model_cfg)
    )
    if trainer.checkpoint_callback is not None:
        trainer.save_checkpoint(
            Path(trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=False
        )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(
        {
            k: float(v)
            for k, v in trainer.validate(module, datamodule=data, verbose=False)[0].items()
        }
    )
    if trainer.is_global_zero:
        print(module.summary(metrics))
        record = {"metrics": metrics, "config": resolved}
        (Path(cfg.output_dir) / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    if isinstance(logger, WandbLogger) and trainer.is_global_zero:
        logger.experiment.finish()
    return metrics
