"""Build everything from a composed Hydra config and run pre-training."""
import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from flip.config import check_hardware, check_mask, per_device_batch
from flip.zeroshot import format_zero_shot

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Pre-train, then evaluate held-out zero-shot accuracy; returns the final metrics."""
    check_mask(cfg)
    check_hardware(cfg.trainer.accelerator)
    L.seed_everything(cfg.seed, workers=True)

    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    module = hydra.utils.instantiate(cfg.task, model=hydra.utils.instantiate(cfg.model))
    if cfg.init_from:
        state = torch.load(cfg.init_from, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        log.info("initialised weights from %s", cfg.init_from)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, max_steps=module.total_steps, logger=logger, callbacks=callbacks)
    data = hydra.utils.instantiate(cfg.data, batch_size=per_device_batch(cfg, trainer.world_size))

    trainer.fit(module, datamodule=data, ckpt_path=cfg.ckpt_path)
    if trainer.checkpoint_callback is not None:  # the final weights, whatever the interval
        trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if data.classnames:
        top1 = trainer.validate(module, datamodule=data, verbose=False)[0]["val/zeroshot_top1"]
        metrics["val/zeroshot_top1"] = top1
        if trainer.is_global_zero:
            print(format_zero_shot(top1, len(data.classnames)))
    return metrics
