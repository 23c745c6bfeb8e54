"""PretrainModule through Lightning's XLA strategy on torch-xla's CPU device (PJRT_DEVICE=CPU),
the code path a TPU runs. Run by tests/test_xla.py:  python tests/xla_pretrain_steps.py OUT.json

Lightning refuses accelerator="tpu" without TPU metadata, so a test-only subclass of its
XLAAccelerator reports the one XLA:CPU device; everything else is Lightning's XLA code.
"""

import json
import os
import sys

os.environ.setdefault("PJRT_DEVICE", "CPU")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402
from lightning.pytorch.accelerators import XLAAccelerator  # noqa: E402
from lightning.pytorch.strategies import SingleDeviceXLAStrategy  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from flip.models.clip import FLIP  # noqa: E402
from flip.models.image_encoder import ImageEncoder  # noqa: E402
from flip.models.text_encoder import TextEncoder  # noqa: E402
from flip.tasks.pretrain import PretrainModule  # noqa: E402

STEPS, BATCH = 6, 16


class XLACPUAccelerator(XLAAccelerator):
    """Lightning's XLA accelerator, told that torch-xla's CPU device is available."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def auto_device_count() -> int:
        return 1

    @staticmethod
    def parse_devices(devices) -> int:
        return 1

    @staticmethod
    def get_parallel_devices(devices) -> list:
        return [torch_xla.device()]


def module(mask: float, micro: int | None) -> PretrainModule:
    torch.manual_seed(0)
    image = ImageEncoder(32, patch_size=8, width=32, depth=2, heads=2)
    text = TextEncoder(vocab_size=100, context_length=8, width=32, depth=1, heads=2)
    return PretrainModule(
        FLIP(image, text, embed_dim=16),
        global_batch=BATCH,
        total_samples=STEPS * BATCH,
        warmup_samples=BATCH,
        micro_batch=micro,
        base_lr=0.05,
        image_mask={"ratio": mask},
    )


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 100, (BATCH, 8), generator=g)
    data = TensorDataset(images.repeat(STEPS, 1, 1, 1), tokens.repeat(STEPS, 1))
    return DataLoader(data, batch_size=BATCH, shuffle=False, drop_last=True)


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def run(mask: float, xla: bool, micro: int | None = None) -> list[float]:
    losses = Losses()
    device = (
        dict(
            accelerator=XLACPUAccelerator(),
            strategy=SingleDeviceXLAStrategy(device=torch_xla.device()),
        )
        if xla
        else dict(accelerator="cpu")
    )
    trainer = L.Trainer(
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
        **device,
    )
    trainer.fit(module(mask, micro), loader())
    return losses.values


if __name__ == "__main__":
    result = {
        "device": str(torch_xla.device()),
        "xla_mask0": run(0.0, xla=True),
        "cpu_mask0": run(0.0, xla=False),
        "xla_mask50_cached": run(0.5, xla=True, micro=4),
    }
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
