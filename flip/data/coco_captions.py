"""Caption datasets on disk (nothing is downloaded): COCO's Karpathy split and COCO-format
annotation files (nocaps).

- Karpathy's ``dataset_coco.json`` (``images[{filepath, filename, split: train | val |
  test | restval, sentences[{raw}], cocoid}]``), read by ``flip.data.benchmarks.readers.captions_json``
  (the reader of the retrieval evaluation); images at ``<root>/<filepath>/<filename>``
  (``val2014/COCO_val2014_000000391895.jpg``). Training uses train + restval (113,287
  images), the paper's test split of [38] is ``test`` (5,000 images), ``val`` another 5,000.
- COCO-format caption annotations (``images[{id, file_name}]``, ``annotations[{image_id,
  caption}]``): nocaps' ``nocaps_val_4500_captions.json`` (images under ``<root>/val``;
  each image also has ``domain``: in-, near- or out-of-domain) and COCO's own
  ``captions_val2014.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from flip.data.benchmarks.readers import Captioned, DatasetNotFound, captions_json, load_image
from flip.errors import ConfigError

COCO_FORMAT_LAYOUT = (
    '{root}/{ann_file}: COCO-format captions ({{"images": [{{"id", "file_name"}}], '
    '"annotations": [{{"image_id", "caption"}}]}}); images under {root}/{image_dir}'
)


def karpathy_images(
    root,
    transform,
    splits: Sequence[str] = ("test",),
    ann_file: str = "dataset_coco.json",
    image_dir: str = "",
) -> Captioned:
    """The images of the Karpathy ``splits`` with their reference captions."""
    if isinstance(splits, str):
        splits = [splits]
    parts = [captions_json("coco", root, split, transform, ann_file, image_dir) for split in splits]
    return Captioned([item for part in parts for item in part.items], transform)


def coco_format_images(
    root, transform, ann_file: str, image_dir: str = "", name: str = "nocaps"
) -> Captioned:
    """Images with their captions from a COCO-format annotation file (nocaps,
    ``captions_val2014.json``), in the file's image order."""
    root = Path(root)
    ann = root / ann_file
    layout = [COCO_FORMAT_LAYOUT.format(root=root, ann_file=ann_file, image_dir=image_dir)]
    if not ann.is_file():
        raise DatasetNotFound(name, root, layout, why=f"no {ann}")
    data = json.loads(ann.read_text("utf-8"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ConfigError(
            f"{ann}: expected COCO-format captions ({{'images': [...], 'annotations': [...]}}}})"
        )
    refs: dict = {}
    for a in data["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    items = [(root / image_dir / im["file_name"], refs.get(im["id"], [])) for im in data["images"]]
    without = [str(p) for p, caps in items if not caps]
    if without:
        raise ConfigError(f"{ann}: {len(without)} images have no caption, e.g. {without[0]}")
    missing = [p for p, _ in items if not p.is_file()]
    if missing:
        raise DatasetNotFound(
            name, root, layout, why=f"{len(missing)} images missing, e.g. {missing[0]}"
        )
    return Captioned(items, transform)


class CaptionPairs(Dataset):
    """(transform(image), caption): one sample per reference caption of each image."""

    def __init__(self, images: Captioned):
        self.images = images
        self.pairs = [(i, j) for i, (_, caps) in enumerate(images.items) for j in range(len(caps))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        i, j = self.pairs[k]
        path, captions = self.images.items[i]
        return self.images.transform(load_image(path)), captions[j]

    @property
    def captions(self) -> list[str]:
        return [c for _, caps in self.images.items for c in caps]
