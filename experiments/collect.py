"""Collect training runs into the paper's tables (markdown + CSV) and figures (PNG).

    python experiments/collect.py table1a multirun/2026-11-30/04-00-00 --out experiments/results/mini/table1a
    python experiments/collect.py fig3 runs/ --wandb my-entity/flip

A run is a directory holding ``result.json`` (``flip.run.train`` writes it: final metrics
and the resolved config) and, with ``logger=csv``, ``logs/version_*/metrics.csv`` (the
validation curve). Every ``result.json`` below the given directories is read, so a Hydra
multirun's sweep directory (``<sweep>/<job>/result.json``) and a chained unmasked-tuning
run (``<run>/unmasked_tuning/result.json``) are both found. ``eval.py``'s ``results.json``
(Table 1d) is attached to the run whose checkpoint it evaluated.

Each run's row is identified from its config, never from its directory name: image
``mask``, ``batch.global``, ``task.text_mask`` (ratio, kind; runs recorded before masks
moved to the task: ``model.text.mask_ratio``/``mask_kind``), the objective (an
auxiliary ``reconstruction`` term = "+ MAE"), ``init_from`` (a tuned run; its pre-training
mask is read from the run that wrote the checkpoint), the model (image width/depth/patch),
``schedule.total_samples`` and, for Table 8's data axis, LAION-2B named in ``tags`` or
``data.shards``. Paper values come from ``experiments/paper_tables.json``.

Runs that differ only in their seed are one row: its numbers are the mean over the seeds
with the sample standard deviation beside it (``… std`` columns in the CSV, ``mean ± std``
in markdown), its curve the point-wise mean; speed-ups pair each masked seed with the
mask-0 run of the same seed (``experiments/seed_statistics.py``). Curves carry analytic
training FLOPs (samples seen x ``step_benchmark.analytic_flops``'s forward + backward
count) beside CPU and wall time.

This is tooling beside the library, not part of ``flip``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

try:
    from seed_statistics import differs, paired_speedups, spread
except ImportError:  # imported as experiments.collect
    from experiments.seed_statistics import differs, paired_speedups, spread

HERE = Path(__file__).resolve().parent
PAPER = json.loads((HERE / "paper_tables.json").read_text())
TABLES = (
    "table1a",
    "table1b",
    "table1c",
    "table1d",
    "table1e",
    "table1f",
    "fig3",
    "table2",
    "table8",
)
MODEL_NAMES = {
    (768, 12, 16): "B/16",
    (1024, 24, 16): "L/16",
    (1024, 24, 14): "L/14",
    (1280, 32, 14): "H/14",
}  # image tower (width, depth, patch) -> paper name
PAPER_BATCHES = {16384: "16k", 32768: "32k", 65536: "64k"}
TOP1 = "val/zeroshot_top1"


# ------------------------------------------------------------------------------ reading


def read_run(directory: Path | str) -> dict:
    """One run: its directory, final metrics, config and validation curve."""
    directory = Path(directory)
    record = json.loads((directory / "result.json").read_text())
    csvs = sorted(
        (directory / "logs").glob("version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
    rows = _read_csv(csvs[-1]) if csvs else []
    run = {
        "dir": directory,
        "name": str(directory),
        "metrics": record["metrics"],
        "config": record["config"],
        "evals": [],
        "pretrain": None,
    }
    run["curve"] = with_flops(validation_curve(rows, run["metrics"]), run)
    return run


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


def validation_curve(rows: list[dict], final: dict) -> list[dict]:
    """Validation points as {samples, wall, cpu, acc} (acc in %), from logged rows.

    A validation row carries no time: it gets the training time and samples seen of the
    last training row at or before its step (validation time itself is not training
    time). The final metrics close the curve when its last point differs from them.
    """
    train = sorted((r for r in rows if "time/train_cpu_s" in r), key=lambda r: r["step"])
    points = []
    for r in rows:
        if TOP1 not in r:
            continue
        before = [t for t in train if t["step"] <= r["step"]]
        if not before:
            continue
        t = before[-1]
        points.append(
            {
                "samples": t.get("train/samples_seen", math.nan),
                "wall": t["time/train_wall_s"],
                "cpu": t["time/train_cpu_s"],
                "acc": 100 * r[TOP1],
            }
        )
    if TOP1 in final and "time/train_cpu_s" in final:
        last = {
            "samples": final.get("train/samples_seen", math.nan),
            "wall": final["time/train_wall_s"],
            "cpu": final["time/train_cpu_s"],
            "acc": 100 * final[TOP1],
        }
        if not points or (points[-1]["acc"], points[-1]["samples"]) != (
            last["acc"],
            last["samples"],
        ):
            points.append(last)
    return points


def load_runs(*dirs: Path | str) -> list[dict]:
    """Every run below ``dirs`` (sorted by path), tuned runs linked to their pre-training
    run, ``eval.py`` results attached to the run whose checkpoint they evaluated."""
    runs = [read_run(p.parent) for d in dirs for p in sorted(Path(d).rglob("result.json"))]
    by_dir = {r["dir"].resolve(): r for r in runs}
    for run in runs:
        if run["config"].get("init_from"):  # <pretrain>/checkpoints/last.ckpt
            pre = Path(run["config"]["init_from"]).resolve().parents[1]
            if pre not in by_dir and (pre / "result.json").exists():  # not collected: read it
                by_dir[pre] = read_run(pre)
            run["pretrain"] = by_dir.get(pre)
            if run["pretrain"] is None:
                print(
                    f"collect: {run['name']} tunes {run['config']['init_from']}, whose run "
                    "(result.json) is not found: its pre-training mask is taken from a "
                    "'mask<r>' tag, else unknown, and its time excludes pre-training",
                    file=sys.stderr,
                )
    for d in dirs:
        for path in sorted(Path(d).rglob("results.json")):
            record = json.loads(path.read_text())
            ckpt = Path(record.get("ckpt_path", "")).resolve()
            owner = next((by_dir[p] for p in ckpt.parents if p in by_dir), None)
            if owner is None:
                print(
                    f"collect: {path} evaluates {ckpt}, which no collected run wrote: skipped",
                    file=sys.stderr,
                )
                continue
            owner["evals"].append(record)
    return runs


def load_wandb_runs(path: str, api=None) -> list[dict]:
    """The runs of a W&B project ``entity/project`` (``wandb.Api()`` unless ``api`` is
    given): config, summary metrics and the logged history as the validation curve."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs = []
    for r in api.runs(path):
        config, metrics = _unflatten(dict(r.config)), dict(r.summary)
        if TOP1 not in metrics:
            continue
        runs.append(
            {
                "dir": None,
                "name": f"wandb:{path}/{r.id}",
                "metrics": metrics,
                "config": config,
                "evals": [],
                "pretrain": None,
                "curve": [],
            }
        )
        runs[-1]["curve"] = with_flops(validation_curve(list(r.scan_history()), metrics), runs[-1])
    return runs


def _unflatten(flat: dict) -> dict:
    """W&B may store nested keys dotted (``task.text_mask.ratio``): nest them again."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _merge(value, node[leaf]) if leaf in node else value
    return out


def _merge(base, top):
    """``top`` over ``base``, nested dicts merged key by key."""
    if not (isinstance(base, dict) and isinstance(top, dict)):
        return top
    return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in top.items()}}


# ------------------------------------------------------------------------------ seeds


def row_key(run: dict) -> str:
    """What places a run in a row: its config without seeds, its own paths and the
    checkpoint it tuned (whose pre-training mask counts instead)."""
    config = json.loads(json.dumps(run["config"]))

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("seed", "init_from")}
        return [strip(v) for v in node] if isinstance(node, list) else node

    text = json.dumps(strip(config), sort_keys=True)
    if config.get("output_dir"):
        text = text.replace(str(config["output_dir"]), "<out>")
    return f"{text}|tuned={bool(config.get('init_from'))}|pretrain mask={pretrain_mask(run)}"


def members(run: dict) -> list[dict]:
    """The seed runs a (merged) row stands for."""
    return run.get("seeds") or [run]


def merge_seeds(runs: list[dict]) -> list[dict]:
    """One run per row: runs differing only in their seed merged into their mean
    (:func:`merged`), in the order their rows first appear; single runs unchanged."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(row_key(run), []).append(run)
    return [g[0] if len(g) == 1 else merged(g) for g in groups.values()]


def merged(runs: list[dict]) -> dict:
    """The mean of seed runs of one row: numeric metrics and curve points averaged (the
    curve over the points all seeds have), with ``acc_std``/``cpu_std``/``wall_std``/
    ``flops_std`` per point; ``seeds`` keeps the runs for spreads and paired speed-ups."""
    runs = sorted(runs, key=lambda r: r["config"].get("seed", 0))
    numeric = set.intersection(
        *({k for k, v in r["metrics"].items() if isinstance(v, (int, float))} for r in runs)
    )
    curve = []
    for i in range(min(len(r["curve"]) for r in runs)):
        points = [r["curve"][i] for r in runs]
        curve.append({k: spread(p[k] for p in points)["mean"] for k in points[0]})
        for k in ("acc", "cpu", "wall", "flops"):
            curve[-1][f"{k}_std"] = spread(p.get(k, math.nan) for p in points)["std"]
    pretrains = [r["pretrain"] for r in runs]
    seeds = ",".join(str(r["config"].get("seed", "?")) for r in runs)
    return {
        "dir": runs[0]["dir"],
        "name": f"{runs[0]['name']} [seeds {seeds}]",
        "metrics": {k: spread(r["metrics"][k] for r in runs)["mean"] for k in numeric},
        "config": runs[0]["config"],
        "evals": [e for r in runs for e in r["evals"]],
        "pretrain": merged(pretrains) if all(p is not None for p in pretrains) else None,
        "curve": curve,
        "seeds": runs,
    }


# ------------------------------------------------------------------------------ rows


def text_mask(config: dict) -> tuple[float, str]:
    """(ratio, kind) of a run's text mask: ``task.text_mask``, or in runs recorded before
    masks moved to the task, ``model.text.mask_ratio``/``mask_kind``."""
    mask = (config.get("task") or {}).get("text_mask")
    if mask is None:
        text = config["model"]["text"]
        mask = {"ratio": text.get("mask_ratio"), "kind": text.get("mask_kind")}
    return float(mask.get("ratio") or 0.0), mask.get("kind") or "random"


def describe(run: dict) -> dict:
    """The config values that place a run in a table, and its measured numbers."""
    c, m = run["config"], run["metrics"]
    image, text = c["model"]["image"], c["model"]["text"]
    pre = run["pretrain"]
    text_ratio, text_kind = text_mask(c)
    wall, cpu = m.get("time/train_wall_s", math.nan), m.get("time/train_cpu_s", math.nan)
    if pre is not None:  # the paper counts tuning time on top of pre-training
        wall += pre["metrics"].get("time/train_wall_s", math.nan)
        cpu += pre["metrics"].get("time/train_cpu_s", math.nan)
    tags = [str(t) for t in c.get("tags") or []]
    shards = str((c.get("data") or {}).get("shards", ""))
    return {
        "mask": pretrain_mask(run),
        "tuned": bool(c.get("init_from")),
        "batch": int(c["batch"]["global"]),
        "text_ratio": text_ratio,
        "text_kind": text_kind if text_ratio > 0 else "none",
        "text_len": int(text["context_length"] * (1 - text_ratio)),
        "reconstruction": "reconstruction" in ((c.get("objective") or {}).get("auxiliary") or {}),
        "model": model_name(image),
        "model_size": image["width"] ** 2
        * image["depth"]
        * (image["image_size"] // image["patch_size"]) ** 2,
        "samples": float(c["schedule"]["total_samples"]),
        "data_2b": any("2b" in t.lower() for t in tags) or "2b" in shards.lower(),
        "tag_row": next(
            (t for t in tags if t != "mini" and not t.startswith(("table", "fig"))), None
        ),
        "epochs": (
            float(c["schedule"]["total_samples"]) / c["data"]["train"]["size"]
            if ((c.get("data") or {}).get("train") or {}).get("size")
            else math.nan
        ),
        "acc": 100 * m[TOP1] if TOP1 in m else math.nan,
        "wall": wall,
        "cpu": cpu,
        "samples_seen": m.get("train/samples_seen", math.nan),
    }


def pretrain_mask(run: dict) -> float:
    """The image mask a run was pre-trained at: its own, or for a tuned run (init_from)
    the mask of the run that wrote the checkpoint, else of a ``mask<r>`` tag, else NaN."""
    c = run["config"]
    if not c.get("init_from"):
        return float(c["mask"])
    if run["pretrain"] is not None:
        return pretrain_mask(run["pretrain"])
    tagged = [t[4:] for t in map(str, c.get("tags") or []) if t.startswith("mask")]
    try:
        return float(tagged[0])
    except (IndexError, ValueError):
        return math.nan


def model_name(image: dict) -> str:
    key = (image["width"], image["depth"], image["patch_size"])
    return MODEL_NAMES.get(key, f"w{key[0]}d{key[1]}p{key[2]}@{image['image_size']}px")


def train_flops_per_sample(run: dict) -> float:
    """Analytic training FLOPs (forward + backward) per sample of ``run``
    (experiments/step_benchmark.analytic_flops: image tower at the run's mask, 0 for a
    tuned run, text tower at its kept text length)."""
    try:
        from step_benchmark import analytic_flops
    except ImportError:  # imported as experiments.collect
        from experiments.step_benchmark import analytic_flops

    d = describe(run)
    model = json.loads(json.dumps(run["config"]["model"]))
    model["text"]["context_length"] = d["text_len"]
    return analytic_flops(model, d["mask"] if not d["tuned"] else 0.0, d["batch"])["train"]


def with_flops(curve: list[dict], run: dict) -> list[dict]:
    """The curve's points with ``flops``: training FLOPs spent by that point."""
    per_sample = train_flops_per_sample(run)
    return [{**p, "flops": p["samples"] * per_sample} for p in curve]


def flops_ratio(run: dict, reference: dict) -> float:
    """Analytic training FLOPs per sample of ``run`` over ``reference``."""
    return train_flops_per_sample(run) / train_flops_per_sample(reference)


def _pick(runs: list[dict], **want) -> dict | None:
    """The run whose description matches ``want`` (the last by path if several)."""
    found = [r for r in runs if all(_same(describe(r)[k], v) for k, v in want.items())]
    if len(found) > 1:
        print(
            f"collect: {len(found)} runs match {want}; using {found[-1]['name']}", file=sys.stderr
        )
    return found[-1] if found else None


def _same(a, b) -> bool:
    return (
        math.isclose(a, b, abs_tol=1e-9) if isinstance(a, float) or isinstance(b, float) else a == b
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _times(run: dict | None, base: dict | None) -> dict:
    """Train wall/CPU seconds of ``run`` and their ratios to ``base``'s."""
    if run is None:
        return {}
    d = describe(run)
    out = {"train wall s": d["wall"], "train CPU s": d["cpu"], "train CPU s std": _std(run, "cpu")}
    if base is not None:
        b = describe(base)
        out |= {
            "time wall (ours)": _ratio(d["wall"], b["wall"]),
            "time CPU (ours)": _ratio(d["cpu"], b["cpu"]),
        }
    return out


def _acc(run: dict | None) -> float:
    return describe(run)["acc"] if run is not None else math.nan


def _std(run: dict | None, key: str) -> float:
    """Standard deviation over the row's seeds of ``describe(...)[key]`` (NaN for one)."""
    return spread(describe(m)[key] for m in members(run))["std"] if run is not None else math.nan


def _acc_cols(run: dict | None, col: str) -> dict:
    """``{col: mean accuracy, "<col> std": its spread over seeds}``."""
    return {col: _acc(run), f"{col} std": _std(run, "acc")}


def batch_labels(runs: list[dict]) -> dict[int, str]:
    """Our global batches -> the paper's labels: 16k/32k/64k when run at full scale, else
    by their ratio to the smallest batch collected (x1, x2, x4 = 16k, 32k, 64k)."""
    batches = sorted({describe(r)["batch"] for r in runs})
    if all(b in PAPER_BATCHES for b in batches):
        return {b: PAPER_BATCHES[b] for b in batches}
    labels = {1: "16k", 2: "32k", 4: "64k"}
    return {
        b: labels.get(b // batches[0], str(b)) if b % batches[0] == 0 else str(b) for b in batches
    }


# ------------------------------------------------------------------------------ tables


def table1a(runs: list[dict]) -> list[dict]:
    base = _pick(runs, mask=0.0, tuned=False)
    rows = []
    for p in PAPER["table1a"]["rows"]:
        run = _pick(runs, mask=p["mask"], tuned=False)
        rows.append(
            {
                "mask": f"{p['mask']:.0%}",
                "batch": p["batch"],
                "batch (ours)": describe(run)["batch"] if run else None,
                "FLOPs": p["flops"],
                "FLOPs (ours)": flops_ratio(run, base) if run and base else math.nan,
                "time": p["time"],
                **_times(run, base),
                "acc.": p["acc"],
                **_acc_cols(run, "acc. (ours)"),
                "seeds": len(members(run)) if run else 0,
                "differs from mask 0 (> 2 SE)": differs(
                    [_acc(m) for m in members(run)], [_acc(m) for m in members(base)]
                )
                if run and base and run is not base
                else None,
                "run": run["name"] if run else None,
            }
        )
    return rows


def table1b(runs: list[dict]) -> list[dict]:
    untuned = [r for r in runs if not describe(r)["tuned"]]
    labels = batch_labels(untuned) if untuned else {}
    rows = []
    for p in PAPER["table1b"]["rows"]:
        row = {
            "batch": p["batch"],
            "batch (ours)": next((b for b, lab in labels.items() if lab == p["batch"]), None),
        }
        for mask in (0.5, 0.75):
            col = f"mask {mask:.0%}"
            run = (
                _pick(untuned, mask=mask, batch=row["batch (ours)"])
                if row["batch (ours)"] is not None
                else None
            )
            row |= {
                col: p[col],
                **_acc_cols(run, f"{col} (ours)"),
                f"{col} train CPU s": describe(run)["cpu"] if run else math.nan,
            }
        rows.append(row)
    return rows


def table1c(runs: list[dict]) -> list[dict]:
    base = _pick(runs, text_ratio=0.0, tuned=False)
    rows = []
    for p in PAPER["table1c"]["rows"]:
        run = _pick(runs, text_kind=p["kind"], text_ratio=p["ratio"], tuned=False)
        rows.append(
            {
                "text mask": p["text mask"],
                "text len": p["text len"],
                "text len (ours)": describe(run)["text_len"] if run else None,
                "time": p["time"],
                **_times(run, base),
                "FLOPs (ours)": flops_ratio(run, base) if run and base else math.nan,
                "acc.": p["acc"],
                **_acc_cols(run, "acc. (ours)"),
                "run": run["name"] if run else None,
            }
        )
    return rows


def eval_top1(record: dict) -> float:
    """The zero-shot top-1 (%) of an eval.py results.json (the held-out set if present)."""
    rows = [r for r in record["results"] if r.get("protocol") == "zeroshot" and "value" in r]
    if not rows:
        return math.nan
    held = [r for r in rows if r["dataset"] == "heldout"]
    return 100 * (held or rows)[0]["value"]


def table1d(runs: list[dict]) -> list[dict]:
    """Rows w/ mask (single view at the training ratio), w/ mask ensemble, w/o mask (an
    eval at mask 0 if present, else the run's own held-out top-1 from training); each
    the mean (and spread) over the seeds' checkpoints evaluated."""
    cells: dict[tuple[str, float], list[float]] = {}
    for mask in (0.5, 0.75):
        run = _pick(runs, mask=mask, tuned=False)
        if run is None:
            continue
        for record in run["evals"]:
            if record["mask"] == 0:
                cells.setdefault(("w/o mask", mask), []).append(eval_top1(record))
            elif math.isclose(record["mask"], mask):
                case = "w/ mask, ensemble" if record["masked_views"] == "ensemble" else "w/ mask"
                cells.setdefault((case, mask), []).append(eval_top1(record))
        cells.setdefault(("w/o mask", mask), [_acc(m) for m in members(run)])
    rows = []
    for p in PAPER["table1d"]["rows"]:
        row = {"case": p["case"]}
        for mask in (0.5, 0.75):
            col, s = f"mask {mask:.0%}", spread(cells.get((p["case"], mask), []))
            row |= {col: p[col], f"{col} (ours)": s["mean"], f"{col} (ours) std": s["std"]}
        rows.append(row)
    return rows


def _mask_columns(table: str, find) -> list[dict]:
    """Rows of a case x (mask 50 %, mask 75 %) table: paper, ours and our time ratio to
    the table's first (baseline) row at the same mask; ``find(case, mask)`` -> run."""
    rows, paper = [], PAPER[table]["rows"]
    for p in paper:
        row = {"case": p["case"]}
        for mask in (0.5, 0.75):
            col = f"mask {mask:.0%}"
            run, base = find(p["case"], mask), find(paper[0]["case"], mask)
            t = _times(run, base)
            row |= {
                col: p[col],
                **_acc_cols(run, f"{col} (ours)"),
                f"{col} time CPU (ours)": t.get("time CPU (ours)", math.nan),
                f"{col} time wall (ours)": t.get("time wall (ours)", math.nan),
            }
        rows.append(row)
    return rows


def table1e(runs: list[dict]) -> list[dict]:
    return _mask_columns(
        "table1e",
        lambda case, mask: _pick(runs, mask=mask, tuned=case != "baseline", reconstruction=False),
    )


def table1f(runs: list[dict]) -> list[dict]:
    return _mask_columns(
        "table1f",
        lambda case, mask: _pick(runs, mask=mask, tuned=False, reconstruction=case != "baseline"),
    )


def fig3(runs: list[dict]) -> list[dict]:
    """Every run: mask, tuned, schedule (as a multiple of the shortest pre-training one: a
    tuning run's own short schedule is not the unit), accuracy and times, with the time
    ratio to the mask-0 untuned run of the same schedule."""
    pretraining = [r for r in runs if not describe(r)["tuned"]] or runs
    shortest = min(describe(r)["samples"] for r in pretraining)
    rows = []
    for run in sorted(
        runs, key=lambda r: (describe(r)["mask"], describe(r)["tuned"], describe(r)["samples"])
    ):
        d = describe(run)
        base = _pick(runs, mask=0.0, tuned=False, samples=d["samples"])
        rows.append(
            {
                "mask": f"{d['mask']:.0%}",
                "tuned": d["tuned"],
                "epochs": d["epochs"],
                "schedule (x shortest)": d["samples"] / shortest,
                "samples seen": d["samples_seen"],
                **_times(run, base),
                **_acc_cols(run, "acc. (ours)"),
                "run": run["name"],
            }
        )
    return rows


def table2(runs: list[dict]) -> list[dict]:
    """The paper's rows, then ours: one column per model (our runs at the paper's model
    names land under them; other models get a column of their own)."""
    cols = list(PAPER["table2"]["columns"])
    ours = {}
    for run in runs:
        d = describe(run)
        if d["model"] in ours:
            print(f"collect: two {d['model']} runs; using {run['name']}", file=sys.stderr)
        ours[d["model"]] = run
        if d["model"] not in cols:
            cols.append(d["model"])
    rows = [
        {"case": p["case"], "data": p["data"], "epochs": p["epochs"], **{c: p.get(c) for c in cols}}
        for p in PAPER["table2"]["rows"]
    ]
    rows.append(
        {"case": "FLIP (ours)", "data": "", "epochs": "", **{c: _acc(ours.get(c)) for c in cols}}
    )
    rows.append(
        {
            "case": "train CPU s (ours)",
            "data": "",
            "epochs": "",
            **{c: describe(ours[c])["cpu"] if c in ours else math.nan for c in cols},
        }
    )
    return rows


TABLE8_CASES = {
    (False, False, False): "baseline",
    (True, False, False): "model scaling",
    (False, True, False): "data scaling",
    (False, False, True): "schedule scaling",
    (True, True, False): "model+data scaling",
    (True, True, True): "joint scaling",
}


def table8_case(run: dict, runs: list[dict]) -> str | None:
    """Which axes a run scales relative to the smallest model and schedule collected:
    model (larger image tower), data (LAION-2B in tags/shards, or a tag row naming
    data), schedule (more samples)."""
    d = describe(run)
    model = d["model_size"] > min(describe(r)["model_size"] for r in runs)
    schedule = d["samples"] > min(describe(r)["samples"] for r in runs)
    data = d["data_2b"] or d["tag_row"] in ("data", "model_data", "joint")
    return TABLE8_CASES.get((model, data, schedule))


def table8(runs: list[dict]) -> list[dict]:
    cases = {}
    for run in runs:
        cases[table8_case(run, runs)] = run
    names = PAPER["table8"]["columns"]
    rows = []
    for p in PAPER["table8"]["rows"]:
        run = cases.get(p["case"])
        d = describe(run) if run else {}
        base = cases.get("baseline")
        rows.append(
            {
                "case": p["case"],
                "model": p["model"],
                "data": p["data"],
                "sampled": p["sampled"],
                "model (ours)": d.get("model"),
                "sampled (ours)": d.get("samples_seen"),
                names[0]: p["values"][0],
                f"{names[0]} (ours)": d.get("acc", math.nan),
                **_times(run, base),
                **dict(zip(names[1:], p["values"][1:])),
                "run": run["name"] if run else None,
            }
        )
    return rows


BUILDERS = {
    "table1a": table1a,
    "table1b": table1b,
    "table1c": table1c,
    "table1d": table1d,
    "table1e": table1e,
    "table1f": table1f,
    "fig3": fig3,
    "table2": table2,
    "table8": table8,
}


def collect(table: str, runs: list[dict]) -> list[dict]:
    """The rows of ``table`` (one of TABLES) from ``runs`` (seeds of a row merged): the
    paper's columns with ours beside them (columns named ``… (ours)``)."""
    if table not in BUILDERS:
        raise SystemExit(f"unknown table {table!r}: use one of {', '.join(TABLES)}")
    if not runs:
        raise SystemExit("no runs found (no result.json below the given directories)")
    return BUILDERS[table](merge_seeds(runs))


# ------------------------------------------------------------------------------ speed-up

CLOCKS = {"cpu": "process CPU s", "wall": "wall-clock s", "flops": "training FLOPs"}


def spent(run: dict, clock: str) -> float:
    """A run's training compute on ``clock`` (CPU s, wall s or analytic FLOPs), a tuned
    run's pre-training included."""
    if clock != "flops":
        return describe(run)[clock]  # pre-training's time already added
    own = describe(run)["samples_seen"] * train_flops_per_sample(run)
    return own + (spent(run["pretrain"], clock) if run["pretrain"] is not None else 0.0)


def speedups(runs: list[dict], clock: str = "cpu") -> list[dict]:
    """Time-to-accuracy speed-up (the paper's Fig. 1/3 headline), seed by seed: the
    target is the final held-out accuracy of the longest mask-0 untuned run of the same
    seed; each masked run's compute to first reach it (interpolated on its validation
    curve) is set against that mask-0 run's total. Mean, spread and standard error over
    the seeds; "beyond 2 SE" says whether the speed-up differs from 1x by more than 2
    standard errors. ``clock``: "cpu" (process CPU s), "wall" (s) or "flops"."""
    rows_ = merge_seeds(runs)
    base_rows = [r for r in rows_ if describe(r)["mask"] == 0 and not describe(r)["tuned"]]
    if not base_rows:
        return []
    base = max(base_rows, key=lambda r: describe(r)["samples"])
    targets = {m["config"].get("seed"): (_acc(m), spent(m, clock)) for m in members(base)}
    rows = []
    for run in rows_:
        d = describe(run)
        if d["mask"] == 0 and not d["tuned"]:
            continue
        curves = {}
        for m in members(run):
            offset = spent(m["pretrain"], clock) if m["pretrain"] is not None else 0.0
            curves[m["config"].get("seed")] = (
                [offset + p[clock] for p in m["curve"]],
                [p["acc"] for p in m["curve"]],
            )
        res = paired_speedups(targets, curves)
        up, to = res["speedup"], res["time"]
        paired = len(set(targets) & set(curves))
        rows.append(
            {
                "clock": clock,
                "mask": f"{d['mask']:.0%}",
                "tuned": d["tuned"],
                "schedule samples": d["samples"],
                "target acc. (mask 0)": spread(a for a, _ in targets.values())["mean"],
                "mask-0 total": spread(t for _, t in targets.values())["mean"],
                "to target": to["mean"],
                "to target std": to["std"],
                "speed-up": up["mean"],
                "speed-up std": up["std"],
                "speed-up se": up["se"],
                "seeds reaching": f"{up['n']}/{paired}",
                "beyond 2 SE of 1x": None
                if math.isnan(up["se"]) or res["missed"]
                else abs(up["mean"] - 1) > 2 * up["se"],
                "run": run["name"],
            }
        )
    return rows


# ------------------------------------------------------------------------------ output


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def to_markdown(rows: list[dict]) -> str:
    """A markdown table; a column ``X std`` beside ``X`` is shown inside it as
    ``mean ± std`` (the CSV keeps both)."""
    if not rows:
        return "(no rows)\n"
    every = list(dict.fromkeys(k for r in rows for k in r))
    cols = [c for c in every if not (c.endswith(" std") and c[: -len(" std")] in every)]

    def cell(r, c):
        std = r.get(f"{c} std")
        if std is None or (isinstance(std, float) and math.isnan(std)):
            return _fmt(r.get(c))
        return f"{_fmt(r.get(c))} ± {_fmt(std)}"

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(
            {
                k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                for k, v in r.items()
            }
            for r in rows
        )


def plot_accuracy_vs_time(runs: list[dict], path: Path | str, clock: str = "cpu") -> Path:
    """Fig. 1/3: held-out accuracy vs training compute (``clock``: CPU s, wall s or
    FLOPs), one colour per mask ratio: each row's validation curve (the mean over its
    seeds, error bars one standard deviation over them in accuracy and, for time, in
    time) and the final points of its schedules (markers, joined); tuned runs dashed,
    their compute counted after pre-training's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = merge_seeds(runs)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    masks = sorted({describe(r)["mask"] for r in runs})
    colours = dict(zip(masks, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for tuned in (False, True):
        for mask in masks:
            group = sorted(
                (r for r in runs if describe(r)["mask"] == mask and describe(r)["tuned"] == tuned),
                key=lambda r: describe(r)["samples"],
            )
            if not group:
                continue
            style = "--" if tuned else "-"
            for run in group:
                offset = spent(run["pretrain"], clock) if run["pretrain"] is not None else 0.0
                curve = run["curve"]
                ax.errorbar(
                    [offset + p[clock] for p in curve],
                    [p["acc"] for p in curve],
                    yerr=[p.get("acc_std", math.nan) for p in curve],
                    xerr=[p.get(f"{clock}_std", math.nan) for p in curve],
                    fmt=style,
                    color=colours[mask],
                    alpha=0.5,
                    lw=1,
                    capsize=2,
                )
            ax.plot(
                [spent(r, clock) for r in group],
                [describe(r)["acc"] for r in group],
                style,
                marker="o",
                color=colours[mask],
                label=f"mask {mask:.0%}"
                + (" + tuning" if tuned else "")
                + (f" ({len(members(group[-1]))} seeds)" if len(members(group[-1])) > 1 else ""),
            )
    ax.set_xlabel(f"training compute ({CLOCKS[clock]})")
    ax.set_ylabel("held-out zero-shot top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_scaling(runs: list[dict], path: Path | str) -> Path:
    """Fig. 4: held-out accuracy vs samples seen, one curve per run (labelled by its
    Table 8 case when it has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for run in runs:
        label = table8_case(run, runs) or run["name"]
        d = describe(run)
        label += f" ({d['model']}, mask {d['mask']:.0%})"
        ax.plot(
            [p["samples"] for p in run["curve"]],
            [p["acc"] for p in run["curve"]],
            marker=".",
            label=label,
        )
    ax.set_xlabel("samples seen")
    ax.set_ylabel("held-out zero-shot top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_outputs(table: str, runs: list[dict], out: Path | str) -> dict[str, Path]:
    """``<out>/<table>.md`` and ``.csv`` (for Table 1a and Fig. 3 also the speed-up table,
    when masked and mask-0 runs are both present), ``accuracy_vs_{cpu,wall,flops}.png`` and
    ``scaling.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(table, runs)
    paths = {"md": out / f"{table}.md", "csv": out / f"{table}.csv"}
    text = f"# {table}: {PAPER[table]['title']}\n\n{to_markdown(rows)}"
    if PAPER[table].get("note"):
        text += f"\n{PAPER[table]['note']}\n"
    ups = [u for c in CLOCKS for u in speedups(runs, c)] if table in ("table1a", "fig3") else []
    if ups:
        text += (
            "\n## Time-to-accuracy speed-up\n\nCompute (process CPU s, wall s, analytic "
            "training FLOPs) each masked run needs to first reach the final held-out accuracy "
            "of the mask-0 run of the same seed (linear interpolation between validation "
            "points), against that mask-0 run's total; mean ± std over seeds.\n\n"
            + to_markdown(ups)
        )
        write_csv(ups, out / f"{table}_speedup.csv")
        paths["speedup"] = out / f"{table}_speedup.csv"
    text += f"\nPaper values: {PAPER['source']}\n\nRuns:\n" + "".join(
        f"- {r['name']}\n" for r in runs
    )
    paths["md"].write_text(text)
    write_csv(rows, paths["csv"])
    paths["cpu_png"] = plot_accuracy_vs_time(runs, out / "accuracy_vs_cpu.png", "cpu")
    paths["wall_png"] = plot_accuracy_vs_time(runs, out / "accuracy_vs_wall.png", "wall")
    paths["flops_png"] = plot_accuracy_vs_time(runs, out / "accuracy_vs_flops.png", "flops")
    paths["scaling_png"] = plot_scaling(runs, out / "scaling.png")
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table", choices=TABLES)
    parser.add_argument("dirs", nargs="*", type=Path, help="run or sweep directories")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default experiments/results/<table>)",
    )
    parser.add_argument("--wandb", default=None, help="also read this W&B project (entity/project)")
    args = parser.parse_args(argv)
    runs = load_runs(*args.dirs) + (load_wandb_runs(args.wandb) if args.wandb else [])
    paths = write_outputs(args.table, runs, args.out or HERE / "results" / args.table)
    print(paths["md"].read_text())
    return paths


if __name__ == "__main__":
    main()
