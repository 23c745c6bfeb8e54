"""SLURM through Hydra's submitit launcher (conf/hydra/launcher/), checked without a cluster:
the composed launcher, the sbatch script a sweep would submit (a fake `sbatch` records it),
a real 3-job sweep with the local submitit launcher, and Lightning's requeue on SIGUSR1
under simulated SLURM variables with submitit's own signal handlers installed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationValidationError

from flip.checkpoint import load_checkpoint
from flip.run import train
from tests.conftest import CONF, FAST, compose_fast

ROOT = CONF.parent
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
GPU_4x8 = ["accelerator=gpu", "trainer.num_nodes=4", "trainer.devices=8"]


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def run(
    args: list[str], cwd: Path, path_prefix: Path | None = None, timeout: int = 300, **env_vars: str
):
    env = dict(os.environ, HYDRA_FULL_ERROR="1", **env_vars)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fake_commands(directory: Path, **scripts: str) -> Path:
    directory.mkdir()
    for name, body in scripts.items():
        (directory / name).write_text(f"#!/bin/sh\n{body}\n")
        (directory / name).chmod(0o755)
    return directory


# --- composition --------------------------------------------------------------------------


def test_slurm_launcher_takes_its_size_from_the_trainer():
    cfg = compose_with_hydra("hydra/launcher=slurm", *GPU_4x8, "hydra.launcher.partition=gpu")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == SLURM_LAUNCHER
    assert launcher["nodes"] == 4
    assert launcher["gpus_per_node"] == 8 and launcher["tasks_per_node"] == 8  # a task per GPU
    assert launcher["partition"] == "gpu"
    assert launcher["cpus_per_task"] == 10 and launcher["mem_gb"] == 480
    assert launcher["timeout_min"] == 1440
    assert launcher["signal_delay_s"] == 120
    assert launcher["additional_parameters"] == {"signal": "USR1@120", "requeue": True}
    assert launcher["max_num_timeout"] == 0
    assert launcher["setup"] and all(isinstance(line, str) for line in launcher["setup"])
    # the default single-node trainer sizes a one-GPU job; the delay moves with signal_delay_s
    cfg = compose_with_hydra("hydra/launcher=slurm", "hydra.launcher.signal_delay_s=300")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (1, 1, 1)
    assert launcher["additional_parameters"]["signal"] == "USR1@300"


def test_slurm_launcher_refuses_devices_auto():
    cfg = compose_with_hydra("hydra/launcher=slurm", "accelerator=gpu")  # trainer.devices=auto
    with pytest.raises(InterpolationValidationError, match="hydra.launcher.gpus_per_node"):
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_local_launcher_runs_one_task_per_job():
    cfg = compose_with_hydra("hydra/launcher=local", "trainer.devices=2")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == LOCAL_LAUNCHER
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 1, 2)


@pytest.mark.slow
def test_cfg_prints_resolved_slurm_launcher(tmp_path):
    # Hydra 1.3 takes --cfg without -m/sweep values; the launcher does not depend on them.
    out = run(
        ["hydra/launcher=slurm", *GPU_4x8, "--cfg", "all", "-p", "hydra.launcher", "--resolve"],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["_target_"] == SLURM_LAUNCHER
    assert (printed["nodes"], printed["gpus_per_node"], printed["tasks_per_node"]) == (4, 8, 8)
    assert printed["additional_parameters"]["signal"] == "USR1@120"
    assert not list(tmp_path.iterdir())  # nothing written, nothing submitted


# --- what a sweep submits -----------------------------------------------------------------


@pytest.mark.slow
def test_sweep_submits_one_array_job_per_setting(tmp_path):
    """`train.py -m hydra/launcher=slurm mask=0,0.5,0.75` up to `sbatch`, which is a fake that
    records the script and fails, so nothing waits on a cluster."""
    record = tmp_path / "submitted.sh"
    bin_dir = fake_commands(
        tmp_path / "bin", srun="exit 1", sbatch=f'cp "$1" {record}\necho "sbatch: fake" >&2\nexit 1'
    )
    work = tmp_path / "work"
    work.mkdir()
    out = run(
        ["-m", "hydra/launcher=slurm", *GPU_4x8, "mask=0,0.5,0.75"], cwd=work, path_prefix=bin_dir
    )
    assert out.returncode != 0 and "sbatch: fake" in out.stderr + out.stdout
    for i, mask in enumerate(["0", "0.5", "0.75"]):
        assert f"#{i} : {' '.join(GPU_4x8)} mask={mask}" in out.stdout + out.stderr
    flags = {
        line.split("=")[0]: line.partition("=")[2]
        for line in record.read_text().splitlines()
        if line.startswith("#SBATCH")
    }
    assert flags["#SBATCH --array"] == "0-2%3"  # one SLURM job per setting
    assert flags["#SBATCH --nodes"] == "4"
    assert flags["#SBATCH --ntasks-per-node"] == "8"
    assert flags["#SBATCH --gpus-per-node"] == "8"
    assert flags["#SBATCH --cpus-per-task"] == "10"
    assert flags["#SBATCH --mem"] == "480GB"
    assert flags["#SBATCH --time"] == "1440"
    assert flags["#SBATCH --signal"] == "USR1@120"  # Lightning's requeue signal, not USR2
    assert "#SBATCH --requeue" in flags
    assert "\nsrun " in record.read_text()

    # A requeued job reruns its pickle: it must land in the same output directory (the
    # sweep dir's ${now:...} is cached in the pickled config), where its hpc_ckpt is.
    (sweep_dir,) = (work / "multirun").glob("*/*")
    pickles = sorted((sweep_dir / ".submitit").glob("*.pkl"))
    assert len(pickles) == 3
    time.sleep(1.1)  # a re-resolved ${now:%H-%M-%S} would differ
    from hydra.core.singleton import Singleton
    from hydra.core.utils import setup_globals
    from submitit.core.utils import DelayedSubmission

    saved = Singleton.get_state()
    try:
        masks = set()
        for pkl in pickles:
            delayed = DelayedSubmission.load(pkl)
            overrides, job_dir_key, _, _, state = delayed.args
            Singleton.set_state(state)
            setup_globals()
            launcher = delayed.function
            job_cfg = launcher.hydra_context.config_loader.load_sweep_config(
                launcher.config, overrides
            )
            job_dir = work / str(OmegaConf.select(job_cfg, job_dir_key))
            assert job_dir.resolve() == sweep_dir.resolve()
            masks.add(job_cfg.mask)
        assert masks == {0, 0.5, 0.75}
    finally:
        Singleton.set_state(saved)


# --- a real sweep through submitit on this machine ----------------------------------------


@pytest.mark.slow
def test_local_submitit_sweep_runs_three_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    fast = [o for o in FAST if not o.startswith("schedule.total_samples=")]
    out = run(
        [
            "-m",
            "hydra/launcher=local",
            "mask=0,0.5,0.75",
            *fast,
            "schedule.total_samples=32",
            "data.zeroshot.size=40",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        OMP_NUM_THREADS="1",
    )  # 3 jobs at once on a small machine: no thread oversubscription
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1", "2"]
    masks = []
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        masks.append(yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["mask"])
        assert f"mask={masks[-1]}" in overrides
        ckpt = load_checkpoint(job / "checkpoints" / "last.ckpt")
        assert ckpt["global_step"] == 2  # 32 samples / 16 per step
    assert masks == [0, 0.5, 0.75]
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 3  # via submitit


# --- Lightning's requeue on SLURM -------------------------------------------------------

EVENTS: list[tuple[str, int]] = []


class RequeueProbe(L.Callback):
    """Records the steps training starts and ends at; sends SIGUSR1 (what SLURM sends signal_delay_s
    before the time limit, given --signal=USR1@...) to this process after step `signal_at`."""

    def __init__(self, signal_at: int | None = None):
        self.signal_at = signal_at

    def on_train_start(self, trainer, pl_module):
        EVENTS.append(("start", trainer.global_step))

    def on_train_end(self, trainer, pl_module):
        EVENTS.append(("end", trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.signal_at:
            EVENTS.append(("signal", trainer.global_step))
            os.kill(os.getpid(), signal.SIGUSR1)


def test_lightning_requeues_on_sigusr1_and_resumes(tmp_path, monkeypatch):
    """A job of hydra/launcher=slurm, simulated: SLURM variables set, submitit's handlers
    (USR2, TERM, CONT) installed. SIGUSR1 mid-run -> Lightning saves hpc_ckpt_1.ckpt in the
    output dir and runs `scontrol requeue <array job>_<task>`, whereupon SLURM sends SIGTERM
    (here the fake scontrol does) -> the run stops cleanly; the rerun resumes from hpc_ckpt."""
    record = tmp_path / "scontrol.txt"
    bin_dir = fake_commands(tmp_path / "bin", scontrol=f'echo "$@" >> {record}\nkill -TERM $PPID')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = dict(
        SLURM_JOB_ID="4242",
        SLURM_ARRAY_JOB_ID="4240",
        SLURM_ARRAY_TASK_ID="1",
        SLURM_JOB_NAME="train",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODELIST="localhost",
        SUBMITIT_EXECUTOR="slurm",
    )
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)

    import submitit
    from submitit.core.utils import DelayedSubmission, JobPaths

    signums = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT]
    saved = {s: signal.getsignal(s) for s in signums}
    out = tmp_path / "job"
    probe = f"+callbacks.probe._target_={__name__}.RequeueProbe"
    EVENTS.clear()
    try:
        env = submitit.JobEnvironment()
        env._handle_signals(JobPaths(tmp_path / "submitit"), DelayedSubmission(print))
        assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # free for Lightning

        with pytest.raises(SystemExit):  # SIGTERM after the requeue: a clean stop
            train(compose_fast(probe, "+callbacks.probe.signal_at=2", output_dir=out))  # 4 steps
        assert EVENTS == [("start", 0), ("signal", 2)]
        assert record.read_text().split() == ["requeue", "4240_1"]
        hpc = load_checkpoint(out / "hpc_ckpt_1.ckpt")
        assert hpc["global_step"] == 2
        assert not (out / "hpc_ckpt_2.ckpt").exists()

        # the requeued job: same overrides, same output dir, ckpt_path=null
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        EVENTS.clear()
        train(compose_fast(probe, output_dir=out))
        assert EVENTS == [("start", 2), ("end", 4)]
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
