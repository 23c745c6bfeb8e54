"""Readers for evaluation sets in their standard on-disk layouts (no downloads, ever).

Every classification reader returns a map-style dataset of ``(image, label)`` with
``classnames`` (class names in label order, or None when the names come from the
config) and, where the label space is a projection of another one, ``groups``: for each
dataset class the list of classifier rows whose maximum is its logit (ImageNet-A/R's
200-class subsets, ObjectNet's 113 classes, ImageNet-Vid's 30 classes; ``None`` = the
classifier rows are the dataset classes). Retrieval readers return ``(image, [captions])``.

A missing dataset raises :class:`DatasetNotFound` naming the directory and the layouts
that would have been accepted (``LAYOUTS``).
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from flip.config import ConfigError
from flip.evaluation import metadata

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif")

LAYOUTS = {
    "wds": "CLIP_benchmark webdataset export: {root}/{split}/nshards.txt, {root}/{split}/0.tar … "
           "(samples <key>.webp|jpg|png + <key>.cls, or <key>.txt captions for retrieval), "
           "{root}/classnames.txt, {root}/zeroshot_classification_templates.txt",
    "folder": "image folder: {root}/{split}/<class>/<image> (classes in sorted folder order, or "
              "folders named 0 … C-1 by label; optional {root}/classnames.txt, one name per line)",
    "torchvision": "the torchvision dataset folder under {root}, as torchvision.datasets.{tv}"
                   "(root, download=True) would leave it",
    "imagenet": "{root}/{split}/<wnid>/<image> (or {root}/<wnid>/… ; ImageNetV2: folders 0 … 999)",
    "objectnet": "{root}/objectnet-1.0/images/<folder>/<image> (or {root}/images/…) and the "
                 "mapping files folder_to_objectnet_label.json, objectnet_to_imagenet_1k.json, "
                 "pytorch_to_imagenet_2012_id.json, imagenet_to_label_2012_v2 in {root}, "
                 "{root}/mappings or {root}/objectnet-1.0/mappings",
    "video_pm": "{root}/metadata/labels.json ({frame: [class ids]}), {root}/metadata/pmsets.json "
                "({anchor frame: [neighbour frames]}), frame paths relative to {root}, and the "
                "class map {root}/metadata/rev_class_idx_map.json ({class id: [ImageNet ids]}) or "
                "misc/<…>_class_index.json + misc/rev_wnid_map.json",
    "captions": "{root}/{ann_file}: Karpathy JSON ({\"images\": [{\"filename\", \"filepath\", "
                "\"split\", \"sentences\": [{\"raw\"}]}]}) or a list of {\"image\", \"caption\": "
                "[…]}; images under {root}/{image_dir}",
    "jsonl": "{root}/{split}.jsonl with one {\"img\": <path relative to root>, \"label\": 0|1} per line",
    "voc": "{root}/VOCdevkit/VOC2007 (or {root}/VOC2007): JPEGImages/, ImageSets/Main/{split}.txt "
           "and ImageSets/Main/<class>_{split}.txt",
}


class DatasetNotFound(ConfigError, FileNotFoundError):
    """An evaluation set is not where the config says; the message gives the expected layout."""


def not_found(name: str, root, formats: Sequence[str], split: str = "test", why: str = "",
              **fmt) -> DatasetNotFound:
    values = {"root": root, "split": split, **fmt}

    def fill(text: str) -> str:  # only the named placeholders: layouts also show JSON braces
        for key, value in values.items():
            text = text.replace("{" + key + "}", str(value))
        return text

    layouts = "; or ".join(fill(LAYOUTS[f]) for f in formats)
    return DatasetNotFound(
        f"dataset {name} not found at {root}{f' ({why})' if why else ''}; nothing is downloaded, "
        f"expected {layouts}. Set eval_data.{name}.root=<dir> or data_root=<dir>")


def load_image(file) -> Image.Image:
    with Image.open(file) as im:
        return im.convert("RGB")


class ImageList(Dataset):
    """(transform(image), label) from a list of (path, label)."""

    def __init__(self, samples: list, transform: Callable, classnames=None, groups=None):
        self.samples, self.transform = samples, transform
        self.classnames, self.groups = classnames, groups

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
    for folders named by label number, the config's names (``classnames`` = None); else the
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
        raise ConfigError(f"dataset {name}: {folder} has labels up to {num - 1} but only "
                          f"{len(classnames)} class names")
    return ImageList(samples, transform, classnames)


def _read_lines(path: Path) -> list[str]:
    return [s.strip() for s in Path(path).read_text("utf-8").splitlines() if s.strip()]


# -- CLIP_benchmark webdataset export ---------------------------------------------------
class TarShards(Dataset):
    """Samples of the tar shards {root}/{split}/{0..n-1}.tar, random access by index.

    Each tar is indexed once (member offsets; no decoding); a sample is the files that
    share a key (the member path up to the first dot of its basename), as in webdataset.
    ``mode="cls"`` yields (image, int(<key>.cls)); ``mode="txt"`` yields (image, captions)
    with one caption per non-empty line of <key>.txt.
    """

    def __init__(self, name: str, root, split: str, transform, mode: str = "cls"):
        root = Path(root)
        nshards_file = root / split / "nshards.txt"
        if not nshards_file.is_file():
            raise not_found(name, root, ["wds"], split, why=f"no {nshards_file}")
        n = int(nshards_file.read_text().strip())
        self.shards = [root / split / f"{i}.tar" for i in range(n)]
        missing = [str(s) for s in self.shards if not s.is_file()]
        if missing:
            raise not_found(name, root, ["wds"], split, why=f"missing shards {missing[:3]}")
        self.transform, self.mode = transform, mode
        self.samples: list[dict[str, tuple[int, int, int]]] = []  # ext -> (shard, offset, size)
        for s, shard in enumerate(self.shards):
            entries: dict[str, dict] = {}
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    folder, base = os.path.split(m.name)
                    key, _, ext = base.partition(".")
                    entries.setdefault(os.path.join(folder, key), {})[ext.lower()] = (
                        s, m.offset_data, m.size)
            self.samples += [v for _, v in sorted(entries.items())]
        need = ("cls", "npy") if mode == "cls" else ("txt",)  # npy: multi-hot labels (VOC)
        self.samples = [v for v in self.samples if any(n in v for n in need) and self._image_ext(v)]
        if not self.samples:
            raise not_found(name, root, ["wds"], split,
                            why=f"no image+.{'/.'.join(need)} samples in the shards")
        self.classnames = _read_lines(root / "classnames.txt") if (root / "classnames.txt").is_file() else None
        tfile = root / "zeroshot_classification_templates.txt"
        self.templates = _read_lines(tfile) if tfile.is_file() else None
        self.groups = None
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = None

    @staticmethod
    def _image_ext(entry: dict) -> str | None:
        return next((e for e in ("webp", "jpg", "jpeg", "png", "ppm", "bmp") if e in entry), None)

    def _read(self, where: tuple[int, int, int]) -> bytes:
        if self._pid != os.getpid():  # fresh handles in each DataLoader worker
            self._files, self._pid = {}, os.getpid()
        shard, offset, size = where
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")
        f.seek(offset)
        return f.read(size)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_pid": None}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        entry = self.samples[i]
        image = self.transform(load_image(io.BytesIO(self._read(entry[self._image_ext(entry)]))))
        if self.mode == "cls" and "npy" in entry:  # multi-label export
            return image, torch.from_numpy(np.load(io.BytesIO(self._read(entry["npy"])))).bool()
        text = self._read(entry[self.mode]).decode("utf-8")
        if self.mode == "cls":
            return image, int(text.strip())
        return image, [c.strip() for c in text.splitlines() if c.strip()]


# -- torchvision dataset folders ---------------------------------------------------------
def torchvision_dataset(name: str, root, split: str, transform, tv: str, split_arg: str = "split",
                        kwargs: dict | None = None, classnames=None):
    """``torchvision.datasets.<tv>(root, <split>, download=False)``.

    split_arg: ``split`` passes split=<split>; ``train`` passes train=(split == "train").
    Class names: ``classnames`` if given, else the dataset's ``classes`` with "_" -> " ".
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, tv)
    args = dict(kwargs or {})
    if split_arg == "train":
        args["train"] = split == "train"
    elif split_arg == "split":
        args["split"] = split
    try:
        ds = cls(str(root), transform=transform, download=False, **args)
    except ImportError as err:  # e.g. PCAM needs h5py
        raise ConfigError(f"dataset {name}: torchvision.datasets.{tv} needs a missing package "
                          f"({err}); install it or use the wds/folder layout") from None
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise not_found(name, root, ["torchvision"], split, why=str(err).strip().splitlines()[0],
                        tv=tv) from None
    names = classnames if classnames is not None else [
        str(c).replace("_", " ") for c in getattr(ds, "classes", [])]
    ds.classnames, ds.groups = list(names) or None, None
    return ds


# -- ImageNet and its variants -----------------------------------------------------------
def imagenet_folder(name: str, root, split: str, transform, label_space: str = "imagenet") -> ImageList:
    """Folders named by WordNet id (ImageNet val, -Sketch, -A, -R) or by label (ImageNetV2).

    Labels index ``label_space`` (``imagenet``: 1000; ``imagenet_a`` / ``imagenet_r``: their
    200 classes). For a 200-class space, ``groups`` restricts the 1000-way ImageNet
    classifier to those classes' rows.
    """
    root = Path(root)
    folder = root / split if split and (root / split).is_dir() else root
    if not folder.is_dir() or not any(d.is_dir() for d in folder.iterdir()):
        raise not_found(name, root, ["imagenet", "wds"], split, why=f"no class folders in {folder}")
    space = metadata.label_space(label_space)
    index = {w: i for i, w in enumerate(space)}
    names = sorted(d.name for d in folder.iterdir() if d.is_dir())
    samples = []
    for n in names:
        if n.isdigit():
            label = int(n)
            if not 0 <= label < len(space):
                raise ConfigError(f"dataset {name}: folder {folder / n} is not a label in 0..{len(space) - 1}")
        elif n in index:
            label = index[n]
        else:
            raise ConfigError(f"dataset {name}: folder {folder / n} is neither a WordNet id of "
                              f"the {label_space} label space nor a label number")
        samples += [(p, label) for p in _images_in(folder / n)]
    wnid = metadata.imagenet_wnid_index()
    groups = None if label_space == "imagenet" else [[wnid[w]] for w in space]
    return ImageList(samples, transform, list(metadata.imagenet_classnames()), groups)


def _find(root: Path, names: Sequence[str], subdirs: Sequence[str]) -> Path | None:
    for sub in subdirs:
        if all((root / sub / n).is_file() for n in names):
            return root / sub
    return None


def objectnet(name: str, root, split: str, transform) -> ImageList:
    """ObjectNet's 113 ImageNet-overlapping classes; each class's logit is the max over the
    logits of the ImageNet classes it maps to (the ImageNet-testbed / CLIP protocol)."""
    root = Path(root)
    files = ["folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
             "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2"]
    meta = _find(root, files, ["", "mappings", "objectnet-1.0/mappings"])
    images = next((p for p in (root / "objectnet-1.0" / "images", root / "images") if p.is_dir()), None)
    if meta is None or images is None:
        raise not_found(name, root, ["objectnet"], split)
    folder_label = json.loads((meta / files[0]).read_text())
    label_folder = {v: k for k, v in folder_label.items()}
    to_imagenet = json.loads((meta / files[1]).read_text())
    pytorch_to_id = {int(k): int(v) for k, v in json.loads((meta / files[2]).read_text()).items()}
    id_to_pytorch = {v: k for k, v in pytorch_to_id.items()}
    line_names = (meta / files[3]).read_text().splitlines()
    name_to_pytorch = {n.strip(): id_to_pytorch[i] for i, n in enumerate(line_names) if n.strip()}
    folder_groups = {label_folder[o]: sorted(name_to_pytorch[n] for n in inet.split("; "))
                     for o, inet in to_imagenet.items()}
    folders = sorted(folder_groups)
    samples = [(p, k) for k, f in enumerate(folders) if (images / f).is_dir()
               for p in _images_in(images / f)]
    ds = ImageList(samples, transform, list(metadata.imagenet_classnames()),
                   [folder_groups[f] for f in folders])
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
                p.name for p in misc.glob("*_class_index.json") if not p.name.startswith("imagenet_class"))
            index_file = next((misc / c for c in cands if (misc / c).is_file()), None)
        if index_file is None:
            raise not_found(name, root, ["video_pm"], split, why="no class map")
        rev_wnid = json.loads((misc / "rev_wnid_map.json").read_text())
        cls_index = json.loads(index_file.read_text())  # {"0": [wnid, name], ...}
        groups = [sorted(wnid[w] for w in rev_wnid[cls_index[str(k)][0]]) for k in range(len(cls_index))]
    frames = sorted(set(pmsets) | {f for fs in pmsets.values() for f in fs})
    position = {f: i for i, f in enumerate(frames)}
    missing = [f for f in frames if not (root / f).is_file()]
    if missing:
        raise not_found(name, root, ["video_pm"], split, why=f"{len(missing)} frames missing, e.g. {root / missing[0]}")
    samples = []
    for f in frames:
        target = torch.zeros(len(groups), dtype=torch.bool)
        target[[int(c) for c in labels[f]]] = True
        samples.append((root / f, target))
    ds = VideoFrames(samples, transform, list(metadata.imagenet_classnames()), groups)
    ds.frames = frames
    ds.pmsets = {position[a]: [position[f] for f in fs] for a, fs in pmsets.items()}
    number = {f: _frame_number(f) for f in frames}
    ds.pm_offsets = None if None in number.values() else {
        position[a]: [number[f] - number[a] for f in fs] for a, fs in pmsets.items()}
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


def captions_json(name: str, root, split: str, transform, ann_file: str, image_dir: str = "") -> Captioned:
    """Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``: images whose
    ``split`` equals ``split``) or a BLIP-style list of {"image", "caption"} (one file per split)."""
    root = Path(root)
    ann = root / ann_file
    if not ann.is_file():
        raise not_found(name, root, ["captions", "wds"], split, why=f"no {ann}",
                        ann_file=ann_file, image_dir=image_dir)
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
        raise ConfigError(f"{ann}: expected Karpathy JSON ({{'images': [...]}}) or a list of "
                          "{'image', 'caption'} records")
    if not images:
        raise ConfigError(f"{ann}: no images in split {split!r}")
    items = [(root / image_dir / rel, caps) for rel, caps in images.items()]
    missing = [p for p, _ in items if not p.is_file()]
    if missing:
        raise not_found(name, root, ["captions"], split, why=f"{len(missing)} images missing, e.g. "
                        f"{missing[0]}", ann_file=ann_file, image_dir=image_dir)
    return Captioned(items, transform)


# -- Hateful Memes, VOC2007 -----------------------------------------------------------------
def jsonl(name: str, root, split: str, transform, classnames=None) -> ImageList:
    root = Path(root)
    file = root / f"{split}.jsonl"
    if not file.is_file():
        raise not_found(name, root, ["jsonl"], split)
    rows = [json.loads(line) for line in file.read_text("utf-8").splitlines() if line.strip()]
    return ImageList([(root / r["img"], int(r["label"])) for r in rows], transform, classnames)


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")


def voc2007(name: str, root, split: str, transform, classnames=None) -> ImageList:
    """Multi-label VOC2007 classification: label = multi-hot of the classes marked 1 or 0
    (0 = "difficult", present in the image) in ImageSets/Main/<class>_<split>.txt."""
    root = Path(root)
    base = next((p for p in (root / "VOCdevkit" / "VOC2007", root / "VOC2007", root)
                 if (p / "ImageSets" / "Main" / f"{split}.txt").is_file()), None)
    if base is None:
        raise not_found(name, root, ["voc", "wds"], split)
    ids = _read_lines(base / "ImageSets" / "Main" / f"{split}.txt")
    target = {i: torch.zeros(len(VOC_CLASSES), dtype=torch.bool) for i in ids}
    for c, cls in enumerate(VOC_CLASSES):
        for line in _read_lines(base / "ImageSets" / "Main" / f"{cls}_{split}.txt"):
            img, flag = line.split()
            if int(flag) >= 0:
                target[img][c] = True
    samples = [(base / "JPEGImages" / f"{i}.jpg", target[i]) for i in ids]
    return ImageList(samples, transform, classnames)


# -- dispatch --------------------------------------------------------------------------------
def detect_format(root, split: str) -> str | None:
    root = Path(root)
    if (root / split / "nshards.txt").is_file():
        return "wds"
    if (root / split).is_dir():
        return "folder"
    return None

