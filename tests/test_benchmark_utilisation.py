"""The utilisation benchmark (experiments/benchmark_utilisation.py): every utilisation is the
analytic training FLOPs over the measured step time over the matmul peak measured in the
same run, and the table prints those numbers. No timing is asserted."""

import benchmark_utilisation as bu  # experiments/benchmark_utilisation.py
import pytest
import torch
from step_benchmark import analytic_flops, matmul_peak, model_config


def test_matmul_peak_is_the_flops_of_one_mm_over_its_time():
    peak = matmul_peak("fp32", torch.device("cpu"), size=128, repeats=2)
    assert peak["flops_per_s"] == pytest.approx(2 * 128**3 / peak["seconds"])


def test_profile_categories():
    assert bu.category("aten::addmm") == "matmul"
    assert bu.category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert bu.category("aten::native_layer_norm_backward") == "layer norm"
    assert bu.category("aten::gather") == "gather / masking"
    assert bu.category("aten::_fused_adamw_") == "optimiser"
    assert bu.category("aten::mul") == "other"


def test_run_on_tiny_derives_utilisation_from_its_measurements(tmp_path):
    batch = 2
    result = bu.main(
        ["--models", f"tiny:{batch}", "--dtypes", "fp32", "bf16", "--ratios", "0", "0.5",
         "--repeats", "1", "--warmup", "0", "--profile", "0.5", "--out", str(tmp_path / "u")]
    )  # fmt: skip
    rows = {(r["dtype"], r["mask"]): r for r in result["rows"]}
    assert set(rows) == {(d, m) for d in ("fp32", "bf16") for m in (0.0, 0.5)}
    cfg = model_config("tiny", 64)
    for (_, mask), r in rows.items():
        assert r["train_flops"] == analytic_flops(cfg, mask, batch)["train"] * batch
        assert r["step_s"] == r["step_s_all"][0]
        assert r["utilisation"] == pytest.approx(
            r["train_flops"] / r["step_s"] / r["peak_flops_per_s"]
        )
    assert rows["fp32", 0.0]["peak_flops_per_s"] != rows["bf16", 0.0]["peak_flops_per_s"]
    profile = rows["fp32", 0.5]["profile"]
    assert sum(profile["share"].values()) == pytest.approx(1.0)
    assert 0 < profile["gemm_share"] <= profile["share"]["matmul"]
    markdown = (tmp_path / "u.md").read_text()
    for r in rows.values():
        assert f"| {r['step_s']:.3f} |" in markdown and f"**{r['utilisation']:.2f}**" in markdown
