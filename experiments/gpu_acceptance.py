"""The GPU acceptance run: one command, one table, a few minutes on one modern GPU.

    python experiments/gpu_acceptance.py                        # CUDA: ViT-B/16 and L/16, bf16-mixed
    python experiments/gpu_acceptance.py --device cpu --archs tiny --batch 8 --grad-cache-batch 16 \\
        --warmup 1 --repeats 2                                  # the same on CPU, tiny, in seconds

For each architecture, our model and OpenCLIP's ``PatchDropout`` CLIP of the same shape
(``experiments/step_benchmark.py``'s trainees: forward, contrastive loss, backward, each
project's shipped AdamW) take training steps at mask 0 / 0.5 / 0.75 under bf16 autocast,
the ratios interleaved. The table gives per row: step time (median), samples/s, the time
ratio to mask 0 beside the paper's Table 1a (0.50 / 0.33, ViT-L/16 on TPU) and the
analytic FLOPs ratio, and the peak memory of one step per sample (``max_memory_allocated``
above the start on CUDA; resident-set growth on CPU) with its ratio to mask 0. Below it:
which scaled-dot-product attention kernel our step ran (the op names of a profiled step;
fused = flash, memory-efficient or cuDNN, not the math fallback) with
``torch.backends.cuda``'s switches, and the gradient-caching overhead at 4 micro-batches
(``flip.grad_cache.cached_backward`` against the one-shot step of the same batch, mask
0.5, timed by ``experiments/benchmark_grad_cache.py``'s ``step``).

Writes ``<out>.md`` and ``<out>.json`` (default ``experiments/results/gpu-acceptance-<device>``).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from benchmark_grad_cache import build
from benchmark_grad_cache import step as grad_cache_step
from step_benchmark import (
    PAPER_TIME,
    Settings,
    _cpu_name,
    _sync,
    analytic_flops,
    model_config,
    peak_memory,
    trainees_and_step,
)
from torch.profiler import ProfilerActivity, profile

RESULTS = Path(__file__).resolve().parent / "results"
FUSED_SDPA = ("flash_attention", "efficient_attention", "cudnn_attention")
MATH_SDPA = "_scaled_dot_product_attention_math"
MICRO_BATCHES = 4


def timed(fn, device: torch.device) -> float:
    """Wall-clock seconds of ``fn`` (synchronised on CUDA)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def sdpa_kernels(fn, device: torch.device) -> dict:
    """The attention ops and (CUDA) kernels one call of ``fn`` ran, and whether fused."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    names = {e.key for e in prof.key_averages()}
    ops = sorted(n for n in names if "scaled_dot_product" in n or "attention" in n.lower())
    kernels = sorted(
        n
        for e in prof.events()
        if e.device_type.name == "CUDA"
        for n in [e.name]
        if any(k in n.lower() for k in ("flash", "fmha", "attention"))
    )
    fused = any(k in n for n in ops for k in FUSED_SDPA) and not any(MATH_SDPA in n for n in ops)
    return {"ops": ops, "cuda_kernels": sorted(set(kernels)), "fused": fused}


def sdpa_switches() -> dict:
    if not torch.cuda.is_available():
        return {}
    b = torch.backends.cuda
    return {
        "flash_attention_available": b.is_flash_attention_available(),
        "flash_sdp_enabled": b.flash_sdp_enabled(),
        "mem_efficient_sdp_enabled": b.mem_efficient_sdp_enabled(),
        "cudnn_sdp_enabled": b.cudnn_sdp_enabled(),
        "math_sdp_enabled": b.math_sdp_enabled(),
    }


def measure_steps(arch: str, a: argparse.Namespace, device: torch.device, log) -> dict:
    """Step times and peak memory of both implementations at every ratio; one
    implementation on the device at a time (an L/16 with AdamW state is ~7 GB)."""
    s = Settings(arch=arch, batch=a.batch, device=str(device), dtype="bf16", ratios=a.ratios)
    cfg = model_config(arch, s.resolved_image_size())
    out = {"image_size": cfg["image"]["image_size"], "rows": []}
    for impl in ("flip", "openclip"):
        times, memory, sdpa = measure_impl(impl, s, cfg, a, device, log)
        if impl == "flip":
            out["sdpa"] = sdpa
        base = statistics.median(times[a.ratios[0]])
        flops0 = analytic_flops(cfg, a.ratios[0], a.batch)["train"]
        mem0 = memory[a.ratios[0]]
        for r in a.ratios:
            sec, mem = statistics.median(times[r]), memory[r]
            out["rows"].append(
                {
                    "impl": impl,
                    "mask": r,
                    "step_s": sec,
                    "step_s_all": times[r],
                    "samples_per_s": a.batch / sec,
                    "time_ratio": sec / base,
                    "paper_time_ratio": PAPER_TIME.get(r),
                    "flops_ratio": analytic_flops(cfg, r, a.batch)["train"] / flops0,
                    "peak_bytes": mem,
                    "peak_mb_per_sample": None if mem is None else mem / 2**20 / a.batch,
                    "memory_ratio": None if mem is None or not mem0 else mem / mem0,
                }
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def measure_impl(impl: str, s: Settings, cfg: dict, a, device: torch.device, log):
    """Times per ratio (interleaved), the peak memory of one step per ratio and the
    attention kernels of one step at mask 0.5 of implementation ``impl``."""
    trainees, step = trainees_and_step(s, cfg, device, (impl,))
    t = trainees[impl]

    def one_step() -> None:
        step(impl)

    times = {r: [] for r in a.ratios}
    for rep in range(a.warmup + a.repeats):
        for r in a.ratios:
            t.set_mask(r)
            sec = timed(one_step, device)
            if rep >= a.warmup:
                times[r].append(sec)
            log(f"{s.arch} {impl} mask {r}: {sec:.4f} s")
    memory = {}
    for r in a.ratios:
        t.set_mask(r)
        memory[r] = peak_memory(one_step, device)
    t.set_mask(0.5 if 0.5 in a.ratios else a.ratios[-1])
    return times, memory, sdpa_kernels(one_step, device)


def measure_grad_cache(arch: str, a: argparse.Namespace, device: torch.device, log) -> dict:
    """Cached step over one-shot step of the same ``--grad-cache-batch`` samples, mask 0.5,
    4 micro-batches, bf16 autocast, interleaved."""
    model, objective, draw_masks, size = build(arch, 0.5)
    model.to(device)
    g = torch.Generator().manual_seed(0)
    B = a.grad_cache_batch
    images = torch.randn(B, 3, size, size, generator=g).to(device)
    tokens = torch.randint(1, 30522, (B, model.text.context_length), generator=g).to(device)
    times = {"one_shot": [], "cached": []}

    def run(variant: str) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            grad_cache_step(
                variant, model, objective, draw_masks, images, tokens, B // MICRO_BATCHES
            )

    for rep in range(a.warmup + a.repeats):
        for variant in times:
            sec = timed(lambda: run(variant), device)  # noqa: B023 (called at once)
            if rep >= a.warmup:
                times[variant].append(sec)
            log(f"{arch} grad cache {variant}: {sec:.4f} s")
    one_shot, cached = (statistics.median(times[v]) for v in ("one_shot", "cached"))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "batch": B,
        "micro_batches": MICRO_BATCHES,
        "one_shot_s": one_shot,
        "cached_s": cached,
        "times": times,
        "overhead": cached / one_shot,
    }


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    memory = "max_memory_allocated" if meta["device"].startswith("cuda") else "RSS growth"
    out = [
        f"`{meta['command']}`",
        "",
        f"{meta['machine']}, torch {meta['torch']}, open_clip {meta['open_clip']}, bf16 "
        f"autocast, micro-batch {meta['batch']}, {meta['repeats']} timed steps per row "
        f"after {meta['warmup']} warm-up (median, wall clock).",
        "",
        "| model | impl | mask | step s | samples/s | time ratio | paper Table 1a | "
        f"FLOPs ratio (analytic) | peak MB/sample ({memory}) | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, m in result["archs"].items():
        for r in m["rows"]:
            out.append(
                f"| {arch} {m['image_size']} px | {r['impl']} | {r['mask']:g} "
                f"| {r['step_s']:.4f} | {r['samples_per_s']:.1f} | {r['time_ratio']:.3f} "
                f"| {_fmt(r['paper_time_ratio'], '.2f')} | {r['flops_ratio']:.3f} "
                f"| {_fmt(r['peak_mb_per_sample'], '.1f')} | {_fmt(r['memory_ratio'], '.3f')} |"
            )
    out.append("")
    for arch, m in result["archs"].items():
        sdpa, gc = m["sdpa"], m["grad_cache"]
        kernels = (
            f"; CUDA kernels {', '.join(sdpa['cuda_kernels'])}" if sdpa["cuda_kernels"] else ""
        )
        out += [
            f"- {arch}: fused scaled-dot-product attention "
            f"{'**used**' if sdpa['fused'] else '**NOT used**'} (ops: "
            f"{', '.join(f'`{o}`' for o in sdpa['ops']) or 'none'}{kernels})",
            f"- {arch}: gradient caching at {gc['micro_batches']} micro-batches of "
            f"{gc['batch'] // gc['micro_batches']}: {gc['cached_s']:.4f} s vs one-shot "
            f"{gc['one_shot_s']:.4f} s = **{gc['overhead']:.2f}×**",
        ]
    if result["meta"]["sdpa_switches"]:
        out.append(f"- torch.backends.cuda: {result['meta']['sdpa_switches']}")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["vit_b16", "vit_l16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64, help="samples per timed step")
    p.add_argument(
        "--grad-cache-batch", type=int, default=128, help="global batch of the caching check"
    )
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="path without suffix")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.grad_cache_batch % MICRO_BATCHES:
        raise SystemExit(f"error: --grad-cache-batch must be a multiple of {MICRO_BATCHES}")
    import open_clip

    device = torch.device(a.device)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    archs = {}
    for arch in a.archs:
        archs[arch] = measure_steps(arch, a, device, log)
        archs[arch]["grad_cache"] = measure_grad_cache(arch, a, device, log)
    result = {
        "meta": {
            "command": "python experiments/gpu_acceptance.py "
            + " ".join(sys.argv[1:] if argv is None else argv),
            "device": a.device,
            "machine": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"{_cpu_name()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "batch": a.batch,
            "warmup": a.warmup,
            "repeats": a.repeats,
            "sdpa_switches": sdpa_switches(),
        },
        "archs": archs,
    }
    table = to_markdown(result)
    print(table)
    out = a.out or RESULTS / f"gpu-acceptance-{device.type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
