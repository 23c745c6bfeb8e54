"""The fast shard loader keeps the augmentation: DecodeRandomResizedCrop against torchvision.

Crop boxes are read back from the pixels of images whose red and green channels are their
own x and y coordinates; the photographs are scikit-learn's two sample photos (JPEG q95).
"""

import io

import hydra
import lightning as L
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from PIL import Image
from scipy.stats import ks_2samp
from sklearn.datasets import load_sample_images
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from flip.data import transforms
from flip.data.images import BadSample, decode_image
from flip.data.shards import ShardDataModule, ShardStream
from flip.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodeRandomResizedCrop,
    normalize,
    train_transform,
)
from flip.run import train
from tests.conftest import compose_fast, compose_train

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1), torch.tensor(IMAGENET_STD).view(-1, 1, 1)
SCALE, RATIO = (0.5, 1.0), (3 / 4, 4 / 3)


def encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    kwargs = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def coordinates(width: int = 256, height: int = 256) -> Image.Image:
    """Red = x, green = y of every pixel (both < 256), blue 0."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, 0 * x], -1).astype(np.uint8))


def recover_box(out: torch.Tensor) -> tuple[float, float, float, float, bool]:
    """(top, left, height, width, flipped) of the crop a (3, S, S) output of
    ``coordinates`` shows: bicubic resampling keeps a linear ramp linear, so the mean red
    of output column c is ``left + (c + 0.5) * width / S - 0.5`` (reversed when flipped),
    the green of row r likewise; columns near the crop's edges (filter clamped) are left
    out of the fit."""
    size = out.shape[-1]
    inner = np.arange(3, size - 3)
    centres = (inner + 0.5) / size
    red = out[0].float().mean(0).numpy()[inner]
    green = out[1].float().mean(1).numpy()[inner]
    slope_x, at_x = np.polyfit(centres, red, 1)
    slope_y, at_y = np.polyfit(centres, green, 1)
    flipped = slope_x < 0
    width, height = abs(slope_x), slope_y
    left = (at_x + slope_x if flipped else at_x) + 0.5
    return at_y + 0.5, left, height, width, bool(flipped)


def photos(fmt: str = "JPEG") -> list[bytes]:
    return [encode(Image.fromarray(a), fmt) for a in load_sample_images().images]  # 640x427


def as_levels(normalised: torch.Tensor) -> torch.Tensor:
    """A torchvision-normalised float image back in 0..255 grey levels."""
    return (normalised * STD + MEAN) * 255


def test_crops_and_flips_are_torchvisions_draws_applied_where_drawn():
    """Same seed, same crop and flip as torchvision's RandomResizedCrop + RandomHorizontalFlip
    (lossless PNG: no reduced decoding, so the box is exact)."""
    data = encode(coordinates(), "PNG")
    decode = DecodeRandomResizedCrop(32, SCALE, RATIO)
    flips = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out, mode = decode(data)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32) and mode == "RGB"
        torch.manual_seed(seed)
        top, left, height, width = T.RandomResizedCrop.get_params(coordinates(), SCALE, RATIO)
        flip = bool(torch.rand(1) < 0.5)
        got = recover_box(out)
        assert got[4] == flip
        # read back to within the uint8 rounding of the ramps (~1 px over a 26-column fit)
        assert np.allclose(got[:4], (top, left, height, width), atol=1.5), (got, seed)
        flips += flip
    assert 10 < flips < 30  # both kinds happen


def test_crop_area_aspect_and_flip_rate_match_torchvision_from_reduced_jpegs():
    """The crops actually taken (read back from the pixels, JPEG decoded at reduced size
    where the crop allows) have torchvision's area-fraction and aspect-ratio distributions
    (two-sample Kolmogorov-Smirnov against RandomResizedCrop.get_params, fixed seeds), stay
    in the configured ranges, and half are flipped."""
    image = coordinates()
    data = encode(image, "JPEG")
    decode = DecodeRandomResizedCrop(32, SCALE, RATIO)
    n = 600
    torch.manual_seed(0)
    boxes = [recover_box(decode(data)[0]) for _ in range(n)]
    assert sum(decode.draft_scale(h, w) > 1 for _, _, h, w, _ in boxes) > n / 2  # drafted
    area = np.array([h * w / 256**2 for _, _, h, w, _ in boxes])
    aspect = np.array([w / h for _, _, h, w, _ in boxes])
    torch.manual_seed(1)
    ref = [T.RandomResizedCrop.get_params(image, SCALE, RATIO) for _ in range(4 * n)]
    ref_area = np.array([h * w / 256**2 for _, _, h, w in ref])
    ref_aspect = np.array([w / h for _, _, h, w in ref])
    assert ks_2samp(area, ref_area).pvalue > 0.05
    assert ks_2samp(aspect, ref_aspect).pvalue > 0.05
    assert SCALE[0] - 0.02 < area.min() and area.max() < SCALE[1] + 0.02
    assert RATIO[0] - 0.02 < aspect.min() and aspect.max() < RATIO[1] + 0.02
    assert abs(np.mean([b[4] for b in boxes]) - 0.5) < 4 * (0.25 / n) ** 0.5  # 4 sigma
    tops = np.array([t for t, _, _, _, _ in boxes])
    assert tops.min() > -1 and (tops + [h for _, _, h, _, _ in boxes]).max() < 257


def test_full_decode_matches_torchvisions_pil_pipeline_within_a_grey_level():
    """Without reduced decoding, the uint8 crop is torchvision's PIL pipeline's (same seed)
    to within the rounding of two bicubic implementations (torch's uint8 kernel vs PIL)."""
    decode = DecodeRandomResizedCrop(64, draft=False)
    reference = train_transform(64)
    for data in photos():
        image = Image.open(io.BytesIO(data)).convert("RGB")
        for seed in range(8):
            torch.manual_seed(seed)
            ref = as_levels(reference(image))
            torch.manual_seed(seed)
            out = decode(data)[0].float()
            diff = (out - ref).abs()
            assert diff.max() <= 2.01 and diff.mean() < 0.02, (seed, diff.max(), diff.mean())


@pytest.mark.parametrize("size, scale", [(112, 2), (64, 4)])
def test_reduced_decoding_changes_pixels_by_about_a_grey_level(size, scale):
    """Decoding at 1/2 or 1/4 size (libjpeg's DCT scaling before the bicubic resize) against
    full decode + the same crop box (edges on the reduced grid): measured 0.4-1.5 grey
    levels mean absolute difference per image, RMS <= 2.6 (bounded here at 2 and 3.5);
    against torchvision's exact box (edges moved by under half an output pixel, which
    shifts sharp edges) 1.0-3.8 mean (bounded at 6). For scale: a half-pixel shift of the
    crop at full decode alone gives ~1-1.3, bilinear instead of bicubic ~1.1-1.8."""
    decode = DecodeRandomResizedCrop(size)
    reference = train_transform(size)
    scales = set()
    for data in photos():
        full = Image.open(io.BytesIO(data)).convert("RGB")
        pixels = TF.pil_to_tensor(full)
        for seed in range(10):
            torch.manual_seed(seed)
            top, left, height, width = T.RandomResizedCrop.get_params(full, SCALE, RATIO)
            flip = bool(torch.rand(1) < 0.5)
            s = decode.draft_scale(height, width)
            scales.add(s)
            t, b = round(top / s) * s, round((top + height) / s) * s
            l, r = round(left / s) * s, round((left + width) / s) * s
            same_box = TF.resized_crop(
                pixels, t, l, b - t, r - l, [size, size], InterpolationMode.BICUBIC, antialias=True
            ).float()
            if flip:
                same_box = same_box.flip(-1)
            torch.manual_seed(seed)
            exact = as_levels(reference(full))
            torch.manual_seed(seed)
            out = decode(data)[0].float()
            diff = (out - same_box).abs()
            assert diff.mean() < 2.0 and diff.pow(2).mean().sqrt() < 3.5, (seed, diff.mean())
            assert (out - exact).abs().mean() < 6.0
    assert scales == {scale}  # every crop of a 640x427 photo is decoded reduced


@pytest.mark.skipif(transforms.simplejpeg is None, reason="simplejpeg not installed")
def test_simplejpeg_and_pil_decoders_give_the_same_crops(monkeypatch):
    """Both decoders are libjpeg-turbo with the same settings: full and reduced sizes
    (1/1, 1/2, 1/4, 1/8), odd image sizes and greyscale give identical outputs."""
    image = Image.fromarray(load_sample_images().images[1]).crop((0, 0, 637, 421))
    jpegs = [encode(image, "JPEG"), encode(image.convert("L"), "JPEG")]
    sizes, outputs = (224, 112, 64, 24), {}
    for decoder in ("simplejpeg", "pil"):
        if decoder == "pil":
            monkeypatch.setattr(transforms, "simplejpeg", None)
        torch.manual_seed(0)
        outputs[decoder] = [
            DecodeRandomResizedCrop(size)(data)
            for size in sizes
            for data in jpegs
            for _ in range(3)
        ]
    assert [mode for _, mode in outputs["pil"]] == (["RGB"] * 3 + ["L"] * 3) * len(sizes)
    for (a, mode_a), (b, mode_b) in zip(outputs["simplejpeg"], outputs["pil"]):
        assert mode_a == mode_b and torch.equal(a, b)


def test_draft_scale_leaves_the_crop_at_least_the_output_size():
    decode = DecodeRandomResizedCrop(224)
    assert decode.draft_scale(447, 1000) == 1 and decode.draft_scale(448, 449) == 2
    assert decode.draft_scale(896, 900) == 4 and decode.draft_scale(1792, 5000) == 8
    assert DecodeRandomResizedCrop(224, draft=False).draft_scale(1792, 5000) == 1


def test_data_draft_setting_reaches_the_decoder(tmp_path):
    """``data.draft=false`` (conf/data/laion.yaml): full decode, torchvision's crop to within
    the bicubic rounding; the default drafts (different pixels) for crops that allow it."""
    pattern = write_solid_shards(tmp_path, COLOURS)
    data = photos()[0]
    torch.manual_seed(3)
    reference = as_levels(train_transform(64)(Image.open(io.BytesIO(data)).convert("RGB")))
    outputs = {}
    for draft in (None, "false"):
        cfg = compose_train(
            "data=laion",
            f'data.shards="{pattern}"',
            "data.image_size=64",
            *([f"data.draft={draft}"] if draft else []),
        )
        dm = hydra.utils.instantiate(cfg.data)
        torch.manual_seed(3)
        outputs[draft] = dm.stream().decode(data)[0].float()
    assert (outputs["false"] - reference).abs().max() <= 2.01
    assert (outputs[None] - reference).abs().mean() > 0.2  # decoded at 1/4 size


def test_greyscale_and_cmyk_jpegs_come_out_rgb_and_bad_bytes_are_bad_samples():
    decode = DecodeRandomResizedCrop(16)
    grey = encode(Image.new("L", (300, 200), 77), "JPEG")
    out, mode = decode(grey)
    assert mode == "L" and out.shape == (3, 16, 16) and set(out.unique().tolist()) <= {76, 77, 78}
    cmyk = encode(Image.new("CMYK", (300, 200), (0, 255, 255, 0)), "JPEG")
    out, mode = decode(cmyk)
    rgb = TF.pil_to_tensor(decode_image(cmyk)[0])[:, :1, :1]  # what every pipeline converts to
    assert mode == "CMYK" and (out.int() - rgb.int()).abs().max() <= 1
    with pytest.raises(BadSample, match="corrupt_image"):
        decode(b"not an image at all")
    with pytest.raises(BadSample, match="corrupt_image: image file is truncated"):
        decode(grey[: len(grey) // 2])  # simplejpeg refuses it, PIL names it
    with pytest.raises(BadSample, match="large_image"):
        decode(grey, max_pixels=300 * 200 - 1)


def test_normalize_is_totensor_then_normalize_bit_for_bit():
    pixels = torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8)
    reference = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = torch.stack([reference(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
    assert torch.equal(normalize(pixels), expected)


def write_solid_shards(root, colours, per_shard: int = 4) -> str:
    """One PNG of a solid colour per sample, caption 'colour i'."""
    root.mkdir(parents=True, exist_ok=True)
    n_shards = len(colours) // per_shard
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as writer:
            for i in range(s * per_shard, (s + 1) * per_shard):
                image = Image.new("RGB", (40 + i, 30), colours[i])
                writer.write(
                    {"__key__": f"{i:09d}", "png": encode(image, "PNG"), "txt": f"colour {i}"}
                )
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")


COLOURS = [(255, 0, 0), (0, 128, 255), (10, 200, 30), (250, 250, 0)] * 2


def test_host_batches_are_uint8_and_the_datamodule_normalises_after_transfer(tmp_path):
    pattern = write_solid_shards(tmp_path, COLOURS)
    dm = ShardDataModule(pattern, image_size=16, batch_size=4, num_workers=0, shuffle_buffer=0)
    images, tokens = batch = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16)
    moved = dm.on_after_batch_transfer(batch, 0)
    assert type(moved) is tuple and moved[1] is tokens
    assert moved[0].dtype == torch.float32 and torch.equal(moved[0], normalize(images))
    zeroshot = [torch.randn(2, 3, 16, 16), torch.tensor([0, 1])]  # float: passes unchanged
    assert dm.on_after_batch_transfer(zeroshot, 0) is zeroshot


class HostBatches(ShardDataModule):
    """Keeps each batch as the loader hands it over, before the copy to the device."""

    host: list

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        self.host.append(batch)
        return super().on_before_batch_transfer(batch, dataloader_idx)


class Recorder(L.LightningModule):
    """Keeps what training_step receives."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.received = []

    def training_step(self, batch, batch_idx):
        images, tokens = batch
        self.received.append((images.clone(), tokens.clone()))
        return (self.weight * images.mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_training_steps_receive_normalised_float_images(tmp_path):
    pattern = write_solid_shards(tmp_path, COLOURS)
    dm = HostBatches(pattern, image_size=16, batch_size=4, num_workers=0, shuffle_buffer=0)
    dm.host = []
    module = Recorder()
    L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, datamodule=dm)
    assert len(module.received) == 3
    for (images, tokens), (host_images, host_tokens) in zip(module.received, dm.host):
        assert host_images.dtype == torch.uint8 and images.dtype == torch.float32
        assert torch.equal(images, normalize(host_images)) and torch.equal(tokens, host_tokens)
        for image, row in zip(images, tokens):  # solid colours: every crop is that colour
            i = int(dm.tokenizer.decode(row).split()[-1])
            colour = torch.tensor(COLOURS[i], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16)
            assert (image - normalize(colour)).abs().max() < 1.01 / 255 / min(IMAGENET_STD)


@pytest.mark.slow
def test_pretraining_with_gradient_caching_runs_on_the_uint8_loader(tmp_path):
    pattern = write_solid_shards(
        tmp_path / "shards", [(i * 30 % 256, 90, 200 - i) for i in range(32)]
    )
    metrics = train(
        compose_fast(
            "data=laion",
            f'data.shards="{pattern}"',
            "data.image_size=32",
            "data.shuffle_buffer=0",
            "batch.micro=8",
            output_dir=tmp_path / "run",
        )
    )
    assert metrics["train/samples_seen"] == 64.0
    assert metrics["train/micro_batches"] == 2.0  # the gradient-caching path ran
    assert np.isfinite(metrics["train/loss"])
    stream = ShardStream(pattern, batch_size=16, image_size=32, passes=1, shuffle_buffer=0)
    assert next(iter(stream))[0].dtype == torch.uint8  # what the model was not given
