"""Real-format (img2dataset layout) webdataset shards with every kind of bad input.

``write_fixture_shards(root)`` writes, with PIL-made images (no binary fixtures):

  00000.tar  10 good RGB JPEGs (keys 000000000-000000009), varied sizes
  00001.tar  12 samples: CMYK, L (greyscale) JPEGs, an RGBA PNG (transparent left half),
             a palette PNG (all kept and converted), then a zero-byte jpg, random bytes,
             a truncated JPEG, no .txt, a blank caption, a 300x300 image (large when
             max_pixels=MAX_PIXELS), no image (txt + json only), and one good RGB JPEG
  00002.tar  6 good samples, cut in the middle of sample 4's jpg: 4 good samples
  00003.tar  6 good samples, cut exactly before sample 3's first header: 3 good samples
  00004.tar  absent (unreadable path)
  00005.tar  not a tar (an HTML error page)

One pass in shard order therefore reads EXPECTED_GOOD good samples and skips
EXPECTED_SKIPPED; the shard failures are EXPECTED_SHARD_FAILURES.
"""

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

MAX_PIXELS = 50_000  # the decompression-bomb guard the tests use (300 x 300 = 90,000)
EXPECTED_GOOD = 10 + 5 + 4 + 3
EXPECTED_SKIPPED = Counter(
    empty_image=1,
    corrupt_image=2,
    missing_caption=1,
    empty_caption=1,
    large_image=1,
    missing_image=1,
)
EXPECTED_SHARD_FAILURES = Counter(unreadable_shard=1, corrupt_shard=3)
EXPECTED_CONVERTED = Counter(CMYK=1, L=1, RGBA=1, P=1)
SHARDS = "{00000..00005}.tar"
RED = (255, 0, 0)


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def noise_image(seed: int, size=(48, 40), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.frombytes(mode, size, array.tobytes())


def sample(key: str, image: bytes | None = None, caption: str | None = None, ext="jpg") -> dict:
    out = {"__key__": key, "json": json.dumps({"key": key, "status": "success"}).encode()}
    if image is not None:
        out[ext] = image
    if caption is not None:
        out["txt"] = caption
    return out


def write(path: Path, samples) -> None:
    with wds.TarWriter(str(path)) as writer:
        for s in samples:
            writer.write(s)


def caption(shard: int, index: int) -> str:
    return f"shard {shard} sample {index} a photo"


def good(shard: int, index: int, size=None) -> dict:
    size = size or (40 + 8 * (index % 4), 32 + 4 * (index % 3))
    image = Image.new("RGB", size, RED) if index == 0 else noise_image(100 * shard + index, size)
    return sample(f"{shard:05d}{index:04d}", encode(image), caption(shard, index))


def truncate(path: Path, member: str, where: str) -> None:
    """Cut ``path`` inside ``member``'s data ('data') or just before its header ('header')."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    cut = info.offset_data + info.size // 2 if where == "data" else info.offset
    data = path.read_bytes()
    path.write_bytes(data[:cut])


def bad_samples(shard: int = 1) -> list[dict]:
    key = lambda i: f"{shard:05d}{i:04d}"  # noqa: E731
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 16, 32))  # transparent left half -> white
    palette = Image.new("P", (24, 24), 3)
    palette.putpalette([0, 0, 0, 255, 255, 255, 0, 255, 0, 0, 0, 255] * 64)
    jpeg = encode(noise_image(7, (64, 64)))
    return [
        sample(key(0), encode(noise_image(1, (40, 40), "CMYK")), "a cmyk photo"),
        sample(key(1), encode(noise_image(2, (40, 30), "L")), "a grey photo"),
        sample(key(2), encode(rgba, "PNG"), "a half transparent blue square", ext="png"),
        sample(key(3), encode(palette, "PNG"), "a palette image", ext="png"),
        sample(key(4), b"", "a zero byte file"),
        sample(key(5), os.urandom(500), "random bytes"),
        sample(key(6), jpeg[: len(jpeg) // 2], "a truncated jpeg"),
        sample(key(7), encode(noise_image(8)), None),  # no .txt
        sample(key(8), encode(noise_image(9)), "  \n "),  # blank caption
        sample(key(9), encode(Image.new("RGB", (300, 300), (0, 128, 0))), "a big image"),
        sample(key(10), None, "no image at all"),
        good(shard, 11),
    ]


def write_fixture_shards(root: Path) -> str:
    """Write the shards described above under ``root``; returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    write(root / "00000.tar", [good(0, i) for i in range(10)])
    write(root / "00001.tar", bad_samples(1))
    write(root / "00002.tar", [good(2, i) for i in range(6)])
    truncate(root / "00002.tar", "000020004.jpg", "data")
    write(root / "00003.tar", [good(3, i) for i in range(6)])
    truncate(root / "00003.tar", "000030003.jpg", "header")
    (root / "00005.tar").write_bytes(b"<html><body>503 Service Unavailable</body></html>\n")
    return str(root / SHARDS)


def write_reader_shards(root: Path, n_shards: int = 4, good_per_shard: int = 8) -> str:
    """``n_shards`` shards, each ``good_per_shard`` (>= 2) good samples with 3 bad ones after
    the first (corrupt image, blank caption, no .txt) and a good sample last, so that a reader
    owning one shard has reported every skip of a pass when it hands over the pass's last
    batch."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        items = [good(s, i) for i in range(good_per_shard)]
        items[1:1] = [
            sample(f"{s:05d}9001", os.urandom(300), "corrupt"),
            sample(f"{s:05d}9002", encode(noise_image(s)), ""),
            sample(f"{s:05d}9003", encode(noise_image(s + 50)), None),
        ]
        write(root / f"{s:05d}.tar", items)
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")


READER_SKIPS_PER_SHARD = Counter(corrupt_image=1, empty_caption=1, missing_caption=1)


if __name__ == "__main__":  # python -m tests.shard_fixtures OUT_DIR: write them for a look
    import sys

    print(write_fixture_shards(Path(sys.argv[1])))
