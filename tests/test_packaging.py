"""A non-editable install works: the wheel holds the library and its configs, and an
installed copy trains and evaluates from another directory with no path to this checkout.

The wheel is built from a copy of the sources (no build/ or egg-info in the checkout) with
``pip wheel --no-deps --no-build-isolation`` (offline) and installed with
``pip install --no-deps --target``; the subprocesses see only that target on PYTHONPATH.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["flip", "conf", "pyproject.toml", "setup.py", "README.md"]


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        check=True,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(out))
    (whl,) = out.glob("flip-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("target")
    _pip("install", "--no-deps", "--target", str(target), str(wheel))
    return target


def test_wheel_holds_the_library_and_the_configs_only(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "flip").rglob("*.py")}
    assert modules and modules <= names  # every module of the package
    configs = {"flip/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {"flip/conf/train.yaml", "flip/conf/eval.yaml", "flip/conf/model/tiny.yaml"} <= configs
    assert configs <= names  # conf/ installed as flip.conf
    data = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "flip").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    }
    assert "flip/assets/bert-base-uncased-vocab.txt" in data
    assert data <= names  # vocabulary, evaluation metadata, …
    assert not any(n.startswith(("experiments/", "tests/", "notebooks/")) for n in names)


def test_wheel_declares_dependencies_extras_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
        (ep,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(ep).decode()
    for extra in ("tpu", "wandb", "openclip", "slurm", "eval", "official", "dev"):
        assert f"Provides-Extra: {extra}" in metadata
    requires = [
        line.split(": ", 1)[1]
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    core = {
        r.split(">")[0].split("=")[0].split(";")[0].strip() for r in requires if "extra ==" not in r
    }
    assert {"torch", "lightning", "hydra-core", "timm", "webdataset", "tokenizers"} <= core
    assert "open-clip-torch" not in core and "wandb" not in core  # optional
    assert "flip-train = flip.cli.train:main" in entry_points
    assert "flip-eval = flip.cli.eval:main" in entry_points


def test_the_library_imports_open_clip_only_in_its_interop_module(wheel):
    with zipfile.ZipFile(wheel) as z:
        importing = sorted(
            n
            for n in z.namelist()
            if n.endswith(".py")
            and any(s in z.read(n).decode() for s in ("import open_clip", "from open_clip"))
        )
    assert set(importing) <= {"flip/interop/openclip.py"}


def run_installed(target: Path, cwd: Path, *command: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_installed_copy_trains_and_evaluates_from_another_directory(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run_installed(
        installed,
        elsewhere,
        sys.executable,
        "-c",
        "import flip, flip.conf; print(flip.__file__); print(flip.conf.__file__)",
    )
    assert all(Path(p).is_relative_to(installed) for p in where.split())  # not this checkout

    run = tmp_path / "run"
    trained = run_installed(
        installed,
        elsewhere,
        sys.executable,
        "-m",
        "flip.cli",
        "train",
        *FAST,
        "data.zeroshot.size=40",
        f"hydra.run.dir={run}",
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (run / "train.log").is_file()  # job named as by train.py
    report = [line for line in trained.splitlines() if line.startswith("held-out zero-shot")]

    evaluated = run_installed(
        installed,
        elsewhere,
        str(installed / "bin" / "flip-eval"),
        f"ckpt_path={ckpt}",
        "data.zeroshot.size=40",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    # the installed evaluation reads the architecture from the checkpoint and gives the
    # training run's held-out number
    assert len(report) == 1 and report[0] in evaluated.splitlines()
    assert (tmp_path / "eval" / "results.json").is_file()
