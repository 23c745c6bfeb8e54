"""Long runs stay flat: resident memory and step time over a long CPU training run.

Runs ``flip.run.train`` on the default config (tiny model, embedded shapes data, one
loader worker) for ``--steps`` optimiser steps with held-out zero-shot evaluation and a
periodic checkpoint every ``--every`` steps, and records after every training step

- the step time (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward,
  optimiser; evaluation and checkpointing happen outside it and are not counted),
- the resident memory of the training process and of its descendants (the loader workers),
  and their proportional set size (PSS: shared pages split between the processes, so the
  sum is not inflated by the workers' copy-on-write pages), read from ``/proc``.

Then it fits a least-squares line to each series after ``--skip`` warm-up steps and prints
the slope (MB or ms per 1000 steps) with the means of the first and last ``--window``
steps. A leak in a loader worker, the metric state or the checkpoint path shows up as a
positive memory slope. Writes ``<out>.md`` (the table, the command, the commit) and
``<out>.json`` (every step's record).

    python experiments/long_run.py --steps 2000 --every 200 --threads 1 \\
        --out experiments/results/long-run-tiny-cpu
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
SERIES = {  # record key: (unit, what)
    "step_ms": ("ms", "step time (forward, backward, optimiser), wall clock"),
    "step_cpu_ms": ("ms", "step CPU time of the training process (robust to a shared machine)"),
    "rss_main_mb": ("MB", "RSS of the training process"),
    "rss_workers_mb": ("MB", "RSS of the loader workers (sum)"),
    "pss_total_mb": ("MB", "PSS of the process tree (sum)"),
}


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the process or thread ended meanwhile
                continue
            out += children
            todo += children
    return out


def _field_kb(path: str, field: str) -> float:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:  # the process ended meanwhile
        pass
    return 0.0


def memory_mb(pid: int) -> dict[str, float]:
    """RSS of ``pid``, summed RSS of its descendants and summed PSS of all, in MB."""
    kids = _descendants(pid)
    return {
        "rss_main_mb": _field_kb(f"/proc/{pid}/status", "VmRSS") / 1024,
        "rss_workers_mb": sum(_field_kb(f"/proc/{k}/status", "VmRSS") for k in kids) / 1024,
        "pss_total_mb": sum(_field_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in [pid, *kids])
        / 1024,
        "processes": 1 + len(kids),
    }


class StepRecorder(L.Callback):
    """Appends one JSON line per training step to ``path``: step, step time, memory."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._start = self._cpu = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step_ms = (time.perf_counter() - self._start) * 1000
        cpu_ms = (time.process_time() - self._cpu) * 1000
        record = {
            "step": trainer.global_step,
            "step_ms": step_ms,
            "step_cpu_ms": cpu_ms,
            **memory_mb(os.getpid()),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def slope_table(records: list[dict], skip: int, window: int) -> list[dict]:
    """Per series: least-squares slope per 1000 steps after ``skip`` steps, and the means
    of the first and last ``window`` steps of that range."""
    kept = [r for r in records if r["step"] > skip]
    steps = np.array([r["step"] for r in kept], dtype=float)
    rows = []
    for key, (unit, what) in SERIES.items():
        if key not in kept[0]:  # a series older records lack
            continue
        values = np.array([r[key] for r in kept], dtype=float)
        slope = np.polyfit(steps, values, 1)[0] * 1000
        first, last = values[:window].mean(), values[-window:].mean()
        rows.append(
            {
                "series": key,
                "what": what,
                "unit": unit,
                "slope_per_1000_steps": float(slope),
                "first_mean": float(first),
                "last_mean": float(last),
                "median": float(np.median(values)),
            }
        )
    return rows


def format_table(rows: list[dict], skip: int, window: int, n: int) -> str:
    lines = [
        f"| series | slope per 1000 steps | mean of steps {skip + 1}–{skip + window} "
        f"| mean of the last {window} | median |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        u = r["unit"]
        lines.append(
            f"| {r['what']} | {r['slope_per_1000_steps']:+.2f} {u} | {r['first_mean']:.1f} {u} "
            f"| {r['last_mean']:.1f} {u} | {r['median']:.1f} {u} |"
        )
    lines.append(f"\n{n} steps fitted (steps {skip + 1}–{skip + n}).")
    return "\n".join(lines)


def run(steps: int, every: int, workdir: Path, overrides: list[str]) -> list[dict]:
    """Train ``steps`` steps of the default config, evaluating and checkpointing every
    ``every`` steps; the per-step records."""
    from flip.run import train

    trace = workdir / "steps.jsonl"
    trace.unlink(missing_ok=True)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"output_dir={workdir}",
                f"trainer.val_check_interval={every}",
                f"callbacks.checkpoint.every_n_train_steps={every}",
                "trainer.enable_progress_bar=false",
                "+callbacks.long_run._target_=long_run.StepRecorder",
                f"+callbacks.long_run.path={trace}",
                *overrides,
            ],
        )
    cfg.schedule.total_samples = steps * cfg.batch["global"]
    train(cfg)
    return [json.loads(line) for line in trace.read_text().splitlines()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=200, help="steps between eval and checkpoint")
    p.add_argument(
        "--skip", type=int, default=300, help="steps left out of the fit (warm-up, first eval)"
    )
    p.add_argument("--window", type=int, default=200, help="steps of the first/last means")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=None, help="run output (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    p.add_argument("overrides", nargs="*", help="more train.py overrides")
    args = p.parse_args(argv)
    if args.steps <= args.skip:
        p.error(f"--steps={args.steps} must exceed --skip={args.skip}")
    torch.set_num_threads(args.threads)
    commit = subprocess.run(  # the code this run imports
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        start = time.time()
        records = run(args.steps, args.every, workdir, args.overrides)
        wall = time.time() - start
    window = min(args.window, args.steps - args.skip)
    rows = slope_table(records, args.skip, window)
    table = format_table(rows, args.skip, window, len(records) - args.skip)
    print(table)
    if args.out is not None:
        command = "python experiments/long_run.py " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        meta = {
            "command": command,
            "commit": commit,
            "steps": args.steps,
            "every": args.every,
            "skip": args.skip,
            "window": window,
            "threads": args.threads,
            "wall_s": wall,
            "load_average": os.getloadavg(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"meta": meta, "rows": rows, "records": records}) + "\n"
        )
        args.out.with_suffix(".md").write_text(
            f"# Long run: memory and step time over {args.steps} steps\n\n"
            f"`{command}` at commit {commit}; {args.threads} thread(s), {os.cpu_count()} "
            f"cores, load average at the end {meta['load_average'][0]:.2f}, "
            f"{wall / 60:.1f} min wall. Evaluation and a checkpoint every {args.every} steps; "
            f"the first {args.skip} steps (warm-up) are left out of the fit.\n\n{table}\n"
        )
    return {"rows": rows, "records": records}


if __name__ == "__main__":
    main()
