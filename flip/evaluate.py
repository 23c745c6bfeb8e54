"""Evaluate a pre-trained checkpoint: held-out zero-shot classification."""
import hydra
import lightning as L
from omegaconf import DictConfig

from flip.config import check_hardware
from flip.tasks.pretrain import PretrainModule
from flip.zeroshot import format_zero_shot


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Zero-shot top-1 of ``cfg.ckpt_path`` on ``cfg.data``'s zero-shot set (no masking)."""
    check_hardware(cfg.trainer.accelerator)
    L.seed_everything(cfg.seed, workers=True)
    module = PretrainModule.load_from_checkpoint(
        cfg.ckpt_path, map_location="cpu", model=hydra.utils.instantiate(cfg.model))
    data = hydra.utils.instantiate(cfg.data, batch_size=cfg.batch_size)
    if not data.classnames:
        raise ValueError(f"data={cfg.data._target_} has no zero-shot set to evaluate")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    if trainer.is_global_zero:
        print(format_zero_shot(metrics["val/zeroshot_top1"], len(data.classnames)))
    return metrics
