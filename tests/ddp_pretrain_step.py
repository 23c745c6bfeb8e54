"""One PretrainModule step under Lightning DDP on 2 CPU (gloo) processes; each rank saves
its synchronised gradients and how many gradient all-reduces DDP ran (a counting comm
hook around DDP's own all-reduce). Run by tests/test_grad_cache.py:
    python tests/ddp_pretrain_step.py OUT_DIR MICRO_BATCH
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_grad_cache import batch, tiny_flip  # noqa: E402  (one model/data definition)

from flip.tasks.pretrain import PretrainModule  # noqa: E402

NOISE_SEED = 1000  # the module seeds step 0 of rank r with NOISE_SEED + r


ALL_REDUCES = []  # one entry per gradient bucket all-reduced by DDP


def counting_allreduce(state, bucket):
    ALL_REDUCES.append(bucket.index())
    return default_hooks.allreduce_hook(state, bucket)


def build_model():
    return tiny_flip()


def dataset():
    return batch(8, seed=1)


class Capture(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_start(self, trainer, module):
        # Lightning registers comm hooks on CUDA only; the DDP wrapper takes one on gloo too
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        # the sampler's shuffled share of this rank, for the test's reference computation
        torch.save(batch, self.out / f"batch{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        module.captured = {"grads": grads}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        module.captured["loss"] = outputs["loss"].detach() if isinstance(outputs, dict) else outputs
        torch.save(module.captured, self.out / f"rank{trainer.global_rank}.pt")
        if trainer.global_rank == 0:
            meta = {
                "world_size": trainer.world_size,
                "all_reduces": len(ALL_REDUCES),
                "micro_batches": float(trainer.callback_metrics["train/micro_batches"]),
            }
            (self.out / "meta.json").write_text(json.dumps(meta))


def main(out: Path, micro: int) -> None:
    module = PretrainModule(
        build_model(),
        global_batch=8,
        total_samples=8,
        warmup_samples=0,
        micro_batch=micro,
        base_lr=1e-3,
        seed=NOISE_SEED,
        image_mask={"ratio": 0.5},
    )
    loader = DataLoader(TensorDataset(*dataset()), batch_size=4, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Capture(out)],
    )
    trainer.fit(module, loader)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
