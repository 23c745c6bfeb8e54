"""Pre-training's part of a run: checks, the model (from ``init_from`` when given), the
closing zero-shot line, the chained unmasked tuning. ``flip.run.train`` runs it."""

import logging
from pathlib import Path

import hydra
import lightning as L
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
    check_mask,
    check_patches,
    check_reconstruction,
    check_task_masks,
    check_tuning,
)
from flip.eval.zeroshot import format_zero_shot

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
    run-time settings (activation checkpointing). ``data.image_size``
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


class Pretraining:
    """Pre-training's part of a run (``flip.run.train``): the checks, the model (its
    architecture from ``init_from`` when given, with this run's run-time settings; the data's
    image size follows), the Trainer's length in steps, the closing held-out zero-shot line
    and, with ``unmasked_tuning``, the tuning run that follows."""

    def __init__(self, cfg: DictConfig):
        check_mask(cfg)
        check_task_masks(cfg)
        check_reconstruction(cfg)
        check_tuning(cfg)
        self.cfg = cfg
        ckpt = load_checkpoint(cfg.init_from) if cfg.init_from else None
        model_cfg = resolve_model_config(cfg, ckpt)
        check_patches(model_cfg)
        self.model_config = model_cfg
        self.lightning_module = hydra.utils.instantiate(cfg.task, _partial_=True)(
            model=hydra.utils.instantiate(model_cfg),
            objective=hydra.utils.instantiate(cfg.objective),
            model_config=model_cfg,
        )
        if ckpt is not None:
            state = model_state(ckpt)
            if cfg.get("init_resample_patch"):
                state = resample_patch_embedding(state, model_cfg["image"]["patch_size"])
            load_weights(self.lightning_module.model, state, f"init_from={cfg.init_from}")
            log.info("initialised weights from %s", cfg.init_from)

    def trainer_args(self) -> dict:
        return {"max_steps": self.lightning_module.total_steps}

    def module(self, data: L.LightningDataModule) -> L.LightningModule:
        return self.lightning_module

    def report(self, trainer: L.Trainer, module, data) -> dict[str, float]:
        """Held-out zero-shot top-1 of the final weights, printed next to chance."""
        if not data.classnames:
            return {}
        top1 = trainer.validate(module, datamodule=data, verbose=False)[0]["val/zeroshot_top1"]
        if trainer.is_global_zero:
            print(format_zero_shot(top1, len(data.classnames)))
        return {"val/zeroshot_top1": top1}

    def then(self, last: Path) -> DictConfig | None:
        """The run that tunes these weights (Table 1e chained), if ``unmasked_tuning``."""
        return unmasked_tuning_config(self.cfg, last) if self.cfg.get("unmasked_tuning") else None


def unmasked_tuning_config(cfg: DictConfig, last: Path) -> DictConfig:
    """The run that follows pre-training when ``unmasked_tuning`` names a schedule (paper
    Table 1e): the same run at mask 0 (image and text), contrastive loss alone, the
    ``unmasked_tuning`` schedule, weights from pre-training's ``last.ckpt``, written to
    ``<output_dir>/unmasked_tuning``."""
    tune = cfg.copy()
    with open_dict(tune):
        tune.mask, tune.task.text_mask.ratio = 0.0, 0.0
        tune.schedule, tune.unmasked_tuning = cfg.unmasked_tuning, None
        tune.objective = {"_target_": "flip.objective.Objective", "auxiliary": {}}
        tune.init_from, tune.ckpt_path = str(last), None
        tune.output_dir = str(Path(cfg.output_dir) / "unmasked_tuning")
        tune.tags = [*cfg.get("tags", []), "unmasked_tuning"]
    return tune
