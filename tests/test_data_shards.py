"""webdataset shards: the real pipeline over real-format shards with every kind of bad input."""

import csv
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.pin_memory import pin_memory

from flip.callbacks.data_quality import DataQualityCallback
from flip.checkpoint import load_checkpoint
from flip.data.quality import LoaderStats, SharedStats
from flip.data.shards import (
    ShardDataModule,
    ShardStream,
    assign_shards,
    expand_shards,
    keep_batch,
)
from flip.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, to_normalized_tensor
from flip.errors import ConfigError, DataError
from flip.run import train
from flip.tokenizer import Tokenizer
from tests.conftest import compose_fast
from tests.ddp_shards_run import OnePass
from tests.ddp_shards_run import main as run_ddp
from tests.shard_fixtures import (
    EXPECTED_CONVERTED,
    EXPECTED_GOOD,
    EXPECTED_SHARD_FAILURES,
    EXPECTED_SKIPPED,
    MAX_PIXELS,
    READER_SKIPS_PER_SHARD,
    RED,
    caption,
    write_fixture_shards,
    write_reader_shards,
)

MEAN, STD = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]


def normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255 - MEAN) / STD


@pytest.fixture(scope="module")
def fixture_shards(tmp_path_factory) -> str:
    return write_fixture_shards(tmp_path_factory.mktemp("shards"))


def one_pass(pattern, **kwargs) -> ShardStream:
    return ShardStream(pattern, 1, passes=1, shuffle_buffer=0, max_pixels=MAX_PIXELS, **kwargs)


def shard_of(tokens: torch.Tensor, tokenizer=Tokenizer(32)) -> list[tuple[int, int]]:
    """(shard, sample) of each caption 'shard S sample I a photo' in a token batch."""
    out = []
    for row in tokens:
        match = re.fullmatch(r"shard (\d+) sample (\d+) a photo", tokenizer.decode(row))
        out.append((int(match[1]), int(match[2])))
    return out


def test_one_pass_reads_every_good_sample_and_counts_every_bad_one(fixture_shards):
    stream = one_pass(fixture_shards, transform=lambda img: img)
    items = list(stream.samples())
    keys = [key for _, _, key, _ in items]
    assert keys == (
        [f"00000{i:04d}" for i in range(10)]
        + [f"00001{i:04d}" for i in (0, 1, 2, 3, 11)]
        + [f"00002{i:04d}" for i in range(4)]  # cut inside sample 4's jpg
        + [f"00003{i:04d}" for i in range(3)]
    )  # cut before sample 3's header
    stats = stream.state.stats
    assert len(items) == stats.samples == EXPECTED_GOOD == 22
    assert stats.skipped == EXPECTED_SKIPPED + EXPECTED_SHARD_FAILURES
    assert stats.sample_skips == 7 and stats.shard_failures == 4 and stats.shards == 6
    assert stats.converted == EXPECTED_CONVERTED
    assert all(img.mode == "RGB" for img, _, _, _ in items)
    examples = stats.examples
    missing = fixture_shards.replace("{00000..00005}", "00004")
    assert examples["unreadable_shard"].startswith(f"{missing}: FileNotFoundError")
    assert "00005.tar" in examples["corrupt_shard"]  # the last corrupt shard read
    assert examples["large_image"].endswith("000010009: 300x300 > max_pixels=50000")
    assert examples["missing_image"].endswith(
        "000010010: no jpg/jpeg/png/webp/bmp/gif/ppm/tif/tiff file"
    )
    assert "data: 22 good samples, 7 skipped (24.14% of 29 read)" in stats.summary()
    assert "shards read: 6, failed: 4 (66.67%)" in stats.summary()


def test_truncation_at_a_member_boundary_is_not_silent(tmp_path):
    pattern = write_fixture_shards(tmp_path)
    stream = one_pass(pattern.replace("{00000..00005}", "00003"))
    assert len(list(stream.samples())) == 3
    assert stream.state.stats.skipped == Counter(corrupt_shard=1)
    assert "without an end-of-archive block" in stream.state.stats.examples["corrupt_shard"]
    intact = one_pass(pattern.replace("{00000..00005}", "00000"))
    assert len(list(intact.samples())) == 10 and not intact.state.stats.skipped


def test_batches_are_full_typed_and_normalised(fixture_shards):
    stats = SharedStats(1)
    stream = ShardStream(
        fixture_shards,
        batch_size=5,
        image_size=32,
        passes=1,
        shuffle_buffer=0,
        max_pixels=MAX_PIXELS,
        stats=stats,
    )
    batches, read_before = [], []
    for batch in stream:
        read_before.append(stats.read().samples)  # what the reader had reported by then
        batches.append(batch)
    assert len(batches) == 4  # 22 good samples: 4 full batches, the last 2 dropped
    for batch in batches:
        assert type(batch) is tuple and len(batch) == 2  # a plain (images, tokens) pair
        images, tokens = batch
        assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8  # see below
        assert tokens.shape == (5, 32) and tokens.dtype == torch.int64
    images, tokens = batches[0]
    # sample 000000000 is solid red: any crop/flip of it is red, normalised with ImageNet
    # stats once on the device (ShardDataModule.on_after_batch_transfer calls normalize)
    assert torch.allclose(normalize(images[0]), normalised(RED).expand(3, 32, 32), atol=0.05)
    assert torch.equal(tokens[0], Tokenizer(32)(caption(0, 0))[0])
    # each batch's counts are reported before the batch is handed over; the end of the
    # pass reports the rest, the 2 good samples of the dropped partial batch included
    assert read_before == [5, 10, 15, 20]
    total = stats.read()
    assert total.samples == EXPECTED_GOOD and total.shards == 6
    assert total.skipped == EXPECTED_SKIPPED + EXPECTED_SHARD_FAILURES
    assert total.converted == EXPECTED_CONVERTED
    assert total.examples["large_image"].endswith("000010009: 300x300 > max_pixels=50000")
    assert stream.state.stats.samples == 0  # all of it handed to the shared table


def test_transparency_is_composited_over_white(fixture_shards):
    stream = one_pass(fixture_shards, transform=to_normalized_tensor())
    image = {key: img for img, _, key, _ in stream.samples()}["000010002"]  # RGBA png
    assert image.shape == (3, 32, 32)
    assert torch.allclose(image[:, :, :16], normalised((255, 255, 255)).expand(3, 32, 16))
    assert torch.allclose(image[:, :, 16:], normalised((0, 0, 255)).expand(3, 32, 16))


def test_readers_on_ranks_and_workers_read_disjoint_shards(tmp_path):
    urls = [f"{i}.tar" for i in range(6)]
    assert [assign_shards(urls, k, 4) for k in range(4)] == [
        ["0.tar", "4.tar"],
        ["1.tar", "5.tar"],
        ["2.tar"],
        ["3.tar"],
    ]
    assert [assign_shards(urls[:2], k, 4) for k in range(4)] == [["0.tar"], ["1.tar"]] * 2

    pattern = write_reader_shards(tmp_path, n_shards=4, good_per_shard=8)
    seen, total = {}, LoaderStats()
    for rank in (0, 1):  # 2 ranks x 2 DataLoader worker processes, one pass each
        stats = SharedStats(2)  # a row per worker of this rank
        stream = ShardStream(
            pattern,
            batch_size=4,
            image_size=16,
            rank=rank,
            world_size=2,
            passes=1,
            shuffle_buffer=0,
            stats=stats,
        )
        loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=keep_batch)
        seen[rank] = []
        for batch in loader:
            assert type(batch) is tuple and batch[0].shape == (4, 3, 16, 16)
            seen[rank] += shard_of(batch[1])
        per_worker = [LoaderStats.from_tensor(row) for row in stats.counts]
        assert [w.samples for w in per_worker] == [8, 8] and [w.shards for w in per_worker] == [
            1,
            1,
        ]
        total += stats.read()
    # reader k = rank * 2 + worker owns shard k; every sample exactly once
    assert sorted(seen[0]) == [(s, i) for s in (0, 1) for i in range(8)]
    assert sorted(seen[1]) == [(s, i) for s in (2, 3) for i in range(8)]
    assert total.samples == 32 and total.shards == 4
    assert total.skipped == Counter({r: 4 * n for r, n in READER_SKIPS_PER_SHARD.items()})


def test_stream_is_infinite_reshuffled_and_seeded(tmp_path):
    pattern = write_reader_shards(tmp_path, n_shards=3, good_per_shard=4)

    def read(batches, **kwargs):
        stats = SharedStats(1)
        stream = ShardStream(
            pattern, batch_size=4, image_size=16, shuffle_buffer=0, stats=stats, **kwargs
        )
        out = []
        for i, batch in enumerate(stream):
            out.append(shard_of(batch[1]))
            if i + 1 == batches:
                return out, stats.read()

    passes, stats = read(3 * 8)  # one batch = one shard; 8 passes over 3 shards
    assert stats.samples == 96 and stats.shards == 24
    orders = [tuple(b[0][0] for b in passes[3 * p : 3 * p + 3]) for p in range(8)]
    assert all(sorted(o) == [0, 1, 2] for o in orders)  # every pass reads every shard once
    assert len(set(orders)) > 1  # in a new order
    assert read(6)[0] == read(6)[0]  # a function of the seed ...
    assert read(24, start=100)[0] != passes  # ... and of the step training starts at


def test_reader_with_only_bad_shards_stops_naming_them(fixture_shards):
    bad = fixture_shards.replace("{00000..00005}", "{00004..00005}")
    stream = ShardStream(bad, batch_size=2, max_consecutive_bad=20)
    with pytest.raises(
        DataError,
        match=r"rank 0 worker 0 \(shards .*00004.tar, .*00005.tar\): "
        r"20 shard reads gave no sample; no readable sample",
    ):
        next(iter(stream))


def test_datamodule_errors_name_the_path(fixture_shards, tmp_path):
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "data.shards='/nonexistent/{00000..00003}.tar' matches 4 paths and none exists "
            "(first: /nonexistent/00000.tar)"
        ),
    ):  # a ConfigError: one line from train.py
        ShardDataModule("/nonexistent/{00000..00003}.tar", batch_size=2).setup("fit")
    with pytest.raises(DataError, match="data.shards='/data/laion' does not exist"):
        ShardDataModule("/data/laion", batch_size=2).setup("fit")
    bad = fixture_shards.replace("{00000..00005}", "{00004..00005}")
    with pytest.raises(DataError, match=r"data.shards=.*: no readable sample in 1 shard\(s\) read"):
        ShardDataModule(bad, batch_size=2).setup("fit")
    with pytest.raises(DataError, match="matches no shard files"):
        ShardDataModule(str(tmp_path), batch_size=2).setup("fit")  # a folder without .tar
    assert expand_shards(str(Path(fixture_shards).parent)) == [
        str(Path(fixture_shards).parent / f"0000{i}.tar") for i in (0, 1, 2, 3, 5)
    ]


def test_datamodule_workers_report_counts_outside_plain_batches(tmp_path):
    pattern = write_reader_shards(tmp_path, n_shards=2, good_per_shard=8)
    dm = OnePass(pattern, batch_size=4, image_size=16, num_workers=2, shuffle_buffer=0)
    dm.setup("fit")
    assert dm.loader_stats == LoaderStats()  # setup's probe of the first sample is not counted
    batches = list(dm.train_dataloader())  # one pass: each worker reads its one shard
    assert len(batches) == 4
    for batch in batches:
        assert type(batch) is tuple and [type(t) for t in batch] == [torch.Tensor] * 2
        assert dm.on_before_batch_transfer(batch, 0) is batch  # nothing to take off
    stats = dm.loader_stats
    assert stats.samples == 16 and stats.shards == 2
    assert stats.skipped == Counter({r: 2 * n for r, n in READER_SKIPS_PER_SHARD.items()})
    # the example of the last worker with one: worker 1, which reads shard 1
    assert stats.examples["corrupt_image"].endswith(
        "00001.tar 000019001: not a recognised image format"
    )


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")  # CPU-only torch: no pinning
def test_pin_memory_is_a_datamodule_setting_and_batches_survive_pinning(tmp_path, monkeypatch):
    pattern = write_reader_shards(tmp_path, n_shards=2, good_per_shard=8)
    for pin in (False, True):
        dm = ShardDataModule(
            pattern, batch_size=4, image_size=16, num_workers=0, shuffle_buffer=0, pin_memory=pin
        )
        assert dm.train_dataloader().pin_memory is pin
    images, tokens = batch = next(iter(dm.train_dataloader()))
    # what the loader's pin-memory step does to a batch, with Tensor.pin_memory standing in
    # for the page-locked copy that needs a GPU: both tensors come through (a Batch with a
    # .stats attribute lost it here)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, device=None: t.clone())
    pinned = pin_memory(batch)
    assert len(pinned) == 2 and torch.equal(pinned[0], images) and torch.equal(pinned[1], tokens)
    assert dm.loader_stats.samples == 4  # counts still arrive, beside the batch


@pytest.mark.slow
def test_counts_reach_the_main_process_from_spawned_workers(tmp_path):
    pattern = write_reader_shards(tmp_path, n_shards=2, good_per_shard=8)
    stats = SharedStats(1)
    stream = ShardStream(
        pattern, batch_size=4, image_size=16, passes=1, shuffle_buffer=0, stats=stats
    )
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=1,
        collate_fn=keep_batch,
        multiprocessing_context="spawn",
    )
    assert len(list(loader)) == 4
    total = stats.read()
    assert total.samples == 16 and total.shards == 2
    assert total.skipped == Counter({r: 2 * n for r, n in READER_SKIPS_PER_SHARD.items()})


def test_shared_stats_round_trip_every_field():
    stats = LoaderStats(
        samples=7,
        shards=3,
        skipped=Counter(corrupt_shard=2, empty_caption=1),
        converted=Counter({"CMYK": 2, "P": 1, "RGBa": 4, "BGR;15": 3}),
    )
    stats.skip("large_image", "x.tar 0001: " + "é" * 400)  # cut at EXAMPLE_BYTES, UTF-8 safe
    table = SharedStats(2)
    table.add(stats)
    table.add(LoaderStats(samples=1, skipped=Counter(large_image=1)))
    total = table.read()
    assert total.samples == 8 and total.shards == 3
    assert total.skipped == Counter(corrupt_shard=2, empty_caption=1, large_image=2)
    assert total.converted == Counter(CMYK=2, P=1, RGBa=4, other=3)  # not in PIL's MODES
    assert total.examples["large_image"] == "x.tar 0001: " + "é" * 250  # 12 + 500 bytes
    with pytest.raises(ValueError, match=r"skip reasons \['typo'\] are not in"):
        table.add(LoaderStats(skipped=Counter(typo=1)))


def test_skip_rate_above_the_limit_stops_with_the_counts():
    class DM:
        max_skip_rate, skip_rate_min_samples = 0.05, 100

    stats = LoaderStats(samples=90, shards=3)
    for _ in range(10):
        stats.skip("corrupt_image", "a.tar 0001: not a recognised image format")
    with pytest.raises(
        DataError,
        match=re.escape(
            "too much bad input: 10.0% of the 100 samples read failed, above "
            "data.max_skip_rate=0.05"
        ),
    ) as err:
        DataQualityCallback().check(DM, stats)
    assert "skipped corrupt_image: 10  (e.g. a.tar 0001: not a recognised" in str(err.value)
    DataQualityCallback().check(DM, LoaderStats(samples=80, skipped=Counter(corrupt_image=10)))
    shards = LoaderStats(samples=1000, shards=10, skipped=Counter(unreadable_shard=1))
    with pytest.raises(DataError, match=r"10.0% of the 10 shard reads failed"):
        DataQualityCallback().check(DM, shards)


def read_metrics(root) -> list[dict]:
    (path,) = Path(root).glob("logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_on_shards_logs_exact_skip_counts_and_resumes_them(tmp_path, caplog):
    shards = tmp_path / "shards"
    write_reader_shards(shards, n_shards=2, good_per_shard=8)
    common = (
        "data=laion",
        f"data.shards={shards}",
        "data.image_size=32",
        "data.shuffle_buffer=0",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.checkpoint.save_top_k=-1",
    )

    def expected(batches: int) -> dict:
        """The counts after ``batches`` batches of 16 read in this process: each batch is
        one pass over the 2 shards (8 good samples and 3 bad ones each)."""
        skips = {
            f"data/skipped_{r}": 2.0 * batches * READER_SKIPS_PER_SHARD.get(r, 0)
            for r in (
                "unreadable_shard",
                "corrupt_shard",
                "missing_image",
                "empty_image",
                "corrupt_image",
                "large_image",
                "missing_caption",
                "empty_caption",
            )
        }
        return {**skips, "data/samples_read": 22.0 * batches, "data/shards_read": 2.0 * batches}

    def last_counts(root) -> dict:
        last = read_metrics(root)[-1]
        return {
            k: float(v)
            for k, v in last.items()
            if k.startswith("data/skipped_") or k in ("data/samples_read", "data/shards_read")
        }

    metrics = train(compose_fast(*common, output_dir=tmp_path / "full"))
    assert metrics["train/samples_seen"] == 64.0  # 4 steps of 16
    # counts are of the reader (no loader workers here): the 4 batches trained on and the
    # one Lightning fetched ahead to see whether the stream had ended
    assert last_counts(tmp_path / "full") == expected(5)
    assert "data: 80 good samples, 30 skipped (27.27% of 110 read)" in caplog.text

    caplog.clear()  # resume at step 2: the counts continue, the stream is reseeded
    ckpt = tmp_path / "full" / "checkpoints" / "step00000002.ckpt"
    assert load_checkpoint(ckpt)["ShardDataModule"] == {"batches_seen": 2}
    train(compose_fast(*common, f"ckpt_path={ckpt}", output_dir=tmp_path / "resumed"))
    # 3 batches read by step 2 (saved in the checkpoint), 3 more by the resumed run
    assert last_counts(tmp_path / "resumed") == expected(6)
    assert "data: 96 good samples, 36 skipped (27.27% of 132 read)" in caplog.text


@pytest.mark.slow
def test_training_stops_when_too_much_input_is_bad(fixture_shards, tmp_path):
    cfg = compose_fast(
        "data=laion",
        f'data.shards="{fixture_shards}"',
        "data.image_size=32",
        "data.shuffle_buffer=0",
        f"data.max_pixels={MAX_PIXELS}",
        "data.max_skip_rate=0.1",
        "data.skip_rate_min_samples=16",
        "trainer.log_every_n_steps=1",
        output_dir=tmp_path,
    )
    with pytest.raises(
        DataError,
        match=r"too much bad input: .*% of the \d+ (samples read|"
        r"shard reads) failed, above data.max_skip_rate=0.1",
    ):
        train(cfg)


@pytest.mark.slow
def test_ddp_ranks_and_workers_read_disjoint_shards_and_counts_add_up(tmp_path):
    """Lightning DDP on 2 gloo processes x 2 loader workers, through the DataModule and
    DataQualityCallback: each of the 4 readers owns one shard (tests/ddp_shards_run.py)."""
    write_reader_shards(tmp_path / "shards", n_shards=4, good_per_shard=8)
    run_ddp(str(tmp_path / "shards"), tmp_path, strategy="ddp_fork")  # forks: no re-import
    seen = {r: (tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)}
    samples = {r: sorted(tuple(map(int, s.split(":"))) for s in seen[r]) for r in (0, 1)}
    assert samples[0] == [(s, i) for s in (0, 1) for i in range(8)]
    assert samples[1] == [(s, i) for s in (2, 3) for i in range(8)]
    totals = (tmp_path / "totals.txt").read_text().split()
    assert totals == [
        "samples=32",
        "shards=4",
        "corrupt_image=4",
        "empty_caption=4",
        "missing_caption=4",
    ]
