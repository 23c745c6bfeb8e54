"""Preemption: a signal mid-run saves a checkpoint and exits cleanly; resuming from it gives
the same subsequent losses, learning rates and sample counts as an uninterrupted run."""

import subprocess
import sys

import pytest

from flip.checkpoint import load_checkpoint
from flip.run import train
from tests.conftest import CONF, FAST, compose_fast
from tests.test_train import by_step, read_metrics

COMMON = ["logger=csv", "trainer.log_every_n_steps=1", "schedule.total_samples=128"]  # 8 steps


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, micro",
    [("SIGTERM", None), ("SIGUSR1", None), ("SIGTERM", 4)],
    ids=["SIGTERM", "SIGUSR1", "SIGTERM-gradient-cached"],
)
def test_signal_checkpoint_and_exact_resume(signum, micro, tmp_path_factory):
    full_dir, stop_dir, resumed_dir = (tmp_path_factory.mktemp(n) for n in ("full", "stop", "res"))
    common = [*COMMON, f"batch.micro={'null' if micro is None else micro}"]
    train(compose_fast(*common, output_dir=full_dir))

    stop = subprocess.run(
        [
            sys.executable,
            "train.py",
            *FAST,
            "data.zeroshot.size=40",
            *common,
            f"output_dir={stop_dir}",
            f"hydra.run.dir={stop_dir}",
            "+callbacks.stop._target_=tests.signal_at_step.SignalAtStep",
            "+callbacks.stop.step=4",
            f"+callbacks.stop.signum={signum}",
        ],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stop.returncode == 0, stop.stderr[-3000:]
    assert "held-out zero-shot" not in stop.stdout  # stopped, not finished
    ckpt = stop_dir / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["global_step"] == 4

    train(compose_fast(*common, f"ckpt_path={ckpt}", output_dir=resumed_dir))
    full, resumed = read_metrics(full_dir), read_metrics(resumed_dir)
    assert by_step(resumed, "train/micro_batches")[4] == (1.0 if micro is None else 16 / micro)
    for key in ("train/loss", "train/lr", "train/samples_seen"):
        expected, actual = by_step(full, key), by_step(resumed, key)
        assert sorted(actual) == [4, 5, 6, 7], key
        assert [actual[s] for s in range(4, 8)] == pytest.approx(
            [expected[s] for s in range(4, 8)], rel=1e-6
        ), key


def test_signal_handlers_are_restored_after_a_run(fast_cfg):
    import signal

    before = signal.getsignal(signal.SIGUSR1)
    train(fast_cfg())
    assert signal.getsignal(signal.SIGUSR1) is before
