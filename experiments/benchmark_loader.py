"""Loader vs model throughput: is the data pipeline or the model the bottleneck here?

    python experiments/benchmark_loader.py                      # ~3 minutes on 2 CPU cores
    python experiments/benchmark_loader.py --shards '/data/laion/{00000..00009}.tar'

1. Writes 224x224 JPEG shards (quality 95, img2dataset's default) of crops of the two
   photographs shipped with scikit-learn (no download), unless --shards is given.
2. Loader, one reader in this process with 1 torch thread (what one DataLoader worker
   does): images/s for reading the tar stream alone, + decoding, + the training
   augmentation (RandomResizedCrop 224 scale 0.5-1 bicubic, flip, normalise) and caption
   tokenisation in batches (the full ``data=laion`` pipeline); then the real
   ``ShardDataModule`` loader with --workers worker processes.
3. Model, alone: images/s of a full training step (forward, symmetric InfoNCE, backward,
   AdamW) of model=tiny and model=vit_b16 at 224 px, mask 0 / 0.5 / 0.75, small batches
   (the fastest of --steps steps).
4. A markdown table: model images/s, DataLoader workers needed to keep up
   (model rate / per-worker rate) and which side is the bottleneck with --workers workers.
   Loader and model are timed separately; in training they share the same cores.
"""
import argparse
import io
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flip.data import shards as sh
from flip.data.images import decode_image

WORDS = ("a photo of the old red temple with a garden and blue sky over the hills at dusk "
         "close up of a pink flower petals in bright sunlight on a summer day").split()


def write_photo_shards(out: Path, n: int, per_shard: int, size: int = 224, seed: int = 0):
    """n JPEG (quality 95) crops of scikit-learn's sample photos, size x size, in shards."""
    import webdataset as wds
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 2 x (427, 640)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    writer = None
    for i in range(n):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            writer = wds.TarWriter(str(out / f"{i // per_shard:05d}.tar"))
        photo = photos[i % 2]
        side = rng.randint(96, 427)
        x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        img = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=95)
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        writer.write({"__key__": f"{i // per_shard:05d}{i % per_shard:04d}",
                      "jpg": buffer.getvalue(), "txt": caption, "json": b"{}"})
    writer.close()
    return str(out / f"{{00000..{(n - 1) // per_shard:05d}}}.tar")


def timed(iterator, seconds: float, warmup: int = 1, count=lambda item: 1) -> float:
    """Items per second over ~``seconds`` after ``warmup`` items."""
    for _ in range(warmup):
        next(iterator)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += count(next(iterator))
    return n / (time.perf_counter() - start)


def raw_samples(urls):
    """The tar stream alone: open, members, grouped samples (no decode), forever."""
    state = sh._ReaderState("benchmark", 10**9)
    source = sh._shard_source(urls, random.Random(0), None)
    files = sh.tar_file_expander(sh._open_shards(source, state),
                                 handler=state.handler("corrupt_shard"))
    return sh.group_by_keys(sh._check_shard_end(files, state))


def decoded(urls):
    for sample in raw_samples(urls):
        yield decode_image(sample["jpg"])


def measure_loader(pattern: str, batch: int, seconds: float, workers: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    urls = sh.expand_shards(pattern)
    stream = sh.ShardStream(urls, batch, 224, shuffle_buffer=1000, shuffle_initial=100)
    out = {
        "read": timed(raw_samples(urls), seconds, warmup=10),
        "decode": timed(decoded(urls), seconds, warmup=10),
        "full": timed(iter(stream), seconds, count=lambda b: len(b[0])),
    }
    torch.set_num_threads(threads)
    if workers > 0:
        dm = sh.ShardDataModule(pattern, batch_size=batch, num_workers=workers,
                                shuffle_buffer=1000, shuffle_initial=100)
        loader = iter(dm.train_dataloader())
        out["loader"] = timed(loader, seconds, warmup=2 * workers, count=lambda b: len(b[0]))
        del loader  # stops the worker processes
    return out


def measure_model(arch: str, mask: float, batch: int, steps: int, threads: int) -> float:
    """Seconds per training step (forward, loss, backward, AdamW) at 224 px: the fastest
    of ``steps`` after one warm-up step."""
    import hydra
    from hydra import compose, initialize_config_module

    from flip.loss import global_contrastive_loss

    torch.set_num_threads(threads)
    with initialize_config_module(config_module="flip.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"model={arch}", f"mask={mask}",
                                          "data.image_size=224", "output_dir=/tmp/unused"])
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


def table(loader: dict, models: list[dict], workers: int) -> str:
    per_worker = loader["full"]
    lines = [
        "| stage (one reader, 1 thread) | images/s |",
        "|---|---|",
        f"| read tar stream (no decode) | {loader['read']:,.0f} |",
        f"| + JPEG decode | {loader['decode']:,.0f} |",
        f"| + RandomResizedCrop/flip/normalise + tokenise + batch (full pipeline, per worker) "
        f"| {per_worker:,.0f} |",
    ]
    if "loader" in loader:
        lines.append(f"| ShardDataModule loader, {workers} worker processes | "
                     f"{loader['loader']:,.0f} |")
    lines += ["", "| model (224 px) | mask | batch | step (s) | model images/s | "
              "workers needed (model / per-worker) | bottleneck with "
              f"{workers} worker{'s' if workers != 1 else ''} |", "|---|---|---|---|---|---|---|"]
    supply = loader.get("loader", per_worker * max(1, workers))
    for m in models:
        rate = m["batch"] / m["step"]
        need = rate / per_worker
        verdict = "loader" if supply < rate else "model"
        lines.append(f"| {m['arch']} | {m['mask']:g} | {m['batch']} | {m['step']:.2f} | "
                     f"{rate:.3g} | {need:.2g} ({math.ceil(need)}) | {verdict} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="existing shards (default: write 224-px JPEG shards)")
    p.add_argument("--images", type=int, default=768, help="images to write")
    p.add_argument("--per-shard", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="loader batch size")
    p.add_argument("--seconds", type=float, default=10.0, help="per loader measurement")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--models", nargs="+", default=["tiny:32", "vit_b16:8"],
                   help="arch:batch pairs")
    p.add_argument("--masks", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--steps", type=int, default=3, help="timed steps per model row (min)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads for the model")
    a = p.parse_args(argv)

    tmp = None
    pattern = a.shards
    if pattern is None:
        tmp = Path(tempfile.mkdtemp(prefix="flip-loader-bench-"))
        pattern = write_photo_shards(tmp, a.images, a.per_shard)
        sizes = [p.stat().st_size for p in tmp.glob("*.tar")]
        print(f"wrote {a.images} 224x224 JPEGs (q95, {sum(sizes) / a.images / 1024:.1f} KiB "
              f"each incl. tar overhead) in {len(sizes)} shards", file=sys.stderr)
    try:
        loader = measure_loader(pattern, a.batch, a.seconds, a.workers)
        print(f"loader: {loader}", file=sys.stderr, flush=True)
        models = []
        for spec in a.models:
            arch, batch = spec.split(":")
            for mask in a.masks:
                step = measure_model(arch, mask, int(batch), a.steps, a.threads)
                models.append({"arch": arch, "mask": mask, "batch": int(batch), "step": step})
                print(f"model: {models[-1]}", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"cores: {torch.get_num_threads()} torch threads, model timed with {a.threads}; "
          f"numpy {np.__version__}, torch {torch.__version__}\n")
    print(table(loader, models, a.workers))


if __name__ == "__main__":
    main()
