"""Our webdataset training loader (``data=laion``) against OpenCLIP's, on the same shards.

    python experiments/benchmark_loader.py --out experiments/results/loader-cpu  # ~12 min, 2 cores
    python experiments/benchmark_loader.py --shards 'laion=/data/laion/{00000..00009}.tar'
    python experiments/benchmark_loader.py --models tiny:32 vit_b16:8   # + which side limits

1. Shards: JPEG (quality 95, img2dataset's default) photographs with captions, written from
   the two photos shipped with scikit-learn (no download): 256x256 (img2dataset's usual
   resize) and 640x480 (larger photographs), unless ``--shards`` names existing shards.
2. The race, in interleaved rounds (every pipeline once per round, the order rotated):
   images/s of training batches (batch ``--batch``, images at 224 px) from
   * ``ours``: ``flip.data.shards`` (``ShardStream`` in-process, ``ShardDataModule``'s
     DataLoader with workers): uint8 batches, normalised later on the device;
   * ``ours, normalised on the host``: the same plus ``flip.data.transforms.normalize`` in
     the consuming process, what a CPU-only run pays there (on a GPU it runs on the device);
   * ``OpenCLIP like for like``: ``open_clip_train.data.get_wds_dataset`` with
     ``AugmentationCfg(scale=(0.5, 1.0))`` plus a horizontal flip and the ImageNet mean/std:
     our augmentation (RandomResizedCrop 224, scale 0.5-1, bicubic, flip, normalise);
   * ``OpenCLIP as shipped``: its default training transform (scale 0.9-1, no flip, the
     OpenAI mean/std).
   Each pipeline keeps its own tokeniser (ours: BERT WordPiece on the whole batch;
   OpenCLIP: its CLIP BPE tokenizer per sample) and its defaults: shuffle buffer 5000
   samples, 1000 before the first; OpenCLIP reads shards without resampling (its default).
   Two settings: one reader in this process with 1 torch thread (what one DataLoader
   worker does: images/s per core), and a DataLoader with ``--workers`` worker processes.
3. A profile per stage (ms per image, fastest of 3 passes over the same samples, 1 thread).

Prints markdown; ``--out P`` also writes ``P.md`` and ``P.json`` (figures, settings, load).

Two facts about OpenCLIP's loader as installed (open-clip-torch 3.3.0, webdataset 1.0.2),
handled here and stated in the output: webdataset 1.0.2's ``tar_file_expander`` yields an
end-of-shard marker ``{}`` that OpenCLIP's ``group_by_keys_nothrow`` reads as a file
(``KeyError: 'fname'``, the stream stops at the first shard's end), so its
``tarfile_to_samples_nothrow`` is replaced by the same stages with ``eof_value=None``; and
``open_clip_train.data`` imports pandas (for its CSV dataset, unused here), which this
project does not install: a placeholder module stands in when pandas is absent.
"""

import argparse
import io
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from flip.data import shards as sh
from flip.data import transforms
from flip.data.images import decode_image
from flip.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodeRandomResizedCrop,
    normalize,
    train_transform,
)
from flip.tokenizer import Tokenizer

try:
    import simplejpeg
except ImportError:
    simplejpeg = None

WORDS = (
    "a photo of the old red temple with a garden and blue sky over the hills at dusk "
    "close up of a pink flower petals in bright sunlight on a summer day"
).split()
IMAGE_SIZE = 224
PIPELINES = ("ours", "ours_host_norm", "openclip_lfl", "openclip_shipped")
LABELS = {
    "ours": "ours (uint8 batches)",
    "ours_host_norm": "ours, normalised on the host",
    "openclip_lfl": "OpenCLIP like for like (scale 0.5-1 + flip)",
    "openclip_shipped": "OpenCLIP as shipped (scale 0.9-1, no flip)",
}


# ---------------------------------------------------------------------------- shards
def write_photo_shards(
    out: Path, n: int, per_shard: int, width: int, height: int, seed: int = 0
) -> str:
    """n JPEG (quality 95) photographs of width x height, with captions, in shards.

    Square images are random square crops of scikit-learn's two sample photos (640x427)
    resized to the size, as img2dataset's resize does; larger ones are the photos enlarged
    1.13-1.5x (natural detail kept, barely smoothed) and cut at a random place.
    """
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    writer = None
    for i in range(n):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(out / f"{i // per_shard:05d}.tar"))
        photo = photos[i % 2]
        if width == height:
            side = rng.randint(96, photo.height)
            x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
            img = photo.crop((x, y, x + side, y + side)).resize(
                (width, height), Image.Resampling.BICUBIC
            )
        else:
            f = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.33)
            big = photo.resize(
                (math.ceil(photo.width * f), math.ceil(photo.height * f)), Image.Resampling.BICUBIC
            )
            x, y = rng.randint(0, big.width - width), rng.randint(0, big.height - height)
            img = big.crop((x, y, x + width, y + height))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=95)
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        writer.write(
            {
                "__key__": f"{i // per_shard:05d}{i % per_shard:04d}",
                "jpg": buffer.getvalue(),
                "txt": caption,
                "json": b"{}",
            }
        )
    writer.close()
    return str(out / f"{{00000..{(n - 1) // per_shard:05d}}}.tar")


# --------------------------------------------------------------------------- OpenCLIP
def openclip_data():
    """``open_clip_train.data`` as installed, made to run (see the module docstring)."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        sys.modules["pandas"] = types.ModuleType("pandas")  # only its CsvDataset uses it
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    ocd.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
    return ocd


def openclip_transform(like_for_like: bool):
    from open_clip import AugmentationCfg, image_transform
    from torchvision import transforms as T

    if not like_for_like:
        return image_transform(IMAGE_SIZE, is_train=True)
    transform = image_transform(
        IMAGE_SIZE,
        is_train=True,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        aug_cfg=AugmentationCfg(scale=(0.5, 1.0)),
    )
    transform.transforms.insert(1, T.RandomHorizontalFlip())  # after RandomResizedCrop
    return transform


def openclip_loader(pattern: str, batch: int, workers: int, like_for_like: bool):
    import open_clip

    args = Namespace(
        train_data=pattern,
        val_data=None,
        dataset_resampled=False,
        train_num_samples=10**9,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch,
        world_size=1,
        workers=workers,
    )
    info = openclip_data().get_wds_dataset(
        args, openclip_transform(like_for_like), True, tokenizer=open_clip.get_tokenizer("ViT-B-16")
    )
    return info.dataloader


# --------------------------------------------------------------------------- timing
def batches(name: str, pattern: str, batch: int, workers: int):
    """(an endless iterator of training batches (images, texts) of pipeline ``name``, the
    loader's own iterator, whose worker processes ``rate`` stops)."""
    if name.startswith("openclip"):  # its WebLoader is a DataPipeline around a DataLoader
        loader = openclip_loader(pattern, batch, workers, name == "openclip_lfl").pipeline[0]
    elif workers == 0:
        loader = sh.ShardStream(sh.expand_shards(pattern), batch, IMAGE_SIZE)
    else:
        loader = sh.ShardDataModule(
            pattern, image_size=IMAGE_SIZE, batch_size=batch, num_workers=workers
        ).train_dataloader()
    it = iter(loader)
    if name == "ours_host_norm":
        return ((normalize(images), tokens) for images, tokens in it), it
    return it, it


def rate(name: str, pattern: str, batch: int, workers: int, seconds: float, warmup: float) -> float:
    """Images/s over ``seconds`` after ``warmup`` seconds of batches (shuffle buffer
    filled, workers started, their prefetched batches drained)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker; the consumer does nothing
    it, base = batches(name, pattern, batch, workers)
    try:
        start = time.perf_counter()
        while time.perf_counter() - start < warmup:
            images, _ = next(it)
            assert images.shape == (batch, 3, IMAGE_SIZE, IMAGE_SIZE), images.shape
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            n += len(next(it)[0])
        return n / (time.perf_counter() - start)
    finally:  # persistent workers would outlive the iterator and share the next run's cores
        if hasattr(base, "_shutdown_workers"):
            base._shutdown_workers()
        torch.set_num_threads(threads)


def race(sets: dict, a) -> list[dict]:
    """Interleaved rounds: per shard set and setting, every pipeline once per round."""
    runs = {(s, w, p): [] for s in sets for w in (0, a.workers) for p in PIPELINES}
    for r in range(a.rounds):
        for s, pattern in sets.items():
            for w in (0, a.workers):
                order = PIPELINES[r % len(PIPELINES) :] + PIPELINES[: r % len(PIPELINES)]
                for p in order:
                    x = rate(p, pattern, a.batch, w, a.seconds, a.warmup)
                    runs[(s, w, p)].append(x)
                    print(
                        f"round {r + 1}/{a.rounds} {s} workers={w} {p}: {x:.1f} img/s "
                        f"(load {os.getloadavg()[0]:.2f})",
                        file=sys.stderr,
                        flush=True,
                    )
    rows = []
    for (s, w, p), xs in runs.items():
        ours, lfl, shipped = (runs[(s, w, q)] for q in ("ours", "openclip_lfl", "openclip_shipped"))
        row = {
            "shards": s,
            "workers": w,
            "pipeline": p,
            "images_per_s": xs,
            "median": statistics.median(xs),
            "min": min(xs),
            "max": max(xs),
        }
        if p.startswith("ours"):  # per-round ratios: same round, neighbouring in time
            for ref, ys in (("lfl", lfl), ("shipped", shipped)):
                per_round = [x / y for x, y in zip(xs, ys)]
                row[f"vs_{ref}"] = statistics.median(xs) / statistics.median(ys)
                row[f"vs_{ref}_rounds"] = per_round
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- profile
def ms_per_item(fn, items, repeats: int = 3, pil_only: bool = False) -> float:
    """Fastest of ``repeats`` passes, ms per item; ``pil_only``: without simplejpeg."""
    best = math.inf
    saved = transforms.simplejpeg
    transforms.simplejpeg = None if pil_only else saved
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for item in items:
                fn(item)
            best = min(best, (time.perf_counter() - start) / len(items))
    finally:
        transforms.simplejpeg = saved
    return best * 1e3


def pilrgb(data: bytes) -> Image.Image:
    """webdataset's "pilrgb" image decoder, which OpenCLIP's loader uses."""
    with io.BytesIO(data) as stream:
        img = Image.open(stream)
        img.load()
        return img.convert("RGB")


def shard_samples(url: str) -> list[dict]:
    """The samples of one shard, undecoded (tar members grouped by key)."""
    with wds.gopen(url) as stream:
        return list(
            sh.group_by_keys(sh.tar_file_expander([{"url": url, "stream": stream}], eof_value=None))
        )


def read_shard(url: str) -> int:
    return len(shard_samples(url))


def profile(pattern: str, n: int, batch: int) -> dict:
    """ms per image of each stage, over the first ``n`` samples, 1 thread."""
    import open_clip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    urls = sh.expand_shards(pattern)
    samples = []
    for sample in sh.ShardStream(
        urls, 1, passes=1, shuffle_buffer=0, transform=lambda img: img
    ).samples():
        samples.append(sample)
        if len(samples) == n:
            break
    raw = [s["jpg"] for url in urls for s in shard_samples(url)][:n]
    pils = [img for img, _, _, _ in samples]
    captions = [c for _, c, _, _ in samples]
    ours, full = (
        DecodeRandomResizedCrop(IMAGE_SIZE),
        DecodeRandomResizedCrop(IMAGE_SIZE, draft=False),
    )
    drafted = sum(ours.draft_scale(*_crop_hw(img)) > 1 for img in pils for _ in range(10))
    lfl = openclip_transform(True)
    u8 = [ours(d)[0] for d in raw[:batch]]
    floats = [lfl(img) for img in pils[:batch]]
    u8_batch = torch.stack(u8)
    oc_tok, our_tok = open_clip.get_tokenizer("ViT-B-16"), Tokenizer(32)
    out = {
        "read_tar_per_sample": ms_per_item(lambda url: read_shard(url), urls)
        * len(urls)
        / sum(read_shard(url) for url in urls),
        "decode_full_pil": ms_per_item(lambda d: decode_image(d), raw),
        "decode_full_simplejpeg": ms_per_item(lambda d: simplejpeg.decode_jpeg(d, "RGB"), raw)
        if simplejpeg is not None
        else None,
        "ours_decode_crop_flip_uint8": ms_per_item(ours, raw),
        "ours_with_pil_decoder": ms_per_item(ours, raw, pil_only=True),
        "ours_without_draft": ms_per_item(full, raw),
        "share_of_crops_drafted": drafted / (10 * len(pils)),
        "openclip_decode_pilrgb": ms_per_item(pilrgb, raw),
        "openclip_lfl_transform_on_decoded": ms_per_item(lfl, pils),
        "pil_reference_transform_on_decoded": ms_per_item(train_transform(IMAGE_SIZE), pils),
        "stack_uint8_batch": ms_per_item(lambda _: torch.stack(u8), [0]) / len(u8),
        "stack_float_batch": ms_per_item(lambda _: torch.stack(floats), [0]) / len(floats),
        "normalize_on_host": ms_per_item(lambda _: normalize(u8_batch), [0]) / len(u8),
        "tokenize_ours_batched": ms_per_item(lambda _: our_tok(captions[:batch]), [0]) / batch,
        "tokenize_openclip_per_sample": ms_per_item(lambda c: oc_tok(c)[0], captions[:batch]),
    }
    torch.set_num_threads(threads)
    return out


def _crop_hw(img) -> tuple[int, int]:
    from torchvision import transforms as T

    _, _, h, w = T.RandomResizedCrop.get_params(img, (0.5, 1.0), (3 / 4, 4 / 3))
    return h, w


# --------------------------------------------------------------------------- model side
def measure_model(arch: str, mask: float, batch: int, steps: int, threads: int) -> float:
    """Seconds per training step (forward, loss, backward, AdamW) at 224 px: the fastest
    of ``steps`` after one warm-up step."""
    import hydra
    from hydra import compose, initialize_config_module

    from flip.loss import global_contrastive_loss

    torch.set_num_threads(threads)
    with initialize_config_module(config_module="flip.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"model={arch}",
                f"mask={mask}",
                "data.image_size=224",
                "output_dir=/tmp/unused",
            ],
        )
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 224, 224)
    tokens = torch.randint(1000, 30000, (batch, 32))

    def step():
        image_features, text_features, scale = model(images, tokens)
        loss = global_contrastive_loss(image_features, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed step (the machine may be shared)


# --------------------------------------------------------------------------- report
def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def to_markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"Training batches of {m['batch']} images at {IMAGE_SIZE} px from the same JPEG "
        f"(q95) shards: our loader (`data=laion`) vs OpenCLIP's `get_wds_dataset` "
        f"(open-clip-torch {m['open_clip']}, webdataset {m['webdataset']}, its "
        f"`tarfile_to_samples_nothrow` run with `eof_value=None`); {m['rounds']} interleaved "
        f"rounds of {m['seconds']:g} s each after {m['warmup']:g} s warm-up; median "
        f"[min–max] images/s; ratios are of medians, per-round ratios in brackets. "
        f"torch {m['torch']}, Pillow {m['pillow']}, {m['cpus']} CPUs.",
        f"Load: `{m['uptime_start']}` at start, `{m['uptime_end']}` at end.",
        "",
        "| shards | setting | pipeline | images/s | ours / OpenCLIP like for like | "
        "ours / OpenCLIP as shipped |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["race"]:
        setting = (
            "1 reader in-process, 1 thread"
            if r["workers"] == 0
            else f"DataLoader, {r['workers']} workers"
        )
        cells = [
            r["shards"],
            setting,
            LABELS[r["pipeline"]],
            f"{r['median']:.0f} [{r['min']:.0f}–{r['max']:.0f}]",
        ]
        for ref in ("lfl", "shipped"):
            if f"vs_{ref}" in r:
                rounds = r[f"vs_{ref}_rounds"]
                cells.append(f"**{r[f'vs_{ref}']:.2f}×** [{min(rounds):.2f}–{max(rounds):.2f}]")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per stage, ms per image (1 thread, fastest of 3 passes over the same "
        f"{m['profile_samples']} samples; share of crops drafted: crops whose shorter "
        "side is >= 2 x 224 px, decoded at 1/2 or less):",
        "",
    ]
    names = list(next(iter(result["profile"].values())))
    lines += [
        "| stage | " + " | ".join(result["profile"]) + " |",
        "|---|" + "---|" * len(result["profile"]),
    ]
    for name in names:
        vals = [p[name] for p in result["profile"].values()]
        fmt = (
            (lambda v: f"{v:.0%}")
            if name.startswith("share")
            else (lambda v: "" if v is None else f"{v:.3f}")
        )
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in vals) + " |")
    if result.get("models"):
        lines += [
            "",
            "| model (224 px) | mask | batch | step (s) | model images/s | "
            "our 1-thread readers needed |",
            "|---|---|---|---|---|---|",
        ]
        for mm in result["models"]:
            lines.append(
                f"| {mm['arch']} | {mm['mask']:g} | {mm['batch']} | {mm['step']:.2f} "
                f"| {mm['images_per_s']:.3g} | {mm['readers_needed']:.2g} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shards",
        nargs="+",
        help="NAME=PATTERN of existing shards (default: write 256x256 and 640x480 JPEG shards)",
    )
    p.add_argument("--images", type=int, default=1500, help="images per written shard set")
    p.add_argument("--per-shard", type=int, default=250)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0, help="timed per measurement")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before timing")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--profile-samples", type=int, default=200)
    p.add_argument(
        "--models",
        nargs="*",
        default=[],
        help="arch:batch pairs: model step "
        "rates and how many 1-thread readers of the first shard set keep up",
    )
    p.add_argument("--masks", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--steps", type=int, default=3, help="timed steps per model row (min)")
    p.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads for the model"
    )
    p.add_argument("--out", help="write <out>.md and <out>.json")
    a = p.parse_args(argv)

    import open_clip

    tmp = None
    if a.shards:
        sets = dict(spec.split("=", 1) for spec in a.shards)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="flip-loader-bench-"))
        sets = {}
        for w, h in ((256, 256), (640, 480)):
            name = f"{w}x{h}"
            sets[name] = write_photo_shards(tmp / name, a.images, a.per_shard, w, h)
            size = sum(f.stat().st_size for f in (tmp / name).glob("*.tar"))
            print(
                f"wrote {a.images} {name} JPEGs (q95, {size / a.images / 1024:.1f} KiB each "
                "with tar overhead)",
                file=sys.stderr,
            )
    start = uptime()
    try:
        profiles = {s: profile(pattern, a.profile_samples, a.batch) for s, pattern in sets.items()}
        print(json.dumps(profiles, indent=1), file=sys.stderr, flush=True)
        rows = race(sets, a)
        models = []
        for spec in a.models:
            arch, batch = spec.split(":")
            per_reader = next(
                r["median"] for r in rows if r["workers"] == 0 and r["pipeline"] == "ours"
            )
            for mask in a.masks:
                step = measure_model(arch, mask, int(batch), a.steps, a.threads)
                models.append(
                    {
                        "arch": arch,
                        "mask": mask,
                        "batch": int(batch),
                        "step": step,
                        "images_per_s": int(batch) / step,
                        "readers_needed": int(batch) / step / per_reader,
                    }
                )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "meta": {
            "batch": a.batch,
            "rounds": a.rounds,
            "seconds": a.seconds,
            "warmup": a.warmup,
            "workers": a.workers,
            "profile_samples": a.profile_samples,
            "shards": sets if a.shards else {s: f"written: {a.images} images" for s in sets},
            "torch": torch.__version__,
            "pillow": Image.__version__,
            "numpy": np.__version__,
            "webdataset": wds.__version__,
            "open_clip": open_clip.__version__,
            "cpus": os.cpu_count(),
            "uptime_start": start,
            "uptime_end": uptime(),
        },
        "race": rows,
        "profile": profiles,
        "models": models,
    }
    text = to_markdown(result)
    print(text)
    if a.out:
        Path(a.out).with_suffix(".md").write_text(text)
        Path(a.out).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
