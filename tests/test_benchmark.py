"""The benchmark harness (flip.benchmark, experiments/benchmark.py): FLOPs counts against
analytic formulas and a quick run on the tiny model. No timings are asserted."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Block

from flip.benchmark import (
    Settings, analytic_flops, block_flops, count_flops, measured_flops, model_config,
    openclip_config, run_benchmark, to_markdown,
)

_CLI = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"
_spec = importlib.util.spec_from_file_location("experiments_benchmark", _CLI)
benchmark_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark_cli)


@pytest.mark.parametrize("tokens, width, heads", [(17, 64, 4), (50, 96, 2), (1, 32, 1)])
def test_block_flops_match_the_formula(tokens, width, heads):
    block = Block(width, heads, 4.0, qkv_bias=True)  # fused attention, as in the models
    x = torch.randn(3, tokens, width, requires_grad=True)
    # written out: qkv 3D², proj D², fc1 + fc2 8D² multiply-adds per token, QKᵀ and AV
    # L²D each; 2 FLOPs per multiply-add
    per_sample = 2 * tokens * 12 * width**2 + 2 * 2 * tokens**2 * width
    assert block_flops(tokens, width) == per_sample
    assert count_flops(lambda: block(x)) == 3 * per_sample
    # backward: gradients w.r.t. the input and the weights, twice the forward
    assert count_flops(lambda: block(x).sum().backward()) == 3 * 3 * per_sample


def test_analytic_flops_of_vit_b16():
    cfg = model_config("vit_b16", 224)
    a = {r: analytic_flops(cfg, r, batch=32) for r in (0.0, 0.5, 0.75)}
    assert a[0.0]["image"] == pytest.approx(35.13e9, rel=2e-3)  # the published 17.56 GMACs
    assert a[0.0]["text"] / a[0.0]["image"] == pytest.approx(0.07, abs=0.001)
    train = {r: a[r]["train"] / a[0.0]["train"] for r in a}
    assert train[0.5] == pytest.approx(0.53, abs=0.005)
    assert train[0.75] == pytest.approx(0.30, abs=0.005)


def test_analytic_flops_of_vit_l16_match_the_paper():
    cfg = model_config("vit_l16", 224)
    a = {r: analytic_flops(cfg, r, batch=32) for r in (0.0, 0.5, 0.75)}
    assert a[0.0]["text"] / a[0.0]["image"] == pytest.approx(0.044, abs=0.001)
    assert a[0.5]["train"] / a[0.0]["train"] == pytest.approx(0.52, abs=0.005)
    assert a[0.75]["train"] / a[0.0]["train"] == pytest.approx(0.28, abs=0.005)


@pytest.mark.parametrize("impl", ["flip", "openclip"])
def test_counting_on_the_meta_device_equals_counting_on_the_cpu(impl):
    cfg = model_config("tiny", 32)
    on_cpu = measured_flops(cfg, impl, (0.0, 0.75), batch=2, device="cpu")
    assert measured_flops(cfg, impl, (0.0, 0.75), batch=2) == on_cpu
    assert on_cpu[0.75]["train"] < on_cpu[0.0]["train"]


def test_openclip_mirror_has_our_architecture():
    import open_clip

    cfg = model_config("tiny", 32)
    kw = openclip_config(cfg)
    model = open_clip.model.CLIP(**kw)
    assert model.visual.transformer.width == cfg["image"]["width"]
    assert len(model.visual.transformer.resblocks) == cfg["image"]["depth"]
    assert model.visual.transformer.resblocks[0].attn.num_heads == cfg["image"]["heads"]
    assert isinstance(model.visual.ln_pre, torch.nn.Identity)
    assert model.attn_mask is None  # non-causal text
    assert model.token_embedding.num_embeddings == 30522


def test_harness_runs_on_tiny_and_counts_match_the_formula():
    s = Settings(arch="tiny", image_size=32, batch=4, warmup=0, repeats=1, threads=None,
                 profile=0.75)
    result = run_benchmark(s)
    rows = {(r["impl"], r["mask"]): r for r in result["rows"]}
    assert set(rows) == {(i, m) for i in ("flip", "openclip") for m in (0.0, 0.5, 0.75)}
    cfg = model_config("tiny", 32)
    for r in rows.values():
        a = analytic_flops(cfg, r["mask"], batch=4)
        # the counted training step of our model is the formula exactly
        if r["impl"] == "flip":
            for key in ("image", "text", "forward", "train"):
                assert r["flops"][key] == a[key], (r["mask"], key)
        assert abs(r["flops_ratio"] - r["analytic_ratio"]) < 0.01
        assert r["wall_s"]["n"] == 1 and r["wall_s"]["median"] > 0
        assert r["samples_per_s"] > 0
    # masking removes image tokens: 16 patches, 8 and 4 kept
    assert [rows["flip", m]["visible_patches"] for m in (0.0, 0.5, 0.75)] == [16, 8, 4]
    assert rows["flip", 0.75]["flops_ratio"] < rows["flip", 0.5]["flops_ratio"] < 1
    assert "speedup_vs_openclip" in rows["flip", 0.5]
    assert result["profile"]["flip"][0]["self_ms"] >= 0
    table = to_markdown(result)
    assert "| flip | 0.75 | 4 |" in table and "throughput vs OpenCLIP" in table


def test_flops_only_run_of_vit_l16_gives_table_1a():
    result = run_benchmark(Settings(arch="vit_l16", flops_only=True))  # meta device: instant
    ours = {r["mask"]: r for r in result["rows"] if r["impl"] == "flip"}
    assert ours[0.5]["flops_ratio"] == pytest.approx(0.52, abs=0.005)
    assert ours[0.75]["flops_ratio"] == pytest.approx(0.28, abs=0.005)
    assert ours[0.0]["text_share"] == pytest.approx(0.044, abs=0.001)
    assert ours[0.5]["wall_s"] is None and result["profile"] == {}
    assert "paper 0.52" in to_markdown(result)


def test_command_line_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    benchmark_cli.main(["--arch", "tiny", "--image-size", "32", "--batch", "2",
                        "--ratios", "0", "0.75", "--impls", "flip", "--warmup", "0",
                        "--repeats", "1", "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["mask"] for r in data["rows"]] == [0.0, 0.75]
    assert data["meta"]["command"].startswith("python experiments/benchmark.py --arch tiny")
    assert "| flip | 0 | 16 |" in out.with_suffix(".md").read_text()
    assert "| flip | 0.75 | 4 |" in capsys.readouterr().out
