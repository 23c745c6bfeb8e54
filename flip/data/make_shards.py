"""Write webdataset shards in img2dataset's layout from a CSV, a folder or the shapes data.

    python -m flip.data.make_shards --folder /data/my_images --out /data/my_shards
    python -m flip.data.make_shards --csv /data/pairs.csv --out /data/my_shards --resize 256
    python -m flip.data.make_shards --shapes 2048 --out /tmp/flip_shards   # fixture shards

Output: ``OUT/00000.tar, 00001.tar, ...`` with ``--per-shard`` samples each; sample
``i`` of shard ``s`` has key ``f"{s:05d}{i:04d}"`` (img2dataset's scheme for shards of up
to 10,000) and members ``KEY.jpg`` (or the source file's own extension, one of
``flip.data.images.IMAGE_EXTENSIONS``), ``KEY.txt`` (the caption) and ``KEY.json`` (key,
caption, source, width, height). Train on them with ``python train.py data=laion
data.shards=OUT`` (a directory: all its .tar; the command is printed) or with a brace
pattern, quoted for Hydra: ``python train.py data=laion 'data.shards="OUT/{00000..00041}.tar"'``.

By default every image is decoded once (``--no-verify`` skips that): unreadable,
zero-byte or oversized images and blank or missing captions are left out and counted.
Without ``--resize`` the original file bytes are stored (a file whose suffix is not an
image extension is re-encoded as JPEG); with ``--resize N`` the image is converted to RGB
(``flip.data.images.to_rgb``), its shorter side resized to N (bicubic; never enlarged)
and stored as JPEG at ``--quality``, like img2dataset's ``resize_mode=keep_ratio``.
"""

import argparse
import csv
import io
import json
import sys
from collections import Counter
from pathlib import Path

import webdataset as wds
from PIL import Image

from flip.data.folder import list_images
from flip.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadSample,
    decode_caption,
    decode_image,
)


def from_csv(path: Path, image_root: Path | None = None):
    """(image path, caption or None) per CSV row."""
    root = image_root or path.parent
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"image_path", "caption"} <= set(reader.fieldnames or []):
            raise SystemExit(f"error: {path}: expected a header with image_path,caption")
        for row in reader:
            yield root / row["image_path"], row["caption"]


def from_folder(root: Path):
    """(image path, caption or None) per image with its same-stem .txt next to it."""
    for rel in list_images(root):
        text = (root / rel).with_suffix(".txt")
        yield root / rel, text.read_bytes().decode("utf-8", "replace") if text.is_file() else None


def from_shapes(n: int, image_size: int, seed: int = 0):
    """(PIL image, caption) of the embedded procedurally generated shapes data."""
    from flip.data.shapes import ShapesCaptions, render

    data = ShapesCaptions("train", size=n, image_size=image_size, seed=seed)
    for i in range(n):
        scene, caption = data.sample(i)
        yield render(scene, image_size), caption


def encode(img: Image.Image, resize: int | None, quality: int) -> bytes:
    if resize is not None and min(img.size) > resize:
        scale = resize / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_shards(
    items,
    out: Path,
    per_shard: int = 10_000,
    resize: int | None = None,
    quality: int = 95,
    verify: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Counter:
    """Write ``items`` ((path or PIL image, caption)) as shards; Counter of written/skipped."""
    if not 1 <= per_shard <= 10_000:
        raise ValueError(f"--per-shard must be in 1..10000 (keys have 4 digits), got {per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    counts = Counter()
    writer, shard, index = None, -1, per_shard
    for source, caption in items:
        try:
            caption = decode_caption(caption if caption is not None else "")
        except BadSample:
            counts["missing_caption" if caption is None else "empty_caption"] += 1
            continue
        try:
            if isinstance(source, Image.Image):
                img, name, ext = source, "", "jpg"
                data = encode(img, resize, quality)
            else:
                name, suffix = str(source), source.suffix.lower()
                data = source.read_bytes()
                kept = resize is None and suffix in IMAGE_EXTENSIONS  # the file's own bytes
                ext = suffix[1:] if kept else "jpg"
                if verify or not kept:
                    img, _ = decode_image(data, max_pixels)
                    if not kept:
                        data = encode(img, resize, quality)
                else:
                    img = None
                    if not data:
                        raise BadSample("empty_image")
        except FileNotFoundError:
            counts["missing_image"] += 1
            continue
        except BadSample as bad:
            counts[bad.reason] += 1
            continue
        if index == per_shard:
            if writer is not None:
                writer.close()
            shard, index = shard + 1, 0
            writer = wds.TarWriter(str(out / f"{shard:05d}.tar"))
        key = f"{shard:05d}{index:04d}"
        meta = {
            "key": key,
            "caption": caption,
            "source": name,
            "width": img.width if img is not None else None,
            "height": img.height if img is not None else None,
        }
        writer.write({"__key__": key, ext: data, "txt": caption, "json": json.dumps(meta).encode()})
        index += 1
        counts["written"] += 1
    if writer is not None:
        writer.close()
    counts["shards"] = shard + 1
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flip.data.make_shards",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", type=Path, help="image_path,caption CSV")
    src.add_argument("--folder", type=Path, help="folder of x.jpg with x.txt captions")
    src.add_argument(
        "--shapes",
        type=int,
        metavar="N",
        help="N samples of the embedded shapes data (fixture shards)",
    )
    parser.add_argument("--image-root", type=Path, help="CSV paths are relative to this")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--resize", type=int, help="shorter side to N px, re-encode as JPEG")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--image-size", type=int, default=224, help="--shapes image size")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="store image bytes without decoding them once",
    )
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    args = parser.parse_args(argv)
    if args.csv:
        if not args.csv.is_file():
            raise SystemExit(f"error: CSV not found: {args.csv}")
        items = from_csv(args.csv, args.image_root)
    elif args.folder:
        if not args.folder.is_dir():
            raise SystemExit(f"error: folder not found: {args.folder}")
        items = from_folder(args.folder)
    else:
        items = from_shapes(args.shapes, args.image_size)
    counts = write_shards(
        items, args.out, args.per_shard, args.resize, args.quality, args.verify, args.max_pixels
    )
    skipped = {k: v for k, v in counts.items() if k not in ("written", "shards")}
    print(
        f"wrote {counts['written']:,} samples in {counts['shards']:,} shards to {args.out}"
        + (
            f"; skipped {sum(skipped.values()):,}: "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items()))
            if skipped
            else ""
        )
    )
    if counts["shards"]:  # a directory means all its *.tar (no braces to quote for Hydra)
        print(f"train: python train.py data=laion data.shards={args.out}")
    else:
        sys.exit(1)


if __name__ == "__main__":
    main()
