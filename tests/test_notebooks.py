"""Every notebook in notebooks/ runs headless (nbclient) on fixture results — real train()
runs with validation curves and an eval.py ensemble — so none can rot; the outputs they
print come from the collector on those runs."""

import json
import math
from pathlib import Path

import collect
import nbformat
import pytest
from nbclient import NotebookClient

from tests.test_collect import build_runs

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
    return build_runs(tmp_path_factory.getbasetemp() / "collect-runs")


def run_notebook(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return nb


def text_of(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", ""))
            out.append(json.dumps(o.get("data", {})))
    return "\n".join(out)


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(
        [
            "table1a_speed.ipynb",
            "fig3_accuracy_vs_time.ipynb",
            "fig4_scaling.ipynb",
            "walkthrough.ipynb",
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fig3_accuracy_vs_time.ipynb", "fig4_scaling.ipynb"])
def test_figure_notebooks_on_fixture_runs(name, runs_root, tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.symlink_to(runs_root, target_is_directory=True)
    monkeypatch.setenv("FLIP_RESULTS", str(results))
    nb = run_notebook(name)
    text = text_of(nb)
    assert "3 runs under" in text and "image/png" in text
    m0 = json.loads((runs_root / "m0" / "result.json").read_text())["metrics"]
    assert f"{100 * m0['val/zeroshot_top1']:.2f}" in text  # our number in the table shown
    pngs = (
        ["accuracy_vs_cpu.png", "accuracy_vs_wall.png", "accuracy_vs_flops.png"]
        if name.startswith("fig3")
        else ["scaling.png"]
    )
    for png in pngs:
        assert (runs_root / png).stat().st_size > 5000
    if name.startswith("fig3"):  # the speed-up lines: the collector's numbers, per clock
        runs = collect.load_runs(runs_root)
        for clock in collect.CLOCKS:
            for up in collect.speedups(runs, clock):
                row = f"mask {up['mask']}{' + tuning' if up['tuned'] else ''}, "
                row += collect.CLOCKS[clock]
                value = (
                    f"{up['speed-up']:.2f}x"
                    if not math.isnan(up["speed-up"])
                    else f"does not reach {up['target acc. (mask 0)']:.1f} %"
                )
                assert f"{row}: {value}" in text
    else:
        assert "74.30" in text  # the paper's Table 8 baseline beside ours


@pytest.mark.slow
def test_walkthrough_on_a_fixture_checkpoint(runs_root, monkeypatch):
    monkeypatch.setenv("FLIP_RESULTS", str(runs_root))
    monkeypatch.setenv("FLIP_CKPT", str(runs_root / "m0.5" / "checkpoints" / "last.ckpt"))
    text = text_of(run_notebook("walkthrough.ipynb"))
    assert "4 views of 49 patches; every patch in exactly one view: True" in text
    record = json.loads((runs_root / "m0.5" / "eval_ensemble" / "results.json").read_text())
    ensemble = next(r["value"] for r in record["results"] if r["dataset"] == "heldout")
    assert f"ensemble of 2 views at mask 50 %: {100 * ensemble:.1f} %" in text
    trained = json.loads((runs_root / "m0.5" / "result.json").read_text())["metrics"]
    assert f"intact images: {100 * trained['val/zeroshot_top1']:.1f} %" in text
    assert "| 50% | 32k |" in text  # the sweep's table


@pytest.mark.slow
def test_table1a_speed_notebook_runs():
    assert "### benchmark-" in text_of(run_notebook("table1a_speed.ipynb"))
