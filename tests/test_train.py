"""End-to-end runs of `train(cfg)` on the real configs with a very small model."""

import csv

import hydra
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flip.checkpoint import build_model, load_checkpoint
from flip.errors import ConfigError
from flip.run import train
from flip.tokenizer import Tokenizer
from tests.conftest import compose_fast


def read_metrics(root) -> list[dict]:
    (path,) = root.glob("logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def by_step(rows, key) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@torch.no_grad()
def plain_zero_shot_top1(ckpt, cfg) -> float:
    """Held-out top-1 of a checkpoint by a plain loop (no evaluation code of flip): class
    embedding = normalised mean of the normalised prompt embeddings, image by image."""
    model = build_model(ckpt)
    ds = hydra.utils.instantiate(cfg.data.zeroshot)
    tokenize = Tokenizer(cfg.model.text.context_length)
    classes = torch.stack(
        [
            F.normalize(
                F.normalize(
                    model.encode_text(tokenize([t.format(c) for t in ds.templates])), dim=-1
                ).mean(0),
                dim=0,
            )
            for c in ds.classnames
        ]
    )
    correct = sum(
        int((model.encode_image(image[None]) @ classes.T).argmax() == label) for image, label in ds
    )
    return correct / len(ds)


@pytest.fixture
def image_block_inputs(monkeypatch):
    """The token count of every training pass of the image tower, measured where the
    tokens enter its first block (class token included)."""
    import flip.models.image_encoder as image_encoder

    original, seen = image_encoder.run_blocks, []

    def run_blocks(blocks, x, checkpointing):
        if blocks.training:  # held-out zero-shot passes run in eval mode
            seen.append(x.shape[1])
        return original(blocks, x, checkpointing)

    monkeypatch.setattr(image_encoder, "run_blocks", run_blocks)
    return seen


def test_default_pipeline_trains_and_reports_zero_shot(
    fast_cfg, tmp_path, capsys, image_block_inputs
):
    cfg = fast_cfg()
    metrics = train(cfg)
    assert metrics["val/zeroshot_top1"] == pytest.approx(
        plain_zero_shot_top1(tmp_path / "checkpoints" / "last.ckpt", cfg), abs=1e-6
    )
    assert metrics["train/samples_seen"] == 64.0  # 4 steps of the 16-sample global batch
    assert image_block_inputs == [1 + 32] * 4  # 4 steps: class token + int(64 (1 - 0.5)) patches
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        line == f"held-out zero-shot top-1: {100 * metrics['val/zeroshot_top1']:.1f}% (chance 2.5%)"
    )
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_last_checkpoint_holds_the_final_step_mid_epoch(fast_cfg, tmp_path):
    train(fast_cfg("data.train.size=1000"))  # 4 steps of a 62-step epoch
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_digits_pipeline(fast_cfg, tmp_path, capsys):
    cfg = fast_cfg("data=digits")
    metrics = train(cfg)
    assert metrics["val/zeroshot_top1"] == pytest.approx(
        plain_zero_shot_top1(tmp_path / "checkpoints" / "last.ckpt", cfg), abs=1e-6
    )
    assert "(chance 10.0%)" in capsys.readouterr().out


def test_csv_pipeline(fast_cfg, tmp_path):
    rows = ["image_path,caption"]
    for i in range(20):
        Image.new("RGB", (40, 30), (12 * i, 0, 255 - 12 * i)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a colour number {i}")
    rows.append("missing.png,never loaded")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    metrics = train(
        fast_cfg(
            "data=csv",
            f"data.train.path={tmp_path / 'pairs.csv'}",
            "data.image_size=64",
            "trainer.log_every_n_steps=1",
            "batch.global=4",
            "schedule.total_samples=20",
            "data.max_skip_rate=0.5",
        )
    )
    # 20 readable rows of 21: 5 steps of 4 (drop_last), the missing image skipped and counted
    assert metrics["train/samples_seen"] == 20.0 and "val/zeroshot_top1" not in metrics
    assert metrics["data/skipped_missing_image"] == 1.0


def test_lr_schedule_is_scaled_warmed_up_and_cosine(fast_cfg, tmp_path):
    train(
        fast_cfg(
            "logger=csv",
            "trainer.log_every_n_steps=1",
            "schedule.total_samples=128",
            "schedule.warmup_samples=32",
            "schedule.base_lr=0.0256",
        )
    )
    lr = by_step(read_metrics(tmp_path), "train/lr")
    # peak 0.0256 x 16 / 256 = 0.0016; step s uses the schedule at (s + 1) x 16 samples:
    # warm-up to 32 samples (0.5, 1.0), then 0.5 (1 + cos(pi p)) for p = 1/6 … 6/6
    expected = [0.0008, 0.0016, 0.0014928203, 0.0012, 0.0008, 0.0004, 0.00010717968, 0.0]
    assert [lr[s] for s in sorted(lr)] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_resume_continues_step_count_and_schedule(fast_cfg, tmp_path_factory):
    common = (
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "schedule.total_samples=128",
        "callbacks.checkpoint.every_n_train_steps=4",
        "callbacks.checkpoint.save_top_k=-1",
    )
    full_dir, resumed_dir = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("resumed")

    train(compose_fast(*common, output_dir=full_dir))
    ckpt = full_dir / "checkpoints" / "step00000004.ckpt"
    assert load_checkpoint(ckpt)["global_step"] == 4
    train(compose_fast(*common, f"ckpt_path={ckpt}", output_dir=resumed_dir))
    full, resumed = read_metrics(full_dir), read_metrics(resumed_dir)
    lr_full, lr_resumed = by_step(full, "train/lr"), by_step(resumed, "train/lr")
    assert sorted(lr_resumed) == [4, 5, 6, 7]  # continues at step 4, stops at 8
    assert [lr_resumed[s] for s in range(4, 8)] == pytest.approx([lr_full[s] for s in range(4, 8)])
    seen = by_step(resumed, "train/samples_seen")
    assert [seen[s] for s in range(4, 8)] == [80.0, 96.0, 112.0, 128.0]
    # training time keeps counting from the checkpoint's, and only grows
    spent = load_checkpoint(ckpt)["callbacks"]["TrainingTime"]
    wall = by_step(resumed, "time/train_wall_s")
    assert spent["wall"] > 0 and spent["cpu"] > 0
    assert spent["wall"] < wall[4] < wall[5] < wall[6] < wall[7]


def test_unmasked_tuning_starts_from_the_checkpoint_at_mask_zero(
    fast_cfg, tmp_path_factory, image_block_inputs
):
    pre_dir, tune_dir = tmp_path_factory.mktemp("pre"), tmp_path_factory.mktemp("tune")
    train(compose_fast(output_dir=pre_dir))
    pretrained = pre_dir / "checkpoints" / "last.ckpt"
    cfg = compose_fast(
        "experiment=unmasked_tuning",
        f"init_from={pretrained}",
        "schedule.total_samples=64",
        "schedule.warmup_samples=16",
        output_dir=tune_dir,
    )
    assert cfg.mask == 0.0 and cfg.schedule.base_lr == 4e-8
    image_block_inputs.clear()  # pre-training's
    train(cfg)
    assert image_block_inputs == [1 + 64] * 4  # all 64 patches: no masking
    before = load_checkpoint(pretrained)["state_dict"]
    after = load_checkpoint(tune_dir / "checkpoints" / "last.ckpt")["state_dict"]
    # a tiny learning rate: weights stay within 1e-4 of the pre-trained ones
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-4
    assert any(not torch.equal(before[k], after[k]) for k in before)  # but they did train


def test_mask_075_encodes_a_quarter_of_the_patches_in_training(fast_cfg, image_block_inputs):
    train(fast_cfg("mask=0.75", "schedule.total_samples=32"))
    assert image_block_inputs == [1 + 16] * 2  # 2 steps: class token + int(64 (1 - 0.75))


def test_invalid_mask_fails_before_training(fast_cfg):
    with pytest.raises(ConfigError, match="mask=1.0"):
        train(fast_cfg("mask=1.0"))


def step_losses(*overrides, output_dir) -> list[float]:
    train(
        compose_fast("logger=csv", "trainer.log_every_n_steps=1", *overrides, output_dir=output_dir)
    )
    loss = by_step(read_metrics(output_dir), "train/loss")
    return [loss[s] for s in sorted(loss)]


def test_gradient_caching_run_equals_the_one_shot_run(tmp_path_factory):
    """batch.micro=4: 4 micro-batches per step, and every step's loss is the one-shot
    run's (same masks, exact gradients)."""
    plain = step_losses(output_dir=tmp_path_factory.mktemp("plain"))
    cached_dir = tmp_path_factory.mktemp("cached")
    cached = step_losses("batch.micro=4", output_dir=cached_dir)
    assert by_step(read_metrics(cached_dir), "train/micro_batches")[0] == 4.0
    assert len(plain) == 4 and cached == pytest.approx(plain, rel=1e-5)


def test_activation_checkpointing_run_equals_the_plain_run(fast_cfg, tmp_path_factory):
    cfg = fast_cfg("activation_checkpointing=true")
    assert cfg.model.image.grad_checkpointing and cfg.model.text.grad_checkpointing
    plain = step_losses(output_dir=tmp_path_factory.mktemp("plain"))
    checkpointed = step_losses(
        "activation_checkpointing=true", output_dir=tmp_path_factory.mktemp("checkpointed")
    )
    assert len(plain) == 4 and checkpointed == pytest.approx(plain, rel=1e-6)


@pytest.mark.slow
def test_an_eager_cpu_run_beats_chance_several_fold(tmp_path):
    """A small model, 200 steps of 64 on the embedded shapes (about 2.5 CPU minutes):
    held-out zero-shot top-1 at least 4x chance (measured: 19.8 %, chance 2.5 %)."""
    from tests.conftest import compose_train

    cfg = compose_train(
        "model.image.width=64",
        "model.image.depth=2",
        "model.image.heads=2",
        "model.text.width=32",
        "model.text.depth=1",
        "model.text.heads=1",
        "model.embed_dim=64",
        "batch.global=64",
        "schedule.total_samples=12800",
        "schedule.warmup_samples=1280",
        "schedule.base_lr=4e-3",
        "data.zeroshot.size=400",
        "logger=none",
        "trainer.enable_progress_bar=false",
        output_dir=tmp_path,
    )
    top1 = train(cfg)["val/zeroshot_top1"]
    assert top1 >= 4 * (1 / 40), f"held-out top-1 {top1:.3f} is not 4x chance (0.025)"


def test_chained_unmasked_tuning_tunes_the_last_checkpoint_at_mask_zero(
    fast_cfg, tmp_path, image_block_inputs
):
    """unmasked_tuning=<schedule> (Table 1e in one run): pre-training, then tuning of its
    last.ckpt at mask 0 in <output_dir>/unmasked_tuning."""
    import json

    metrics = train(
        fast_cfg("logger=csv", "unmasked_tuning={base_lr:4e-8,total_samples:32,warmup_samples:16}")
    )
    pre, tuned_dir = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "unmasked_tuning"
    record = json.loads((tuned_dir / "result.json").read_text())
    assert record["config"]["mask"] == 0.0 and record["config"]["init_from"] == str(pre)
    assert record["config"]["schedule"] == {
        "base_lr": 4e-8,
        "total_samples": 32,
        "warmup_samples": 16,
    }
    assert "unmasked_tuning" in record["config"]["tags"]
    assert image_block_inputs == [1 + 32] * 4 + [1 + 64] * 2  # pre-training at 0.5, tuning at 0
    assert metrics["train/samples_seen"] == 32.0 and metrics["pretrain/train/samples_seen"] == 64.0
    assert metrics["val/zeroshot_top1"] == record["metrics"]["val/zeroshot_top1"]
    before = load_checkpoint(pre)["state_dict"]
    after = load_checkpoint(tuned_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-4
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train
