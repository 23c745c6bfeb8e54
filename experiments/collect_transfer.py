"""Collect the transfer miniatures (paper Tables 3 and 7 in miniature) into one table: each
task's run from the pre-trained checkpoint beside its controls, mean ± std over seeds.

    python experiments/collect_transfer.py experiments/results/mini/transfer

A row is a task (fine-tuning, VQA, captioning) and a way of starting it, read from the
run's config: ``pre-trained`` (``init_from``'s weights), ``linear probe``
(``task.freeze_encoder=true``), ``random init`` (``init_weights=random``), ``shuffled
images`` (``data.shuffle_images=true``: VQA's question-only model, captioning's image-blind
decoder). Runs differing only in their seed are one row. Each control row says whether the
pre-trained row beats it beyond 2 standard errors of the difference (``seed_statistics``).
Writes ``transfer.md`` and ``transfer.csv`` into the directory (or ``--out``).

Tooling beside the library, as ``experiments/collect.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

try:
    from seed_statistics import differs, spread
except ImportError:  # imported as experiments.collect_transfer
    from experiments.seed_statistics import differs, spread

TASKS = {  # task module -> (name, paper table, the metrics reported: key, label, scale)
    "FinetuneModule": ("fine-tuning", "3", [("val/top1", "top-1 %", 100)]),
    "VQAModule": (
        "VQA",
        "7",
        [
            ("val/vqa_acc", "VQA acc. %", 100),
            ("val/vqa_acc_yes_no", "yes/no %", 100),
            ("val/vqa_acc_number", "number %", 100),
            ("val/vqa_acc_other", "other %", 100),
        ],
    ),
    "CaptioningModule": (
        "captioning",
        "7",
        [("test/CIDEr", "CIDEr", 1), ("test/BLEU-4", "BLEU-4", 1), ("test/METEOR", "METEOR", 1)],
    ),
}
START = "pre-trained"


def start(config: dict) -> str:
    """How the run started: pre-trained, or which control."""
    if config.get("init_weights", "pretrained") == "random":
        return "random init"
    if config["task"].get("freeze_encoder") and config["task"]["_target_"].endswith(
        "FinetuneModule"
    ):
        return "linear probe"
    if config["data"].get("shuffle_images"):
        return "shuffled images"
    return START


def read(dirs: list[Path]) -> dict[tuple[str, str], list[dict]]:
    """(task module, start) -> its seed runs' records (``result.json``), in path order."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(p for d in dirs for p in Path(d).rglob("result.json")):
        record = json.loads(path.read_text())
        task = record["config"]["task"]["_target_"].rsplit(".", 1)[-1]
        if task in TASKS:
            record["dir"] = str(path.parent)
            rows.setdefault((task, start(record["config"])), []).append(record)
    return rows


def table(rows: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """One line per (task, start): each metric's mean and std over seeds, the training CPU
    time, the seeds, and for a control whether the pre-trained row is above it beyond 2 SE
    of the difference in the task's first metric."""
    lines = []
    for task, (name, paper, metrics) in TASKS.items():
        starts = sorted((s for t, s in rows if t == task), key=lambda s: (s != START, s))
        for how in starts:
            runs = rows[(task, how)]
            line = {"paper": f"Table {paper}", "task": name, "start": how}
            for key, label, scale in metrics:
                s = spread(scale * r["metrics"].get(key, float("nan")) for r in runs)
                line[label], line[f"{label} std"] = s["mean"], s["std"]
            cpu = spread(r["metrics"].get("time/train_cpu_s", float("nan")) for r in runs)
            line["train CPU s"] = cpu["mean"]
            line["seeds"] = ",".join(str(r["config"].get("seed")) for r in runs)
            if how != START and (task, START) in rows:
                key, _, _ = metrics[0]
                ours = [r["metrics"][key] for r in rows[(task, START)]]
                theirs = [r["metrics"][key] for r in runs]
                line["pre-trained above it (> 2 SE)"] = sum(ours) / len(ours) > sum(theirs) / len(
                    theirs
                ) and differs(ours, theirs)
            line["run"] = runs[0]["dir"]
            lines.append(line)
    return lines


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if value != value else f"{value:.1f}"
    return str(value)


def to_markdown(lines: list[dict]) -> str:
    """Metrics as 'mean ± std' cells; columns in first-seen order."""
    columns = [c for line in lines for c in line if not c.endswith(" std")]
    columns = list(dict.fromkeys(columns))
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for line in lines:
        cells = []
        for c in columns:
            value, std = line.get(c, ""), line.get(f"{c} std")
            cell = _fmt(value)
            if std is not None and std == std:
                cell += f" ± {std:.1f}"
            cells.append(cell)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--out", type=Path, default=None, help="default: the first directory")
    args = parser.parse_args(argv)
    rows = read(args.dirs)
    if not rows:
        raise SystemExit("no transfer runs found (no result.json of a transfer task)")
    lines = table(rows)
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    text = "# Transfer miniatures: pre-trained vs controls (mean ± std over seeds)\n"
    for task in dict.fromkeys(line["task"] for line in lines):
        mine = [line for line in lines if line["task"] == task]
        text += f"\n## {mine[0]['paper']}: {task}\n\n" + to_markdown(mine)
    (out / "transfer.md").write_text(text)
    columns = list(dict.fromkeys(c for line in lines for c in line))
    with open(out / "transfer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(lines)
    print((out / "transfer.md").read_text())
    return out / "transfer.md"


if __name__ == "__main__":
    main()
