"""flip.checkpoint: a checkpoint rebuilds its model from the stored config; tensors the
model has no place for (a training-only auxiliary module) are reported, not dropped
silently; missing weights and contradicting architectures are errors."""

import logging

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from flip.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    merge_model_config,
    model_config,
    save_flip_checkpoint,
)
from flip.errors import ConfigError
from flip.objective import Objective
from flip.tasks.pretrain import PretrainModule
from tests.conftest import compose_fast
from tests.test_grad_cache import TokenPenalty


@pytest.fixture
def model_cfg(tmp_path) -> dict:
    return OmegaConf.to_container(compose_fast(output_dir=tmp_path).model, resolve=True)


def test_extra_modules_load_into_evaluation_and_are_reported(model_cfg, tmp_path, caplog):
    module = PretrainModule(
        hydra.utils.instantiate(model_cfg),
        objective=Objective({"penalty": TokenPenalty(width=32)}),
        model_config=model_cfg,
        global_batch=8,
        total_samples=8,
        warmup_samples=0,
    )
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": {"model_config": model_cfg}},
        tmp_path / "run.ckpt",
    )
    with caplog.at_level(logging.WARNING, logger="flip.checkpoint"):
        model = build_model(tmp_path / "run.ckpt")
    assert "2 tensors not used by this model (modules: objective)" in caplog.text
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert not model.training


def test_checkpoints_storing_training_masks_in_the_model_config_still_load(model_cfg, tmp_path):
    """Before masks moved to the task, towers stored ``mask_ratio`` (and the text tower
    ``mask_kind``): the keys are dropped on load, whatever their values."""
    assert not {"mask_ratio", "mask_kind"} & {*model_cfg["image"], *model_cfg["text"]}
    older = {
        **model_cfg,
        "image": {**model_cfg["image"], "mask_ratio": 0.5},
        "text": {**model_cfg["text"], "mask_ratio": 0.25, "mask_kind": "prioritized"},
    }
    model = hydra.utils.instantiate(model_cfg)
    save_flip_checkpoint(tmp_path / "old.ckpt", model, older)
    loaded = build_model(tmp_path / "old.ckpt")  # would fail: unknown constructor argument
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert model_config(load_checkpoint(tmp_path / "old.ckpt")) == model_cfg
    # and next to the current model config, as init_from and eval.py merge them
    assert build_model(tmp_path / "old.ckpt", model_cfg).visual.num_patches == 64


def test_missing_weights_are_an_error(model_cfg, tmp_path):
    model = hydra.utils.instantiate(model_cfg)
    save_flip_checkpoint(tmp_path / "m.ckpt", model, model_cfg)
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)
    del state["state_dict"]["model.text_proj.weight"]
    torch.save(state, tmp_path / "m.ckpt")
    with pytest.raises(
        CheckpointError, match="lacks 1 weights of the model \\(text_proj.weight\\)"
    ):
        build_model(tmp_path / "m.ckpt")


def test_merge_keeps_the_architecture_and_takes_run_time_settings(model_cfg):
    requested = {**model_cfg, "image": {**model_cfg["image"], "grad_checkpointing": True}}
    merged = merge_model_config(model_cfg, requested)
    assert merged["image"]["grad_checkpointing"] and merged["image"]["width"] == 32
    assert not model_cfg["image"]["grad_checkpointing"]  # the stored config is not modified
    wider = {**model_cfg, "image": {**model_cfg["image"], "width": 64}}
    with pytest.raises(
        ConfigError,
        match="model.image.width=64 contradicts the checkpoint, which "
        "was trained with model.image.width=32",
    ):
        merge_model_config(model_cfg, wider)
    # only the explicitly set keys are checked
    assert merge_model_config(model_cfg, wider, explicit={"text.width"})["image"]["width"] == 32
