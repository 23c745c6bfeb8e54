"""Shared fixtures: compose the real `conf/` as `python train.py` would."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF = Path(__file__).resolve().parents[1] / "conf"

# A seconds-long CPU run of the real pipeline: a very small model and schedule.
FAST = [
    "model.image.width=32",
    "model.image.depth=1",
    "model.image.heads=1",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=1",
    "model.embed_dim=16",
    "batch.global=16",
    "schedule.total_samples=64",
    "schedule.warmup_samples=16",
    "data.num_workers=0",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def compose_train(*overrides: str, output_dir: Path | str = "/tmp/flip-test") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={output_dir}", *overrides])


def compose_fast(*overrides: str, output_dir: Path | str) -> DictConfig:
    """The fast configuration; on the default shapes data a 40-image zero-shot set."""
    shapes = [] if any(o.startswith("data=") for o in overrides) else ["data.zeroshot.size=40"]
    return compose_train(*FAST, *shapes, *overrides, output_dir=output_dir)


@pytest.fixture
def fast_cfg(tmp_path):
    """Compose the fast configuration plus extra overrides, writing under tmp_path."""
    return lambda *overrides: compose_fast(*overrides, output_dir=tmp_path)
