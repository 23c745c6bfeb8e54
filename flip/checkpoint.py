"""Checkpoints that carry their model: safe loading, the stored model config, rebuilding.

Training stores the resolved model config (``_target_`` and every constructor argument,
image size and tokenizer length included) in the checkpoint's hyper-parameters, so
evaluation, ``init_from`` and the OpenCLIP export rebuild the architecture from the file
alone. A config given explicitly next to a checkpoint must agree with it on every
architecture key; run-time settings (activation checkpointing, drop path) may differ.
Training masks are no model setting (``task.image_mask``/``text_mask``); configs stored
before they moved there carry ``mask_ratio``/``mask_kind`` in a tower, dropped on load.

Files are read with ``torch.load(weights_only=True)``: tensors, containers and the few
types Lightning writes (allow-listed below). A file that needs anything else — arbitrary
pickled Python, which could run code — is refused with one sentence.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import hydra
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import nn

from flip.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

CONFIG_KEY = "model_config"  # checkpoint["hyper_parameters"][CONFIG_KEY]
RUNTIME_KEYS = frozenset({"grad_checkpointing", "drop_path"})
FORMER_MASK_KEYS = frozenset({"mask_ratio", "mask_kind"})  # in towers of older model configs
SAFE_TYPES = [AttributeDict]  # Lightning's hyper-parameter container


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format (a zip archive) since torch 1.6
LEGACY_MAGIC = b"\x80"  # the older format: a pickle stream (protocol 2 or later)


def _check_file(path: Path) -> None:
    """Name what a file is when it cannot be a readable checkpoint: absent, empty, not
    written by ``torch.save``, or a zip archive whose end is missing (cut off mid-write)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it is not a checkpoint")
    if not (head.startswith(ZIP_MAGIC) or head.startswith(LEGACY_MAGIC)):
        raise CheckpointError(
            f"{path} is not a checkpoint: it was not written by torch.save (it begins with "
            f"{head!r}, not a zip archive or a pickle stream)"
        )
    if head.startswith(ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is incomplete: a truncated file ({size} bytes) whose end is "
            "missing, as when the run was killed while writing it; use an earlier checkpoint "
            "(ckpt_path=auto takes the newest complete one)"
        )


def load_checkpoint(path, mmap: bool = False) -> dict:
    """The checkpoint at ``path`` loaded weights-only on the CPU. ``mmap``: tensors are
    mapped from the file, not read (cheap inspection of large checkpoints)."""
    path = Path(path)
    _check_file(path)
    try:
        with torch.serialization.safe_globals(SAFE_TYPES):
            ckpt = torch.load(
                path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
            )
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported global" in line), None)
        if detail is None:  # not a refused type: the pickle stream itself is broken
            after = [i + 1 for i, line in enumerate(lines) if "WeightsUnpickler error" in line]
            reason = lines[after[0]] if after and after[0] < len(lines) else lines[0]
            raise CheckpointError(
                f"checkpoint {path} is damaged and cannot be read ({reason})"
            ) from None
        raise CheckpointError(
            f"{path} is refused: it holds pickled Python objects that weights-only loading "
            f"does not allow ({detail}); convert it in a trusted environment to a plain "
            "state dict"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {path} is damaged and cannot be read ({str(err).splitlines()[0]})"
        ) from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint (a dictionary of weights)")
    return dict(ckpt)


def model_config(ckpt: Mapping) -> dict | None:
    """The model config training stored in ``ckpt``, or None (plain state dicts); the
    training masks older versions stored in its towers are dropped."""
    cfg = (ckpt.get("hyper_parameters") or {}).get(CONFIG_KEY)
    if cfg is None:
        return None
    return {
        k: {n: x for n, x in v.items() if n not in FORMER_MASK_KEYS}
        if isinstance(v, Mapping)
        else v
        for k, v in cfg.items()
    }


def model_state(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """The weights of a Lightning checkpoint with the model's ``model.`` prefix stripped —
    tensors of other modules (e.g. ``objective.*``, a training-only decoder) keep their
    full names, so that loading reports them as unused instead of dropping them
    silently — or a plain state dict as it is."""
    state = ckpt.get("state_dict", ckpt)
    if any(k.startswith("model.") for k in state):
        return {k.removeprefix("model."): v for k, v in state.items()}
    return dict(state)


def _flatten(cfg: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, (list, tuple)) else v
    return out


def _is_runtime(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in RUNTIME_KEYS


def architecture_differences(
    stored: Mapping, requested: Mapping, keys: Iterable[str] | None = None
) -> list[tuple[str, object, object]]:
    """(dotted key, requested value, stored value) of every architecture key (run-time
    settings excluded) of ``requested`` that differs from ``stored``, sorted by key;
    ``keys``: compare only these (None: all)."""
    have, want = _flatten(stored), _flatten(requested)
    checked = set(want) if keys is None else set(keys) & set(want)
    return [
        (key, want[key], have.get(key, "<absent>"))
        for key in sorted(checked)
        if not _is_runtime(key) and have.get(key, "<absent>") != want[key]
    ]


def merge_model_config(
    stored: Mapping,
    requested: Mapping | None,
    explicit: Iterable[str] | None = None,
    source: str = "the checkpoint",
) -> dict:
    """The stored architecture with the requested run-time settings.

    requested: the model config of the current run (or None: the stored one as is).
    explicit: keys of ``requested`` (dotted, e.g. ``image.width``) the user set and that
    must therefore agree with ``stored``; None = all of them. A disagreement raises
    ``ConfigError`` naming the key and both values.
    """
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in stored.items()}
    if requested is None:
        return merged
    differences = architecture_differences(stored, requested, explicit)
    if differences:
        key, wanted, trained = differences[0]
        raise ConfigError(
            f"model.{key}={wanted!r} contradicts {source}, which was trained with "
            f"model.{key}={trained!r}; drop the override (the "
            "architecture is read from the checkpoint)"
        )
    want = _flatten(requested)
    for key, value in want.items():  # run-time settings come from the current run
        if _is_runtime(key):
            node = merged
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return merged


def resample_patch_embedding(state: Mapping[str, torch.Tensor], patch_size: int) -> dict:
    """``state`` with its patch-embedding kernel resampled to ``patch_size`` (timm's
    ``resample_patch_embed``, FlexiViT's pseudo-inverse resize: a patch embedded at the new
    size gives the features of the resized patch at the old one). Paper footnote 3: ViT-L/14
    is obtained by tuning ViT-L/16 at patch 14. The sin-cos position embedding is fixed
    and follows the new grid by itself."""
    from timm.layers import resample_patch_embed

    key = "visual.patch_embed.proj.weight"
    if state[key].shape[-1] == patch_size:
        return dict(state)
    return {**state, key: resample_patch_embed(state[key], [patch_size, patch_size])}


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load ``state`` into ``model``; every model weight must be present. Returns the
    names of checkpoint tensors the model has no place for (e.g. a training-only
    decoder) after logging them."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} weights of the model ({', '.join(missing[:4])}"
            f"{', …' if len(missing) > 4 else ''}): it was trained with another architecture"
        )
    if unexpected:
        modules = sorted({k.split(".")[0] for k in unexpected})
        log.warning(
            "%s: %d tensors not used by this model (modules: %s)",
            source,
            len(unexpected),
            ", ".join(modules),
        )
    return list(unexpected)


def build_model(ckpt_path, override: Mapping | None = None) -> nn.Module:
    """The model of a checkpoint, built from its stored config, weights loaded, in eval
    mode. ``override``: a model config given explicitly; it must agree with the stored
    architecture (it is required for checkpoints that store none)."""
    ckpt = load_checkpoint(ckpt_path)
    stored = model_config(ckpt)
    if stored is None and override is None:
        raise CheckpointError(
            f"{ckpt_path} stores no model config (not written by this version of flip); "
            "name the architecture it was trained with, e.g. model=vit_b16 data.image_size=224"
        )
    cfg = (
        dict(override)
        if stored is None
        else merge_model_config(stored, override, source=str(ckpt_path))
    )
    model = hydra.utils.instantiate(cfg)
    load_weights(model, model_state(ckpt), str(ckpt_path))
    return model.eval()


def save_flip_checkpoint(path, model: nn.Module, model_cfg: Mapping) -> None:
    """A weights-only checkpoint of ``model`` that ``build_model`` and ``eval.py`` read:
    ``state_dict`` (``model.`` prefix) and the model config."""
    torch.save(
        {
            "state_dict": {f"model.{k}": t for k, t in model.state_dict().items()},
            "hyper_parameters": {CONFIG_KEY: dict(model_cfg)},
        },
        path,
    )
