"""Evaluation datasets built by ``_target_`` from an ``eval_data`` entry (``conf/eval_data/``).

An entry says what the data is, where, and how it is scored::

    title: CIFAR10                  # the results table's name for it
    kind: classification            # classification | retrieval | video (PM-k frame sets)
    protocols: [zeroshot]           # what eval_task=suite runs on it
    metric: top1                    # the reported number (the one CLIP reports)
    classnames: clip:CIFAR10        # used when the data carries no class names (metadata.py)
    templates: clip:CIFAR10         # prompt templates (metadata.py)
    dataset:                        # built once per split with the arguments of splits.<role>
      _target_: flip.data.benchmarks.datasets.clip_benchmark_set
      name: cifar10
      builder: cifar10
      root: ${data_root}/cifar10
      transform: ${transform}
    splits: {test: {split: test}, train: {split: train}}   # evaluated / linear-probe training

:func:`clip_benchmark_set` reads the layouts CLIP_benchmark reads — its webdataset export
and the torchvision dataset folders — through CLIP_benchmark's own builders, never letting
them download; datasets it has no builder for name one of our readers
(``flip.data.benchmarks.readers``), either directly or as ``otherwise:`` behind the export.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from flip.data.benchmarks import metadata
from flip.data.benchmarks.readers import DatasetNotFound, not_found
from flip.errors import ConfigError

# CLIP_benchmark builders that only read an existing directory when called with
# download=False. Its others fetch files whatever the flag says (imagenetv2 unless all
# 10000 images are present, flickr30k/mscoco_captions their annotation files, vtab/tfds).
READ_ONLY_BUILDERS = frozenset(
    {
        "cifar10",
        "cifar100",
        "food101",
        "sun397",
        "cars",
        "fgvc_aircraft",
        "dtd",
        "pets",
        "caltech101",
        "flowers",
        "mnist",
        "stl10",
        "eurosat",
        "gtsrb",
        "country211",
        "pcam",
        "renderedsst2",
        "voc2007",
        "voc2007_multilabel",
        "imagenet1k-unverified",
        "imagenet_sketch",
        "imagenet-a",
        "imagenet-r",
    }
)
# builders that read the whole set whatever the split (a probe would train on the test set)
UNSPLIT_BUILDERS = frozenset({"sun397", "eurosat", "caltech101"})
# builders over a class-folder tree whose labels are its sorted folders, and the WordNet ids
# those folders must be (metadata.label_space): a missing or misnamed folder shifts labels
CLASS_FOLDERS = {
    "imagenet1k-unverified": "imagenet",
    "imagenet_sketch": "imagenet",
    "imagenet-a": "imagenet_a",
    "imagenet-r": "imagenet_r",
}


def clip_benchmark_set(
    name: str,
    root,
    split: str,
    transform: Callable,
    builder: str | None = None,
    otherwise: Callable[..., Dataset] | None = None,
) -> Dataset:
    """The dataset at ``root``: CLIP_benchmark's webdataset export when
    ``{root}/{split}/nshards.txt`` exists (streamed); else CLIP_benchmark's ``builder``
    (e.g. ``cifar10``: the torchvision folder, ``download=False``); else ``otherwise``
    (one of our readers, called as ``otherwise(name=, root=, split=, transform=)``)."""
    from clip_benchmark.datasets import builder as cb

    root = Path(str(root))
    if (root / split / "nshards.txt").is_file():
        with warnings.catch_warnings():  # shard order does not matter to an evaluation
            warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle")
            return cb.build_wds_dataset(f"wds/{name}", transform, split=split, data_dir=str(root))
    wds = not_found(name, root, ["wds"], split).layouts
    if builder is not None:
        return _clip_benchmark_builder(name, builder, root, split, transform, wds)
    if otherwise is not None:
        try:
            return otherwise(name=name, root=root, split=split, transform=transform)
        except DatasetNotFound as err:
            raise DatasetNotFound(name, root, wds + err.layouts, err.why) from None
    raise DatasetNotFound(name, root, wds, f"no {root / split / 'nshards.txt'}")


def _clip_benchmark_builder(
    name: str, builder: str, root: Path, split: str, transform, wds: list[str]
) -> Dataset:
    from clip_benchmark.datasets import builder as cb

    if builder not in READ_ONLY_BUILDERS:
        raise ConfigError(
            f"eval_data {name}: CLIP_benchmark's {builder!r} builder may download "
            f"files; use one of {sorted(READ_ONLY_BUILDERS)} or our readers"
        )
    if builder in UNSPLIT_BUILDERS and split != "test":
        raise ConfigError(
            f"eval_data {name}: CLIP_benchmark's {builder!r} builder has no "
            f"{split!r} split (it reads the whole set); use the webdataset export"
        )
    layouts = wds + not_found(name, root, ["clip_benchmark"], split, builder=builder).layouts
    if not root.is_dir():  # CLIP_benchmark downloads into a missing root
        raise DatasetNotFound(name, root, layouts, "no such directory")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="split argument ignored")
            ds = cb.build_dataset(
                builder,
                root=str(root),
                transform=transform,
                split=split,
                download=False,
                task="zeroshot_classification",
            )
    except AssertionError as err:  # its split checks
        raise ConfigError(f"eval_data {name}: {err}") from None
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DatasetNotFound(name, root, layouts, str(err).strip().splitlines()[0]) from None
    if builder in CLASS_FOLDERS:
        _check_class_folders(name, ds.root, sorted(ds.class_to_idx), CLASS_FOLDERS[builder])
    return ds


def _check_class_folders(name: str, folder, found: list[str], space: str) -> None:
    want = list(metadata.label_space(space))
    if found != want:
        odd = sorted(set(found) - set(want))[:1] or sorted(set(want) - set(found))[:1]
        raise ConfigError(
            f"dataset {name}: the class folders of {folder} are not the {len(want)} WordNet ids "
            f"of {space} ({len(found)} folders; first difference: {odd[0] if odd else 'order'}); "
            "labels are the sorted folders, so every class folder must be there"
        )


class SingleCaptions(Dataset):
    """(image, caption) -> (image, [caption]): an image-text training set as a retrieval set."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, caption = self.dataset[i]
        return image, [caption]


def class_names(entry, dataset) -> list[str]:
    """The dataset's own class names (label order: ``classes`` as in torchvision and
    CLIP_benchmark, ``classnames`` as in ``flip.data``), else the entry's ``classnames`` spec."""
    names = getattr(dataset, "classes", None) or getattr(dataset, "classnames", None)
    if not names and entry.get("classnames") is not None:
        names = metadata.classnames(entry.classnames)
    if not names:
        raise ConfigError(
            "no class names: set the entry's classnames or put classnames.txt next to the data"
        )
    return list(names)


def prompt_templates(entry, dataset, imagenet_set: str) -> list[str]:
    """The entry's ``templates`` spec, else the dataset's own templates."""
    spec = entry.get("templates")
    templates = (
        metadata.templates(spec, imagenet_set)
        if spec is not None
        else getattr(dataset, "templates", None)
    )
    if not templates:
        raise ConfigError("no prompt templates: set the entry's templates")
    return list(templates)
