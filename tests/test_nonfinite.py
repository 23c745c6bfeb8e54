"""A non-finite loss stops the run naming the step and the last checkpoint, or (if asked)
skips the step without touching the weights, counting it."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flip.tasks.pretrain import PretrainModule
from tests.test_grad_cache import batch, tiny_flip


def fit(nonfinite: str, tmp_path) -> PretrainModule:
    images, tokens = batch(16)
    images[8:] = float("nan")  # the second step's batch is corrupt
    module = PretrainModule(
        tiny_flip().float(),
        global_batch=8,
        total_samples=16,
        warmup_samples=0,
        base_lr=1e-3,
        nonfinite=nonfinite,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(TensorDataset(images.float(), tokens), batch_size=8))
    return module


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\).* at step 1; last good"):
        fit("stop", tmp_path)


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    module = fit("skip", tmp_path)
    assert module.skipped_steps == 1 and module.global_step == 1  # one real step taken
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="nonfinite must be 'stop' or 'skip'"):
        PretrainModule(
            tiny_flip(), global_batch=8, total_samples=8, warmup_samples=0, nonfinite="ignore"
        )
