"""LAION-style webdataset shards (img2dataset layout) as an infinite training stream.

A shard is a tar file of samples ``KEY.jpg`` (or another of the image extensions,
``flip.data.images.IMAGE_EXTENSIONS``), ``KEY.txt`` (the caption) and optionally
``KEY.json`` (metadata, unused here), as written by img2dataset or by
``python -m flip.data.make_shards``. ``shards`` is a brace pattern
(``/data/laion400m/{00000..41407}.tar``), several patterns joined by ``::``, a directory
(all its ``*.tar``), or a list of these; anything ``webdataset.gopen`` opens works
(local paths, ``pipe:curl -s URL``, ``s3://`` via a pipe).

Per reader (DataLoader worker ``w`` of ``W`` on rank ``r`` of ``R``), the pipeline is
built from webdataset's stages::

    this reader's shards, reshuffled every pass, forever      (_shard_source)
    -> open (webdataset.gopen)                                 (_open_shards)
    -> tar members (webdataset tar_file_expander)
    -> end-of-shard truncation check                           (_check_shard_end)
    -> samples (webdataset group_by_keys)
    -> shuffle buffer (webdataset.shuffle)
    -> decode + checks + RandomResizedCrop/flip, uint8        (_decode)
    -> batches of exactly batch_size, captions tokenised      (ShardStream.__iter__)
    -> (main process, after the copy to the device) normalise (on_after_batch_transfer)

Images stay uint8 until they are on the device: the crop is drawn from the JPEG header,
the JPEG decoded at reduced size when the crop allows, crop and resize done in one uint8
resize (``flip.data.transforms.DecodeRandomResizedCrop``, the augmentation of
``train_transform``), and ``ShardDataModule.on_after_batch_transfer`` normalises with the
ImageNet mean/std (``flip.data.transforms.normalize``), so every consumer through
Lightning gets the same float batches as before, at a fraction of the loader's cost
(docs/performance.md, "Data loader"). A ``ShardStream`` read directly yields the uint8
batches.

Shard splitting: reader ``k = r * W + w`` of ``K = R * W`` owns shards ``k, k + K,
k + 2K, ...`` of the expanded list, so ranks and workers read disjoint shards (with fewer
shards than readers, reader ``k`` shares shard ``k mod n``; a warning says so). Each
reader cycles over its own shards forever, in a new random order every pass, so the
stream never ends and training length is counted in samples seen
(``schedule.total_samples // batch.global`` steps), like the official recipe's
"virtual epochs" over a resampled stream, but without replacement within a pass.
The order is a function of (``seed``, rank, worker, the batches trained before this
start, which the DataModule saves in checkpoints), so a resumed run continues with fresh
data rather than replaying the start of the stream.

Bad input is skipped and counted per reason (``flip.data.quality``): shards that cannot
be opened (``unreadable_shard``), tar streams that break off or are not tar at all
(``corrupt_shard``, including truncation exactly at a member boundary, which tarfile
itself would pass silently), samples without an image or caption, zero-byte, corrupt or
oversized images, empty captions (``flip.data.images``). Each reader adds its counts to
the DataModule's ``SharedStats`` just before it hands over each batch (and at the end of
a finite pass), outside the batches, which are plain ``(images, tokens)`` tuples. A
reader that sees ``max_consecutive_bad`` failures in a row without one good sample raises
``DataError`` naming its shards, and ``setup('fit')`` fails at once, naming
``data.shards``, when no path exists or nothing can be read.
"""

from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Iterator
from functools import partial

import lightning as L
import torch
import torch.distributed as dist
import webdataset as wds
from omegaconf import ListConfig
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from flip.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadSample,
    decode_caption,
    decode_image,
)
from flip.data.quality import LoaderStats, QualityMixin, SharedStats
from flip.data.transforms import DecodeRandomResizedCrop, normalize
from flip.errors import DataError, DataPathError
from flip.tokenizer import Tokenizer

log = logging.getLogger(__name__)
IMAGE_MEMBERS = tuple(ext[1:] for ext in IMAGE_EXTENSIONS)  # "jpg", ...: a sample's image
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gz bz2 xz zst
_WARNINGS = 5  # per reader: the first few skips are logged, the rest only counted


# ------------------------------------------------------------------------- shard lists
def expand_shards(shards) -> list[str]:
    """The shard URLs of a brace pattern / '::' list / directory / list of those."""
    if isinstance(shards, (list, tuple, ListConfig)):
        return [url for item in shards for url in expand_shards(str(item))]
    if not isinstance(shards, str) or not shards.strip():
        raise ValueError(f"data.shards must be a path, pattern or list, got {shards!r}")
    if os.path.isdir(shards):
        return sorted(glob.glob(os.path.join(shards, "*.tar")))
    return wds.shardlists.expand_urls(shards)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def assign_shards(urls: list[str], reader: int, readers: int) -> list[str]:
    """Reader ``reader`` of ``readers``: every ``readers``-th shard (disjoint when possible)."""
    if len(urls) >= readers:
        return urls[reader::readers]
    return [urls[reader % len(urls)]]


def distributed_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------ pipeline state
class _TailTracker:
    """A read-only stream that remembers its length, first and last bytes, and EOF."""

    def __init__(self, raw):
        self.raw, self.nbytes, self.head, self.tail, self.eof = raw, 0, b"", b"", False

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if not data and n != 0:
            self.eof = True
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.nbytes += len(data)
        self.tail = (self.tail + data)[-512:]
        return data

    def truncated(self) -> bool:
        """True if the stream ended without a tar end-of-archive (zero) block."""
        if not self.eof or self.head.startswith(_COMPRESSED_MAGIC):
            return False  # tarfile stopped at the end-of-archive block / can't tell
        return self.nbytes % 512 != 0 or self.tail != bytes(512)

    def close(self) -> None:
        self.raw.close()

    def __getattr__(self, name):
        return getattr(self.raw, name)


class _ReaderState:
    """One reader's counters, current shard and failure streaks."""

    def __init__(self, where: str, max_consecutive_bad: int):
        self.where, self.max_consecutive_bad = where, max_consecutive_bad
        self.stats = LoaderStats()
        self.url, self.tracker, self.serial, self.failed_serial = None, None, 0, -1
        self.shard_streak = 0  # shard reads since the last sample came out of a tar
        self.sample_streak = 0  # skipped samples since the last good one
        self.warned = 0

    def _warn(self, reason: str, example: str) -> None:
        self.warned += 1
        if self.warned <= _WARNINGS:
            log.warning("skipping %s: %s", reason, example)

    def begin_shard(self, url: str) -> None:
        self.url, self.tracker = url, None
        self.serial += 1
        self.stats.shards += 1
        self.shard_streak += 1
        self._guard(self.shard_streak, "shard reads gave no sample")

    def fail_shard(self, reason: str, error) -> None:
        """Count a shard failure once per shard read (tar errors can be reported twice)."""
        if self.failed_serial == self.serial:
            return
        self.failed_serial = self.serial
        example = f"{self.url}: {error}"
        self.stats.skip(reason, example)
        self._warn(reason, example)

    def handler(self, reason: str):
        def handle(exn: Exception) -> bool:
            detail = str(exn.args[0]).split(" @ ")[0] if exn.args else ""  # drop "@ <stream>"
            self.fail_shard(reason, f"{type(exn).__name__}: {detail}")
            return True  # skip and continue

        return handle

    def skip_sample(self, reason: str, example: str) -> None:
        self.stats.skip(reason, example)
        self._warn(reason, example)
        self.sample_streak += 1
        self._guard(self.sample_streak, "samples in a row were unusable")

    def _guard(self, streak: int, what: str) -> None:
        if streak > self.max_consecutive_bad:
            raise DataError(
                f"{self.where}: {streak - 1} {what}; no readable sample "
                f"(data.max_consecutive_bad={self.max_consecutive_bad}). Check data.shards. "
                f"Counts so far:\n{self.stats.summary()}"
            )


# ------------------------------------------------------------------------ pipeline stages
def _shard_source(urls: list[str], rng: random.Random | None, passes: int | None):
    """dict(url=...) for each shard, reshuffled every pass; forever if passes is None."""
    n = 0
    while passes is None or n < passes:
        order = list(urls)
        if rng is not None:
            rng.shuffle(order)
        for url in order:
            yield {"url": url}
        n += 1


def _open_shards(sources, state: _ReaderState):
    for source in sources:
        url = source["url"]
        state.begin_shard(url)
        try:
            stream = gopen(url)
        except Exception as err:  # missing file, permission, directory, failed pipe, ...
            state.fail_shard("unreadable_shard", f"{type(err).__name__}: {err}")
            continue
        state.tracker = _TailTracker(stream)
        yield {"url": url, "stream": state.tracker}
        state.tracker.close()


def _check_shard_end(files, state: _ReaderState):
    """Pass tar members through; at each end-of-shard marker, catch silent truncation."""
    for item in files:
        if item == {} and state.tracker is not None and state.tracker.truncated():
            state.fail_shard(
                "corrupt_shard",
                f"tar ends after {state.tracker.nbytes} bytes "
                "without an end-of-archive block (truncated)",
            )
        yield item


def _samples_seen(samples, state: _ReaderState):
    for sample in samples:
        state.shard_streak = 0
        yield sample


class _DecodeThen:
    """A decoder ``(bytes, max_pixels) -> (transform(image), mode)`` for a transform of
    decoded PIL images (``ShardStream(transform=...)``: inspection, tools, tests)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, data: bytes, max_pixels: int | None):
        image, mode = decode_image(data, max_pixels)
        return self.transform(image), mode


def _decode(samples, state: _ReaderState, decode, max_pixels: int | None):
    """(image, caption, key, url) for every usable sample; the rest are counted."""
    for sample in samples:
        key, url = sample.get("__key__"), sample.get("__url__")
        ext = next((e for e in IMAGE_MEMBERS if e in sample), None)
        if ext is None:
            state.skip_sample("missing_image", f"{url} {key}: no {'/'.join(IMAGE_MEMBERS)} file")
            continue
        if "txt" not in sample:
            state.skip_sample("missing_caption", f"{url} {key}: no .txt file")
            continue
        try:
            caption = decode_caption(sample["txt"])
            image, mode = decode(sample[ext], max_pixels)
        except BadSample as bad:
            state.skip_sample(bad.reason, f"{url} {key}: {bad.detail}")
            continue
        state.sample_streak = 0
        state.stats.samples += 1
        if mode != "RGB":
            state.stats.converted[mode] += 1
        yield image, caption, key, url


# ------------------------------------------------------------------------------ dataset
class ShardStream(IterableDataset):
    """Batches ``(images (B, 3, S, S) uint8, tokens (B, L) long)`` from shards.

    Use with ``DataLoader(stream, batch_size=None, collate_fn=keep_batch)``: batching,
    shard splitting per rank and worker, shuffling and skip counting happen here.
    ``passes=None``: forever (training); an int: that many passes over each reader's
    shards (inspection, tests), then the last partial batch is dropped. ``stats``: where
    each reader adds its counts, before every batch and at the end of its passes
    (``ShardDataModule`` passes its ``SharedStats``); without it they stay in
    ``self.state.stats`` of the reading process. Images: ``DecodeRandomResizedCrop``
    (uint8, to be normalised with ``flip.data.transforms.normalize``), or ``transform``
    of each decoded PIL image when one is given.
    """

    def __init__(
        self,
        urls,
        batch_size: int,
        image_size: int = 224,
        tokenizer=None,
        shuffle_buffer: int = 5000,
        shuffle_initial: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        passes: int | None = None,
        crop_scale=(0.5, 1.0),
        hflip: bool = True,
        draft: bool = True,
        transform=None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_consecutive_bad: int = 1000,
        stats: SharedStats | None = None,
    ):
        super().__init__()
        self.urls = expand_shards(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise DataError(f"no shards in {urls!r}")
        self.batch_size, self.passes, self.seed, self.start = batch_size, passes, seed, start
        self.rank, self.world_size = rank, world_size
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer(32)
        self.decode = (
            DecodeRandomResizedCrop(image_size, tuple(crop_scale), hflip=hflip, draft=draft)
            if transform is None
            else _DecodeThen(transform)
        )
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.max_pixels, self.max_consecutive_bad = max_pixels, max_consecutive_bad
        self.stats = stats
        self.state: _ReaderState | None = None  # of the last iteration in this process

    def reader(self) -> tuple[int, int, int, int]:
        """(worker, workers, reader, readers) of the calling process."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return worker, workers, self.rank * workers + worker, self.world_size * workers

    def samples(self) -> Iterator[tuple[torch.Tensor, str, str, str]]:
        """The decoded, augmented sample stream ``(image, caption, key, url)`` of this reader."""
        worker, workers, reader, readers = self.reader()
        urls = assign_shards(self.urls, reader, readers)
        name = f"rank {self.rank} worker {worker}"
        self.state = state = _ReaderState(
            f"{name} (shards {', '.join(urls[:3])}{', ...' if len(urls) > 3 else ''})",
            self.max_consecutive_bad,
        )
        rng = random.Random(f"flip-shards/{self.seed}/{self.start}/{self.rank}/{worker}")
        stages = [
            partial(_shard_source, urls, rng if self.passes is None else None, self.passes),
            partial(_open_shards, state=state),
            partial(tar_file_expander, handler=state.handler("corrupt_shard")),
            partial(_check_shard_end, state=state),
            partial(group_by_keys, handler=state.handler("corrupt_shard")),
            partial(_samples_seen, state=state),
        ]
        if self.shuffle_buffer > 1:
            stages.append(
                wds.shuffle(
                    self.shuffle_buffer, self.shuffle_initial, rng=random.Random(rng.random())
                )
            )
        stages.append(partial(_decode, state=state, decode=self.decode, max_pixels=self.max_pixels))
        return iter(wds.DataPipeline(*stages))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, captions = [], []
        for image, caption, _, _ in self.samples():
            images.append(image)
            captions.append(caption)
            if len(images) == self.batch_size:
                self._report()
                yield torch.stack(images), self.tokenizer(captions)
                images, captions = [], []
        self._report()  # a finished pass: what was read after its last full batch

    def _report(self) -> None:
        if self.stats is not None:
            self.stats.add(self.state.stats.take())


def keep_batch(batch):
    """DataLoader collate_fn for pre-batched items: pass through (default_convert would
    turn the ``(images, tokens)`` tuple into a list)."""
    return batch


def first_sample(urls: list[str], max_pixels: int | None, max_bad: int = 1000):
    """(image, caption, stats) of the first readable sample, in shard order; DataError if none."""
    stream = ShardStream(
        urls,
        1,
        transform=lambda img: img,
        passes=1,
        shuffle_buffer=0,
        max_pixels=max_pixels,
        max_consecutive_bad=max_bad,
    )
    try:
        for image, caption, _, _ in stream.samples():
            return image, caption, stream.state.stats
    except DataError:
        pass
    raise DataError(
        f"no readable sample in {stream.state.stats.shards} shard(s) read:\n"
        f"{stream.state.stats.summary()}"
    )


# --------------------------------------------------------------------------- datamodule
class ShardDataModule(QualityMixin, L.LightningDataModule):
    """Training on webdataset shards; optional zero-shot set (e.g. ``ImageFolderZeroShot``).

    ``batch_size``: per device; every batch has exactly this many samples. Training
    images leave the loader as uint8 and are normalised after the copy to the device
    (``on_after_batch_transfer``). ``draft``: decode JPEGs at reduced size when the crop
    allows (``DecodeRandomResizedCrop``).
    """

    def __init__(
        self,
        shards,
        zeroshot: Dataset | None = None,
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 4,
        pin_memory: bool = False,
        context_length: int = 32,
        shuffle_buffer: int = 5000,
        shuffle_initial: int = 1000,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
        draft: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        max_skip_rate: float = 0.05,
        skip_rate_min_samples: int = 10_000,
        max_consecutive_bad: int = 1000,
        seed: int = 0,
    ):
        super().__init__()
        self.init_quality(max_skip_rate, skip_rate_min_samples)
        self.shards = shards
        self.urls = expand_shards(shards)  # checked in setup('fit')
        self.zeroshot_set = zeroshot
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.pin_memory = pin_memory
        self.shuffle_buffer, self.shuffle_initial = shuffle_buffer, shuffle_initial
        self.crop_scale, self.hflip, self.draft = tuple(crop_scale), hflip, draft
        self.max_pixels, self.max_consecutive_bad, self.seed = max_pixels, max_consecutive_bad, seed
        self.tokenizer = Tokenizer(context_length)
        self.classnames = list(zeroshot.classnames) if zeroshot is not None else []
        self.templates = list(zeroshot.templates) if zeroshot is not None else []

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return distributed_rank()

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if not self.urls:
            raise DataPathError(f"data.shards={self.shards!r} matches no shard files")
        local = [u for u in self.urls if is_local(u)]
        missing = [u for u in local if not os.path.isfile(u)]
        if local and len(missing) == len(self.urls):
            what = (
                "does not exist"
                if len(missing) == 1
                else f"matches {len(missing):,} paths and none exists (first: {missing[0]})"
            )
            raise DataPathError(f"data.shards={self.shards!r} {what}")
        if missing:
            log.warning(
                "data.shards: %d of %d shard paths do not exist (e.g. %s); reads of "
                "them are skipped and counted as unreadable_shard",
                len(missing),
                len(self.urls),
                missing[0],
            )
        absent = set(missing)
        readable = [u for u in self.urls if u not in absent]
        try:
            first_sample(readable, self.max_pixels, self.max_consecutive_bad)
        except DataError as err:
            raise DataPathError(f"data.shards={self.shards!r}: {err}") from None
        _, world = self._rank()
        readers = world * max(1, self.num_workers)
        if len(self.urls) < readers:
            log.warning(
                "%d shards for %d readers (%d ranks x %d workers): readers share "
                "shards; write at least %d shards so each reads its own",
                len(self.urls),
                readers,
                world,
                max(1, self.num_workers),
                readers,
            )

    def stream(self) -> ShardStream:
        rank, world = self._rank()
        return ShardStream(
            self.urls,
            self.batch_size,
            self.image_size,
            self.tokenizer,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_initial=self.shuffle_initial,
            seed=self.seed,
            rank=rank,
            world_size=world,
            start=self.batches_seen,  # restored from a checkpoint: fresh data on resume
            crop_scale=self.crop_scale,
            hflip=self.hflip,
            draft=self.draft,
            max_pixels=self.max_pixels,
            max_consecutive_bad=self.max_consecutive_bad,
            stats=self.shared_stats(),
        )

    def train_dataloader(self) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.stream(),
            batch_size=None,
            collate_fn=keep_batch,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.zeroshot_set is None:
            return []
        return DataLoader(
            self.zeroshot_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Normalise uint8 training images where they now are (the device): a quarter of
        the bytes crossed from the workers and to the device. Zero-shot batches arrive as
        float and pass unchanged."""
        images, *rest = batch
        if images.dtype != torch.uint8:
            return batch
        return (normalize(images), *rest)
