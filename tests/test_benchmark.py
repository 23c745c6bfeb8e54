"""The training-step benchmark (experiments/step_benchmark.py, experiments/benchmark.py;
experiments/ is on pytest's path): FLOPs counts against formulas and hand counts, and every
derived number of a run (ratios, throughput, the markdown table) recomputed from the raw
measurements. No timings are asserted."""

import importlib.util
import json
import re
from pathlib import Path

import benchmark as benchmark_cli  # experiments/benchmark.py
import pytest
import torch
from hydra.utils import instantiate
from step_benchmark import (
    BUILDERS,
    Settings,
    analytic_flops,
    block_flops,
    count_flops,
    measured_flops,
    model_config,
    openclip_config,
    run_benchmark,
    to_markdown,
    top_ops,
)
from timm.layers import config as timm_config
from timm.layers import set_fused_attn
from timm.models.vision_transformer import Block
from torch.utils.flop_counter import FlopCounterMode

from flip.tasks.pretrain import PretrainModule


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


@pytest.fixture
def unfused_timm_attention():
    """timm attention as explicit matmuls, which FlopCounterMode counts (it misses the fused
    CPU kernel); timm reads the switch when a block is built."""
    before = timm_config._USE_FUSED_ATTN
    set_fused_attn(False)
    yield
    timm_config._USE_FUSED_ATTN = before


def test_analytic_flops_of_vit_b16_equal_torchs_own_count(unfused_timm_attention):
    """The formula against torch's FLOP counter on the real B/16 (meta device, timm's
    unfused attention, no sdpa_kernel switch): forward and training step at each ratio."""
    cfg, batch = model_config("vit_b16", 224), 2
    with torch.device("meta"):
        t = BUILDERS["flip"](cfg, "for_loop")
        assert not t.model.visual.blocks[0].attn.fused_attn
        images = torch.randn(batch, 3, 224, 224)
        tokens = torch.randint(1, 30522, (batch, 32))
        counted = {}
        for r in (0.0, 0.5, 0.75):
            t.set_mask(r)
            with FlopCounterMode(display=False) as image, torch.no_grad():
                t.encode_image(images)
            with FlopCounterMode(display=False) as train:
                t.loss(images, tokens).backward()
            counted[r] = {"image": image.get_total_flops(), "train": train.get_total_flops()}
    assert counted[0.0]["image"] / batch == pytest.approx(35.13e9, rel=2e-3)  # 17.56 GMACs
    for r, c in counted.items():
        a = analytic_flops(cfg, r, batch)
        assert (a["image"] * batch, a["train"] * batch) == (c["image"], c["train"])
    assert counted[0.5]["train"] / counted[0.0]["train"] == pytest.approx(0.527, abs=5e-4)
    assert counted[0.75]["train"] / counted[0.0]["train"] == pytest.approx(0.298, abs=5e-4)


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


# tiny at 32 px, batch 4, per sample, 2 FLOPs per multiply-add, counted by hand:
# image: patch embedding 16 patches x 128 x (3*8*8) = 786_432; a block on L tokens of width
#   128: qkv + proj + fc1 + fc2 = L*12*128^2 multiply-adds, QK^T + AV = 2*L^2*128:
#   L=17 (16 patches + class token): 6_832_640, L=5 (mask 0.75 keeps 4): 1_978_880;
#   3 blocks; projection 128 x 128 = 32_768.
# text: 32 tokens of width 64: 3_407_872 per block, 2 blocks, projection 64 x 128 = 16_384.
# loss: two (4 x 128) @ (128 x 4) logit matmuls, 2 * 2 * 4 * 4 * 128 FLOPs for 4 samples:
#   2_048 per sample.
# train step: backward = 2 x forward, but the patch embedding needs no input gradient.
TINY32 = {
    0.0: {"image": 786_432 + 3 * 6_832_640 + 32_768, "text": 2 * 3_407_872 + 16_384},
    0.75: {"image": 786_432 + 3 * 1_978_880 + 32_768, "text": 2 * 3_407_872 + 16_384},
}
for _f in TINY32.values():
    _f["forward"] = _f["image"] + _f["text"] + 2_048
    _f["train"] = 3 * _f["forward"] - 786_432


@pytest.mark.parametrize("impl", ["flip", "openclip"])
def test_counted_flops_of_tiny_equal_the_hand_count(impl):
    cfg = model_config("tiny", 32)
    counted = measured_flops(cfg, impl, (0.0, 0.75), batch=4)
    assert counted == TINY32
    assert {r: analytic_flops(cfg, r, batch=4) for r in TINY32} == TINY32


def test_top_ops_counts_calls_and_ranks_by_self_time():
    a = torch.randn(128, 128)

    def work():
        for _ in range(3):
            a @ a
        for _ in range(5):
            a + 1

    ops = top_ops(work, torch.device("cpu"), rows=1000)  # every op
    calls = {o["op"]: o["calls"] for o in ops}
    assert calls["aten::mm"] == 3 and calls["aten::add"] == 5
    self_ms = [o["self_ms"] for o in ops]
    assert self_ms == sorted(self_ms, reverse=True)
    for o in ops:
        assert o["share"] == pytest.approx(o["self_ms"] / sum(self_ms))


def _number(cell: str) -> float | None:
    return None if cell == "–" else float(cell.rstrip("×"))


def table_rows(markdown: str) -> dict[tuple[str, float], dict[str, float | None]]:
    """The numbers of to_markdown's main table, parsed back, by (impl, mask)."""
    out = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 14 or cells[0] not in ("flip", "openclip"):
            continue
        ratio, analytic = cells[6].replace("(", "").replace(")", "").split()
        time, cpu_time = cells[10].replace("(", "").replace(")", "").split()
        wall = cells[7].replace("[", " ").replace("]", "").replace("–", " ").split()
        memory, tokens = cells[12].replace("(", "").replace(")", "").split()
        vs = cells[13].replace("(", "").replace(")", "").split()
        out[cells[0], float(cells[1])] = {
            "visible": int(cells[2]),
            "image": float(cells[3]),
            "text": float(cells[4]),
            "train": float(cells[5]),
            "ratio": float(ratio),
            "analytic": float(analytic),
            "wall": tuple(map(float, wall)) if wall != ["–"] else None,
            "samples_per_s": _number(cells[9]),
            "time_ratio": _number(time),
            "cpu_time_ratio": _number(cpu_time),
            "mb_per_sample": _number(cells[11]),
            "memory_ratio": _number(memory),
            "token_ratio": float(tokens),
            "vs": tuple(map(_number, vs)) if vs else None,
        }
    return out


def assert_table_equals_json(markdown: str, result: dict) -> None:
    """Every number of the markdown table is the json's, at the printed precision."""
    table = table_rows(markdown)
    assert set(table) == {(r["impl"], r["mask"]) for r in result["rows"]}
    for r in result["rows"]:
        t = table[r["impl"], r["mask"]]
        assert t["visible"] == r["visible_patches"]
        for key in ("image", "text", "train"):
            assert t[key] == pytest.approx(r["flops"][key] / 1e9, abs=5e-4)
        assert t["ratio"] == pytest.approx(r["flops_ratio"], abs=5e-4)
        assert t["analytic"] == pytest.approx(r["analytic_ratio"], abs=5e-4)
        assert t["token_ratio"] == pytest.approx(r["visible_token_ratio"], abs=5e-4)
        if r["wall_s"] is None:
            assert t["wall"] is None and t["samples_per_s"] is None
            continue
        w = r["wall_s"]
        assert t["wall"] == pytest.approx((w["median"], w["min"], w["max"]), abs=5e-4)
        assert t["samples_per_s"] == pytest.approx(r["samples_per_s"], abs=5e-3)
        assert t["time_ratio"] == pytest.approx(r["time_ratio"], abs=5e-4)
        assert t["cpu_time_ratio"] == pytest.approx(r["cpu_time_ratio"], abs=5e-4)
        assert t["mb_per_sample"] == pytest.approx(r["peak_mb_per_sample"], abs=0.05)
        assert t["memory_ratio"] == pytest.approx(r["memory_ratio"], abs=5e-4)
        if "speedup_vs_openclip" in r:
            assert t["vs"] == pytest.approx(
                (r["speedup_vs_openclip"], r["cpu_speedup_vs_openclip"]), abs=5e-3
            )


@pytest.mark.slow  # memory: a fresh process per row
def test_harness_run_on_tiny_derives_every_number_from_its_measurements():
    batch = 4
    s = Settings(arch="tiny", image_size=32, batch=batch, warmup=0, repeats=2, profile=0.75)
    result = run_benchmark(s)
    rows = {(r["impl"], r["mask"]): r for r in result["rows"]}
    assert set(rows) == {(i, m) for i in ("flip", "openclip") for m in (0.0, 0.5, 0.75)}
    # masking removes image tokens: 16 patches, 8 and 4 kept
    assert [rows["flip", m]["visible_patches"] for m in (0.0, 0.5, 0.75)] == [16, 8, 4]
    for impl in ("flip", "openclip"):
        assert rows[impl, 0.75]["flops"] == TINY32[0.75]
    for (impl, mask), r in rows.items():
        base = rows[impl, 0.0]
        # ratios: one raw measurement over another, recomputed here
        assert r["flops_ratio"] == r["flops"]["train"] / base["flops"]["train"]
        assert r["analytic_ratio"] == (
            analytic_flops(model_config("tiny", 32), mask, batch)["train"]
            / analytic_flops(model_config("tiny", 32), 0.0, batch)["train"]
        )
        assert r["text_share"] == base["flops"]["text"] / base["flops"]["image"]
        w, c = r["wall_s"], r["cpu_s"]
        assert w["n"] == c["n"] == 2
        assert w["median"] == pytest.approx((w["min"] + w["max"]) / 2)  # median of two
        assert c["median"] == pytest.approx((c["min"] + c["max"]) / 2)
        assert r["samples_per_s"] == pytest.approx(batch / w["median"])
        assert r["time_ratio"] == pytest.approx(w["median"] / base["wall_s"]["median"])
        assert r["cpu_time_ratio"] == pytest.approx(c["median"] / base["cpu_s"]["median"])
        assert r["peak_mb_per_sample"] == pytest.approx(r["peak_mb"] / batch)
        assert r["memory_ratio"] == pytest.approx(r["peak_mb"] / base["peak_mb"])
        # 16 patches and a class token; 8 and 4 patches kept
        assert r["visible_token_ratio"] == {0.0: 1.0, 0.5: 9 / 17, 0.75: 5 / 17}[mask]
        # measured in its own process: its peak holds the model, the optimiser and the step
        assert r["process_peak_mb"] > r["peak_mb"] > 0
    for mask in (0.0, 0.5, 0.75):
        ours, theirs = rows["flip", mask], rows["openclip", mask]
        assert ours["speedup_vs_openclip"] == pytest.approx(
            theirs["wall_s"]["median"] / ours["wall_s"]["median"]
        )
        assert ours["cpu_speedup_vs_openclip"] == pytest.approx(
            theirs["cpu_s"]["median"] / ours["cpu_s"]["median"]
        )
        assert "speedup_vs_openclip" not in theirs
    # the profile of one step at mask 0.75: ranked by self time, one entry per op
    for impl in ("flip", "openclip"):
        ops = result["profile"][impl]
        assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
        assert len({o["op"] for o in ops}) == len(ops) == 15
    markdown = to_markdown(result)
    assert_table_equals_json(markdown, result)
    speedup = rows["flip", 0.5]["speedup_vs_openclip"]
    assert f"- mask 0.5: throughput vs OpenCLIP {speedup:.2f}× wall" in markdown
    memory = rows["flip", 0.75]["memory_ratio"]
    assert (
        f"memory ratio {memory:.3f} vs image tokens {5 / 17:.3f} (goal ≤ 0.35: "
        f"{'met' if memory <= 0.35 else 'MISSED'})"
    ) in markdown
    assert "each project's shipped AdamW" in markdown


def test_flops_only_run_of_vit_l16_gives_table_1a():
    result = run_benchmark(Settings(arch="vit_l16", flops_only=True))  # meta device: instant
    ours = {r["mask"]: r for r in result["rows"] if r["impl"] == "flip"}
    assert ours[0.5]["flops_ratio"] == pytest.approx(0.52, abs=0.005)
    assert ours[0.75]["flops_ratio"] == pytest.approx(0.28, abs=0.005)
    assert ours[0.0]["text_share"] == pytest.approx(0.044, abs=0.001)
    assert ours[0.5]["wall_s"] is None and result["profile"] == {}
    assert "paper 0.52" in to_markdown(result)


@pytest.mark.slow  # memory: a fresh process per row
def test_command_line_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    benchmark_cli.main(
        [
            "--arch",
            "tiny",
            "--image-size",
            "32",
            "--batch",
            "2",
            "--ratios",
            "0",
            "0.75",
            "--impls",
            "flip",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["mask"] for r in data["rows"]] == [0.0, 0.75]
    assert data["meta"]["command"].startswith("python experiments/benchmark.py --arch tiny")
    markdown = out.with_suffix(".md").read_text()
    assert_table_equals_json(markdown, data)  # the written table is the written json
    assert data["rows"][1]["flops"]["image"] == TINY32[0.75]["image"]
    assert table_rows(capsys.readouterr().out) == table_rows(markdown)


# -- the optimisers: each project's shipped AdamW, or one implementation for both --------


def _open_clip_train_exclude():
    """The no-decay rule as written in open_clip_train/main.py (its ``exclude`` lambda,
    read from the installed file: the script builds the optimiser inline in ``main``)."""
    source = Path(importlib.util.find_spec("open_clip_train.main").origin).read_text()
    return eval(re.search(r"exclude = (lambda n, p: .+)\n", source).group(1))


def _group_names(model, optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]


def test_shipped_openclip_adamw_is_open_clip_trains():
    from open_clip_train.params import parse_args

    t = BUILDERS["openclip"](model_config("tiny", 32), "shipped")
    exclude = _open_clip_train_exclude()
    named = [(n, p) for n, p in t.model.named_parameters() if p.requires_grad]
    assert len(named) < len(list(t.model.parameters()))  # the fixed sin-cos table is left out
    # main.py: gains and biases (no decay) first, then the rest with args.wd
    assert _group_names(t.model, t.optimizer) == [
        {n for n, p in named if exclude(n, p)},
        {n for n, p in named if not exclude(n, p)},
    ]
    assert "logit_scale" in _group_names(t.model, t.optimizer)[0]
    args = parse_args(["--model", "ViT-B-16"])  # its defaults for a ViT
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [0.0, args.wd] == [0.0, 0.2]
    d = t.optimizer.defaults
    assert (
        (d["lr"], d["betas"], d["eps"])
        == (args.lr, (args.beta1, args.beta2), args.eps)
        == (5e-4, (0.9, 0.98), 1e-6)
    )
    assert d["fused"] is None and d["foreach"] is None  # torch's default implementation


def test_shipped_flip_adamw_is_pretrain_modules():
    t = BUILDERS["flip"](model_config("tiny", 32), "shipped")
    module = PretrainModule(
        instantiate(model_config("tiny", 32)),
        global_batch=256,
        total_samples=10**9,
        warmup_samples=0,
    )
    reference = module.configure_optimizers()["optimizer"]
    ours = [{f"model.{n}" for n in g} for g in _group_names(t.model, t.optimizer)]
    assert ours == _group_names(module, reference)
    for key in ("betas", "eps", "weight_decay", "fused", "foreach"):
        assert t.optimizer.defaults[key] == reference.defaults[key]
    assert t.optimizer.defaults["fused"] is True  # the CPU default


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_like_for_like_gives_both_the_same_adamw(impl):
    cfg = model_config("tiny", 32)
    ours, theirs = (BUILDERS[name](cfg, impl).optimizer.defaults for name in ("flip", "openclip"))
    assert ours == theirs
    assert (ours["fused"], ours["foreach"]) == {
        "fused": (True, None),
        "foreach": (None, True),
        "for_loop": (None, False),
    }[impl]
    assert ours["betas"] == (0.9, 0.95) and ours["eps"] == 1e-8


def test_unknown_adamw_is_refused():
    with pytest.raises(ValueError, match="adamw must be one of shipped, fused"):
        run_benchmark(Settings(arch="tiny", adamw="loop", flops_only=True))
