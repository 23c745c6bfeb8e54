"""The precision benchmark (experiments/benchmark_precision.py): bf16 variants really ran
the blocks' Linears in bf16 (fp32 ones in fp32), and every derived number of a run — and
of the committed results — is recomputed here from the raw per-process fields, the
markdown table equal to the json. No timings are asserted."""

import argparse
import json
import statistics
from pathlib import Path

import benchmark_precision as bp  # experiments/benchmark_precision.py
import pytest
import torch

RESULTS = sorted((Path(__file__).parents[1] / "experiments" / "results").glob("precision-*.json"))


def assert_derived_from_raw(result: dict) -> None:
    """Medians, ratios and dtypes of ``rows`` recomputed from ``runs``; dtypes per precision."""
    assert [r["mode"] for r in result["rows"]] == ["one_shot", "cached"]
    for row in result["rows"]:
        for p, dtype, trainer in (
            ("fp32", "torch.float32", "32-true"),
            ("bf16", "torch.bfloat16", "bf16-mixed"),
        ):
            runs = result["runs"][f"{row['mode']}/{p}"]
            assert len(runs) == result["meta"]["settings"]["rounds"]
            times = [t for r in runs for t in r["times"]]
            got = row[p]
            assert (
                len(times)
                == got["n"]
                == (result["meta"]["settings"]["repeats"] * result["meta"]["settings"]["rounds"])
            )
            assert got["median_s"] == statistics.median(times)
            assert (got["min_s"], got["max_s"]) == (min(times), max(times))
            assert got["cpu_median_s"] == statistics.median(
                [t for r in runs for t in r["cpu_times"]]
            )
            assert got["peak_rss_mib"] == statistics.median([r["peak_rss_mib"] for r in runs])
            assert got["growth_mib"] == statistics.median([r["growth_mib"] for r in runs])
            for r in runs:  # the Trainer's precision, and what the step's Linears produced
                assert r["trainer_precision"] == trainer
                assert r["linear_dtypes"] == [dtype] and r["loss_dtypes"] == ["torch.float32"]
            assert got["linear_dtypes"] == [dtype]
        f, b = row["fp32"], row["bf16"]
        assert row["time_ratio"] == b["median_s"] / f["median_s"]
        assert row["cpu_time_ratio"] == b["cpu_median_s"] / f["cpu_median_s"]
        assert row["rss_ratio"] == b["peak_rss_mib"] / f["peak_rss_mib"]
        assert row["growth_ratio"] == (
            b["growth_mib"] / f["growth_mib"] if f["growth_mib"] else None
        )


def assert_table_is_json(markdown: str, result: dict) -> None:
    """The markdown rows are the json's numbers at the printed precision."""
    table = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("one_shot", "cached"):
            table[cells[0]] = cells
    assert set(table) == {"one_shot", "cached"}
    for row in result["rows"]:
        c, f, b = table[row["mode"]], row["fp32"], row["bf16"]
        for cell, s in ((c[1], f), (c[2], b)):
            median, spread = cell.rstrip("]").split(" [")
            assert float(median) == pytest.approx(s["median_s"], abs=5e-4)
            assert [float(x) for x in spread.split("–")] == pytest.approx(
                [s["min_s"], s["max_s"]], abs=5e-4
            )
        for i, key in (
            (3, "time_ratio"),
            (4, "cpu_time_ratio"),
            (7, "rss_ratio"),
            (10, "growth_ratio"),
        ):
            if row[key] is None:  # no fp32 growth to divide by
                assert c[i] == "–"
            else:
                assert float(c[i]) == pytest.approx(row[key], abs=5e-3)
        for i, value in (
            (5, f["peak_rss_mib"]),
            (6, b["peak_rss_mib"]),
            (8, f["growth_mib"]),
            (9, b["growth_mib"]),
        ):
            assert float(c[i]) == pytest.approx(value, abs=0.5)
        assert c[11] == "torch.float32 / torch.bfloat16"
    m = result["meta"]
    assert m["cpu_model"] in markdown and f"{m['loadavg_start'][0]:.2f}" in markdown


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The command line on tiny 64-px, batch 8, micro 4, two processes per variant — run
    in this process (children replaced by direct calls of ``measure``), one thread."""
    out = tmp_path_factory.mktemp("precision") / "tiny"
    argv = [
        "--batch",
        "8",
        "--micro",
        "4",
        "--repeats",
        "1",
        "--rounds",
        "2",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    threads = torch.get_num_threads()

    def in_process(script, child_argv, variants, rounds):
        assert child_argv == argv
        args = argparse.Namespace(model="tiny", batch=8, micro=4, mask=0.5, repeats=1, threads=1)
        return {v: [bp.measure(v, args) for _ in range(rounds)] for v in variants}

    mp = pytest.MonkeyPatch()
    mp.setattr(bp, "run_variants", in_process)
    try:
        result = bp.main(argv)
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return result, out


def test_run_writes_numbers_derived_from_its_raw_fields(tiny_run):
    result, out = tiny_run
    written = json.loads(out.with_suffix(".json").read_text())
    assert written == json.loads(json.dumps(result))  # the returned result is the file's
    assert written["meta"]["threads"] == 1 and written["meta"]["image_size"] == 64
    assert written["meta"]["command"] == (
        "python experiments/benchmark_precision.py --batch 8 "
        f"--micro 4 --repeats 1 --rounds 2 --threads 1 --out {out}"
    )
    assert_derived_from_raw(written)
    assert_table_is_json(out.with_suffix(".md").read_text(), written)


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_committed_results_are_derived_from_their_raw_fields(path):
    result = json.loads(path.read_text())
    assert_derived_from_raw(result)
    assert_table_is_json(path.with_suffix(".md").read_text(), result)
