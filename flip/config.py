"""Start-up checks of a composed run config: fail early, naming the key and what is allowed."""

from collections.abc import Mapping

import torch
from omegaconf import DictConfig

from flip.errors import ConfigError
from flip.masking import KINDS


def _is_ratio(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value < 1


def check_mask(cfg: DictConfig) -> None:
    mask = cfg.mask
    if not _is_ratio(mask):
        raise ConfigError(
            f"mask={mask!r} is invalid: the image masking ratio must be a number in [0, 1) "
            "(e.g. mask=0, mask=0.5, mask=0.75)"
        )


def check_task_masks(cfg: DictConfig) -> None:
    """task.image_mask and task.text_mask: ratio in [0, 1), kind one of the Table 1c kinds
    (images: random only)."""
    for tower, example in (("image", "mask=0.5"), ("text", "task.text_mask.ratio=0.5")):
        mask = cfg.task.get(f"{tower}_mask") or {}
        ratio, kind = mask.get("ratio", 0.0), mask.get("kind", "random")
        if not _is_ratio(ratio):
            raise ConfigError(
                f"task.{tower}_mask.ratio={ratio!r} is invalid: the {tower} masking ratio must "
                f"be a number in [0, 1) (e.g. {example})"
            )
        kinds = KINDS if tower == "text" else ("random",)
        if kind not in kinds:
            raise ConfigError(
                f"task.{tower}_mask.kind={kind!r} is invalid: use one of {', '.join(kinds)}"
            )


def check_patches(model: Mapping) -> None:
    """The image size must be a whole number of patches (a remainder would be cut off)."""
    size, patch = model["image"]["image_size"], model["image"]["patch_size"]
    if size % patch:
        lower = size - size % patch
        raise ConfigError(
            f"data.image_size={size} is not a multiple of model.image.patch_size={patch}: "
            f"use e.g. data.image_size={lower or patch} or {lower + patch}"
        )


def check_reconstruction(cfg: DictConfig) -> None:
    """A pixel-reconstruction term (objective=reconstruction) needs patches to reconstruct."""
    ratio = (cfg.task.get("image_mask") or {}).get("ratio", 0.0)
    for name, term in (cfg.objective.get("auxiliary") or {}).items():
        if term.get("_target_") == "flip.reconstruction.PixelReconstruction" and not ratio:
            raise ConfigError(
                f"objective.auxiliary.{name} reconstructs the masked patches, but mask=0 masks "
                "none; use mask=0.5 or mask=0.75, or objective=contrastive"
            )


def check_tuning(cfg: DictConfig) -> None:
    """Runs that tune need weights to tune: ``needs_init_from`` (tuning experiments) needs
    ``init_from``; a chained ``unmasked_tuning`` needs the checkpoint it tunes."""
    if cfg.get("needs_init_from") and not cfg.init_from:
        raise ConfigError(
            "this run tunes a pre-trained model: set init_from=<checkpoint>, e.g. "
            "init_from=outputs/…/checkpoints/last.ckpt"
        )
    if cfg.get("unmasked_tuning") and not (cfg.get("callbacks") or {}).get("checkpoint"):
        raise ConfigError(
            "unmasked_tuning tunes the pre-trained last.ckpt: it needs the "
            "checkpoint callback (callbacks.checkpoint)"
        )


def per_device_batch(cfg: DictConfig, world_size: int) -> int:
    """Samples each device loads per step: batch.global / world size. batch.micro, if
    set, must divide it (the step then runs per_device / micro micro-batches with
    gradient caching)."""
    total, micro = cfg.batch["global"], cfg.batch.micro
    if not isinstance(total, int) or total < 1:
        raise ConfigError(f"batch.global={total!r} must be a positive integer")
    if total % world_size:
        raise ConfigError(
            f"batch.global={total} is not divisible by the {world_size} devices "
            "(trainer.devices x trainer.num_nodes)"
        )
    per_device = total // world_size
    if micro is None:
        return per_device
    if not isinstance(micro, int) or micro < 1 or per_device % micro:
        raise ConfigError(
            f"batch.micro={micro!r} must divide the per-device batch "
            f"batch.global / devices = {total} / {world_size} = {per_device}"
        )
    return per_device


def check_hardware(accelerator: str) -> None:
    """One clear sentence when the requested accelerator is absent."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError(
            "accelerator=gpu needs a CUDA GPU, but none is visible on this machine "
            "(torch.cuda.is_available() is False); use accelerator=cpu"
        )
    if accelerator == "tpu":
        from lightning.pytorch.accelerators import XLAAccelerator

        if not XLAAccelerator.is_available():
            raise ConfigError(
                "accelerator=tpu needs a TPU host with torch-xla[tpu], but no TPU is "
                "visible on this machine; use accelerator=cpu or accelerator=gpu"
            )
