"""experiments/collect.py: real run directories (train() with the CSV logger, a tuned run,
an eval.py ensemble) -> the paper's tables with our numbers beside the paper's, the time
ratios and speed-up recomputed here from the raw numbers, the figures; a 2-point Hydra
multirun through train.py collected into both of its rows; a synthetic Table 1a of 3 seeds
per row -> mean ± std rows and speed-ups paired by seed, checked against hand computation."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import collect
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from step_benchmark import analytic_flops

from flip.run import evaluate, train
from tests.conftest import CONF, FAST, compose_fast, compose_train

CURVE = ["logger=csv", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1"]


def build_runs(root: Path) -> Path:
    """Under ``root``: m0 and m0.5 (pre-training), tuned (m0.5 tuned at mask 0) and an
    eval.py ensemble of m0.5 at mask 0.5. Built once per session."""
    if (root / "done").exists():
        return root
    for mask in ("0", "0.5"):
        train(compose_fast(f"mask={mask}", *CURVE, output_dir=root / f"m{mask}"))
    ckpt = root / "m0.5" / "checkpoints" / "last.ckpt"
    train(compose_fast("mask=0", f"init_from={ckpt}", *CURVE, output_dir=root / "tuned"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "eval",
            overrides=[
                f"output_dir={root / 'm0.5' / 'eval_ensemble'}",
                f"ckpt_path={ckpt}",
                "mask=0.5",
                "masked_views=ensemble",
                "data.zeroshot.size=40",
                "data.num_workers=0",
                "trainer.enable_progress_bar=false",
            ],
        )
    evaluate(cfg)
    (root / "done").write_text("")
    return root


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
    return build_runs(tmp_path_factory.getbasetemp() / "collect-runs")


def result(root, name):
    return json.loads((root / name / "result.json").read_text())["metrics"]


def test_validation_curve_takes_time_of_the_last_training_step(runs_root):
    with open(runs_root / "m0" / "logs" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["time/train_cpu_s"]]
    val_rows = [r for r in rows if r["val/zeroshot_top1"]]
    run = collect.read_run(runs_root / "m0")
    assert len(run["curve"]) == len(val_rows) >= 2
    for point, v in zip(run["curve"], val_rows):
        t = [r for r in train_rows if int(r["step"]) <= int(v["step"])][-1]
        assert point["cpu"] == pytest.approx(float(t["time/train_cpu_s"]))
        assert point["wall"] == pytest.approx(float(t["time/train_wall_s"]))
        assert point["samples"] == float(t["train/samples_seen"])
        assert point["acc"] == pytest.approx(100 * float(v["val/zeroshot_top1"]))
    final = result(runs_root, "m0")
    assert run["curve"][-1]["acc"] == pytest.approx(100 * final["val/zeroshot_top1"])


def test_table1a_ours_beside_the_paper(runs_root, tmp_path):
    runs = collect.load_runs(runs_root)
    assert len(runs) == 3
    rows = {r["mask"]: r for r in collect.collect("table1a", runs)}
    assert list(rows) == ["0%", "50%", "75%"]
    m0, m5 = result(runs_root, "m0"), result(runs_root, "m0.5")
    assert (rows["0%"]["acc."], rows["50%"]["acc."], rows["75%"]["acc."]) == (68.6, 69.6, 68.2)
    assert (rows["50%"]["FLOPs"], rows["50%"]["time"], rows["75%"]["time"]) == (0.52, 0.50, 0.33)
    assert rows["0%"]["acc. (ours)"] == pytest.approx(100 * m0["val/zeroshot_top1"])
    assert rows["50%"]["acc. (ours)"] == pytest.approx(100 * m5["val/zeroshot_top1"])
    assert rows["50%"]["train CPU s"] == m5["time/train_cpu_s"]
    assert rows["50%"]["time CPU (ours)"] == pytest.approx(
        m5["time/train_cpu_s"] / m0["time/train_cpu_s"]
    )
    assert rows["50%"]["time wall (ours)"] == pytest.approx(
        m5["time/train_wall_s"] / m0["time/train_wall_s"]
    )
    assert rows["0%"]["time CPU (ours)"] == 1.0 and rows["50%"]["batch (ours)"] == 16
    assert math.isnan(rows["75%"]["acc. (ours)"])  # not run: the paper's row stays, ours empty
    model = json.loads((runs_root / "m0" / "result.json").read_text())["config"]["model"]
    flops = analytic_flops(model, 0.5, 16)["train"] / analytic_flops(model, 0.0, 16)["train"]
    assert rows["50%"]["FLOPs (ours)"] == pytest.approx(flops) and flops < 0.75

    paths = collect.write_outputs("table1a", runs, tmp_path / "out")
    with open(paths["csv"], newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["mask"] for r in written] == ["0%", "50%", "75%"]
    assert float(written[1]["acc. (ours)"]) == pytest.approx(rows["50%"]["acc. (ours)"])
    md = paths["md"].read_text()
    assert "| 50% | 32k | 16 | 0.52 |" in md and "68.60" in md and "arXiv 2212.00794" in md
    for key in ("cpu_png", "wall_png", "scaling_png"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_speedup_against_the_mask0_total_time(runs_root):
    runs = collect.load_runs(runs_root)
    base = next(r for r in runs if r["dir"].name == "m0")
    masked = next(r for r in runs if r["dir"].name == "m0.5")
    base["metrics"] = {**base["metrics"], "val/zeroshot_top1": 0.4, "time/train_cpu_s": 100.0}
    masked["curve"] = [
        {"samples": s, "wall": 1.0, "cpu": t, "acc": a}
        for s, t, a in [(16, 10, 10), (32, 20, 30), (48, 30, 50)]
    ]
    (up,) = [u for u in collect.speedups(runs, "cpu") if not u["tuned"]]
    assert up["to target"] == pytest.approx(25.0)  # 40 % between 30 % and 50 %
    assert up["speed-up"] == pytest.approx(100.0 / 25.0)


def test_tuned_run_and_masked_views_find_their_rows(runs_root):
    runs = collect.load_runs(runs_root)
    pre, tuned = result(runs_root, "m0.5"), result(runs_root, "tuned")
    rows = {r["case"]: r for r in collect.collect("table1e", runs)}
    assert rows["+ tuning"]["mask 50%"] == 70.1
    assert rows["+ tuning"]["mask 50% (ours)"] == pytest.approx(100 * tuned["val/zeroshot_top1"])
    assert rows["baseline"]["mask 50% (ours)"] == pytest.approx(100 * pre["val/zeroshot_top1"])
    total = pre["time/train_cpu_s"] + tuned["time/train_cpu_s"]  # tuning adds to pre-training
    assert rows["+ tuning"]["mask 50% time CPU (ours)"] == pytest.approx(
        total / pre["time/train_cpu_s"]
    )

    record = json.loads((runs_root / "m0.5" / "eval_ensemble" / "results.json").read_text())
    held = next(r for r in record["results"] if r["dataset"] == "heldout")
    rows = {r["case"]: r for r in collect.collect("table1d", runs)}
    assert rows["w/ mask, ensemble"]["mask 50% (ours)"] == pytest.approx(100 * held["value"])
    assert rows["w/ mask, ensemble"]["mask 50%"] == 68.1
    assert rows["w/o mask"]["mask 50% (ours)"] == pytest.approx(100 * pre["val/zeroshot_top1"])
    assert math.isnan(rows["w/ mask"]["mask 50% (ours)"])  # no single-view eval was run


def _variant(run, **changes):
    """A copy of a real run with config values changed (dotted keys)."""
    run = json.loads(json.dumps({k: v for k, v in run.items() if k in ("metrics", "config")}))
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = run["config"]
        for p in parents:
            node = node[p]
        node[leaf] = value
    return {**run, "dir": None, "name": str(changes), "evals": [], "pretrain": None, "curve": []}


def test_rows_identified_from_the_config(runs_root):
    (base,) = [r for r in collect.load_runs(runs_root) if r["dir"].name == "m0.5"]
    runs = {
        "baseline": _variant(base),
        "model scaling": _variant(base, **{"model.image.width": 64}),
        "data scaling": _variant(base, tags=["table8", "data", "LAION-2B"]),
        "schedule scaling": _variant(base, **{"schedule.total_samples": 128}),
        "model+data scaling": _variant(
            base, tags=["table8", "x", "LAION-2B"], **{"model.image.width": 64}
        ),
        "joint scaling": _variant(
            base,
            tags=["mini", "table8", "joint"],
            **{"model.image.width": 64, "schedule.total_samples": 128},
        ),
    }
    for i, run in enumerate(runs.values()):
        run["metrics"]["val/zeroshot_top1"] = i / 100
    rows = collect.collect("table8", list(runs.values()))
    assert [r["case"] for r in rows] == list(runs)
    assert [r["zero-shot IN-1K (ours)"] for r in rows] == pytest.approx(list(range(6)))
    assert rows[5]["zero-shot IN-1K"] == 78.8 and rows[5]["vqa VQAv2"] == 77.3

    text = {
        (kind, ratio): _variant(
            base, mask=0.75, **{"task.text_mask.ratio": ratio, "task.text_mask.kind": kind}
        )
        for kind, ratio in (("random", 0.0), ("random", 0.5), ("prioritized", 0.5))
    }
    # a run recorded before masks moved to the task stored them in the model config
    older = _variant(text["prioritized", 0.5])
    del older["config"]["task"]["text_mask"]
    older["config"]["model"]["text"].update(mask_ratio=0.5, mask_kind="prioritized")
    for run in (older, text["prioritized", 0.5]):
        row = collect.describe(run)
        assert (row["text_ratio"], row["text_kind"], row["text_len"]) == (0.5, "prioritized", 16)
    for i, run in enumerate(text.values()):
        run["metrics"]["val/zeroshot_top1"] = i / 100
    rows = collect.collect("table1c", list(text.values()))
    assert [r["text len (ours)"] for r in rows] == [32, 16, 16]
    assert [r["acc. (ours)"] for r in rows] == pytest.approx([0, 1, 2])
    assert [r["acc."] for r in rows] == [68.2, 66.0, 67.8]

    batches = [
        _variant(base, mask=m, **{"batch.global": b}) for m in (0.5, 0.75) for b in (8, 16, 32)
    ]
    for i, run in enumerate(batches):
        run["metrics"]["val/zeroshot_top1"] = i / 100
    rows = collect.collect("table1b", batches)
    assert [r["batch (ours)"] for r in rows] == [8, 16, 32]
    assert [r["mask 50% (ours)"] for r in rows] == pytest.approx([0, 1, 2])
    assert [r["mask 75% (ours)"] for r in rows] == pytest.approx([3, 4, 5])
    assert [r["mask 75%"] for r in rows] == [65.8, 67.3, 68.2]

    # a tuned run whose pre-training run is not collected: its mask from a mask<r> tag
    tuned = _variant(
        base,
        mask=0.0,
        init_from="/nowhere/checkpoints/last.ckpt",
        tags=["mini", "table1e", "mask0.75", "batch128"],
    )
    assert collect.describe(tuned)["mask"] == 0.75 and collect.describe(tuned)["tuned"]

    recon = _variant(base, **{"objective.auxiliary": {"reconstruction": {"weight": 1.0}}})
    recon["metrics"]["val/zeroshot_top1"] = 0.07
    rows = {r["case"]: r for r in collect.collect("table1f", [_variant(base), recon])}
    assert rows["+ MAE"]["mask 50% (ours)"] == pytest.approx(7.0)
    assert rows["baseline"]["mask 50% (ours)"] == pytest.approx(
        100 * base["metrics"]["val/zeroshot_top1"]
    )


def test_wandb_runs_through_a_fake_api(runs_root):
    """The W&B path without the network: a fake ``wandb.Api`` with the attributes read
    (``runs``, ``config`` with dotted keys, ``summary``, ``scan_history``)."""
    record = json.loads((runs_root / "m0.5" / "result.json").read_text())
    with open(runs_root / "m0.5" / "logs" / "version_0" / "metrics.csv", newline="") as f:
        history = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]

    class Run:
        id = "abc"
        config = {"task.text_mask.ratio": 0.0, **record["config"]}  # nested and dotted keys
        summary = record["metrics"]

        def scan_history(self):
            return iter(history)

    class Api:
        def runs(self, path):
            assert path == "me/flip"
            return [Run()]

    (run,) = collect.load_wandb_runs("me/flip", api=Api())
    local = collect.read_run(runs_root / "m0.5")
    assert run["curve"] == local["curve"]
    rows = {r["mask"]: r for r in collect.collect("table1a", [run])}
    assert rows["50%"]["acc. (ours)"] == pytest.approx(100 * record["metrics"]["val/zeroshot_top1"])


@pytest.mark.slow
def test_two_point_multirun_collects_both_rows(tmp_path):
    sweep = tmp_path / "sweep"
    fast = [o for o in FAST if not o.startswith("logger=")]
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "mask=0,0.5",
            *fast,
            "data.zeroshot.size=40",
            *CURVE,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    paths = collect.main(["table1a", str(sweep), "--out", str(tmp_path / "table")])
    with open(paths["csv"], newline="") as f:
        rows = {r["mask"]: r for r in csv.DictReader(f)}
    for job, mask in (("0", "0%"), ("1", "50%")):
        metrics = result(sweep, job)
        assert rows[mask]["run"] == str(sweep / job)
        assert float(rows[mask]["acc. (ours)"]) == pytest.approx(100 * metrics["val/zeroshot_top1"])
        assert float(rows[mask]["train CPU s"]) == pytest.approx(metrics["time/train_cpu_s"])
    assert rows["75%"]["acc. (ours)"] == "" and rows["75%"]["acc."] == "68.2"
    assert (tmp_path / "table" / "accuracy_vs_cpu.png").stat().st_size > 5000


def write_run(directory: Path, config: dict, finals: tuple[float, float], points: int = 5):
    """A run as train() leaves it (result.json + CSV metrics), with a straight curve:
    validation i of ``points`` at i/points of the schedule, of the final accuracy (%) and
    of the final CPU time ``finals`` (wall = 2 x CPU)."""
    acc, cpu = finals
    total, batch = config["schedule"]["total_samples"], config["batch"]["global"]
    steps = total // batch
    (directory / "logs" / "version_0").mkdir(parents=True)
    rows = []
    for i in range(1, points + 1):
        step = i * steps // points - 1
        t = cpu * i / points
        rows.append({"step": step, "time/train_cpu_s": t, "time/train_wall_s": 2 * t,
                     "train/samples_seen": (step + 1) * batch})  # fmt: skip
        rows.append({"step": step, "val/zeroshot_top1": acc / 100 * i / points})
    with open(directory / "logs" / "version_0" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    metrics = {"val/zeroshot_top1": acc / 100, "time/train_cpu_s": cpu,
               "time/train_wall_s": 2 * cpu, "train/samples_seen": float(total)}  # fmt: skip
    (directory / "result.json").write_text(json.dumps({"metrics": metrics, "config": config}))


def test_seeds_merge_into_mean_and_spread_and_speedups_pair_by_seed(tmp_path):
    finals = {  # row -> per seed (final acc. %, train CPU s)
        "mini_table1a_mask0": [(30.0, 500.0), (32.0, 510.0), (34.0, 520.0)],
        "mini_table1a_mask50": [(33.0, 250.0), (35.0, 250.0), (37.0, 250.0)],
    }
    configs = {}
    for name, per_seed in finals.items():
        for seed, values in enumerate(per_seed):
            out = tmp_path / f"{name}_s{seed}"
            cfg = compose_train(f"experiment={name}", f"seed={seed}", output_dir=out)
            configs[name] = OmegaConf.to_container(cfg, resolve=True)
            write_run(out, configs[name], values)
    runs = collect.load_runs(tmp_path)
    assert len(runs) == 6 and len(collect.merge_seeds(runs)) == 2

    rows = {r["mask"]: r for r in collect.collect("table1a", runs)}
    assert rows["0%"]["acc. (ours)"] == pytest.approx(32.0)
    assert rows["0%"]["acc. (ours) std"] == pytest.approx(2.0)
    assert rows["50%"]["acc. (ours)"] == pytest.approx(35.0) and rows["50%"]["seeds"] == 3
    assert rows["0%"]["train CPU s"] == pytest.approx(510.0)
    assert rows["0%"]["train CPU s std"] == pytest.approx(10.0)
    assert rows["50%"]["time CPU (ours)"] == pytest.approx(250.0 / 510.0)
    # 35 vs 32, each se 2/sqrt(3): 3 < 2 x sqrt(8/3) = 3.27, so not a difference
    assert rows["50%"]["differs from mask 0 (> 2 SE)"] is False
    assert rows["50%"]["run"].endswith("mini_table1a_mask50_s0 [seeds 0,1,2]")

    # seed s: mask 0 ends at acc a_s after T_s CPU s; mask 50's curve (acc 6.6, 13.2, ...
    # at 50, 100, ... CPU s for seed 0) first reaches a_s between its 4th and 5th points
    crossings = [  # fraction of the masked run's schedule where it reaches a_s
        (4 + (30.0 - 26.4) / 6.6) / 5,
        (4 + (32.0 - 28.0) / 7.0) / 5,
        (4 + (34.0 - 29.6) / 7.4) / 5,
    ]
    cpu_ups = [t / (250.0 * c) for t, c in zip((500.0, 510.0, 520.0), crossings)]
    ups = {u["clock"]: u for c in collect.CLOCKS for u in collect.speedups(runs, c)}
    mean = sum(cpu_ups) / 3
    std = math.sqrt(sum((u - mean) ** 2 for u in cpu_ups) / 2)
    assert ups["cpu"]["speed-up"] == pytest.approx(mean)
    assert ups["cpu"]["speed-up std"] == pytest.approx(std)
    assert ups["cpu"]["speed-up se"] == pytest.approx(std / math.sqrt(3))
    assert ups["cpu"]["seeds reaching"] == "3/3" and ups["cpu"]["beyond 2 SE of 1x"] is True
    assert ups["wall"]["speed-up"] == pytest.approx(mean)  # wall = 2 x CPU on both sides

    def per_sample(name):
        d = collect.describe({"config": configs[name], "metrics": {}, "pretrain": None})
        return analytic_flops(configs[name]["model"], d["mask"], d["batch"])["train"]

    f0, f50 = per_sample("mini_table1a_mask0"), per_sample("mini_table1a_mask50")
    flops_ups = [16000 * f0 / (16000 * c * f50) for c in crossings]
    assert ups["flops"]["speed-up"] == pytest.approx(sum(flops_ups) / 3)
    assert f50 / f0 < 0.55  # the mini model: masking half the patches halves the FLOPs

    paths = collect.write_outputs("table1a", runs, tmp_path / "out")
    md = paths["md"].read_text()
    assert "| 32.00 ± 2.00 |" in md and "| 510.00 ± 10.00 |" in md
    with open(paths["csv"], newline="") as f:
        written = {r["mask"]: r for r in csv.DictReader(f)}
    assert float(written["0%"]["acc. (ours) std"]) == pytest.approx(2.0)
    with open(paths["speedup"], newline="") as f:
        assert {r["clock"] for r in csv.DictReader(f)} == {"cpu", "wall", "flops"}
    for key in ("cpu_png", "flops_png"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_fig3_schedule_is_counted_in_the_shortest_pre_training_schedule(runs_root):
    """A tuning run's short schedule (Table 1e's 4000 samples) is not Fig. 3's unit."""
    (base,) = [r for r in collect.load_runs(runs_root) if r["dir"].name == "m0.5"]
    runs = [
        _variant(base, **{"schedule.total_samples": 16000}),
        _variant(base, **{"schedule.total_samples": 32000}),
        _variant(base, init_from="x.ckpt", **{"schedule.total_samples": 4000}),
    ]
    rows = collect.collect("fig3", runs)
    assert sorted((r["tuned"], r["schedule (x shortest)"]) for r in rows) == [
        (False, 1.0),
        (False, 2.0),
        (True, 0.25),
    ]
