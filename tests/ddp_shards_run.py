"""ShardDataModule under Lightning DDP: 2 CPU (gloo) ranks x 2 loader workers, one pass
over the shards (``OnePass``: the stream ends, so every reader's counts are final).
Called by tests/test_data_shards.py (strategy="ddp_fork"), or on its own:
    python tests/ddp_shards_run.py SHARD_DIR OUT_DIR
Each rank writes the (shard:sample) ids of the captions its LightningModule received to
OUT_DIR/rank<r>.txt; rank 0 writes the DataQualityCallback totals (summed over ranks).
"""

import re
import sys
from pathlib import Path

import lightning as L
import torch

from flip.callbacks.data_quality import DataQualityCallback
from flip.data.shards import ShardDataModule, ShardStream


class OnePass(ShardDataModule):
    """The training DataModule with a finite stream: one pass over each reader's shards."""

    def stream(self) -> ShardStream:
        stream = super().stream()
        stream.passes = 1
        return stream


class Recorder(L.LightningModule):
    def __init__(self, out: Path):
        super().__init__()
        self.out, self.seen = out, []
        self.weight = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        images, tokens = batch
        assert type(batch) is tuple and images.shape == (4, 3, 16, 16)  # no stats on it
        tok = self.trainer.datamodule.tokenizer
        for row in tokens:
            m = re.fullmatch(r"shard (\d+) sample (\d+) a photo", tok.decode(row))
            self.seen.append(f"{m[1]}:{m[2]}")
        return (self.weight * images.mean()) ** 2

    def on_train_end(self):
        (self.out / f"rank{self.global_rank}.txt").write_text("\n".join(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Totals(L.Callback):
    def __init__(self, quality: DataQualityCallback, out: Path):
        self.quality, self.out = quality, out

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            t = self.quality.total
            counts = [f"samples={t.samples}", f"shards={t.shards}"]
            counts += [f"{r}={n}" for r, n in sorted(t.skipped.items())]
            (self.out / "totals.txt").write_text("\n".join(counts))


def main(shards: str, out: Path, strategy: str = "ddp") -> None:
    data = OnePass(
        shards,
        batch_size=4,
        image_size=16,
        num_workers=2,
        shuffle_buffer=0,
        skip_rate_min_samples=10**6,
    )
    quality = DataQualityCallback(every=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[quality, Totals(quality, out)],
    )
    trainer.fit(Recorder(out), datamodule=data)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
