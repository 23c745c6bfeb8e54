"""Our readers for the evaluation layouts CLIP_benchmark has no builder for (no downloads,
ever): ObjectNet's mapping to ImageNet, the ImageNet-Vid / YouTube-BB-Robust PM-k frame
sets, ImageNetV2's label-numbered folders, Karpathy caption files (Flickr30k, COCO),
Hateful Memes and plain image folders. The CLIP_benchmark webdataset export and the
torchvision dataset folders are read by CLIP_benchmark itself (``flip.data.benchmarks.datasets``).

Every reader is a ``_target_`` of an ``eval_data`` entry, called as
``reader(name, root, split, transform, **options)``. Classification readers return a
map-style dataset of ``(image, label)`` with ``classes`` (class names in label order, or
None when the names come from the config) and, where the label space is a projection of
the ImageNet classifier's, ``groups``: for each dataset class the classifier rows whose
maximum is its logit (ObjectNet's 113 classes, ImageNet-Vid's 30). Retrieval readers
return ``(image, [captions])``.

A missing dataset raises :class:`DatasetNotFound` naming the directory and the layout
that would have been accepted (``LAYOUTS``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from flip.data.benchmarks import metadata
from flip.data.images import IMAGE_EXTENSIONS, to_rgb
from flip.errors import ConfigError

LAYOUTS = {
    "wds": "the CLIP_benchmark webdataset export: {root}/{split}/nshards.txt, {root}/{split}/0.tar … "
    "(samples <key>.webp|jpg|png + <key>.cls, <key>.npy (multi-label) or <key>.txt captions), "
    "{root}/classnames.txt, {root}/zeroshot_classification_templates.txt, "
    "{root}/dataset_type.txt (retrieval | multilabel)",
    "clip_benchmark": "the folder CLIP_benchmark's `{builder}` builder reads (the torchvision "
    "dataset folder under {root}, as a download would leave it)",
    "folder": "image folder: {root}/{split}/<class>/<image> (classes in sorted folder order, or "
    "folders named 0 … C-1 by label; optional {root}/classnames.txt, one name per line)",
    "imagenet_v2": "{root}/<label>/<image> with folders 0 … 999 (ImageNetV2's format-val release)",
    "objectnet": "{root}/objectnet-1.0/images/<folder>/<image> (or {root}/images/…) and the "
    "mapping files folder_to_objectnet_label.json, objectnet_to_imagenet_1k.json, "
    "pytorch_to_imagenet_2012_id.json, imagenet_to_label_2012_v2 in {root}, "
    "{root}/mappings or {root}/objectnet-1.0/mappings",
    "video_pm": "{root}/metadata/labels.json ({frame: [class ids]}), {root}/metadata/pmsets.json "
    "({anchor frame: [neighbour frames]}), frame paths relative to {root}, and the "
    "class map {root}/metadata/rev_class_idx_map.json ({class id: [ImageNet ids]}) or "
    "misc/<…>_class_index.json + misc/rev_wnid_map.json",
    "captions": '{root}/{ann_file}: Karpathy JSON ({"images": [{"filename", "filepath", '
    '"split", "sentences": [{"raw"}]}]}) or a list of {"image", "caption": '
    "[…]}; images under {root}/{image_dir}",
    "jsonl": '{root}/{split}.jsonl with one {"img": <path relative to root>, "label": 0|1} per line',
}


class DatasetNotFound(ConfigError, FileNotFoundError):
    """An evaluation set is not where the config says; the message gives the expected
    layouts (``layouts``: each filled in with the directory and split)."""

    def __init__(self, name: str, root, layouts: Sequence[str], why: str = ""):
        self.name, self.root, self.layouts, self.why = name, root, list(layouts), why
        super().__init__(
            f"dataset {name} not found at {root}{f' ({why})' if why else ''}; nothing is "
            f"downloaded, expected {'; or '.join(self.layouts)}. Set data_root=<dir> or "
            "eval_data.<entry>.dataset.root=<dir>"
        )


def not_found(
    name: str, root, formats: Sequence[str], split: str = "test", why: str = "", **fmt
) -> DatasetNotFound:
    """A :class:`DatasetNotFound` listing the ``LAYOUTS`` of ``formats``."""
    values = {"root": root, "split": split, **fmt}

    def fill(text: str) -> str:  # only the named placeholders: layouts also show JSON braces
        for key, value in values.items():
            text = text.replace("{" + key + "}", str(value))
        return text

    return DatasetNotFound(name, root, [fill(LAYOUTS[f]) for f in formats], why)


def load_image(file) -> Image.Image:
    """The image as RGB, converted as training converts it (``flip.data.images.to_rgb``)."""
    with Image.open(file) as im:
        im.load()
        return to_rgb(im)


class ImageList(Dataset):
    """(transform(image), label) from a list of (path, label)."""

    def __init__(self, samples: list, transform: Callable, classes=None, groups=None):
        self.samples, self.transform = samples, transform
        self.classes, self.groups = classes, groups

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(load_image(path)), label


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_class_folders(folder: Path) -> tuple[list[str], dict[str, int]]:
    """Class folder names and their labels: sorted names -> 0..C-1, or int(name) if all digits."""
    names = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if names and all(n.isdigit() for n in names):
        return names, {n: int(n) for n in names}
    return names, {n: i for i, n in enumerate(names)}


def image_folder(name: str, root, split: str, transform) -> ImageList:
    """{root}/{split}/<class>/<image>. Class names: {root}/classnames.txt if present; else,
    for folders named by label number, the config's names (``classes`` = None); else the
    folder names themselves ("_" -> " ")."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir() or not any(d.is_dir() for d in folder.iterdir()):
        raise not_found(name, root, ["folder"], split, why=f"no class folders in {folder}")
    names, labels = scan_class_folders(folder)
    samples = [(p, labels[n]) for n in names for p in _images_in(folder / n)]
    if (root / "classnames.txt").is_file():
        classnames = _read_lines(root / "classnames.txt")
    elif all(n.isdigit() for n in names):
        classnames = None
    else:
        classnames = [n.replace("_", " ") for n in names]
    num = max(labels.values()) + 1
    if classnames is not None and len(classnames) < num:
        raise ConfigError(
            f"dataset {name}: {folder} has labels up to {num - 1} but only "
            f"{len(classnames)} class names"
        )
    return ImageList(samples, transform, classnames)


def _read_lines(path: Path) -> list[str]:
    return [s.strip() for s in Path(path).read_text("utf-8").splitlines() if s.strip()]


# -- ImageNet-V2, ObjectNet ------------------------------------------------------------------
def imagenet_v2(name: str, root, split: str, transform) -> ImageList:
    """ImageNetV2 (format-val release): {root}/<label>/<image>, folders 0 … 999 named by
    ImageNet label. (CLIP_benchmark's builder downloads the set unless all 10000 images are
    present, so it is not used.)"""
    root = Path(root)
    if not root.is_dir() or not any(d.is_dir() for d in root.iterdir()):
        raise not_found(name, root, ["imagenet_v2"], split, why=f"no class folders in {root}")
    samples = []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        if not folder.name.isdigit() or not 0 <= int(folder.name) < 1000:
            raise ConfigError(f"dataset {name}: folder {folder} is not an ImageNet label 0 … 999")
        samples += [(p, int(folder.name)) for p in _images_in(folder)]
    return ImageList(samples, transform, list(metadata.imagenet_classnames()))


def _find(root: Path, names: Sequence[str], subdirs: Sequence[str]) -> Path | None:
    for sub in subdirs:
        if all((root / sub / n).is_file() for n in names):
            return root / sub
    return None


def objectnet(name: str, root, split: str, transform) -> ImageList:
    """ObjectNet's 113 ImageNet-overlapping classes; each class's logit is the max over the
    logits of the ImageNet classes it maps to (the ImageNet-testbed / CLIP protocol)."""
    root = Path(root)
    files = [
        "folder_to_objectnet_label.json",
        "objectnet_to_imagenet_1k.json",
        "pytorch_to_imagenet_2012_id.json",
        "imagenet_to_label_2012_v2",
    ]
    meta = _find(root, files, ["", "mappings", "objectnet-1.0/mappings"])
    images = next(
        (p for p in (root / "objectnet-1.0" / "images", root / "images") if p.is_dir()), None
    )
    if meta is None or images is None:
        raise not_found(name, root, ["objectnet"], split)
    folder_label = json.loads((meta / files[0]).read_text())
    label_folder = {v: k for k, v in folder_label.items()}
    to_imagenet = json.loads((meta / files[1]).read_text())
    pytorch_to_id = {int(k): int(v) for k, v in json.loads((meta / files[2]).read_text()).items()}
    id_to_pytorch = {v: k for k, v in pytorch_to_id.items()}
    line_names = (meta / files[3]).read_text().splitlines()
    name_to_pytorch = {n.strip(): id_to_pytorch[i] for i, n in enumerate(line_names) if n.strip()}
    folder_groups = {
        label_folder[o]: sorted(name_to_pytorch[n] for n in inet.split("; "))
        for o, inet in to_imagenet.items()
    }
    folders = sorted(folder_groups)
    samples = [
        (p, k)
        for k, f in enumerate(folders)
        if (images / f).is_dir()
        for p in _images_in(images / f)
    ]
    ds = ImageList(
        samples,
        transform,
        list(metadata.imagenet_classnames()),
        [folder_groups[f] for f in folders],
    )
    ds.labelnames = [folder_label[f] for f in folders]
    return ds


# -- ImageNet-Vid-Robust / YouTube-BB-Robust (PM-k) -------------------------------------------
class VideoFrames(ImageList):
    """Frames of the PM-k sets. ``labels``: multi-hot over the video classes; ``frames``:
    paths relative to root; ``pmsets``: {anchor index: [neighbour indices]}."""


def video_pm(name: str, root, split: str, transform, class_index: str | None = None) -> VideoFrames:
    root = Path(root)
    meta = _find(root, ["labels.json", "pmsets.json"], ["metadata", ""])
    if meta is None:
        raise not_found(name, root, ["video_pm"], split)
    labels = json.loads((meta / "labels.json").read_text())
    pmsets = json.loads((meta / "pmsets.json").read_text())
    wnid = metadata.imagenet_wnid_index()
    rev_idx = _find(root, ["rev_class_idx_map.json"], ["metadata", "misc", ""])
    if rev_idx is not None:
        rev = json.loads((rev_idx / "rev_class_idx_map.json").read_text())
        groups = [sorted(int(i) for i in rev[str(k)]) for k in range(len(rev))]
    else:
        misc = _find(root, ["rev_wnid_map.json"], ["misc", "metadata", ""])
        index_file = None
        if misc is not None:
            cands = ([class_index] if class_index else []) + sorted(  # the named file, else any
                p.name
                for p in misc.glob("*_class_index.json")
                if not p.name.startswith("imagenet_class")
            )
            index_file = next((misc / c for c in cands if (misc / c).is_file()), None)
        if index_file is None:
            raise not_found(name, root, ["video_pm"], split, why="no class map")
        rev_wnid = json.loads((misc / "rev_wnid_map.json").read_text())
        cls_index = json.loads(index_file.read_text())  # {"0": [wnid, name], ...}
        groups = [
            sorted(wnid[w] for w in rev_wnid[cls_index[str(k)][0]]) for k in range(len(cls_index))
        ]
    frames = sorted(set(pmsets) | {f for fs in pmsets.values() for f in fs})
    position = {f: i for i, f in enumerate(frames)}
    missing = [f for f in frames if not (root / f).is_file()]
    if missing:
        raise not_found(
            name,
            root,
            ["video_pm"],
            split,
            why=f"{len(missing)} frames missing, e.g. {root / missing[0]}",
        )
    samples = []
    for f in frames:
        target = torch.zeros(len(groups), dtype=torch.bool)
        target[[int(c) for c in labels[f]]] = True
        samples.append((root / f, target))
    ds = VideoFrames(samples, transform, list(metadata.imagenet_classnames()), groups)
    ds.frames = frames
    ds.pmsets = {position[a]: [position[f] for f in fs] for a, fs in pmsets.items()}
    number = {f: _frame_number(f) for f in frames}
    ds.pm_offsets = (
        None
        if None in number.values()
        else {position[a]: [number[f] - number[a] for f in fs] for a, fs in pmsets.items()}
    )
    return ds


def _frame_number(path: str) -> int | None:
    """The trailing integer of a frame's file name (000017.JPEG -> 17), if any."""
    m = re.search(r"(\d+)$", Path(path).stem)
    return int(m.group(1)) if m else None


# -- retrieval: Flickr30k / COCO Karpathy test split -----------------------------------------
class Captioned(Dataset):
    """(transform(image), [captions]) per image."""

    def __init__(self, items: list[tuple[Path, list[str]]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, captions = self.items[i]
        return self.transform(load_image(path)), list(captions)


def captions_json(
    name: str, root, split: str, transform, ann_file: str, image_dir: str = ""
) -> Captioned:
    """Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``: images whose
    ``split`` equals ``split``) or a BLIP-style list of {"image", "caption"} (one file per split)."""
    root = Path(root)
    ann = root / ann_file
    if not ann.is_file():
        raise not_found(
            name, root, ["captions"], split, why=f"no {ann}", ann_file=ann_file, image_dir=image_dir
        )
    data = json.loads(ann.read_text("utf-8"))
    images: dict[str, list[str]] = {}
    if isinstance(data, dict) and "images" in data:
        for im in data["images"]:
            if im.get("split", split) != split:
                continue
            rel = os.path.join(im.get("filepath", ""), im["filename"])
            images.setdefault(rel, []).extend(s["raw"] for s in im["sentences"])
    elif isinstance(data, list):
        for im in data:
            caps = im["caption"]
            images.setdefault(im["image"], []).extend([caps] if isinstance(caps, str) else caps)
    else:
        raise ConfigError(
            f"{ann}: expected Karpathy JSON ({{'images': [...]}}) or a list of "
            "{'image', 'caption'} records"
        )
    if not images:
        raise ConfigError(f"{ann}: no images in split {split!r}")
    items = [(root / image_dir / rel, caps) for rel, caps in images.items()]
    missing = [p for p, _ in items if not p.is_file()]
    if missing:
        raise not_found(
            name,
            root,
            ["captions"],
            split,
            why=f"{len(missing)} images missing, e.g. {missing[0]}",
            ann_file=ann_file,
            image_dir=image_dir,
        )
    return Captioned(items, transform)


# -- Hateful Memes ---------------------------------------------------------------------------
def jsonl(name: str, root, split: str, transform) -> ImageList:
    """Hateful Memes: {root}/{split}.jsonl rows {\"img\", \"label\"}; names from the config."""
    root = Path(root)
    file = root / f"{split}.jsonl"
    if not file.is_file():
        raise not_found(name, root, ["jsonl"], split)
    rows = [json.loads(line) for line in file.read_text("utf-8").splitlines() if line.strip()]
    return ImageList([(root / r["img"], int(r["label"])) for r in rows], transform)
