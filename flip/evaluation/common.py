"""Pieces shared by the evaluation LightningModules: weights, sampling, batching."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from flip.config import ConfigError

log = logging.getLogger(__name__)


def flip_state_dict(ckpt_path) -> dict[str, torch.Tensor]:
    """The FLIP model weights of a checkpoint: a Lightning checkpoint of the pre-training
    module (``state_dict`` keys ``model.*``; the prefix is stripped) or a plain state dict."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state


def load_model(model_cfg, ckpt_path) -> nn.Module:
    """``hydra.utils.instantiate(model_cfg)`` with the checkpoint's weights, in eval mode.

    Independent of the training module: only the FLIP weights are read."""
    model = hydra.utils.instantiate(model_cfg)
    state = flip_state_dict(ckpt_path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ConfigError(
            f"the weights in {ckpt_path} do not fit model={model_cfg.get('_target_')} as "
            f"configured (pass the model group/overrides used for training): {' '.join(first[:2])}"
        ) from None
    return model.eval()


class Indexed(Dataset):
    """Prepend the sample index to every item: (index, *item)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return (i, *item) if isinstance(item, tuple) else (i, item)


class StridedSampler(Sampler[int]):
    """Indices rank, rank + world, … : every sample exactly once over all processes
    (no padding, unlike ``DistributedSampler``; evaluation metrics stay exact)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return max(0, math.ceil((self.size - self.rank) / self.world))


class EvalModule(L.LightningModule):
    """Base of the evaluation modules: a frozen model and its own test loader."""

    def __init__(self, model: nn.Module, dataset: Dataset, batch_size: int = 256,
                 num_workers: int = 0):
        super().__init__()
        self.model, self.dataset = model, dataset
        self.batch_size, self.num_workers = batch_size, num_workers
        self.model.requires_grad_(False)
        self.results: dict[str, float] = {}

    def collate(self, batch):
        return torch.utils.data.default_collate(batch)

    def test_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer else (0, 1)
        ds = Indexed(self.dataset)
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                          sampler=StridedSampler(len(ds), rank, world), collate_fn=self.collate,
                          persistent_workers=False)

    def publish(self, results: dict[str, float]) -> None:
        """Keep the final numbers (identical on every process) and log them."""
        self.results = {k: float(v) for k, v in results.items()}
        for k, v in self.results.items():
            self.log(f"test/{k}", v, rank_zero_only=True)
