"""Writers of tiny evaluation sets in the real on-disk layouts (``flip.data.benchmarks.readers.LAYOUTS``):
every function writes files exactly where CLIP_benchmark's builders or our readers look."""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def solid_image(seed: int, size: int = 24) -> Image.Image:
    """A deterministic RGB image: a random colour plus noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    noise = rng.integers(-20, 21, size=(size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}[fmt])
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(
    root,
    split: str,
    samples: Sequence[tuple[Image.Image, object]],
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    per_shard: int = 3,
    image_format: str = "webp",
) -> Path:
    """CLIP_benchmark export: {root}/{split}/{i}.tar with <key>.<image_format> and <key>.cls
    (int label), <key>.npy (multi-hot array) or <key>.txt (list of captions, one per line);
    nshards.txt; classnames.txt, zeroshot_classification_templates.txt and dataset_type.txt
    (retrieval | multilabel, as its exporter writes them) at the root."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    shards = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    for s, shard in enumerate(shards):
        with tarfile.open(root / split / f"{s}.tar", "w") as tar:
            for j, (img, target) in enumerate(shard):
                key = f"s{s:04d}{j:04d}"
                _add(tar, f"{key}.{image_format}", _encode(img, image_format))
                if isinstance(target, (list, tuple)):
                    _add(tar, f"{key}.txt", "\n".join(target).encode())
                elif isinstance(target, np.ndarray):  # multi-hot, as CLIP_benchmark's .npy
                    buf = io.BytesIO()
                    np.save(buf, target)
                    _add(tar, f"{key}.npy", buf.getvalue())
                else:
                    _add(tar, f"{key}.cls", str(int(target)).encode())
    (root / split / "nshards.txt").write_text(f"{len(shards)}\n")
    target = samples[0][1]
    if isinstance(target, (list, tuple, np.ndarray)):
        kind = "retrieval" if isinstance(target, (list, tuple)) else "multilabel"
        (root / "dataset_type.txt").write_text(f"{kind}\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def write_folders(folder, images: dict[str, Sequence[Image.Image]], ext: str = "png") -> Path:
    """{folder}/<class>/<i>.<ext> for every class name (or WordNet id, or label number)."""
    folder = Path(folder)
    for cls, imgs in images.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            img.save(folder / cls / f"{i}.{ext}")
    return folder


def write_karpathy(
    root,
    ann_file: str,
    image_dir: str,
    items: Sequence[tuple[Image.Image, list[str]]],
    split: str = "test",
    filepath: str = "",
    other_split: int = 1,
) -> Path:
    """Karpathy JSON {"images": [{filepath, filename, split, sentences: [{raw}]}]} with
    ``other_split`` extra images in split "train" (which the test reader must skip)."""
    root = Path(root)
    records = []
    for i, (img, caps) in enumerate(
        list(items) + [(items[0][0], ["a training caption"])] * other_split
    ):
        name = f"{i:06d}.jpg"
        (root / image_dir / filepath).mkdir(parents=True, exist_ok=True)
        img.save(root / image_dir / filepath / name)
        records.append(
            {
                "filepath": filepath,
                "filename": name,
                "split": split if i < len(items) else "train",
                "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
            }
        )
    (root / ann_file).write_text(json.dumps({"images": records, "dataset": "fixture"}))
    return root


def write_caption_list(
    root, ann_file: str, items: Sequence[tuple[Image.Image, list[str]]], image_dir: str = "images"
) -> Path:
    """BLIP-style annotation list [{"image": <relative path>, "caption": [...]}]."""
    root = Path(root)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for i, (img, caps) in enumerate(items):
        img.save(root / image_dir / f"{i}.jpg")
        records.append({"image": f"{image_dir}/{i}.jpg", "caption": list(caps)})
    (root / ann_file).write_text(json.dumps(records))
    return root


def write_video_pm(
    root,
    videos: dict[str, list[tuple[Image.Image, list[int]]]],
    groups: Sequence[Sequence[int]],
    radius: int = 10,
    class_map: str = "idx",
) -> Path:
    """ImageNet-Vid-Robust layout: frames {root}/val/<video>/<n:06d>.JPEG; labels.json
    {frame: [class ids]}; pmsets.json {anchor (the middle frame): [frames within radius]}.
    class_map "idx": metadata/rev_class_idx_map.json {class id: [ImageNet label ids]} (the
    ImageNet-testbed form); "misc": the release's misc/imagenet_vid_class_index.json
    {id: [wnid, name]} + misc/rev_wnid_map.json {video wnid: [ImageNet wnids]}."""
    root = Path(root)
    labels, pmsets = {}, {}
    for video, frames in videos.items():
        (root / "val" / video).mkdir(parents=True, exist_ok=True)
        names = []
        for n, (img, classes) in enumerate(frames):
            rel = f"val/{video}/{n:06d}.JPEG"
            img.save(root / rel, format="JPEG")
            labels[rel] = list(classes)
            names.append(rel)
        mid = len(names) // 2
        pmsets[names[mid]] = [f for k, f in enumerate(names) if k != mid and abs(k - mid) <= radius]
    (root / "metadata").mkdir(exist_ok=True)
    (root / "metadata" / "labels.json").write_text(json.dumps(labels))
    (root / "metadata" / "pmsets.json").write_text(json.dumps(pmsets))
    if class_map == "idx":
        (root / "metadata" / "rev_class_idx_map.json").write_text(
            json.dumps({str(k): list(g) for k, g in enumerate(groups)})
        )
    else:
        from flip.data.benchmarks.metadata import imagenet_classnames, imagenet_wnids

        wnids = imagenet_wnids()
        (root / "misc").mkdir(exist_ok=True)
        vid = {str(k): [f"n9{k:07d}", f"video class {k}"] for k in range(len(groups))}
        (root / "misc" / "imagenet_vid_class_index.json").write_text(json.dumps(vid))
        (root / "misc" / "rev_wnid_map.json").write_text(
            json.dumps({vid[str(k)][0]: [wnids[i] for i in g] for k, g in enumerate(groups)})
        )
        (root / "misc" / "imagenet_class_index.json").write_text(
            json.dumps(
                {str(i): [w, n] for i, (w, n) in enumerate(zip(wnids, imagenet_classnames()))}
            )
        )
    return root


def write_objectnet(root, classes: dict[str, tuple[str, list[int], list[Image.Image]]]) -> Path:
    """ObjectNet layout: {root}/objectnet-1.0/images/<folder>/*.png and the four mapping files
    in {root}/objectnet-1.0/mappings. ``classes``: folder -> (ObjectNet name, ImageNet label
    ids, images). ``imagenet_to_label_2012_v2`` lists fake names ``inet<k>`` in a shuffled
    "2012 id" order, mapped back by ``pytorch_to_imagenet_2012_id.json`` (as in the real files)."""
    from flip.data.benchmarks.metadata import imagenet_classnames

    root = Path(root)
    base = root / "objectnet-1.0"
    maps = base / "mappings"
    maps.mkdir(parents=True, exist_ok=True)
    perm = np.random.default_rng(0).permutation(1000)  # 2012 id of each pytorch label
    lines = [""] * 1000
    for label, id2012 in enumerate(perm):
        lines[id2012] = f"inet{label}"
    (maps / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(
        json.dumps({str(label): int(i) for label, i in enumerate(perm)})
    )
    (maps / "folder_to_objectnet_label.json").write_text(
        json.dumps({f: name for f, (name, _, _) in classes.items()})
    )
    (maps / "objectnet_to_imagenet_1k.json").write_text(
        json.dumps({name: "; ".join(f"inet{i}" for i in ids) for name, ids, _ in classes.values()})
    )
    write_folders(base / "images", {f: imgs for f, (_, _, imgs) in classes.items()})
    assert len(imagenet_classnames()) == 1000
    return root


def write_voc(
    root,
    images: Sequence[tuple[Image.Image, list[int]]],
    classes: Sequence[str],
    split: str = "test",
) -> Path:
    """VOCdevkit/VOC2007 with JPEGImages, Annotations/<id>.xml (one object per class
    present), ImageSets/Main/{split}.txt and <class>_{split}.txt (1 present, -1 absent)."""
    base = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(len(images))]
    for i, (img, present) in zip(ids, images):
        img.save(base / "JPEGImages" / f"{i}.jpg")
        objects = "".join(
            f"<object><name>{classes[c]}</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            f"<xmax>{img.width}</xmax><ymax>{img.height}</ymax></bndbox></object>"
            for c in present
        )
        (base / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{i}.jpg</filename>{objects}</annotation>"
        )
    (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for c, cls in enumerate(classes):
        rows = [f"{i} {1 if c in present else -1:2d}" for i, (_, present) in zip(ids, images)]
        (base / "ImageSets" / "Main" / f"{cls}_{split}.txt").write_text("\n".join(rows) + "\n")
    return Path(root)


def write_jsonl(root, split: str, images: Sequence[tuple[Image.Image, int]]) -> Path:
    """Hateful Memes layout: {root}/img/<id>.png and {root}/{split}.jsonl rows {id, img, label, text}."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (img, label) in enumerate(images):
        img.save(root / "img" / f"{i:05d}.png")
        rows.append({"id": i, "img": f"img/{i:05d}.png", "label": int(label), "text": "a meme"})
    (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def write_mnist(root, images: Sequence[tuple[np.ndarray, int]]) -> Path:
    """torchvision MNIST raw IDX files under {root}/MNIST/raw (the same images for train and test)."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    pixels = np.stack([x for x, _ in images]).astype(np.uint8)  # (N, 28, 28)
    labels = np.array([y for _, y in images], dtype=np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, len(pixels), 28, 28) + pixels.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, len(labels)) + labels.tobytes()
        )
    return Path(root)
