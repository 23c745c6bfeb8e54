"""Downstream tasks on pre-trained FLIP encoders: the common contract and the task's part of
a run (``Transfer``; ``flip.run.train`` runs it).

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

import logging
from collections.abc import Iterable, Mapping

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from flip.checkpoint import (
    load_checkpoint,
    load_weights,
    merge_model_config,
    model_config,
    model_state,
)
from flip.errors import CheckpointError, ConfigError
from flip.models.clip import no_decay_names

log = logging.getLogger(__name__)

TOWERS = {"visual": "image", "text": "text"}  # FLIP attribute -> model config key


def build_tower(model_config: Mapping, part: str, **runtime) -> nn.Module:
    """One tower of the pre-trained FLIP (``part``: "visual" or "text") with
    the task's run-time settings (``drop_path``, ``grad_checkpointing``)."""
    cfg = merge_model_config(model_config, {TOWERS[part]: runtime})
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


class Transfer:
    """A downstream task's part of a run (``flip.run.train``): the checks, the checkpoint's
    architecture (the data's image size and context length follow it), the Trainer's length
    in epochs, the task module with its pre-trained parts, and the closing line (the task's
    metric on the validation set, beside its trivial baseline)."""

    def __init__(self, cfg: DictConfig):
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
        self.init_weights = cfg.get("init_weights", "pretrained")
        if self.init_weights not in ("pretrained", "random"):
            raise ConfigError(
                f"init_weights={self.init_weights} must be pretrained (init_from's weights) "
                "or random (init_from's architecture, freshly initialised)"
            )
        self.cfg = cfg
        ckpt = load_checkpoint(cfg.init_from)
        self.model_config = model_config(ckpt)
        if self.model_config is None:
            raise CheckpointError(
                f"init_from={cfg.init_from} stores no model config (not a "
                "checkpoint written by flip's pre-training)"
            )
        self.state = model_state(ckpt)
        follow = {
            "image_size": self.model_config["image"]["image_size"],
            "context_length": self.model_config["text"]["context_length"],
        }
        with open_dict(cfg):
            for key, value in follow.items():
                if key in cfg.data and cfg.data[key] != value:
                    log.info("data.%s=%s from the init_from checkpoint", key, value)
                    cfg.data[key] = value

    def trainer_args(self) -> dict:
        """``task.epochs`` passes, validation after every ``task.eval_every`` epochs (and
        after the last)."""
        return {
            "max_epochs": self.cfg.task.epochs,
            "max_steps": -1,
            "val_check_interval": 1.0,
            "check_val_every_n_epoch": self.cfg.task.get("eval_every", 1),
        }

    def module(self, data: L.LightningDataModule) -> TransferModule:
        """The task's module (``task`` but ``eval_every``, the Trainer's, with the checkpoint's
        model config and what the data defines), its pre-trained parts loaded (left at their
        initialisation with ``init_weights=random``)."""
        args = OmegaConf.to_container(self.cfg.task, resolve=True)
        args.pop("eval_every", None)
        module = hydra.utils.instantiate(args, _partial_=True)(
            model_config=self.model_config, **data.task_args
        )
        parts = ", ".join(module.pretrained_parts)
        if self.init_weights == "random":  # the control: the same network, no pre-training
            log.info("%s: the architecture of %s, random weights", parts, self.cfg.init_from)
            return module
        module.load_pretrained(self.state, f"init_from={self.cfg.init_from}")
        log.info("initialised %s from %s", parts, self.cfg.init_from)
        return module

    def report(self, trainer: L.Trainer, module: TransferModule, data) -> dict[str, float]:
        """Validation of the final weights (and the test split, where the data has one),
        with the task's summary line."""
        metrics = dict(trainer.validate(module, datamodule=data, verbose=False)[0])
        if getattr(data, "test_set", None) is not None:  # reported once, at the end
            metrics.update(trainer.test(module, datamodule=data, verbose=False)[0])
        metrics = {k: float(v) for k, v in metrics.items()}
        if trainer.is_global_zero:
            print(module.summary(metrics))
        return metrics

    def then(self, last) -> None:
        return None
