"""python -m flip.data.make_shards / inspect_shards: exact outputs on small real sets."""

import json
import tarfile
from pathlib import Path

from PIL import Image

from flip.data import inspect_shards, make_shards
from flip.data.folder import FolderCaptions
from flip.data.images import IMAGE_EXTENSIONS
from flip.data.shards import ShardStream
from tests.shard_fixtures import MAX_PIXELS, encode, noise_image, write_fixture_shards


def make_folder(root: Path) -> Path:
    root.mkdir()
    for i in range(7):
        noise_image(i, (40 + i, 30)).save(root / f"img{i}.jpg")
        (root / f"img{i}.txt").write_text(f"picture number {i}")
    Image.new("L", (50, 20), 90).save(root / "grey.png")
    (root / "grey.png").with_suffix(".txt").write_text("a grey bar")
    noise_image(9).save(root / "uncaptioned.jpg")  # no .txt: skipped
    (root / "broken.jpg").write_bytes(b"nope")  # corrupt: skipped
    (root / "broken.txt").write_text("broken")
    (root / "blank.jpg").write_bytes(encode(noise_image(10)))
    (root / "blank.txt").write_text("   ")  # blank caption: skipped
    return root


def members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_make_shards_from_a_folder(tmp_path, capsys):
    folder = make_folder(tmp_path / "images")
    make_shards.main(
        ["--folder", str(folder), "--out", str(tmp_path / "shards"), "--per-shard", "3"]
    )
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"wrote 8 samples in 3 shards to {tmp_path / 'shards'}; skipped 3: corrupt_image 1, "
        "empty_caption 1, missing_caption 1",
        f"train: python train.py data=laion data.shards={tmp_path / 'shards'}",
    ]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    # img2dataset layout; sorted file order: grey.png, img0..img6.jpg
    assert members(tmp_path / "shards" / "00000.tar") == [
        "000000000.json",
        "000000000.png",
        "000000000.txt",
        "000000001.jpg",
        "000000001.json",
        "000000001.txt",
        "000000002.jpg",
        "000000002.json",
        "000000002.txt",
    ]
    with tarfile.open(tmp_path / "shards" / "00002.tar") as tar:
        meta = json.loads(tar.extractfile("000020001.json").read())
        assert tar.extractfile("000020001.txt").read() == b"picture number 6"
        assert tar.extractfile("000020001.jpg").read() == (folder / "img6.jpg").read_bytes()
    assert meta == {
        "key": "000020001",
        "caption": "picture number 6",
        "source": str(folder / "img6.jpg"),
        "width": 46,
        "height": 30,
    }
    stream = ShardStream(
        str(tmp_path / "shards" / "{00000..00002}.tar"),
        1,
        passes=1,
        shuffle_buffer=0,
        transform=lambda img: img,
    )
    captions = [c for _, c, _, _ in stream.samples()]
    assert captions == ["a grey bar"] + [f"picture number {i}" for i in range(7)]
    assert stream.state.stats.converted == {"L": 1} and not stream.state.stats.skipped


def test_every_image_extension_goes_from_a_folder_through_shards_to_the_reader(tmp_path):
    formats = {
        ".jpg": "JPEG",
        ".jpeg": "JPEG",
        ".png": "PNG",
        ".webp": "WEBP",
        ".bmp": "BMP",
        ".gif": "GIF",
        ".ppm": "PPM",
        ".tif": "TIFF",
        ".tiff": "TIFF",
    }
    assert sorted(formats) == sorted(IMAGE_EXTENSIONS)  # the test covers the whole list
    root = tmp_path / "images"
    root.mkdir()
    for i, (ext, fmt) in enumerate(formats.items()):
        name = f"img{i}{ext.upper() if i % 2 else ext}"  # suffixes in any case
        noise_image(i, (20, 16)).save(root / name, fmt)
        (root / name).with_suffix(".txt").write_text(f"picture {i}")
    (root / "notes.md").write_text("not an image")
    assert len(FolderCaptions(root, image_size=8)) == 9
    make_shards.main(["--folder", str(root), "--out", str(tmp_path / "shards")])
    shard = tmp_path / "shards" / "00000.tar"
    images = [m for m in members(shard) if not m.endswith((".json", ".txt"))]
    assert images == [f"00000{i:04d}{ext}" for i, ext in enumerate(formats)]  # own bytes
    with tarfile.open(shard) as tar:
        assert tar.extractfile("000000004.bmp").read() == (root / "img4.bmp").read_bytes()
    stream = ShardStream(str(shard), 1, passes=1, shuffle_buffer=0, transform=lambda img: img)
    items = list(stream.samples())
    assert [c for _, c, _, _ in items] == [f"picture {i}" for i in range(9)]
    assert all(img.mode == "RGB" and img.size == (20, 16) for img, _, _, _ in items)
    assert not stream.state.stats.skipped and stream.state.stats.converted == {"P": 1}  # gif


def test_make_shards_from_a_csv_with_resize(tmp_path, capsys):
    folder = make_folder(tmp_path / "images")
    rows = [
        "image_path,caption",
        "img0.jpg,first",
        "grey.png,second",
        "missing.jpg,gone",
        "img1.jpg,",
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    make_shards.main(
        [
            "--csv",
            str(tmp_path / "pairs.csv"),
            "--image-root",
            str(folder),
            "--out",
            str(tmp_path / "shards"),
            "--resize",
            "10",
        ]
    )
    assert capsys.readouterr().out.splitlines()[0] == (
        f"wrote 2 samples in 1 shards to {tmp_path / 'shards'}; skipped 2: empty_caption 1, "
        "missing_image 1"
    )
    stream = ShardStream(
        str(tmp_path / "shards" / "00000.tar"),
        1,
        passes=1,
        shuffle_buffer=0,
        transform=lambda img: img,
    )
    sizes = [(img.size, c) for img, c, _, _ in stream.samples()]
    assert sizes == [((13, 10), "first"), ((25, 10), "second")]  # shorter side 10, JPEG
    assert members(tmp_path / "shards" / "00000.tar")[0] == "000000000.jpg"


def test_make_shards_from_shapes(tmp_path, capsys):
    make_shards.main(
        ["--shapes", "25", "--image-size", "32", "--per-shard", "10", "--out", str(tmp_path)]
    )
    assert capsys.readouterr().out.splitlines()[0] == (
        f"wrote 25 samples in 3 shards to {tmp_path}"
    )
    assert len(members(tmp_path / "00002.tar")) == 5 * 3


def test_inspect_shards_reports_exact_counts(tmp_path, capsys):
    pattern = write_fixture_shards(tmp_path)
    inspect_shards.main([pattern, "--max-pixels", str(MAX_PIXELS)])
    report = capsys.readouterr().out
    lines = report.splitlines()
    assert lines[:3] == [
        f"shard urls: 6 (first {tmp_path / '00000.tar'})",
        "data: 22 good samples, 7 skipped (24.14% of 29 read)",
        "  shards read: 6, failed: 4 (66.67%)",
    ]
    assert "  skipped unreadable_shard: 1" in report and "  skipped corrupt_shard: 3" in report
    assert "  converted to RGB (kept): CMYK 1, L 1, P 1, RGBA 1" in lines
    # 'shard 0 sample 0 a photo': 7 word pieces; 'a grey photo': 3
    assert "caption tokens:    p0=3  p5=3.05  p25=7  p50=7  p75=7  p95=7  p100=7" in lines
    assert "captions longer than 32 tokens (truncated): 0.0%" in lines
    result = inspect_shards.inspect(pattern, limit=5, max_pixels=MAX_PIXELS)
    assert len(result["widths"]) == 5 and result["stats"].shards == 1
