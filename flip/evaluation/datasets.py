"""Build an evaluation dataset from one ``eval_data`` config entry.

An entry (``flip/evaluation/conf/eval_data/<name>.yaml``) says what the data is and where:

``kind``        classification | retrieval | video (PM-k frame sets)
``root``        the dataset directory (default ``${data_root}/<name>``)
``split``       the split evaluated; ``train_split``: the one linear probes train on
``formats``     on-disk layouts accepted, tried in order (``wds`` and ``folder`` are
                detected by their files): wds, folder, torchvision, imagenet, objectnet,
                video_pm, captions, jsonl, voc, heldout (the training config's own sets)
``options``     per-format reader arguments
``classnames``  class-name spec used when the data carries no names (see metadata.py)
``templates``   prompt-template spec (``imagenet`` follows ``zeroshot.imagenet_templates``)
``metric``      the number reported for the dataset (the one CLIP reports)
``suite``       what ``eval_task=suite`` runs on it (zeroshot, linear_probe, retrieval)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from flip.config import ConfigError
from flip.evaluation import metadata, readers
from flip.evaluation.readers import DatasetNotFound


@dataclass
class EvalSet:
    """A dataset ready for a protocol, with what the protocol needs to know about it."""

    dataset: Dataset
    classnames: list[str] | None = None
    templates: list[str] | None = None
    groups: list[list[int]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _heldout(entry: DictConfig, split: str, cfg: DictConfig) -> Dataset:
    """A dataset of the training data config (``cfg.data.<source>``), e.g. the held-out
    zero-shot set, with ``options.heldout.<split>`` overrides (``split``, ``size``, …)."""
    opts = entry.options.heldout
    source = cfg.data.get(opts.source)
    if source is None:
        raise ConfigError(f"data={cfg.data._target_} has no data.{opts.source} set; the held-out "
                          "evaluation needs a data config with one (shapes, digits)")
    node = opts.get(split)
    overrides = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    ds = hydra.utils.instantiate(source, **overrides)
    if opts.get("captions_as_list"):
        ds = _SingleCaption(ds)
    return ds


class _SingleCaption(Dataset):
    """(image, caption) -> (image, [caption])."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, caption = self.dataset[i]
        return image, [caption]


def _options(entry: DictConfig, fmt: str, split: str) -> tuple[dict, str]:
    """The reader arguments of ``fmt`` and the split name it uses: ``options.<fmt>.split``
    renames the evaluation split (e.g. CLIP_benchmark exports ImageNet's val as ``test``)."""
    node = (entry.get("options") or {}).get(fmt)
    opts = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    renamed = opts.pop("split", None)
    return opts, renamed if renamed and split == entry.split else split


def _read(fmt: str, name: str, entry: DictConfig, split: str, transform, cfg) -> Dataset:
    root = Path(str(entry.root)) if entry.get("root") else None
    opts, split = _options(entry, fmt, split)
    if fmt == "wds":
        mode = "txt" if entry.kind == "retrieval" else "cls"
        return readers.TarShards(name, root, split, transform, mode=mode)
    if fmt == "folder":
        return readers.image_folder(name, root, split, transform)
    if fmt == "torchvision":
        names = opts.pop("classnames", None)
        return readers.torchvision_dataset(
            name, root, split, transform,
            classnames=metadata.classnames(names) if names else None, **opts)
    if fmt == "imagenet":
        return readers.imagenet_folder(name, root, split, transform, **opts)
    if fmt == "objectnet":
        return readers.objectnet(name, root, split, transform)
    if fmt == "video_pm":
        return readers.video_pm(name, root, split, transform, **opts)
    if fmt == "captions":
        return readers.captions_json(name, root, split, transform, **opts)
    if fmt == "jsonl":
        return readers.jsonl(name, root, split, transform)
    if fmt == "voc":
        return readers.voc2007(name, root, split, transform)
    if fmt == "heldout":
        return _heldout(entry, split, cfg)
    raise ConfigError(f"eval_data.{name}.formats: unknown format {fmt!r}")


def open_dataset(name: str, entry: DictConfig, split: str, transform, cfg: DictConfig) -> Dataset:
    """The first of ``entry.formats`` found on disk; else one error listing every layout."""
    formats = list(entry.formats)
    detected = None
    if entry.get("root"):
        for fmt in ("wds", "folder"):
            if fmt in formats and readers.detect_format(entry.root, _options(entry, fmt, split)[1]) == fmt:
                detected = fmt
                break
    order = [detected] + [f for f in formats if f != detected] if detected else formats
    for fmt in order:
        try:
            return _read(fmt, name, entry, split, transform, cfg)
        except DatasetNotFound:
            if len(order) == 1:
                raise
    fmt_args = {}
    opts = entry.get("options", {})
    if "torchvision" in formats:
        fmt_args["tv"] = opts.torchvision.tv
    if "captions" in formats:
        fmt_args.update(ann_file=opts.captions.ann_file, image_dir=opts.captions.get("image_dir", ""))
    raise readers.not_found(name, entry.root, formats, split, **fmt_args)


def build_eval_set(name: str, entry: DictConfig, split: str, transform, cfg: DictConfig) -> EvalSet:
    ds = open_dataset(name, entry, split, transform, cfg)
    if entry.kind == "retrieval":
        return EvalSet(ds)
    classnames = getattr(ds, "classnames", None)
    if classnames is None and entry.get("classnames") is not None:
        classnames = metadata.classnames(OmegaConf.to_object(entry.classnames)
                                         if not isinstance(entry.classnames, str) else entry.classnames)
    spec = entry.get("templates")
    if spec is not None:
        templates = metadata.templates(spec if isinstance(spec, str) else OmegaConf.to_object(spec),
                                       cfg.zeroshot.imagenet_templates)
    else:
        templates = getattr(ds, "templates", None)
    if not classnames:
        raise ConfigError(f"eval_data.{name}: no class names (set eval_data.{name}.classnames "
                          f"or put classnames.txt in {entry.get('root')})")
    if not templates:
        raise ConfigError(f"eval_data.{name}: no prompt templates (set eval_data.{name}.templates)")
    extra = {}
    if getattr(ds, "pmsets", None) is not None:
        extra = {"pmsets": ds.pmsets, "pm_offsets": ds.pm_offsets}
    return EvalSet(ds, list(classnames), list(templates), getattr(ds, "groups", None), extra)
