"""Captioned image folders and CSVs: exact skip counts, reported by loader workers; the
image-folder zero-shot set; non-RGB conversion, the same in training and evaluation; a
folder run end to end."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from flip.data.csv_dataset import CsvCaptions
from flip.data.datamodule import ImageTextDataModule
from flip.data.folder import FolderCaptions, ImageFolderZeroShot
from flip.data.images import BadSample, decode_image, to_rgb
from flip.data.quality import LoaderStats
from flip.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    to_normalized_tensor,
    train_transform,
)
from flip.errors import DataPathError
from flip.run import train
from tests.shard_fixtures import encode, noise_image


@pytest.fixture
def folder(tmp_path):
    """8 good images (RGB, CMYK, L, RGBA, P among them) and 6 bad items, sorted by name."""
    root = tmp_path / "images"
    (root / "a_sub").mkdir(parents=True)

    def put(name, data, caption="a caption"):
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption)

    for i in range(4):
        put(f"a{i}.jpg", encode(noise_image(i)), f"good image {i}")
    put("b_cmyk.jpg", encode(noise_image(10, mode="CMYK")), "cmyk")
    put("b_grey.jpg", encode(noise_image(11, mode="L")), "grey")
    put("a_sub/b_rgba.png", encode(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "PNG"), "clear")
    put("b_palette.png", encode(Image.new("P", (20, 20), 1), "PNG"), "palette")
    put("c_empty.jpg", b"")  # empty_image
    put("c_corrupt.jpg", b"\xff\xd8 not really a jpeg")  # corrupt
    put("c_huge.png", encode(Image.new("RGB", (400, 300)), "PNG"))  # large_image
    put("c_nocaption.jpg", encode(noise_image(12)), None)  # missing_caption
    put("c_blank.jpg", encode(noise_image(13)), " \n")  # empty_caption
    put("c_truncated.jpg", encode(noise_image(14, (64, 64)))[:300])  # corrupt
    return root


SKIPS = Counter(empty_image=1, corrupt=2, large_image=1, missing_caption=1, empty_caption=1)


def test_folder_counts_every_bad_item(folder):
    ds = FolderCaptions(folder, image_size=16, max_pixels=100_000)
    assert len(ds) == 14
    assert ds.check() == Counter(ok=8, **SKIPS)
    items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.float32 for x, _ in items)
    # items 8..13 (the c_* files, sorted) are bad: the next readable item wraps around to 0
    assert [c for _, c in items[:5]] == [f"good image {i}" for i in range(4)] + ["clear"]
    assert [c for _, c in items[8:]] == ["good image 0"] * 6
    # item k of the 6 bad ones skips 6 - k items before wrapping: 6+5+4+3+2+1 = 21 skips
    assert sum(ds.skipped.values()) == 21
    assert ds.converted == Counter(CMYK=1, L=1, RGBA=1, P=1)


def test_folder_errors(tmp_path):
    with pytest.raises(DataPathError, match="image folder not found: .*nope"):
        FolderCaptions(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        FolderCaptions(tmp_path)


def test_csv_skips_empty_captions_and_huge_images(tmp_path):
    encode_to = lambda name, img: (tmp_path / name).write_bytes(encode(img, "PNG"))  # noqa
    encode_to("ok.png", Image.new("RGB", (10, 10)))
    encode_to("huge.png", Image.new("RGB", (200, 200)))
    (tmp_path / "pairs.csv").write_text(
        "image_path,caption\nok.png,fine\nok.png,  \nhuge.png,too big\n"
    )
    ds = CsvCaptions(tmp_path / "pairs.csv", image_size=8, max_pixels=10_000)
    assert ds.check() == Counter(ok=1, empty_caption=1, large_image=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_report_exact_skip_counts_beside_plain_batches(folder, workers):
    ds = FolderCaptions(folder, image_size=16, max_pixels=100_000)
    dm = ImageTextDataModule(ds, image_size=16, batch_size=7, num_workers=workers)
    dm.setup("fit")  # probes item 0 (good): nothing to report
    assert dm.loader_stats == LoaderStats()
    for batch in dm.train_dataloader():  # one epoch: 14 items, 2 batches of 7
        assert type(batch) is tuple and len(batch) == 2
        images, tokens = batch
        assert images.shape == (7, 3, 16, 16) and tokens.shape == (7, 32)
    total = dm.loader_stats
    # whatever the shuffle, each bad item is skipped by itself and the bad ones before it
    assert total.samples == 14 and sum(total.skipped.values()) == 21
    # sorted: c_blank c_corrupt c_empty c_huge c_nocaption c_truncated; the j-th of them is
    # skipped j times (by itself and by each bad item before it)
    assert total.skipped == Counter(
        empty_caption=1, corrupt_image=2 + 6, empty_image=3, large_image=4, missing_caption=5
    )
    # each non-RGB image is loaded once (bad items wrap around to item 0, an RGB jpg)
    assert total.converted == Counter(CMYK=1, L=1, RGBA=1, P=1)


def test_image_folder_zero_shot(tmp_path):
    for name, colour in (("red_apple", (255, 0, 0)), ("sky", (0, 0, 255))):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (30, 20), colour).save(tmp_path / name / f"{i}.jpg")
    (tmp_path / "sky" / "3.jpg").write_bytes(b"broken")
    ds = ImageFolderZeroShot(tmp_path, image_size=16)
    assert ds.classnames == ["red apple", "sky"] and len(ds) == 7
    assert ds.templates[0] == "a photo of a {}."
    assert [label for _, label in ds.items] == [0, 0, 0, 1, 1, 1, 1]
    image, label = ds[6]  # the broken file: a blank image, counted
    assert label == 1
    assert torch.equal(image, torch.zeros(3, 16, 16)) and ds.skipped == Counter(corrupt_image=1)
    assert ds[0][0].shape == (3, 16, 16)


def test_non_rgb_modes_convert_to_the_right_colours():
    white_clear = to_rgb(Image.new("RGBA", (2, 2), (0, 0, 0, 0)))
    assert white_clear.mode == "RGB" and white_clear.getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (2, 2), (0, 255))).getpixel((0, 0)) == (0, 0, 0)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    sixteen = Image.frombytes("I;16", (2, 1), np.array([0, 4000], np.uint16).tobytes())
    assert [to_rgb(sixteen).getpixel((x, 0)) for x in (0, 1)] == [(0, 0, 0), (255, 255, 255)]
    image, mode = decode_image(encode(Image.new("RGB", (4, 4), (0, 255, 0)), "PNG"))
    assert mode == "RGB" and image.getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(BadSample, match="large_image: 4x4 > max_pixels=15"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), max_pixels=15)
    assert to_normalized_tensor()(white_clear).shape == (3, 2, 2)


@pytest.mark.parametrize(
    "rgba, over_white",
    [
        ((0, 0, 0, 0), (255, 255, 255)),  # fully transparent black: white, not black
        ((255, 0, 0, 128), (255, 127, 127)),  # half-transparent red: 127 = 255 * (1 - 128/255)
    ],
)
def test_transparency_is_white_in_training_evaluation_and_to_rgb(rgba, over_white):
    image = Image.new("RGBA", (40, 30), rgba)  # uniform: any crop, flip or resize keeps it
    assert to_rgb(image).getpixel((0, 0)) == over_white
    want = (torch.tensor(over_white) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    for transform in (train_transform(16), eval_transform(16), to_normalized_tensor()):
        x = transform(image)
        assert torch.allclose(x, want[:, None, None].expand_as(x), atol=1e-5)


@pytest.mark.slow
def test_folder_pipeline_trains(folder, fast_cfg):
    metrics = train(
        fast_cfg(
            "data=folder",
            f"data.train.root={folder}",
            "data.image_size=32",
            "data.train.max_pixels=100000",
            "batch.global=8",
        )
    )
    assert math.isfinite(metrics["train/loss"]) and "val/zeroshot_top1" not in metrics
