"""The TPU code path on torch-xla's CPU device: Lightning's XLA strategy runs PretrainModule
(plain and gradient-cached steps); its losses match eager CPU and decrease.

What this cannot show (needs a TPU): multi-core XLA collectives (all_gather with gradients
over a TPU pod), bf16 numerics on the MXU, compile-once behaviour at pod scale."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_xla", reason="torch-xla wheels exist for Linux x86_64 only")


@pytest.mark.slow
def test_pretrain_module_on_xla_cpu(tmp_path):
    script = Path(__file__).with_name("xla_pretrain_steps.py")
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "losses.json")],
        env={**os.environ, "PJRT_DEVICE": "CPU"},
        cwd=script.parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "losses.json").read_text())
    assert result["device"].startswith("xla")
    for key in ("xla_mask0", "cpu_mask0", "xla_mask50_cached"):
        assert len(result[key]) == 6
    # same weights and data, no masking: XLA equals eager CPU step by step
    assert result["xla_mask0"] == pytest.approx(result["cpu_mask0"], rel=1e-4)
    # masking (XLA's own random masks) with gradient caching (4 micro-batches of 4):
    # training on a repeated batch lowers the loss
    losses = result["xla_mask50_cached"]
    assert losses[-1] < 0.8 * losses[0], losses
