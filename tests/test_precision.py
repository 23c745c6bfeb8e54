"""The precision a training step really runs in: the Transformer blocks' matmuls of both
towers in bf16 under ``bf16-mixed`` (and under the TPU path's own autocast), fp32
otherwise; the contrastive loss always fp32 — one-shot and gradient-cached. (The residual
stream itself stays fp32 under autocast: fp32 input + bf16 branch promotes to fp32.)"""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flip.tasks.pretrain import PretrainModule
from tests.test_grad_cache import batch, tiny_flip


class Dtypes(L.Callback):
    """Output dtypes of the first block's MLP and attention projections of each tower
    while training, and the loss's."""

    def __init__(self):
        self.blocks, self.losses = set(), set()

    def on_train_start(self, trainer, module):
        for tower in (module.model.visual, module.model.text):
            for layer in (tower.blocks[0].attn.qkv, tower.blocks[0].mlp.fc1):
                layer.register_forward_hook(
                    lambda m, i, out: self.blocks.add(out.dtype) if m.training else None
                )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.add(loss.dtype)


def run(precision: str, micro: int | None, bf16_autocast: bool = False) -> Dtypes:
    module = PretrainModule(
        tiny_flip().float(),
        global_batch=8,
        total_samples=16,
        warmup_samples=0,
        micro_batch=micro,
        bf16_autocast=bf16_autocast,
    )
    images, tokens = batch()
    seen = Dtypes()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(TensorDataset(images.float(), tokens), batch_size=8))
    return seen


@pytest.mark.parametrize("micro", [None, 4], ids=["one-shot", "gradient-cached"])
def test_bf16_mixed_runs_the_blocks_in_bf16_and_the_loss_in_fp32(micro):
    seen = run("bf16-mixed", micro)
    assert seen.blocks == {torch.bfloat16}
    assert seen.losses == {torch.float32}


@pytest.mark.parametrize("micro", [None, 4], ids=["one-shot", "gradient-cached"])
def test_fp32_runs_everything_in_fp32(micro):
    seen = run("32-true", micro)
    assert seen.blocks == {torch.float32} and seen.losses == {torch.float32}


def test_the_tpu_paths_own_autocast_runs_the_blocks_in_bf16():
    """accelerator=tpu: fp32 weights (32-true) and bf16_autocast=true in the step."""
    seen = run("32-true", 4, bf16_autocast=True)
    assert seen.blocks == {torch.bfloat16} and seen.losses == {torch.float32}
