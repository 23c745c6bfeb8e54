"""FLIP vs OpenCLIP training-step benchmark at several mask ratios.

    python experiments/benchmark.py --arch vit_b16 --batch 32 --threads 1 --repeats 3
    python experiments/benchmark.py --arch vit_b16 --batch 32 --threads 1 --adamw fused  # both
    python experiments/benchmark.py --arch vit_l16 --device cuda --dtype bf16 --batch 128
    python experiments/benchmark.py --arch vit_l16 --flops-only   # Table 1a's FLOPs, instantly

Prints a markdown table (FLOPs per sample, step time, memory, ratios to mask 0 and to
OpenCLIP, the paper's Table 1a figures; by default each project with its shipped AdamW)
and writes it with the raw numbers to ``<out>.md`` and ``<out>.json`` (default
``experiments/results/benchmark-<arch>-<device>``).
The measuring code is ``experiments/step_benchmark.py``.
"""

import argparse
import json
import sys
from pathlib import Path

from step_benchmark import ADAMW, IMPLS, Settings, run_benchmark, to_markdown

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="tiny", help="a conf/model option: tiny, vit_b16, vit_l16, …")
    p.add_argument("--image-size", type=int, default=None, help="default: 64 for tiny, else 224")
    p.add_argument("--batch", type=int, default=32, help="micro-batch per step")
    p.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 0.75],
        help="mask ratios; the first is the reference for the ratios",
    )
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: autocast of the forward pass",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row, interleaved")
    p.add_argument("--attention", choices=["fused", "math"], default="fused")
    p.add_argument(
        "--adamw",
        choices=ADAMW,
        default="shipped",
        help="shipped: each project's own AdamW as its training builds it; else "
        "this implementation with FLIP's values for both",
    )
    p.add_argument(
        "--memory",
        choices=["after", "beside"],
        default="after",
        help="measure memory (each row in its own process) after the timed steps, "
        "or beside them: sooner where a core is free, a load on the timing",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile(dynamic=False) of forward + loss for both models",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last images and conv weights (default: on for CUDA)",
    )
    p.add_argument(
        "--profile",
        type=float,
        default=None,
        metavar="RATIO",
        help="also print torch.profiler's top ops of one step at this mask ratio",
    )
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="count FLOPs only (meta device: instant even for ViT-H), no timing",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output path without suffix (writes .json and .md)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    settings = Settings(
        arch=a.arch,
        image_size=a.image_size,
        batch=a.batch,
        ratios=tuple(a.ratios),
        impls=tuple(a.impls),
        device=a.device,
        dtype=a.dtype,
        threads=a.threads,
        warmup=a.warmup,
        repeats=a.repeats,
        attention=a.attention,
        adamw=a.adamw,
        memory=a.memory,
        compile=a.compile,
        channels_last=a.channels_last,
        profile=a.profile,
        flops_only=a.flops_only,
    )
    result = run_benchmark(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    command = "python experiments/benchmark.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    result["meta"]["command"] = command
    table = f"`{command}`\n\n{to_markdown(result)}\n"
    print(table)
    out = a.out or RESULTS / f"benchmark-{a.arch}-{a.device.split(':')[0]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
