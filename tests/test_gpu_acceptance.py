"""The GPU acceptance command (experiments/gpu_acceptance.py) run on the CPU at tiny size,
so that it cannot rot: its table has every row, and every ratio is computed from the
measured values it records. No timing is asserted."""

import statistics

import gpu_acceptance  # experiments/gpu_acceptance.py
import pytest
import torch
from step_benchmark import analytic_flops, model_config
from timm.models.vision_transformer import Block
from torch.nn.attention import SDPBackend, sdpa_kernel

pytest.importorskip("open_clip")


def test_sdpa_detection_tells_the_fused_kernel_from_the_math_fallback():
    block = Block(32, 2)
    x = torch.randn(2, 9, 32)
    fused = gpu_acceptance.sdpa_kernels(lambda: block(x), torch.device("cpu"))
    assert fused["fused"] and "aten::_scaled_dot_product_flash_attention_for_cpu" in fused["ops"]
    with sdpa_kernel(SDPBackend.MATH):
        math = gpu_acceptance.sdpa_kernels(lambda: block(x), torch.device("cpu"))
    assert not math["fused"] and "aten::_scaled_dot_product_attention_math" in math["ops"]


def _cells(markdown: str) -> dict[tuple[str, float], list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[1] in ("flip", "openclip"):
            rows[cells[1], float(cells[2])] = cells
    return rows


@pytest.mark.slow  # two models, three ratios, the caching check: ~10 s idle, minutes under load
def test_acceptance_run_on_cpu_prints_every_row_from_its_measurements(tmp_path, capsys):
    batch = 4
    result = gpu_acceptance.main(
        ["--device", "cpu", "--archs", "tiny", "--batch", str(batch), "--grad-cache-batch", "8",
         "--warmup", "0", "--repeats", "2", "--out", str(tmp_path / "acc")]
    )  # fmt: skip
    m = result["archs"]["tiny"]
    rows = {(r["impl"], r["mask"]): r for r in m["rows"]}
    assert set(rows) == {(i, r) for i in ("flip", "openclip") for r in (0.0, 0.5, 0.75)}
    cfg = model_config("tiny", 64)
    for (impl, mask), r in rows.items():
        base = rows[impl, 0.0]
        assert len(r["step_s_all"]) == 2 and r["step_s"] == statistics.median(r["step_s_all"])
        assert r["samples_per_s"] == pytest.approx(batch / r["step_s"])
        assert r["time_ratio"] == pytest.approx(r["step_s"] / base["step_s"])
        assert r["paper_time_ratio"] == {0.0: 1.0, 0.5: 0.5, 0.75: 0.33}[mask]
        assert r["flops_ratio"] == pytest.approx(
            analytic_flops(cfg, mask, batch)["train"] / analytic_flops(cfg, 0.0, batch)["train"]
        )
        assert r["peak_bytes"] > 0
        assert r["peak_mb_per_sample"] == pytest.approx(r["peak_bytes"] / 2**20 / batch)
        assert r["memory_ratio"] == pytest.approx(r["peak_bytes"] / base["peak_bytes"])
    assert rows["flip", 0.75]["flops_ratio"] == pytest.approx(0.320, abs=1e-3)
    assert m["sdpa"]["fused"]
    gc = m["grad_cache"]
    assert (gc["batch"], gc["micro_batches"]) == (8, 4)
    assert gc["one_shot_s"] == statistics.median(gc["times"]["one_shot"])
    assert gc["overhead"] == pytest.approx(gc["cached_s"] / gc["one_shot_s"])
    # the printed table is the recorded one, at its precision
    printed = (tmp_path / "acc.md").read_text()
    assert printed.strip() in capsys.readouterr().out
    table = _cells(printed)
    assert set(table) == set(rows)
    for key, r in rows.items():
        cells = table[key]
        assert float(cells[3]) == pytest.approx(r["step_s"], abs=5e-5)
        assert float(cells[5]) == pytest.approx(r["time_ratio"], abs=5e-4)
        assert float(cells[7]) == pytest.approx(r["flops_ratio"], abs=5e-4)
        assert float(cells[9]) == pytest.approx(r["memory_ratio"], abs=5e-4)
    assert "fused scaled-dot-product attention **used**" in printed
    assert f"= **{gc['overhead']:.2f}×**" in printed
