"""Resuming after hard kills: ``ckpt_path=auto`` finds the newest complete checkpoint of the
run directory, checkpoints are written atomically (a SIGKILL mid-write leaves every
``*.ckpt`` loadable), and damaged or unfitting checkpoints end in one sentence naming the
file or the keys, without a traceback."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flip.checkpoint import CheckpointError, load_checkpoint
from flip.resume import AtomicCheckpointIO
from flip.run import train
from tests.conftest import CONF, FAST, compose_fast

ROOT = CONF.parent
# 8 steps of 16; a checkpoint (and last.ckpt) every 2 steps, every periodic one kept
COMMON = [
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "schedule.total_samples=128",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.checkpoint.save_top_k=-1",
]


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step over every metrics file of the run (a resumed run adds a version)."""
    out = {}
    for path in sorted(run_dir.glob("logs/version_*/metrics.csv")):
        with open(path) as f:
            out.update(
                {
                    int(r["step"]): float(r["train/loss"])
                    for r in csv.DictReader(f)
                    if r["train/loss"]
                }
            )
    return out


def train_py(
    run_dir: Path, *overrides: str, script: str = "train.py"
) -> subprocess.CompletedProcess:
    """``python train.py`` with the fast settings in the fixed run directory ``run_dir``."""
    return subprocess.run(
        [
            sys.executable,
            script,
            *FAST,
            "data.zeroshot.size=40",
            *COMMON,
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def top1(run_dir: Path) -> float:
    return json.loads((run_dir / "result.json").read_text())["metrics"]["val/zeroshot_top1"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The uninterrupted run: the reference losses and held-out accuracy."""
    run_dir = tmp_path_factory.mktemp("full")
    train(compose_fast(*COMMON, output_dir=run_dir))
    return run_dir


def assert_same_as_full(run_dir: Path, full_run: Path, first_step: int) -> None:
    expected, actual = losses(full_run), losses(run_dir)
    resumed = [s for s in range(first_step, 8)]
    assert [actual[s] for s in resumed] == pytest.approx([expected[s] for s in resumed], rel=1e-6)
    assert top1(run_dir) == top1(full_run)


def test_atomic_write_replaces_the_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert load_checkpoint(path)["step"] == 2
    assert torch.equal(load_checkpoint(path)["w"], torch.zeros(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_with_auto_resumes_exactly(tmp_path, full_run):
    """SIGKILL after step 5 (no handler runs, no last.ckpt written at the kill): the same
    command plus ckpt_path=auto resumes from the step-4 checkpoint and logs the very losses
    and the final held-out accuracy of the uninterrupted run."""
    killed = train_py(
        tmp_path,
        "ckpt_path=auto",
        "+callbacks.kill._target_=tests.signal_at_step.SignalAtStep",
        "+callbacks.kill.step=5",
        "+callbacks.kill.signum=SIGKILL",
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "result.json").exists()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4

    resumed = train_py(tmp_path, "ckpt_path=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ckpt_path=auto resumes from" in resumed.stdout
    assert "last.ckpt (step 4)" in resumed.stdout
    assert_same_as_full(tmp_path, full_run, first_step=4)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_leaves_every_checkpoint_loadable(tmp_path, full_run):
    """Killed halfway through writing last.ckpt at step 4 (the 4th write, after
    step00000004.ckpt): every *.ckpt file present loads, last.ckpt is still the complete
    step-2 file, and ckpt_path=auto resumes from the newest complete one (step 4)."""
    killed = train_py(
        tmp_path, "trainer.plugins=[{_target_:tests.kill_mid_write.KillMidWrite,at_save:4}]"
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = tmp_path / "checkpoints"
    steps = {p.name: load_checkpoint(p)["global_step"] for p in ckpts.glob("*.ckpt")}
    assert steps == {"step00000002.ckpt": 2, "step00000004.ckpt": 4, "last.ckpt": 2}
    (partial,) = ckpts.glob(".last.ckpt.*.partial")  # the write that was cut off
    assert 0 < partial.stat().st_size < (ckpts / "last.ckpt").stat().st_size

    train(compose_fast(*COMMON, "ckpt_path=auto", output_dir=tmp_path))
    assert not partial.exists()
    assert_same_as_full(tmp_path, full_run, first_step=4)


def test_auto_skips_damaged_checkpoints_and_starts_fresh_without_any(tmp_path, full_run, caplog):
    """The newest files are damaged (truncated, a text file): auto logs why it skips each
    and takes the newest that loads; with no checkpoint at all it starts from step 0."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    good = full_run / "checkpoints" / "step00000004.ckpt"
    (ckpts / good.name).write_bytes(good.read_bytes())
    data = (full_run / "checkpoints" / "step00000006.ckpt").read_bytes()
    (ckpts / "step00000006.ckpt").write_bytes(data[: len(data) // 3])
    (ckpts / "last.ckpt").write_text("not a checkpoint\n")
    for age, name in enumerate(["last.ckpt", "step00000006.ckpt", "step00000004.ckpt"]):
        os.utime(ckpts / name, (1e9 - age, 1e9 - age))  # newest first

    with caplog.at_level("INFO", logger="flip.resume"):
        train(compose_fast(*COMMON, "ckpt_path=auto", output_dir=run_dir))
    assert "skips last.ckpt: " in caplog.text and "is not a checkpoint" in caplog.text
    assert "skips step00000006.ckpt: " in caplog.text and "is incomplete" in caplog.text
    assert "step00000004.ckpt (step 4)" in caplog.text
    assert_same_as_full(run_dir, full_run, first_step=4)

    caplog.clear()
    with caplog.at_level("INFO", logger="flip.resume"):
        train(compose_fast(*COMMON, "ckpt_path=auto", output_dir=tmp_path / "fresh"))
    assert "starting fresh" in caplog.text
    assert_same_as_full(tmp_path / "fresh", full_run, first_step=0)


def _damaged(tmp_path: Path, full_run: Path) -> dict[str, Path]:
    data = (full_run / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.ckpt").write_text("step,loss\n1,2.3\n")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    return {n: tmp_path / f"{n}.ckpt" for n in ("truncated", "notes", "empty")}


def test_damaged_files_are_named_as_such(tmp_path, full_run):
    files = _damaged(tmp_path, full_run)
    with pytest.raises(CheckpointError, match=r"truncated.ckpt is incomplete: a truncated file"):
        load_checkpoint(files["truncated"])
    with pytest.raises(CheckpointError, match=r"notes.ckpt is not a checkpoint: .*b'step'"):
        load_checkpoint(files["notes"])
    with pytest.raises(CheckpointError, match=r"empty.ckpt is empty \(0 bytes\)"):
        load_checkpoint(files["empty"])


@pytest.mark.slow
def test_bad_checkpoints_at_start_up_end_in_one_sentence(tmp_path, full_run):
    """train.py and eval.py: non-zero exit, no traceback, the last line names the file
    (or the contradicting model keys)."""
    files = _damaged(tmp_path, full_run)
    last = full_run / "checkpoints" / "last.ckpt"
    cases = [
        ("train.py", [f"ckpt_path={files['truncated']}"], "truncated.ckpt is incomplete"),
        ("train.py", [f"ckpt_path={files['notes']}"], "notes.ckpt is not a checkpoint"),
        (
            "train.py",
            ["model.image.width=48", f"ckpt_path={last}"],
            f"checkpoint {last} was trained with another model than this run asks for: "
            "model.image.width=48 (trained: 32)",
        ),
        (  # a directory named by the start time: the next run would not find it
            "train.py",
            ["ckpt_path=auto", f"hydra.run.dir={tmp_path}/auto/${{now:%H-%M-%S-%f}}"],
            "ckpt_path=auto resumes from the run directory, but this run writes to a new "
            "timestamped one",
        ),
        ("eval.py", [f"ckpt_path={files['truncated']}"], "truncated.ckpt is incomplete"),
    ]
    for script, overrides, message in cases:
        if script == "train.py":
            out = train_py(tmp_path / "run", *overrides)
        else:
            out = subprocess.run(
                [sys.executable, script, *overrides, f"hydra.run.dir={tmp_path}/eval"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
        assert out.returncode == 1, (script, overrides, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
        assert message in out.stderr.strip().splitlines()[-1], (
            script,
            overrides,
            out.stderr[-800:],
        )
