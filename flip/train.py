"""Build everything from a composed Hydra config and run pre-training."""

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from flip.checkpoint import (
    load_checkpoint,
    load_weights,
    merge_model_config,
    model_config,
    model_state,
    resample_patch_embedding,
)
from flip.config import (
    check_hardware,
    check_mask,
    check_reconstruction,
    check_text_mask,
    check_tuning,
    per_device_batch,
)
from flip.console import StepProgressBar, quiet_console
from flip.eval.zeroshot import format_zero_shot
from flip.resume import resume_path
from flip.tasks.transfer import is_transfer_task, train_transfer

log = logging.getLogger(__name__)


def command_line_model_keys() -> set[str] | None:
    """Model config keys the user set on the command line (dotted, relative to
    ``model``; ``data.image_size`` counts as ``image.image_size``); None = the whole model
    group was chosen. Empty outside a Hydra run (a config composed in code)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "model":
            return None
        if key.startswith("model."):
            keys.add(key[len("model.") :])
        elif key == "data.image_size":
            keys.add("image.image_size")
    return keys


def resolve_model_config(cfg: DictConfig, ckpt: dict | None) -> dict:
    """The run's model config: the composed one, or with ``init_from`` the checkpoint's
    architecture (command-line model settings must agree with it) with this run's
    run-time settings (mask ratio, activation checkpointing). ``data.image_size``
    follows the checkpoint. With ``init_resample_patch`` the patch size is this run's."""
    requested = OmegaConf.to_container(cfg.model, resolve=True)
    stored = model_config(ckpt) if ckpt is not None else None
    if stored is None:
        return requested
    if cfg.get("init_resample_patch"):
        stored = {
            **stored,
            "image": {**stored["image"], "patch_size": requested["image"]["patch_size"]},
        }
    merged = merge_model_config(
        stored, requested, command_line_model_keys(), source=f"init_from={cfg.init_from}"
    )
    size = merged["image"]["image_size"]
    if cfg.data.image_size != size:
        log.info("data.image_size=%s from the init_from checkpoint", size)
        cfg.data.image_size = size
    return merged


def train(cfg: DictConfig) -> dict[str, float]:
    """Pre-train, then evaluate held-out zero-shot accuracy; returns the final metrics.
    A downstream task (``task=finetune|captioning|vqa``) runs ``train_transfer``."""
    if is_transfer_task(cfg):
        return train_transfer(cfg)
    check_mask(cfg)
    check_text_mask(cfg)
    check_reconstruction(cfg)
    check_hardware(cfg.trainer.accelerator)
    check_tuning(cfg)
    quiet_console(cfg.trainer.accelerator, cfg.get("verbose", False))
    L.seed_everything(cfg.seed, workers=True)

    ckpt = load_checkpoint(cfg.init_from) if cfg.init_from else None
    model_cfg = resolve_model_config(cfg, ckpt)
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if logger:  # the whole resolved run config, next to the metrics
        logger.log_hyperparams(resolved)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    module = hydra.utils.instantiate(cfg.task, _partial_=True)(
        model=hydra.utils.instantiate(model_cfg),
        objective=hydra.utils.instantiate(cfg.objective),
        model_config=model_cfg,
    )
    if ckpt is not None:
        state = model_state(ckpt)
        if cfg.get("init_resample_patch"):
            state = resample_patch_embedding(state, model_cfg["image"]["patch_size"])
        load_weights(module.model, state, f"init_from={cfg.init_from}")
        log.info("initialised weights from %s", cfg.init_from)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, max_steps=module.total_steps, logger=logger, callbacks=callbacks
    )
    data = hydra.utils.instantiate(cfg.data, batch_size=per_device_batch(cfg, trainer.world_size))

    trainer.fit(
        module, datamodule=data, ckpt_path=resume_path(cfg.ckpt_path, trainer, module, model_cfg)
    )
    if trainer.checkpoint_callback is not None:  # the final weights, whatever the interval
        trainer.save_checkpoint(
            Path(trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=False
        )  # resumable: optimiser and loop state too
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if data.classnames:
        top1 = trainer.validate(module, datamodule=data, verbose=False)[0]["val/zeroshot_top1"]
        metrics["val/zeroshot_top1"] = top1
        if trainer.is_global_zero:
            print(format_zero_shot(top1, len(data.classnames)))
    if trainer.is_global_zero:  # one record per run, read by experiments/collect.py
        record = {"metrics": metrics, "config": resolved}
        (Path(cfg.output_dir) / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    if isinstance(logger, WandbLogger) and trainer.is_global_zero:
        logger.experiment.finish()  # the next job of a multirun starts its own W&B run
    if cfg.get("unmasked_tuning"):  # Table 1e chained: tune the weights just trained
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        tuned = train(unmasked_tuning_config(cfg, last))
        return {**tuned, **{f"pretrain/{k}": v for k, v in metrics.items()}}
    return metrics


def unmasked_tuning_config(cfg: DictConfig, last: Path) -> DictConfig:
    """The run that follows pre-training when ``unmasked_tuning`` names a schedule (paper
    Table 1e): the same run at mask 0 (image and text), contrastive loss alone, the
    ``unmasked_tuning`` schedule, weights from pre-training's ``last.ckpt``, written to
    ``<output_dir>/unmasked_tuning``."""
    tune = cfg.copy()
    with open_dict(tune):
        tune.mask, tune.model.text.mask_ratio = 0.0, 0.0
        tune.schedule, tune.unmasked_tuning = cfg.unmasked_tuning, None
        tune.objective = {"_target_": "flip.objective.Objective", "auxiliary": {}}
        tune.init_from, tune.ckpt_path = str(last), None
        tune.output_dir = str(Path(cfg.output_dir) / "unmasked_tuning")
        tune.tags = [*cfg.get("tags", []), "unmasked_tuning"]
    return tune
