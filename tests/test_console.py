"""What `python train.py` prints: progress, the data summary and the result line, not
Lightning's start-up chatter or warnings that do not apply (`flip/console.py`)."""

import subprocess
import sys

from tests.conftest import CONF, FAST

NOISE = (
    "PJRT_DEVICE",
    "Tip:",
    "litlogger",
    "weights_only",
    "manual optimization",
    "GPU available",
    "TPU available",
    "Seed set",
    "Total params",
)


def test_the_default_run_prints_only_what_a_newcomer_needs(tmp_path):
    fast = [o for o in FAST if "progress_bar" not in o and "model_summary" not in o]
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            *fast,
            "data.zeroshot.size=40",
            "logger=csv",
            "callbacks.checkpoint.every_n_train_steps=2",
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=CONF.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    console = out.stdout + out.stderr
    assert [n for n in NOISE if n in console] == []
    assert "data: 64 good samples, 0 skipped" in console
    assert out.stdout.strip().splitlines()[-1].startswith("held-out zero-shot top-1: ")


def test_verbose_brings_lightnings_lines_back(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            *FAST,
            "data.zeroshot.size=40",
            "verbose=true",
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=CONF.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GPU available" in out.stdout + out.stderr


def test_progress_bar_of_a_step_counted_run_shows_no_epoch_limit():
    """Pre-training ends at max_steps (Lightning sets max_epochs=-1): "Epoch 3", not the
    "Epoch 3/-2" of Lightning's bar; runs with an epoch limit keep "Epoch 3/4"."""
    from types import SimpleNamespace

    from flip.callbacks.progress import StepProgressBar

    bar = StepProgressBar()
    for max_epochs, expected in ((-1, "Epoch 3"), (5, "Epoch 3/4")):
        bar._trainer = SimpleNamespace(max_epochs=max_epochs)
        assert bar._get_train_description(3).strip() == expected
