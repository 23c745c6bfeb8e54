"""Every bad input a user can give at start-up ends in one sentence, by one mechanism
(``flip.cli.run_or_exit``): real ``train.py``/``eval.py`` processes, a non-zero exit, no
traceback, and a message naming the key or the file. ``HYDRA_FULL_ERROR=1`` and
``verbose=true`` keep the traceback.

The table is a plain list of (script, arguments, files to create, expected text); ``{tmp}``
in arguments, file names and the expected text is the test's folder. The processes fail at
start-up (seconds each) and run a few at a time in one fixture.
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import CONF, FAST

HEADER = "image_path,caption\n"
SHORT = HEADER + "".join(f"img{i}.png,a red square\n" for i in range(3))  # 3 rows < a batch of 16
NO_IMAGES = HEADER + "".join(f"gone{i}.png,a red square\n" for i in range(20))

# (script, arguments, {file: content}, expected text in the error line)
CASES = [
    ("train.py", ["mask=1.5"], {}, "mask=1.5 is invalid"),
    ("train.py", ["batch.micro=5"], {}, "batch.micro=5 must divide"),
    ("train.py", ["data.image_size=30"], {}, "data.image_size=30 is not a multiple of"),
    ("train.py", ["task=vqa"], {}, "give init_from=<checkpoint>"),
    ("train.py", ["data=csv", "data.train.path={tmp}/nope.csv"], {}, "{tmp}/nope.csv"),
    ("train.py", ["data=csv", "data.train.path={tmp}/e.csv"], {"e.csv": ""}, "{tmp}/e.csv"),
    (
        "train.py",
        ["data=csv", "data.train.path={tmp}/cols.csv"],
        {"cols.csv": "image,text\na.png,a cat\n"},
        "{tmp}/cols.csv: expected a header with columns 'image_path,caption'",
    ),
    # raised inside hydra.utils.instantiate (the datamodule's constructor)
    (
        "train.py",
        ["data=csv", "data.train.path={tmp}/short.csv", "data.max_skip_rate=2"],
        {"short.csv": SHORT},
        "data.max_skip_rate=2 must be in [0, 1]",
    ),
    # raised inside Lightning's fit set-up (datamodule.setup)
    (
        "train.py",
        ["data=csv", "data.train.path={tmp}/short.csv"],
        {"short.csv": SHORT},
        "the training set has 3 samples, fewer than one batch (16); lower batch.global",
    ),
    (
        "train.py",
        ["data=csv", "data.train.path={tmp}/gone.csv"],
        {"gone.csv": NO_IMAGES},
        "{tmp}/gone.csv: 20 consecutive rows from row 0 have no readable image",
    ),
    ("train.py", ["data=folder", "data.train.root={tmp}/empty"], {"empty/": ""}, "{tmp}/empty"),
    (
        "train.py",
        ["data=laion", "data.shards='{tmp}/none/{{00000..00002}}.tar'"],
        {},
        "data.shards='{tmp}/none/{{00000..00002}}.tar' matches 3 paths and none exists",
    ),
    ("train.py", ["ckpt_path={tmp}/nope.ckpt"], {}, "ckpt_path={tmp}/nope.ckpt does not exist"),
    ("train.py", ["init_from={tmp}/nope.ckpt"], {}, "{tmp}/nope.ckpt does not exist"),
    (
        "train.py",
        ["init_from={tmp}/text.ckpt"],
        {"text.ckpt": "not a checkpoint\n"},
        "{tmp}/text.ckpt",
    ),
    ("eval.py", ["ckpt_path={tmp}/nope.ckpt"], {}, "{tmp}/nope.ckpt does not exist"),
    (
        "eval.py",
        ["ckpt_path={tmp}/text.ckpt"],
        {"text.ckpt": "not a checkpoint\n"},
        "{tmp}/text.ckpt",
    ),
]
DEBUG = [({"HYDRA_FULL_ERROR": "1"}, []), ({}, ["verbose=true"])]
SMALL = [o for o in FAST if not o.startswith("schedule.")]  # tiny model, batch 16, no logger


def run(script: str, args: list[str], folder, env: dict | None = None):
    overrides = [a.format(tmp=folder) for a in args]
    common = SMALL if script == "train.py" else ["logger=none"]
    return subprocess.run(
        [sys.executable, script, *common, *overrides, f"hydra.run.dir={folder}/run"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=CONF.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})},
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case and the two debugging runs, three processes at a time."""
    jobs = []
    for i, (script, args, files, _) in enumerate(CASES):
        folder = tmp_path_factory.mktemp(f"case{i}")
        for name, content in files.items():
            path = folder / name
            if name.endswith("/"):
                path.mkdir()
            else:
                path.write_text(content)
        jobs.append((script, args, folder, None))
    for env, extra in DEBUG:
        jobs.append(("train.py", ["mask=1.5", *extra], tmp_path_factory.mktemp("debug"), env))
    with ThreadPoolExecutor(3) as pool:
        done = list(pool.map(lambda job: (job[2], run(*job)), jobs))
    return done[: len(CASES)], done[len(CASES) :]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[" ".join(c[1]) for c in CASES])
def test_bad_input_is_one_sentence(results, case):
    folder, out = results[0][case]
    expected = CASES[case][3].format(tmp=folder)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-2000:]
    assert "Error in call to target" not in out.stderr
    error = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, out.stderr[-2000:]
    assert expected in error[0], error[0]


@pytest.mark.parametrize("debug", range(len(DEBUG)), ids=["HYDRA_FULL_ERROR=1", "verbose=true"])
def test_debugging_keeps_the_traceback(results, debug):
    _, out = results[1][debug]
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "ConfigError: mask=1.5 is invalid" in out.stderr
    assert not any(line.startswith("error: ") for line in out.stderr.splitlines())
