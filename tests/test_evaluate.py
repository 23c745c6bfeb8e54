"""`eval.py`: a trained checkpoint re-evaluated from disk gives the training run's number,
with nothing but the checkpoint named (the architecture and input size travel with it)."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from flip.run import evaluate, train
from tests.conftest import CONF


def compose_eval(*overrides, output_dir):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval", overrides=[f"output_dir={output_dir}", *overrides])


def test_eval_reproduces_the_final_zero_shot_accuracy(fast_cfg, tmp_path, capsys):
    trained = train(fast_cfg())  # a model smaller than eval.yaml's data default implies
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    cfg = compose_eval(
        f"ckpt_path={ckpt}",
        "data.zeroshot.size=40",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        output_dir=tmp_path / "eval",
    )
    metrics = evaluate(cfg)
    assert metrics["val/zeroshot_top1"] == pytest.approx(trained["val/zeroshot_top1"], abs=1e-6)
    lines = capsys.readouterr().out.strip().splitlines()
    report = [line for line in lines if line.startswith("held-out zero-shot top-1:")]
    assert len(report) == 2 and lines[-1] == report[0]  # eval ends with training's report line
    # the command line, with the checkpoint as its only argument besides the held-out size
    out = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path={ckpt}",
            "data.zeroshot.size=40",
            f"hydra.run.dir={tmp_path / 'cli'}",
        ],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == report[0]


def test_eval_needs_a_checkpoint():
    out = subprocess.run(
        [sys.executable, "eval.py"], cwd=CONF.parent, capture_output=True, text=True
    )
    assert out.returncode != 0 and "ckpt_path" in out.stderr
