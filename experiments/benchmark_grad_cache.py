"""Gradient caching cost, side by side: one training step of the same samples as
(a) one-shot full batch, (b) plain micro-batch accumulation (per-micro-batch loss: fewer
negatives, not the same objective), (c) gradient caching (exact full-batch loss).

Prints median step time (and spread) per variant, the cached/plain time ratio, and the
peak resident memory of each variant measured in its own fresh process.

    python experiments/benchmark_grad_cache.py --model tiny --batch 128 --micro 32
    python experiments/benchmark_grad_cache.py --model vit_b16 --batch 32 --micro 8 --repeats 3
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import hydra
import torch
from hydra import compose, initialize_config_module

from flip.grad_cache import cached_backward
from flip.loss import contrastive_loss

VARIANTS = ("one_shot", "accumulate", "cached")


def build(model: str, mask: float):
    """The model of ``conf/model/<model>`` (installed as ``flip.conf``), its training
    objective and input size."""
    with initialize_config_module(config_module="flip.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"mask={mask}", "output_dir=/tmp"])
    if model != "tiny":
        cfg.data.image_size = 224
    return (hydra.utils.instantiate(cfg.model).train(), hydra.utils.instantiate(cfg.objective),
            cfg.data.image_size)


def step(variant: str, model, objective, images, tokens, micro: int) -> None:
    if variant == "one_shot":
        contrastive_loss(*model(images, tokens)).backward()
    elif variant == "accumulate":
        n = images.shape[0] // micro
        for i in range(0, images.shape[0], micro):
            (contrastive_loss(*model(images[i:i + micro], tokens[i:i + micro])) / n).backward()
    else:
        cached_backward(model, objective, images, tokens, micro)
    model.zero_grad(set_to_none=True)


def measure(variant: str, args) -> dict:
    """Run in a fresh process: warm-up, timed repeats, peak RSS above the model's."""
    torch.manual_seed(0)
    model, objective, size = build(args.model, args.mask)
    images = torch.randn(args.batch, 3, size, size)
    tokens = torch.randint(1, 30522, (args.batch, 32))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(variant, model, objective, images, tokens, args.micro)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(variant, model, objective, images, tokens, args.micro)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base  # KiB on Linux
    return {"variant": variant, "times": times, "peak_mib": peak / 1024}


def run_variants(script: str, argv: list[str], variants, rounds: int) -> dict[str, list[dict]]:
    """``script argv --variant v`` for every variant, each in a fresh process (its own
    peak RSS), ``rounds`` times interleaved so that drifting load hits all alike; the
    json line each child prints last, by variant."""
    rows = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            out = subprocess.run([sys.executable, script, *argv, "--variant", variant],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-3000:]}")
            rows[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--mask", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    results = {v: {"times": [], "peak_mib": []} for v in VARIANTS}
    for variant, rows in run_variants(__file__, sys.argv[1:], VARIANTS, args.rounds).items():
        for row in rows:
            results[variant]["times"] += row["times"]
            results[variant]["peak_mib"].append(row["peak_mib"])
    print(f"model={args.model} batch={args.batch} micro={args.micro} mask={args.mask} "
          f"threads={torch.get_num_threads()} repeats={args.repeats}x{args.rounds}\n")
    print("| variant | step time median (s) | min–max (s) | peak RSS above model (MiB) |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        t, m = results[variant]["times"], results[variant]["peak_mib"]
        print(f"| {variant} | {statistics.median(t):.3f} | {min(t):.3f}–{max(t):.3f} | "
              f"{statistics.median(m):.0f} |")
    median = {v: statistics.median(results[v]["times"]) for v in VARIANTS}
    print(f"\ncached / accumulate time: {median['cached'] / median['accumulate']:.2f}x; "
          f"cached / one-shot: {median['cached'] / median['one_shot']:.2f}x")


if __name__ == "__main__":
    main()
