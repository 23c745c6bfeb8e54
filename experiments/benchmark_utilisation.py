"""How close a training step comes to the machine's own matmul peak, in one run.

    python experiments/benchmark_utilisation.py --models vit_b16:8 tiny:128 --threads 1 \\
        --profile 0.5 --compile 0.5 --out experiments/results/utilisation-cpu

For every model, dtype (fp32, bf16 autocast) and mask ratio: the training step of our model
(``experiments/step_benchmark.py``'s trainee: forward, contrastive loss, backward, the
shipped AdamW) is timed, interleaved over the ratios, and its achieved FLOP/s (the analytic
FLOPs of forward and backward, :func:`step_benchmark.analytic_flops`, ÷ step time) is
divided by the machine's matmul peak (:func:`step_benchmark.matmul_peak`: a large
``torch.mm`` at the same dtype and thread count, measured in the same run). On the CPU both
are timed by process CPU time, so other jobs on a shared machine do not count.

``--profile RATIO`` explains the gap at that ratio: torch.profiler's self time grouped
(matmuls, attention, layer norms, GELU, gathers and masking, optimiser, copies and casts,
the rest), and the rate of the Linear layers' own GEMMs (their FLOPs counted by
``FlopCounterMode`` ÷ the self time of ``aten::mm``/``aten::addmm``) against the peak.
``--compile RATIO`` also times the step with ``torch.compile`` of forward and loss at that
ratio: the first call (compilation) and the steps after it.

Writes ``<out>.md`` (the table, the command, the load) and ``<out>.json``.
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from step_benchmark import (
    Settings,
    _cpu_name,
    _sync,
    analytic_flops,
    matmul_peak,
    model_config,
    trainees_and_step,
)
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 0.75  # of the matmul peak, ViT-B/16 at mask 0.5
# profiler op names -> category (first match wins; the rest is "other")
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("gather / masking", ("gather", "scatter", "index", "sort", "rand", "take_along")),
    ("optimiser", ("adam", "_foreach", "lerp", "addcdiv", "clamp")),
    ("patch conv", ("convolution",)),
    ("copies / casts", ("copy_", "_to_copy", "clone", "contiguous", "cat")),
)


def category(op: str) -> str:
    for name, keys in CATEGORIES:
        if any(k in op for k in keys):
            return name
    return "other"


def _clock(device: torch.device):
    return time.perf_counter if device.type == "cuda" else time.process_time


def timed(step, device: torch.device) -> float:
    _sync(device)
    t0 = _clock(device)()
    step()
    _sync(device)
    return _clock(device)() - t0


def profile_step(step, device: torch.device) -> dict:
    """Self time of one step by category, and the Linear GEMMs' FLOP/s."""
    with FlopCounterMode(display=False) as counter:  # fused attention: Linear GEMMs only
        step()
    gemm_flops = sum(
        n
        for op, n in counter.get_flop_counts()["Global"].items()
        if str(op) in ("aten.mm", "aten.addmm")
    )
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    by_cat, other, gemm_us = defaultdict(float), {}, 0.0
    for e in prof.key_averages():
        us = getattr(e, attr)
        by_cat[category(e.key)] += us
        if category(e.key) == "other":
            other[e.key] = us
        if e.key in ("aten::mm", "aten::addmm"):
            gemm_us += us
    total = sum(by_cat.values())
    return {
        "share": {k: v / total for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "other_top": {k: v / total for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:6]},
        "profiled_s": total / 1e6,
        "gemm_flops": gemm_flops,
        "gemm_share": gemm_us / total,
    }


def measure(arch: str, batch: int, a: argparse.Namespace, log) -> list[dict]:
    """Rows of one model: every dtype and ratio, plus the profile and the compiled step."""
    device = torch.device(a.device)
    s = Settings(arch=arch, batch=batch, impls=("flip",), device=a.device, threads=a.threads)
    cfg = model_config(arch, s.resolved_image_size())
    rows = []
    for dtype in a.dtypes:
        sd = replace(s, dtype=dtype)
        peak = matmul_peak(dtype, device)
        log(f"{arch} {dtype}: matmul peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
        trainees, step = trainees_and_step(sd, cfg, device, ("flip",))
        t = trainees["flip"]
        times = {r: [] for r in a.ratios}
        for rep in range(a.warmup + a.repeats):
            for r in a.ratios:
                t.set_mask(r)
                sec = timed(partial(step, "flip"), device)
                if rep >= a.warmup:
                    times[r].append(sec)
                log(f"{arch} {dtype} mask {r}: {sec:.3f} s")
        for r in a.ratios:
            flops = analytic_flops(cfg, r, batch)["train"] * batch
            sec = statistics.median(times[r])
            rows.append(
                {
                    "arch": arch,
                    "batch": batch,
                    "image_size": cfg["image"]["image_size"],
                    "dtype": dtype,
                    "mask": r,
                    "compiled": False,
                    "step_s": sec,
                    "step_s_all": times[r],
                    "train_flops": flops,
                    "achieved_flops_per_s": flops / sec,
                    "peak_flops_per_s": peak["flops_per_s"],
                    "utilisation": flops / sec / peak["flops_per_s"],
                }
            )
        if a.profile is not None and a.profile in a.ratios:
            t.set_mask(a.profile)
            prof = profile_step(partial(step, "flip"), device)
            next(r for r in rows if r["dtype"] == dtype and r["mask"] == a.profile)["profile"] = (
                prof
            )
            log(f"{arch} {dtype} mask {a.profile} profile: {prof['share']}")
        del trainees, step, t
        if a.compile is not None:
            trainees, step = trainees_and_step(replace(sd, compile=True), cfg, device, ("flip",))
            trainees["flip"].set_mask(a.compile)
            first = timed(partial(step, "flip"), device)
            log(f"{arch} {dtype} compiled mask {a.compile}: first step {first:.1f} s")
            after = [timed(partial(step, "flip"), device) for _ in range(a.warmup + a.repeats)]
            after = after[a.warmup :]
            flops = analytic_flops(cfg, a.compile, batch)["train"] * batch
            sec = statistics.median(after)
            rows.append(
                {
                    "arch": arch,
                    "batch": batch,
                    "image_size": cfg["image"]["image_size"],
                    "dtype": dtype,
                    "mask": a.compile,
                    "compiled": True,
                    "compile_first_step_s": first,
                    "step_s": sec,
                    "step_s_all": after,
                    "train_flops": flops,
                    "achieved_flops_per_s": flops / sec,
                    "peak_flops_per_s": peak["flops_per_s"],
                    "utilisation": flops / sec / peak["flops_per_s"],
                }
            )
            del trainees, step
    return rows


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    clock = "wall clock" if meta["device"].startswith("cuda") else "process CPU time"
    out = [
        f"`{meta['command']}`",
        "",
        f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} threads, commit "
        f"{meta['commit']}; load average {'/'.join(f'{x:.2f}' for x in meta['loadavg_start'])}"
        f" at start, {'/'.join(f'{x:.2f}' for x in meta['loadavg_end'])} at end. Times are "
        f"{clock}, medians of {meta['repeats']} steps after {meta['warmup']} warm-up. "
        "Utilisation = analytic training FLOPs (forward + backward) ÷ step time ÷ the matmul "
        "peak measured in this run at the same dtype and threads.",
        "",
        "| model | micro-batch | dtype | mask | compiled | step s | train GFLOP/step "
        "| achieved GFLOP/s | matmul peak GFLOP/s | utilisation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        compiled = f"yes (first step {r['compile_first_step_s']:.0f} s)" if r["compiled"] else "no"
        out.append(
            f"| {r['arch']} {r['image_size']} px | {r['batch']} | {r['dtype']} | {r['mask']:g} "
            f"| {compiled} | {r['step_s']:.3f} | {r['train_flops'] / 1e9:.1f} "
            f"| {r['achieved_flops_per_s'] / 1e9:.1f} | {r['peak_flops_per_s'] / 1e9:.1f} "
            f"| **{r['utilisation']:.2f}** |"
        )
    b16 = [
        r
        for r in result["rows"]
        if r["arch"] == "vit_b16" and r["mask"] == 0.5 and not r["compiled"]
    ]
    for r in b16:
        met = "met" if r["utilisation"] >= GOAL else "MISSED"
        out.append(
            f"\n- ViT-B/16 mask 0.5 {r['dtype']}: {r['utilisation']:.2f} of the matmul peak "
            f"(goal ≥ {GOAL}: {met})"
        )
    for r in result["rows"]:
        if "profile" not in r:
            continue
        p = r["profile"]
        gemm_s = p["gemm_share"] * r["step_s"]
        out += [
            "",
            f"Profile of one {r['arch']} {r['dtype']} step at mask {r['mask']:g} "
            f"(torch.profiler self time, shares of the {p['profiled_s']:.2f} s profiled; the "
            "profiler's clock is the wall clock, so its absolute times count the machine's "
            f"load): the Linear layers' GEMMs (`aten::mm`, `aten::addmm`: "
            f"{p['gemm_share']:.1%} of the step) run {p['gemm_flops'] / 1e9:.1f} GFLOP in "
            f"{p['gemm_share']:.3f} × {r['step_s']:.3f} s (the step's CPU time above) = "
            f"{p['gemm_flops'] / gemm_s / 1e9:.1f} GFLOP/s, "
            f"**{p['gemm_flops'] / gemm_s / r['peak_flops_per_s']:.2f}** of the peak.",
            "",
            "| category | share of the step |",
            "|---|---|",
            *(f"| {k} | {v:.1%} |" for k, v in p["share"].items()),
            "",
            "Largest ops of the rest: "
            + ", ".join(f"`{k}` {v:.1%}" for k, v in p["other_top"].items())
            + ".",
        ]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["vit_b16:8", "tiny:128"],
        help="<conf/model option>:<micro-batch>",
    )
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", type=float, default=None, metavar="RATIO")
    p.add_argument("--compile", type=float, default=None, metavar="RATIO")
    p.add_argument("--out", type=Path, default=None, help="path without suffix")
    p.add_argument(
        "--render", type=Path, default=None, help="print the table of a written .json only"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.render:
        result = json.loads(a.render.read_text())
        print(to_markdown(result))
        return result
    if a.threads:
        torch.set_num_threads(a.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_start = os.getloadavg()
    # the code measured: HEAD when the run starts
    commit = os.popen("git -C " + str(RESULTS.parent) + " rev-parse --short HEAD").read().strip()
    rows = []
    for spec in a.models:
        arch, batch = spec.split(":")
        rows += measure(arch, int(batch), a, log)
    result = {
        "meta": {
            "command": "python experiments/benchmark_utilisation.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "commit": commit or "unknown",
            "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs"
            + (f", {torch.cuda.get_device_name()}" if a.device.startswith("cuda") else ""),
            "device": a.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "warmup": a.warmup,
            "repeats": a.repeats,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "rows": rows,
    }
    table = to_markdown(result)
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        a.out.with_suffix(".md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
