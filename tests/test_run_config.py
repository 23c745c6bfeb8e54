"""Configs travel: every run logs its resolved config (CSV hparams.yaml, W&B config with
group and tags), checkpoints carry the model config, and `init_from` reads the
architecture from the checkpoint (a contradicting command-line override is an error)."""

import subprocess
import sys

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from flip.checkpoint import load_checkpoint, model_config
from flip.errors import ConfigError
from flip.run import train
from tests.conftest import CONF, FAST, compose_fast, compose_train

NOT_MODEL = [o for o in FAST if not o.startswith("model.")]


def test_csv_logger_gets_the_resolved_run_config(fast_cfg, tmp_path):
    cfg = fast_cfg("logger=csv", "mask=0.75")
    train(cfg)
    (hparams,) = tmp_path.glob("logs/version_*/hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["mask"] == 0.75 and logged["batch"]["global"] == 16
    assert logged["model"]["image"]["width"] == 32
    assert logged["task"]["image_mask"] == {"ratio": 0.75, "kind": "random"}
    assert logged["schedule"] == OmegaConf.to_container(cfg.schedule, resolve=True)


def test_wandb_gets_config_group_and_tags(fast_cfg, monkeypatch):
    """What the W&B run holds when train() finishes it (offline: nothing is sent)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {}
    finish = wandb.sdk.wandb_run.Run.finish

    def capture(run, *args, **kwargs):
        seen.update(config=dict(run.config), group=run.group, tags=tuple(run.tags))
        return finish(run, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "finish", capture)
    train(fast_cfg("logger=wandb", "group=table1a", "tags=[table1a,mask0.75]", "mask=0.75"))
    assert seen["group"] == "table1a" and seen["tags"] == ("table1a", "mask0.75")
    config = seen["config"]
    assert config["mask"] == 0.75 and config["batch"]["global"] == 16
    assert config["model"]["image"]["width"] == 32
    assert config["task"]["image_mask"] == {"ratio": 0.75, "kind": "random"}


def test_every_run_leaves_a_result_record(fast_cfg, tmp_path):
    import json

    cfg = fast_cfg("mask=0.75")
    metrics = train(cfg)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["metrics"] == pytest.approx(metrics)
    assert record["config"]["mask"] == 0.75 and record["config"]["model"]["image"]["width"] == 32
    assert 0 < record["metrics"]["time/train_wall_s"] and 0 < record["metrics"]["time/train_cpu_s"]


def test_checkpoints_carry_the_resolved_model_config(fast_cfg, tmp_path):
    cfg = fast_cfg()
    train(cfg)
    stored = model_config(load_checkpoint(tmp_path / "checkpoints" / "last.ckpt"))
    assert stored == OmegaConf.to_container(cfg.model, resolve=True)
    assert stored["image"]["image_size"] == 64 and stored["text"]["context_length"] == 32


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    train(compose_fast(output_dir=out))
    return out / "checkpoints" / "last.ckpt"


def test_init_from_reads_the_architecture_from_the_checkpoint(pretrained, tmp_path):
    # the default model group (tiny: width 128) is not named: the checkpoint's (32) is used
    cfg = compose_train(
        *NOT_MODEL,
        "data.zeroshot.size=40",
        "experiment=unmasked_tuning",
        f"init_from={pretrained}",
        output_dir=tmp_path,
    )
    assert cfg.model.image.width == 128
    train(cfg)
    tuned = model_config(load_checkpoint(tmp_path / "checkpoints" / "last.ckpt"))
    assert tuned == model_config(load_checkpoint(pretrained))  # the architecture only


def test_init_from_with_a_contradicting_override_names_both_values(pretrained, tmp_path):
    out = run_train(f"init_from={pretrained}", "model.image.width=64", output_dir=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: model.image.width=64 contradicts init_from={pretrained}, which was trained "
        "with model.image.width=32; drop the override (the architecture is read from the "
        "checkpoint)"
    )


def run_train(*overrides: str, output_dir) -> subprocess.CompletedProcess:
    """``python train.py`` with the fast non-model settings, as a user would run it."""
    return subprocess.run(
        [sys.executable, "train.py", *NOT_MODEL, *overrides, f"output_dir={output_dir}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=CONF.parent,
    )


def test_init_from_a_missing_file_is_one_sentence(tmp_path):
    cfg = compose_fast(f"init_from={tmp_path / 'nope.ckpt'}", output_dir=tmp_path)
    with pytest.raises(ConfigError, match="nope.ckpt does not exist"):
        train(cfg)


def test_init_from_at_another_patch_size_resamples_the_kernel(pretrained, tmp_path):
    """Paper footnote 3 (L/14 by tuning L/16), in small: a patch-8 checkpoint tuned at
    patch 4. With lr 0 the saved kernel is exactly timm's resample of the pre-trained one,
    and every other weight is the checkpoint's."""
    from timm.layers import resample_patch_embed

    cfg = compose_train(
        *NOT_MODEL,
        "data.zeroshot.size=40",
        "experiment=unmasked_tuning",
        f"init_from={pretrained}",
        "init_resample_patch=true",
        "model.image.patch_size=4",
        "schedule.base_lr=0",
        output_dir=tmp_path,
    )
    train(cfg)
    tuned = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    before = load_checkpoint(pretrained)["state_dict"]
    after = tuned["state_dict"]
    assert model_config(tuned)["image"]["patch_size"] == 4
    assert model_config(tuned)["image"]["width"] == 32  # the checkpoint's architecture
    key = "model.visual.patch_embed.proj.weight"
    assert after[key].shape == (32, 3, 4, 4)
    assert torch.equal(after[key], resample_patch_embed(before[key], [4, 4]))
    assert all(torch.equal(after[k], before[k]) for k in before if k != key)


def test_another_patch_size_without_resampling_is_refused(pretrained, tmp_path):
    out = run_train(f"init_from={pretrained}", "model.image.patch_size=4", output_dir=tmp_path)
    assert out.returncode == 1
    assert "model.image.patch_size=4 contradicts" in out.stderr


@pytest.mark.parametrize("experiment", ["unmasked_tuning", "table2_vit_l14"])
def test_a_tuning_experiment_without_init_from_stops_at_start_up(experiment, tmp_path):
    """Before, `init_from: ???` in the experiment merged over train.yaml's null into null,
    and the "tuning" silently trained from scratch."""
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"experiment={experiment}",
            f"output_dir={tmp_path}",
            *(["data.shards=/x"] if experiment.startswith("table") else []),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=CONF.parent,
    )
    assert out.returncode == 1
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("error: this run tunes a pre-trained model: set init_from=<checkpoint>")
    )
