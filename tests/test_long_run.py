"""experiments/long_run.py: its memory accounting sees the loader workers, its slopes are
the least-squares slopes of the per-step records, and the script runs end to end at a
tiny size (the committed 2,000-step result is re-derived from its own records)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import long_run  # experiments/long_run.py
import numpy as np
import pytest

from tests.conftest import FAST

RESULTS = sorted((Path(__file__).parents[1] / "experiments" / "results").glob("long-run-*.json"))


def test_slopes_and_window_means_of_a_known_trend():
    records = [
        {
            "step": s,
            "step_ms": 50.0 + 0.02 * s,  # +20 ms per 1000 steps
            "step_cpu_ms": 40.0,  # flat
            "rss_main_mb": 900.0 + 0.5 * s,  # +500 MB per 1000 steps
            "rss_workers_mb": 300.0,
            "pss_total_mb": 1000.0 - 0.1 * s,
        }
        for s in range(1, 1001)
    ]
    rows = {r["series"]: r for r in long_run.slope_table(records, skip=100, window=100)}
    assert rows["step_ms"]["slope_per_1000_steps"] == pytest.approx(20.0)
    assert rows["step_cpu_ms"]["slope_per_1000_steps"] == pytest.approx(0.0, abs=1e-9)
    assert rows["rss_main_mb"]["slope_per_1000_steps"] == pytest.approx(500.0)
    assert rows["rss_workers_mb"]["slope_per_1000_steps"] == pytest.approx(0.0, abs=1e-9)
    assert rows["pss_total_mb"]["slope_per_1000_steps"] == pytest.approx(-100.0)
    # steps 101-200 and 901-1000
    assert rows["rss_main_mb"]["first_mean"] == pytest.approx(900.0 + 0.5 * 150.5)
    assert rows["rss_main_mb"]["last_mean"] == pytest.approx(900.0 + 0.5 * 950.5)


def test_memory_counts_the_descendant_processes():
    """A child holding 200 MB of touched pages shows up in rss_workers_mb, not in the
    process's own RSS."""
    before = long_run.memory_mb(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(60)"]
    )
    try:
        for _ in range(300):
            during = long_run.memory_mb(os.getpid())
            if during["rss_workers_mb"] - before["rss_workers_mb"] > 200:
                break
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    assert during["processes"] == before["processes"] + 1
    assert during["rss_workers_mb"] - before["rss_workers_mb"] > 200
    assert during["pss_total_mb"] - before["pss_total_mb"] > 190
    assert abs(during["rss_main_mb"] - before["rss_main_mb"]) < 50


def assert_rows_derived_from_records(result: dict) -> None:
    meta = result["meta"]
    recomputed = long_run.slope_table(result["records"], meta["skip"], meta["window"])
    assert recomputed == result["rows"]
    kept = [r for r in result["records"] if r["step"] > meta["skip"]]
    steps = np.array([r["step"] for r in kept], dtype=float)
    rss = np.array([r["rss_main_mb"] for r in kept])
    slope = np.polyfit(steps, rss, 1)[0] * 1000
    (row,) = [r for r in result["rows"] if r["series"] == "rss_main_mb"]
    assert row["slope_per_1000_steps"] == pytest.approx(slope)


@pytest.mark.slow
def test_the_script_runs_a_tiny_long_run(tmp_path, capsys):
    """6 steps, evaluation and a checkpoint every 3, one loader worker: a record per
    step, the workers counted, the table printed and written with its command."""
    fast = [o for o in FAST if not o.startswith("data.num_workers")]
    out = long_run.main(
        [
            "--steps=6",
            "--every=3",
            "--skip=2",
            "--window=2",
            f"--out={tmp_path / 'lr'}",
            *fast,
            "data.num_workers=1",
            "data.zeroshot.size=40",
        ]
    )
    records = out["records"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["processes"] >= 2 and r["rss_workers_mb"] > 0 for r in records)
    assert all(r["step_ms"] > 0 and r["rss_main_mb"] > 0 for r in records)
    assert all(0 < r["step_cpu_ms"] for r in records)
    result = json.loads((tmp_path / "lr.json").read_text())
    assert_rows_derived_from_records(result)
    assert "RSS of the loader workers" in capsys.readouterr().out
    assert "--steps=6" in (tmp_path / "lr.md").read_text()


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_committed_results_are_derived_from_their_records(path):
    result = json.loads(path.read_text())
    assert len(result["records"]) == result["meta"]["steps"]
    assert_rows_derived_from_records(result)
