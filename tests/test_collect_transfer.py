"""experiments/collect_transfer.py on synthetic result.json files of 3 seeds per row: the
rows found from each run's config, mean ± std and the 2-standard-error verdict against hand
computation, and the written markdown/CSV."""

import csv
import json
import math
from pathlib import Path

import collect_transfer

FINETUNE = "flip.tasks.finetune.FinetuneModule"
VQA = "flip.tasks.vqa.VQAModule"


def write_run(root: Path, name: str, seed: int, target: str, metrics: dict, **config) -> None:
    run = root / f"{name}_s{seed}"
    run.mkdir(parents=True)
    task = {"_target_": target, **config.pop("task", {})}
    record = {
        "metrics": {"time/train_cpu_s": 100.0 + seed, **metrics},
        "config": {"seed": seed, "task": task, "data": config.pop("data", {}), **config},
    }
    (run / "result.json").write_text(json.dumps(record))


def test_rows_spread_and_verdict_by_hand(tmp_path):
    tops = {"pre": [0.34, 0.36, 0.35], "probe": [0.28, 0.29, 0.27], "scratch": [0.35, 0.33, 0.34]}
    for seed in range(3):
        write_run(tmp_path, "ft", seed, FINETUNE, {"val/top1": tops["pre"][seed]})
        write_run(
            tmp_path,
            "probe",
            seed,
            FINETUNE,
            {"val/top1": tops["probe"][seed]},
            task={"freeze_encoder": True},
        )
        write_run(
            tmp_path,
            "scratch",
            seed,
            FINETUNE,
            {"val/top1": tops["scratch"][seed]},
            init_weights="random",
        )
        write_run(tmp_path, "vqa", seed, VQA, {"val/vqa_acc": 0.5 + seed / 100})
        write_run(
            tmp_path,
            "vqa_blind",
            seed,
            VQA,
            {"val/vqa_acc": 0.3},
            data={"shuffle_images": True},
        )
    lines = {
        (x["task"], x["start"]): x
        for x in collect_transfer.table(collect_transfer.read([tmp_path]))
    }
    assert set(lines) == {
        ("fine-tuning", "pre-trained"),
        ("fine-tuning", "linear probe"),
        ("fine-tuning", "random init"),
        ("VQA", "pre-trained"),
        ("VQA", "shuffled images"),
    }
    pre = lines[("fine-tuning", "pre-trained")]
    assert math.isclose(pre["top-1 %"], 35.0) and math.isclose(pre["top-1 % std"], 1.0)
    assert math.isclose(pre["train CPU s"], 101.0) and pre["seeds"] == "0,1,2"
    assert "pre-trained above it (> 2 SE)" not in pre
    # probe: 35 - 28 = 7 points, SE of the difference sqrt(1/3 + 1/3) = 0.82: beyond 2 SE
    assert lines[("fine-tuning", "linear probe")]["pre-trained above it (> 2 SE)"] is True
    # scratch: 35 - 34 = 1 point < 2 x 0.82: not a difference
    assert lines[("fine-tuning", "random init")]["pre-trained above it (> 2 SE)"] is False
    # a constant control (std 0) against a spread row: SE sqrt(1/3) x 1 point = 0.58
    assert lines[("VQA", "shuffled images")]["pre-trained above it (> 2 SE)"] is True
    assert math.isclose(lines[("VQA", "pre-trained")]["VQA acc. %"], 51.0)


def test_main_writes_markdown_and_csv(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "ft", seed, FINETUNE, {"val/top1": 0.30 + seed / 10})
    collect_transfer.main([str(tmp_path)])
    text = (tmp_path / "transfer.md").read_text()
    assert "## Table 3: fine-tuning\n\n| paper | task | start | top-1 % |" in text
    assert "| Table 3 | fine-tuning | pre-trained | 35.0 ± 7.1 |" in text
    with open(tmp_path / "transfer.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert math.isclose(float(row["top-1 %"]), 35.0) and row["seeds"] == "0,1"
