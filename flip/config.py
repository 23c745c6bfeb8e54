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


def check_text_mask(cfg: DictConfig) -> None:
    """model.text.mask_ratio in [0, 1) and model.text.mask_kind one of the Table 1c kinds."""
    text = cfg.model.text
    ratio, kind = text.get("mask_ratio", 0.0), text.get("mask_kind", "random")
    if not _is_ratio(ratio):
        raise ConfigError(
            f"model.text.mask_ratio={ratio!r} is invalid: the text masking ratio must be a "
            "number in [0, 1) (e.g. model.text.mask_ratio=0.5 keeps 16 of 32 tokens)"
        )
    if kind not in KINDS:
        raise ConfigError(
            f"model.text.mask_kind={kind!r} is invalid: use one of {', '.join(KINDS)}"
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
    for name, term in (cfg.objective.get("auxiliary") or {}).items():
        if term.get("_target_") == "flip.reconstruction.PixelReconstruction" and cfg.mask == 0:
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
