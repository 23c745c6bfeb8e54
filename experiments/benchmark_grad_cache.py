"""Gradient caching cost, side by side: one training step of the same samples as
(a) one-shot full batch, (b) plain micro-batch accumulation (per-micro-batch loss: fewer
negatives, not the same objective), (c) gradient caching (exact full-batch loss,
``flip/grad_cache.py``: the last micro-batch not replayed), (d) the same with
``keep_text_graph``, (e) gradient caching that replays every micro-batch (the library's
former path, kept here only as the baseline of the saving).

Every variant runs in its own fresh process (its own peak RSS), ``--rounds`` times
interleaved so that drifting load hits all alike; per variant: median and min–max of the
step's wall time and of the process CPU time after one warm-up step, and the peak RSS
above the model's. Ratios are to plain accumulation. On a shared machine pass
``--threads 1`` and read the CPU-time columns: with one thread a process's CPU time is
what its step costs, whatever else runs; wall time then also counts waiting for a core.
The ``components`` variant times one micro-batch's parts (graph-free forward of each
tower, forward-backward of both) for the cost model: caching / accumulation =
1 + (n - 1) / n x graph-free forward / forward-backward (the text tower left out of the
graph-free forward with ``keep_text_graph``). Writes ``<out>.md`` and ``<out>.json`` with
the load (``uptime``) at start and end.

Peak RSS depends on glibc's heap: freed activations stay in the process unless their
blocks were mmap'd, and glibc raises its mmap threshold as tensors are freed, so the
order of allocations moves the peak by tens of percent. For memory comparisons run with
``MALLOC_MMAP_THRESHOLD_=65536`` (children inherit it; every tensor beyond 64 KiB is
mmap'd and returned when freed, so peak RSS follows the live tensors; steps get slower).

    python experiments/benchmark_grad_cache.py --model tiny --batch 128 --micro 32 \\
        --threads 1 --repeats 10 --rounds 3 --out experiments/results/grad-cache-tiny-cpu
    python experiments/benchmark_grad_cache.py --model vit_b16 --batch 32 --micro 8 \\
        --threads 1 --repeats 1 --rounds 1 --variants components recompute \\
        cached_keep_text cached accumulate --out experiments/results/grad-cache-vit_b16-cpu-2
    MALLOC_MMAP_THRESHOLD_=65536 python experiments/benchmark_grad_cache.py --model tiny \\
        --batch 128 --micro 32 --threads 1 --repeats 3 --rounds 2 \\
        --out experiments/results/grad-cache-tiny-cpu-mmap
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_module

from flip.grad_cache import cached_backward
from flip.loss import contrastive_loss

VARIANTS = ("one_shot", "accumulate", "cached", "cached_keep_text", "recompute", "components")
BASELINE = "accumulate"


def build(model: str, mask: float):
    """The model of ``conf/model/<model>`` (installed as ``flip.conf``), its training
    objective, the training masks' draw (``PretrainModule.draw_masks``) and input size."""
    with initialize_config_module(config_module="flip.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"mask={mask}", "output_dir=/tmp"])
    if model != "tiny":
        cfg.data.image_size = 224
    module = hydra.utils.instantiate(cfg.task, _partial_=True)(
        model=hydra.utils.instantiate(cfg.model).train(),
        objective=hydra.utils.instantiate(cfg.objective),
    )  # draws the training masks as training does
    return module.model, module.objective, module.draw_masks, cfg.data.image_size


def recompute_backward(model, objective, images, tokens, masks, micro: int) -> None:
    """Gradient caching as the library did before the last micro-batch kept its graph:
    every micro-batch embedded without graph, then every one replayed (n + n forwards)."""
    B = images.shape[0]
    chunks = [slice(i, i + micro) for i in range(0, B, micro)]
    image_mask, text_mask = masks
    states, image_features, text_features = [], [], []
    with torch.no_grad():
        for c in chunks:
            states.append(torch.get_rng_state())
            image_features.append(model.encode_image(images[c], image_mask[c]))
            text_features.append(model.encode_text(tokens[c], text_mask[c]))
    after = torch.get_rng_state()
    image_all = torch.cat(image_features).requires_grad_()
    text_all = torch.cat(text_features).requires_grad_()
    scale = model.scale()
    grad_image, grad_text, grad_scale = torch.autograd.grad(
        objective.contrastive(image_all, text_all, scale), [image_all, text_all, scale]
    )
    for i, (c, state) in enumerate(zip(chunks, states)):
        torch.set_rng_state(state)
        features = model.forward_features(images[c], tokens[c], image_mask[c], text_mask[c])
        surrogate = (features.image * grad_image[c]).sum() + (features.text * grad_text[c]).sum()
        for term in objective.per_sample(features, images[c], tokens[c], B).values():
            surrogate = surrogate + term
        if i == len(chunks) - 1:
            surrogate = surrogate + model.scale() * grad_scale
        surrogate.backward()
    torch.set_rng_state(after)


def step(variant: str, model, objective, draw_masks, images, tokens, micro: int) -> None:
    masks = draw_masks(images.shape[0], images.device)
    if variant == "one_shot":
        contrastive_loss(*model(images, tokens, *masks)).backward()
    elif variant == "accumulate":
        n = images.shape[0] // micro
        for i in range(0, images.shape[0], micro):
            c = slice(i, i + micro)
            image_mask, text_mask = masks[0][c], masks[1][c]
            (contrastive_loss(*model(images[c], tokens[c], image_mask, text_mask)) / n).backward()
    elif variant == "recompute":
        recompute_backward(model, objective, images, tokens, masks, micro)
    else:
        cached_backward(
            model,
            objective,
            images,
            tokens,
            masks,
            micro,
            keep_text_graph=variant == "cached_keep_text",
        )
    model.zero_grad(set_to_none=True)


def components(
    model, draw_masks, images, tokens, micro: int, repeats: int
) -> dict[str, list[float]]:
    """CPU times of one micro-batch's parts, each after a warm-up: the graph-free forward
    of each tower (caching's first pass) and the forward-backward of both (one micro-batch
    of plain accumulation)."""
    image_mask, text_mask = draw_masks(micro, images.device)
    images, tokens = images[:micro], tokens[:micro]

    def image_inference():
        with torch.inference_mode():
            model.encode_image(images, image_mask)

    def text_inference():
        with torch.inference_mode():
            model.encode_text(tokens, text_mask)

    def forward_backward():
        contrastive_loss(*model(images, tokens, image_mask, text_mask)).backward()
        model.zero_grad(set_to_none=True)

    times = {}
    for part in (image_inference, text_inference, forward_backward):
        part()
        times[part.__name__] = []
        for _ in range(repeats):
            cpu = time.process_time()
            part()
            times[part.__name__].append(time.process_time() - cpu)
    return times


def measure(variant: str, args) -> dict:
    """Run in a fresh process: warm-up, timed repeats, peak RSS above the model's."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, objective, draw_masks, size = build(args.model, args.mask)
    images = torch.randn(args.batch, 3, size, size)
    tokens = torch.randint(1, 30522, (args.batch, 32))
    if variant == "components":
        return {
            "variant": variant,
            "threads": torch.get_num_threads(),
            "image_size": size,
            **components(model, draw_masks, images, tokens, args.micro, args.repeats),
        }
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(variant, model, objective, draw_masks, images, tokens, args.micro)  # warm-up
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        step(variant, model, objective, draw_masks, images, tokens, args.micro)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base  # KiB on Linux
    return {
        "variant": variant,
        "times": times,
        "cpu_times": cpu_times,
        "peak_mib": peak / 1024,
        "threads": torch.get_num_threads(),
        "image_size": size,
    }


def run_variants(script: str, argv: list[str], variants, rounds: int) -> dict[str, list[dict]]:
    """``script argv --variant v`` for every variant, each in a fresh process (its own
    peak RSS), ``rounds`` times interleaved so that drifting load hits all alike; the
    json line each child prints last, by variant."""
    rows = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            out = subprocess.run(
                [sys.executable, script, *argv, "--variant", variant],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-3000:]}")
            rows[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cost_model(runs: list[dict], n: int) -> dict[str, float]:
    """Median CPU time of each micro-batch part, and the caching / accumulation ratios
    they predict (n micro-batches)."""
    part = {
        k: statistics.median(t for x in runs for t in x[k])
        for k in ("image_inference", "text_inference", "forward_backward")
    }
    share = (n - 1) / n / part["forward_backward"]
    return {
        **part,
        "predicted_cached": 1 + share * (part["image_inference"] + part["text_inference"]),
        "predicted_cached_keep_text": 1 + share * part["image_inference"],
        "predicted_recompute": 1
        + (part["image_inference"] + part["text_inference"]) / part["forward_backward"],
    }


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: median and range of wall and CPU step times over all repeats of all
    processes, median peak RSS over processes, and the ratios of the medians to plain
    accumulation."""
    rows = {}
    for variant, r in runs.items():
        if variant == "components":
            continue
        wall = [t for x in r for t in x["times"]]
        cpu = [t for x in r for t in x["cpu_times"]]
        rows[variant] = {
            "n": len(wall),
            "median_s": statistics.median(wall),
            "min_s": min(wall),
            "max_s": max(wall),
            "cpu_median_s": statistics.median(cpu),
            "cpu_min_s": min(cpu),
            "cpu_max_s": max(cpu),
            "peak_mib": statistics.median(x["peak_mib"] for x in r),
        }
    if BASELINE in rows:
        base = rows[BASELINE]
        for row in rows.values():
            row["ratio"] = row["median_s"] / base["median_s"]
            row["cpu_ratio"] = row["cpu_median_s"] / base["cpu_median_s"]
    return rows


def to_markdown(result: dict) -> str:
    m, s = result["meta"], result["meta"]["settings"]
    lines = [
        f"Gradient caching step, model={s['model']} {m['image_size']}px batch={s['batch']} "
        f"micro={s['micro']} ({s['batch'] // s['micro']} micro-batches) mask={s['mask']}, "
        f"threads={m['threads']}, {s['repeats']} timed step(s) x {s['rounds']} process(es) "
        f"per variant, torch {m['torch']}",
        f"`{m['command']}`"
        + (
            f" with MALLOC_MMAP_THRESHOLD_={m['malloc_mmap_threshold']}"
            if m.get("malloc_mmap_threshold")
            else ""
        ),
        f"uptime at start: {m['uptime_start']}",
        f"uptime at end: {m['uptime_end']}",
        "",
        "| variant | wall median (s) | wall min–max (s) | wall / accumulate | "
        "CPU median (s) | CPU min–max (s) | CPU / accumulate | peak RSS above model (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in result["rows"].items():
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else "–"
        cpu_ratio = f"{r['cpu_ratio']:.3f}" if "cpu_ratio" in r else "–"
        lines.append(
            f"| {variant} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | "
            f"{ratio} | {r['cpu_median_s']:.3f} | {r['cpu_min_s']:.3f}–"
            f"{r['cpu_max_s']:.3f} | {cpu_ratio} | {r['peak_mib']:.0f} |"
        )
    lines += [
        "",
        "accumulate: plain accumulation (per-micro-batch loss); cached: "
        "flip/grad_cache.py (last micro-batch kept, n - 1 replays); cached_keep_text: "
        "with keep_text_graph; recompute: every micro-batch replayed (the former path). "
        "CPU time: the process's, all its threads.",
    ]
    if "cost_model" in result:
        c = result["cost_model"]
        lines += [
            "",
            f"Cost model, CPU time of one micro-batch of {s['micro']} (median): "
            f"graph-free forward image {c['image_inference']:.3f} s + text "
            f"{c['text_inference']:.3f} s; forward-backward {c['forward_backward']:.3f} s. "
            f"Predicted / accumulate: cached {c['predicted_cached']:.3f}, "
            f"cached_keep_text {c['predicted_cached_keep_text']:.3f}, "
            f"recompute {c['predicted_recompute']:.3f}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--mask", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved processes per variant")
    parser.add_argument("--threads", type=int, help="torch intra-op threads; default: torch's")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return None
    start = uptime()
    runs = run_variants(__file__, argv, args.variants, args.rounds)
    first = runs[args.variants[0]][0]
    settings = {k: v for k, v in vars(args).items() if k not in ("variant", "out")}
    meta = {
        "settings": settings,
        "command": " ".join(["python experiments/benchmark_grad_cache.py", *argv]),
        "image_size": first["image_size"],
        "threads": first["threads"],
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "uptime_start": start,
        "uptime_end": uptime(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    result = {"meta": meta, "runs": runs, "rows": summarise(runs)}
    if "components" in runs:
        result["cost_model"] = cost_model(runs["components"], args.batch // args.micro)
    markdown = to_markdown(result)
    print(markdown)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown)
    return result


if __name__ == "__main__":
    main()
