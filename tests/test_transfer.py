"""The downstream-task contract (flip/tasks/transfer.py), with a minimal task defined here:
architecture and weights from init_from, towers unmasked, data sized by the checkpoint,
the summary line, result.json and a resumable last.ckpt."""

import json

import hydra
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flip.checkpoint import CheckpointError, load_checkpoint, save_flip_checkpoint
from flip.errors import ConfigError
from flip.run import train
from flip.tasks.transfer import TransferModule, build_tower, is_transfer_task
from tests.conftest import compose_train


class ProbeData(L.LightningDataModule):
    """Random images labelled by their mean brightness (2 classes)."""

    def __init__(self, batch_size: int, image_size: int = 32, context_length: int = 8):
        super().__init__()
        self.batch_size, self.image_size, self.context_length = (
            batch_size,
            image_size,
            context_length,
        )
        g = torch.Generator().manual_seed(0)
        images = torch.rand(32, 3, image_size, image_size, generator=g)
        images[:16] *= 0.5
        self.data = TensorDataset(images, (torch.arange(32) >= 16).long())

    @property
    def task_args(self) -> dict:
        return {"num_classes": 2}

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


VALIDATED_AT = []  # the epoch of every validation a Probe ran


class Probe(TransferModule):
    """A linear classifier on the pre-trained image tower's pooled tokens."""

    def __init__(
        self,
        model_config: dict,
        num_classes: int,
        epochs: int = 1,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.visual = build_tower(model_config, "visual", drop_path=drop_path)
        self.head = nn.Linear(self.visual.width, num_classes)

    def forward(self, images):
        tokens, keep = self.visual.forward_features(images)
        return self.head(self.visual.forward_head(tokens)), tokens

    def training_step(self, batch, _):
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images)[0], labels)
        self.log("train/loss", loss)
        return loss

    def on_validation_epoch_start(self):
        VALIDATED_AT.append(self.current_epoch)

    def validation_step(self, batch, _):
        images, labels = batch
        self.log("val/top1", (self(images)[0].argmax(1) == labels).float().mean())
        self.log("val/baseline_top1", torch.tensor(0.5))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def summary(self, metrics):
        return f"probe top-1: {metrics['val/top1']:.1%} (chance {metrics['val/baseline_top1']:.0%})"


def pretrained_checkpoint(path, image_size=32):
    """A tiny FLIP checkpoint as pre-training writes it (model config + weights), masked
    at 0.5 in training."""
    cfg = compose_train(
        "model.image.width=32",
        "model.image.depth=2",
        "model.image.heads=1",
        "model.text.width=32",
        "model.text.depth=1",
        "model.text.heads=1",
        "model.embed_dim=16",
        "mask=0.5",
        f"data.image_size={image_size}",
    )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = hydra.utils.instantiate(model_cfg)
    save_flip_checkpoint(path, model, model_cfg)
    return model, model_cfg


def probe_config(tmp_path, init_from, *overrides):
    cfg = compose_train(
        "logger=none",
        "trainer.enable_progress_bar=false",
        "batch.global=8",
        *overrides,
        output_dir=tmp_path,
    )
    with open_dict(cfg):
        cfg.task = {"_target_": f"{__name__}.Probe", "epochs": 2, "drop_path": 0.1}
        cfg.data = {"_target_": f"{__name__}.ProbeData", "image_size": 64, "context_length": 32}
        cfg.init_from = str(init_from) if init_from else None
    return cfg


def test_build_tower_is_unmasked_with_the_run_time_settings(tmp_path):
    _, model_cfg = pretrained_checkpoint(tmp_path / "p.ckpt")
    tower = build_tower(model_cfg, "visual", drop_path=0.2)
    assert "mask_ratio" not in model_cfg["image"]  # masks are pre-training's, not the model's
    assert tower.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    tower.train()
    tokens, keep = tower.forward_features(torch.rand(2, 3, 32, 32))
    assert keep is None and tokens.shape[1] == 1 + tower.num_patches  # nothing dropped
    with pytest.raises(ConfigError, match="width"):  # architecture keys are not run-time
        build_tower(model_cfg, "visual", width=64)


def test_run_loads_the_checkpoint_and_reports(tmp_path, capsys):
    model, _ = pretrained_checkpoint(tmp_path / "p.ckpt")
    cfg = probe_config(tmp_path, tmp_path / "p.ckpt")
    assert is_transfer_task(cfg) and not is_transfer_task(compose_train())
    metrics = train(cfg)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"probe top-1: {metrics['val/top1']:.1%} (chance 50%)"
    assert cfg.data.image_size == 32  # followed the checkpoint, not the data config's 64
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["metrics"]["val/top1"] == pytest.approx(metrics["val/top1"])
    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 * 32 // 8 and "optimizer_states" in last  # 2 epochs, resumable
    assert last["hyper_parameters"]["model_config"]["image"]["width"] == 32
    # weights started from the checkpoint: 8 steps moved them, but far less than the
    # distance to another random initialisation
    start = model.visual.patch_embed.proj.weight
    tuned = last["state_dict"]["visual.patch_embed.proj.weight"]
    fresh = Probe(last["hyper_parameters"]["model_config"], 2).visual.patch_embed.proj.weight
    assert 0 < (tuned - start).norm() < 0.5 * (fresh - start).norm()


@pytest.mark.parametrize("eval_every, expected", [(1, [0, 1, 2, 3, 4]), (2, [1, 3, 4])])
def test_eval_every_sets_the_epochs_that_validate(tmp_path, eval_every, expected):
    """task.eval_every=2 validates after the 2nd and 4th of 4 epochs (and once after the
    run, at epoch 4: the reported numbers); the module never receives the key."""
    pretrained_checkpoint(tmp_path / "p.ckpt")
    cfg = probe_config(tmp_path, tmp_path / "p.ckpt")
    with open_dict(cfg):
        cfg.task.epochs, cfg.task.eval_every = 4, eval_every
    VALIDATED_AT.clear()
    train(cfg)
    assert VALIDATED_AT == expected


def test_run_refuses_without_init_from_and_with_micro_batches(tmp_path):
    with pytest.raises(ConfigError, match="init_from=<checkpoint>"):
        train(probe_config(tmp_path, None))
    pretrained_checkpoint(tmp_path / "p.ckpt")
    with pytest.raises(ConfigError, match="batch.micro=4"):
        train(probe_config(tmp_path, tmp_path / "p.ckpt", "batch.micro=4"))


def test_checkpoint_without_the_tower_is_refused(tmp_path):
    _, model_cfg = pretrained_checkpoint(tmp_path / "p.ckpt")
    probe = Probe(model_cfg, num_classes=2)
    with pytest.raises(CheckpointError, match="no weights of the visual tower"):
        probe.load_pretrained({"text.x": torch.zeros(1)}, "here")
    state = {f"visual.{k}": v for k, v in probe.visual.state_dict().items() if k != "norm.weight"}
    with pytest.raises(CheckpointError, match="lacks 1 weights"):
        probe.load_pretrained(state, "here")


def test_init_weights_random_keeps_the_architecture_and_not_the_weights(tmp_path):
    """init_weights=random, the from-scratch control: the checkpoint's architecture, its
    weights left at a fresh initialisation; pretrained (the default) copies every one."""
    from flip.tasks.transfer import Transfer

    model, _ = pretrained_checkpoint(tmp_path / "p.ckpt")
    data = ProbeData(batch_size=8)
    expected = model.visual.state_dict()
    loaded = Transfer(probe_config(tmp_path, tmp_path / "p.ckpt")).module(data)
    assert all(torch.equal(v, expected[k]) for k, v in loaded.visual.state_dict().items())
    cfg = probe_config(tmp_path, tmp_path / "p.ckpt", "init_weights=random")
    fresh = Transfer(cfg).module(data).visual.state_dict()
    assert fresh.keys() == expected.keys()
    assert all(v.shape == expected[k].shape for k, v in fresh.items())
    differ = {k for k, v in fresh.items() if not torch.equal(v, expected[k])}
    # every randomly initialised matrix differs (norm scales start at 1 in both; the fixed
    # sin-cos position embedding is the same)
    random_init = {k for k, v in expected.items() if k.endswith("weight") and v.dim() > 1}
    assert len(random_init) > 5 and random_init <= differ
    with pytest.raises(ConfigError, match="init_weights=scratch must be pretrained"):
        Transfer(probe_config(tmp_path, tmp_path / "p.ckpt", "init_weights=scratch"))
