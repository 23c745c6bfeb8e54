"""bf16-mixed against fp32, measured on the real training step: PretrainModule.training_step
(forward, backward, AdamW, logit-scale clip, logging) driven by a Lightning Trainer with
``precision="32-true"`` or ``precision="bf16-mixed"``, one-shot and gradient-cached.

Every (step, precision) variant runs in its own fresh process (its own peak RSS),
``--rounds`` times interleaved; per variant: median and min–max step time (wall and
process CPU time) after one warm-up step, the process's peak RSS and its growth during
training (above the peak before the first step), and the dtypes of the first Transformer
blocks' MLP Linear outputs seen during the steps (bf16 where autocast really ran).
Writes ``<out>.md`` and ``<out>.json``, with the machine load and the CPU. On a shared
machine pass ``--threads 1``: with more intra-op threads than free cores, OpenMP threads
spin at every op's barrier while a sibling is descheduled, and small ops get many times
slower (wall and CPU time alike).

    python experiments/benchmark_precision.py --model tiny --batch 128 --micro 32 \\
        --threads 1 --repeats 5 --rounds 2 --out experiments/results/precision-tiny-cpu
    python experiments/benchmark_precision.py --model vit_b16 --batch 32 --micro 8 \\
        --threads 1 --repeats 1 --rounds 1 --out experiments/results/precision-vit_b16-cpu
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from benchmark_grad_cache import build, run_variants  # experiments/benchmark_grad_cache.py
from torch.utils.data import DataLoader

from flip.tasks.pretrain import PretrainModule

MODES = ("one_shot", "cached")
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}  # short name: Trainer precision
VARIANTS = tuple(f"{m}/{p}" for m in MODES for p in PRECISIONS)


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StepProbe(L.Callback):
    """Wall and CPU time of every training step; the output dtypes of the first block's
    MLP Linear of each tower and the loss dtype; peak RSS when training starts."""

    def __init__(self):
        self.wall, self.cpu, self.linear_dtypes, self.loss_dtypes = [], [], set(), set()

    def on_train_start(self, trainer, module):
        self.start_peak_mib = _max_rss_mib()
        for tower in (module.model.visual, module.model.text):
            tower.blocks[0].mlp.fc1.register_forward_hook(
                lambda m, i, out: self.linear_dtypes.add(str(out.dtype))
            )

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.process_time() - self._cpu)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss_dtypes.add(str(loss.dtype))


def measure(variant: str, args) -> dict:
    """One variant in this (fresh) process: a warm-up step, then ``args.repeats`` timed ones."""
    mode, precision = variant.split("/")
    load = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # same weights in every process
    model, objective, _, size = build(args.model, args.mask)  # the module draws the masks
    steps = 1 + args.repeats
    module = PretrainModule(
        model,
        global_batch=args.batch,
        total_samples=args.batch * steps,
        warmup_samples=0,
        objective=objective,
        image_mask={"ratio": args.mask, "kind": "random"},
        micro_batch=args.micro if mode == "cached" else None,
    )
    images = torch.randn(args.batch, 3, size, size)
    tokens = torch.randint(1, 30522, (args.batch, 32))
    probe = StepProbe()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=PRECISIONS[precision],
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[probe],
    )
    trainer.fit(module, DataLoader([(images, tokens)] * steps, batch_size=None))
    peak = _max_rss_mib()
    return {
        "variant": variant,
        "trainer_precision": trainer.precision,
        "image_size": size,
        "threads": torch.get_num_threads(),
        "times": probe.wall[1:],
        "cpu_times": probe.cpu[1:],
        "peak_rss_mib": peak,
        "growth_mib": peak - probe.start_peak_mib,
        "linear_dtypes": sorted(probe.linear_dtypes),
        "loss_dtypes": sorted(probe.loss_dtypes),
        "loadavg_at_start": load,
    }


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """Per step mode: medians over all repeats (times) and all processes (memory) of each
    precision, and bf16 / fp32 of each."""
    rows = []
    for mode in MODES:
        row = {"mode": mode}
        for p in PRECISIONS:
            r = runs[f"{mode}/{p}"]
            times = [t for x in r for t in x["times"]]
            row[p] = {
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "n": len(times),
                "cpu_median_s": statistics.median(t for x in r for t in x["cpu_times"]),
                "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in r),
                "growth_mib": statistics.median(x["growth_mib"] for x in r),
                "linear_dtypes": sorted({d for x in r for d in x["linear_dtypes"]}),
            }
        fp32, bf16 = row["fp32"], row["bf16"]
        row["time_ratio"] = bf16["median_s"] / fp32["median_s"]
        row["cpu_time_ratio"] = bf16["cpu_median_s"] / fp32["cpu_median_s"]
        row["rss_ratio"] = bf16["peak_rss_mib"] / fp32["peak_rss_mib"]
        # None: fp32 grew nothing measurable (in-process runs reuse the heap) — no ratio
        row["growth_ratio"] = (
            bf16["growth_mib"] / fp32["growth_mib"] if fp32["growth_mib"] else None
        )
        rows.append(row)
    return rows


def machine() -> dict:
    """CPU model, its bf16/AMX flags, what torch sees, the load average now."""
    model, flags = platform.processor(), []
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = sorted(
                    f for f in line.split(":", 1)[1].split() if "bf16" in f or "amx" in f
                )
                break
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpu_bf16_amx_flags": flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_avx512_bf16": torch._C._cpu._is_avx512_bf16_supported(),
        "torch_amx": torch._C._cpu._is_amx_tile_supported(),
        "loadavg": os.getloadavg(),
    }


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def to_markdown(result: dict) -> str:
    m, s = result["meta"], result["meta"]["settings"]
    lines = [
        f"bf16-mixed vs fp32 training step (Lightning Trainer, PretrainModule), "
        f"model={s['model']} {m['image_size']}px batch={s['batch']} micro={s['micro']} "
        f"mask={s['mask']}, {s['repeats']} timed step(s) x {s['rounds']} process(es) per variant, "
        f"threads={m['threads']}, torch {m['torch']}, lightning {m['lightning']}",
        f"CPU: {m['cpu_model']} ({m['cpus']} CPUs), bf16/AMX flags: "
        f"{', '.join(m['cpu_bf16_amx_flags']) or 'none'}; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.2f}' for x in m['loadavg_start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in m['loadavg_end'])} at end",
        "",
        "| step | fp32 step (s) median [min–max] | bf16 step (s) median [min–max] | "
        "bf16/fp32 time | bf16/fp32 CPU time | peak RSS fp32 (MiB) | peak RSS bf16 (MiB) | "
        "bf16/fp32 RSS | growth fp32 (MiB) | growth bf16 (MiB) | bf16/fp32 growth | "
        "Linear out fp32 / bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        f, b = r["fp32"], r["bf16"]
        lines.append(
            f"| {r['mode']} | {f['median_s']:.3f} [{f['min_s']:.3f}–{f['max_s']:.3f}] | "
            f"{b['median_s']:.3f} [{b['min_s']:.3f}–{b['max_s']:.3f}] | {r['time_ratio']:.2f} | "
            f"{r['cpu_time_ratio']:.2f} | {f['peak_rss_mib']:.0f} | {b['peak_rss_mib']:.0f} | "
            f"{r['rss_ratio']:.2f} | {f['growth_mib']:.0f} | {b['growth_mib']:.0f} | "
            f"{_ratio(r['growth_ratio'])} | {','.join(f['linear_dtypes'])} / "
            f"{','.join(b['linear_dtypes'])} |"
        )
    lines += [
        "",
        "Peak RSS: the whole process's (Python, torch, Lightning, model, data, step); "
        "growth: peak RSS above its value before the first step (the steps' activations, "
        "gradients, optimiser state, autocast's bf16 weight copies). CPU time: the process's, "
        "all threads.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--micro", type=int, default=32, help="gradient-cached micro-batch")
    parser.add_argument("--mask", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved processes per variant")
    parser.add_argument("--threads", type=int, help="torch intra-op threads; default: torch's")
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return None
    start = machine()
    runs = run_variants(__file__, argv, VARIANTS, args.rounds)
    end = machine()
    settings = {k: v for k, v in vars(args).items() if k not in ("variant", "out")}
    meta = {
        "settings": settings,
        "command": " ".join(["python experiments/benchmark_precision.py", *argv]),
        "image_size": runs[VARIANTS[0]][0]["image_size"],
        "threads": runs[VARIANTS[0]][0]["threads"],
        "torch": torch.__version__,
        "lightning": L.__version__,
        **{k: v for k, v in start.items() if k != "loadavg"},
        "loadavg_start": start["loadavg"],
        "loadavg_end": end["loadavg"],
    }
    result = {"meta": meta, "runs": runs, "rows": summarise(runs)}
    markdown = to_markdown(result)
    print(markdown)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown)
    return result


if __name__ == "__main__":
    main()
