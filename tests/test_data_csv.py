"""CSV image-caption dataset: loading, skipping bad images, clear errors; transforms."""

import csv
from collections import Counter

import pytest
import torch
from PIL import Image

from flip.data.csv_dataset import CsvCaptions
from flip.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    to_normalized_tensor,
    train_transform,
)
from flip.errors import DataPathError


def write_csv(path, rows, header=("image_path", "caption")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def folder(tmp_path):
    """Three good images (RGB PNG, grey JPEG, RGBA PNG in a subfolder), one corrupt."""
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("L", (20, 20), 128).save(tmp_path / "grey.jpg")
    Image.new("RGBA", (50, 50), (0, 0, 255, 255)).save(tmp_path / "sub" / "blue.png")
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    rows = [
        ("red.png", "a red rectangle"),
        ("grey.jpg", "a grey square, with a comma"),
        ("broken.png", "never returned"),
        ("gone.png", "missing file"),
        ("sub/blue.png", "a blue square"),
    ]
    return tmp_path, write_csv(tmp_path / "pairs.csv", rows)


def test_good_and_skipped_counts(folder):
    _, path = folder
    ds = CsvCaptions(path, image_size=32)
    assert len(ds) == 5
    captions = [ds[i][1] for i in range(len(ds))]
    # rows 2 (corrupt) and 3 (missing) are replaced by the next readable row (4)
    assert captions == [
        "a red rectangle",
        "a grey square, with a comma",
        "a blue square",
        "a blue square",
        "a blue square",
    ]
    # row 2 skips 2 and 3, row 3 skips 3: every skip is counted
    assert ds.skipped == Counter(missing=2, corrupt=1)
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert ds.check() == Counter(ok=3, missing=1, corrupt=1)


def test_all_unreadable_is_an_error_naming_the_csv(folder, tmp_path_factory):
    _, path = folder
    ds = CsvCaptions(path, image_root=tmp_path_factory.mktemp("wrong_root"))
    with pytest.raises(RuntimeError, match="pairs.csv: 5 consecutive rows"):
        ds[0]
    assert ds.skipped == Counter(missing=5)


def test_image_root_and_truncated_file(folder, tmp_path_factory):
    images, _ = folder
    data = images / "red.png"
    truncated = images / "half.png"
    truncated.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])
    other = tmp_path_factory.mktemp("elsewhere")
    path = write_csv(other / "list.csv", [("red.png", "red"), ("half.png", "cut")])
    ds = CsvCaptions(path, image_root=images, transform=to_normalized_tensor())
    assert ds[0][0].shape == (3, 30, 40)
    assert ds[1][1] == "red"  # the truncated row wraps around to row 0
    assert ds.skipped == Counter(corrupt=1)
    # without image_root the paths are relative to the CSV's folder: both missing
    ds = CsvCaptions(path, transform=to_normalized_tensor())
    with pytest.raises(RuntimeError, match="list.csv"):
        ds[0]
    assert ds.skipped == Counter(missing=2)


def test_clear_errors(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataPathError, match="nope.csv"):
        CsvCaptions(missing)
    bad = write_csv(tmp_path / "bad.csv", [("a.png", "x")], header=("path", "text"))
    with pytest.raises(ValueError, match="image_path,caption") as err:
        CsvCaptions(bad)
    assert "path,text" in str(err.value)
    empty = write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match="empty.csv"):
        CsvCaptions(empty)
    blank = tmp_path / "blank.csv"
    blank.write_text("")
    with pytest.raises(ValueError, match="image_path,caption"):
        CsvCaptions(blank)


def test_transforms_shapes_and_values():
    white = Image.new("L", (100, 60), 255)  # grey input becomes RGB
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)  # (3,)
    for transform in (train_transform(48), eval_transform(48), train_transform(48, hflip=False)):
        x = transform(white)
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
        assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-3)
    half = Image.new("RGB", (64, 64), (0, 0, 0))
    half.paste((255, 255, 255), (32, 0, 64, 64))  # right half white
    x = eval_transform(32)(half)
    assert x[:, :, :14].max() < 0 < x[:, :, 18:].min()  # no flip, no crop in eval
    assert torch.equal(to_normalized_tensor()(half), to_normalized_tensor()(half))
    assert to_normalized_tensor()(half).shape == (3, 64, 64)
