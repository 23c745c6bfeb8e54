"""The real Hydra configs: every option of every group composes; bad values fail early."""

import subprocess
import sys

import hydra
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from flip.config import check_hardware, check_mask, per_device_batch
from flip.errors import ConfigError
from flip.models.clip import FLIP
from tests.conftest import CONF, compose_train

ROOT = CONF.parent
# training groups (hydra/: launchers; eval_*: the groups of conf/eval.yaml)
GROUPS = sorted(
    p.name
    for p in CONF.iterdir()
    if p.is_dir() and p.name != "hydra" and not p.name.startswith(("eval_", "_"))
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_and_their_options_exist():
    assert GROUPS == [
        "accelerator",
        "batch",
        "callbacks",
        "data",
        "experiment",
        "logger",
        "model",
        "objective",
        "schedule",
        "task",
        "trainer",
    ]
    assert options("model") == ["mini", "tiny", "vit_b16", "vit_h14", "vit_l14", "vit_l16"]
    assert options("accelerator") == ["cpu", "gpu", "tpu"]
    assert {"16k", "32k", "64k", "1k", "tiny"} <= set(options("batch"))
    assert not (CONF / "mask").exists()  # mask is a number, not a group (Hydra 1.3)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "csv":
        overrides.append("data.train.path=/data/pairs.csv")
    if group == "data" and option == "folder":
        overrides.append("data.train.root=/data/images")
    if group == "experiment":
        overrides.append("init_from=/ckpt/last.ckpt")
    if "shards" in compose_train(*overrides, output_dir=tmp_path).data.keys():  # LAION data
        overrides.append('data.shards="/data/laion400m/{00000..41407}.tar"')  # paper scale
    cfg = compose_train(*overrides, output_dir=tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert resolved["mask"] == cfg.mask and 0 <= cfg.mask < 1
    if "image_mask" in cfg.task:  # pre-training: interpolated from the top level
        assert cfg.task.image_mask.ratio == cfg.mask
    assert cfg.model.image.image_size == cfg.data.image_size


@pytest.mark.parametrize("name", ["tiny", "vit_b16", "vit_l16", "vit_l14", "vit_h14"])
def test_every_model_instantiates(name, tmp_path):
    cfg = compose_train(f"model={name}", output_dir=tmp_path)
    with torch.device("meta"):  # no memory, no compute
        model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model, FLIP)


def test_batch_names_mean_the_global_contrastive_batch(tmp_path):
    sizes = {
        o: compose_train(f"batch={o}", output_dir=tmp_path).batch["global"]
        for o in ("16k", "32k", "64k", "1k")
    }
    assert sizes == {"16k": 16384, "32k": 32768, "64k": 65536, "1k": 1024}


def test_mask_and_batch_overrides_compose_together(tmp_path):
    cfg = compose_train("mask=0.75", "batch=64k", "accelerator=tpu", output_dir=tmp_path)
    assert cfg.mask == 0.75 and cfg.task.image_mask == {"ratio": 0.75, "kind": "random"}
    assert cfg.batch["global"] == 65536 and cfg.task.global_batch == 65536
    assert cfg.trainer.accelerator == "tpu"


def test_unknown_architecture_names_the_group_and_the_choices(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_train("model=vit_x99", output_dir=tmp_path)
    message = str(err.value)
    assert "model/vit_x99" in message
    assert "Available options in 'model'" in message
    assert err.value.options == ["mini", "tiny", "vit_b16", "vit_h14", "vit_l14", "vit_l16"]


def test_cli_lists_allowed_architectures():
    out = subprocess.run(
        [sys.executable, "train.py", "model=vit_x99"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "model/vit_x99" in out.stderr and "vit_b16" in out.stderr and "tiny" in out.stderr


@pytest.mark.parametrize("mask", [1.0, 1.5, -0.1, "half", True])
def test_mask_outside_range_is_rejected(mask):
    with pytest.raises(ConfigError, match=r"mask=.* \[0, 1\)"):
        check_mask(OmegaConf.create({"mask": mask}))


@pytest.mark.parametrize("mask", [0, 0.0, 0.5, 0.75, 0.9])
def test_valid_masks_pass(mask):
    check_mask(OmegaConf.create({"mask": mask}))


def batch_cfg(total, micro=None):
    return OmegaConf.create({"batch": {"global": total, "micro": micro}})


def test_per_device_batch():
    assert per_device_batch(batch_cfg(65536), 256) == 256
    assert per_device_batch(batch_cfg(256), 1) == 256
    assert per_device_batch(batch_cfg(256, 128), 2) == 128
    assert per_device_batch(batch_cfg(65536, 64), 8) == 8192  # 128 cached micro-batches
    with pytest.raises(ConfigError, match="batch.global=256 is not divisible by the 3 devices"):
        per_device_batch(batch_cfg(256), 3)
    with pytest.raises(ConfigError, match="batch.micro=100 must divide"):
        per_device_batch(batch_cfg(256, 100), 1)
    with pytest.raises(ConfigError, match="batch.global=0"):
        per_device_batch(batch_cfg(0), 1)


def test_missing_accelerators_fail_with_one_sentence():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="accelerator=gpu needs a CUDA GPU"):
            check_hardware("gpu")
    check_hardware("cpu")


def test_tpu_request_on_a_cpu_machine_stops_with_one_sentence():
    out = subprocess.run(
        [sys.executable, "train.py", "mask=0.75", "batch=64k", "accelerator=tpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: accelerator=tpu needs a TPU host"), out.stderr


def test_cfg_job_shows_ratio_and_batch():
    out = subprocess.run(
        [sys.executable, "train.py", "--cfg", "job", "mask=0.75", "batch=64k"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    job = OmegaConf.create(out.stdout)
    assert job.mask == 0.75 and job.batch["global"] == 65536
    assert "mask: 0.75" in out.stdout and "global: 65536" in out.stdout


def test_data_root_places_every_downstream_dataset(tmp_path):
    """data_root=/x: ImageNet, COCO, nocaps and VQAv2 are read under /x/<name>."""
    roots = {
        "imagenet": lambda d: (d.train.root, d.val.root),
        "coco_captions": lambda d: (d.train.images.root, d.val.root),
        "nocaps": lambda d: (d.train.images.root, d.val.root),
        "vqav2": lambda d: (d.train.images, d.val.questions),
    }
    for option, paths in roots.items():
        cfg = compose_train(f"data={option}", "data_root=/x", output_dir=tmp_path)
        for path in paths(cfg.data):
            assert path.startswith("/x/"), (option, path)
