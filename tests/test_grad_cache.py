"""Gradient caching: loss and every gradient equal the one-shot full batch (with masking,
with a per-sample auxiliary term, with the text graph kept), on one process and through
Lightning DDP with 2 gloo processes, where it also synchronises gradients once per step;
the last micro-batch is not replayed and a kept text graph is not replayed either."""

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from flip.grad_cache import cached_backward
from flip.loss import contrastive_loss
from flip.masking import Mask
from flip.models.clip import FLIP, Features
from flip.models.image_encoder import ImageEncoder
from flip.models.text_encoder import TextEncoder
from flip.objective import Objective

B, SIZE = 8, 32


def tiny_flip(drop_path: float = 0.0) -> FLIP:
    torch.manual_seed(0)
    image = ImageEncoder(SIZE, patch_size=8, width=32, depth=2, heads=2, drop_path=drop_path)
    text = TextEncoder(vocab_size=100, context_length=8, width=32, depth=2, heads=2)
    return FLIP(image, text, embed_dim=16).double().train()


def batch(n: int = B, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64),
        torch.randint(1, 100, (n, 8), generator=g),
    )


def masks(model: FLIP, n: int = B, text: Mask = Mask()) -> tuple[Mask, Mask]:
    """The batch's masks as ``PretrainModule.draw_masks`` draws them (image 0.5, then the
    text mask): image noise first, then text noise."""
    return Mask(0.5).drawn(n, model.visual.num_patches, "cpu"), text.drawn(n, 8, "cpu")


def grads(model: FLIP) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class TokenPenalty(nn.Module):
    """A per-sample auxiliary term with its own parameter, reading the image tokens and
    kept indices: mean squared (projected tokens) + position-dependent weight."""

    def __init__(self, width: int = 32, weight: float = 0.3):
        super().__init__()
        self.weight, self.head = weight, nn.Linear(width, 4)

    def forward(self, features: Features, images, tokens) -> torch.Tensor:
        x = self.head(features.image_tokens)  # (b, T, 4)
        where = features.image_keep.to(x.dtype).mean(1) / 16  # (b,)
        return (x**2).mean((1, 2)) * (1 + where) + images.mean((1, 2, 3)) ** 2


def objective(aux: bool = False) -> Objective:
    torch.manual_seed(11)
    return Objective({"penalty": TokenPenalty()} if aux else None).double()


def one_shot(model: FLIP, images, tokens, noise, aux: Objective | None = None) -> torch.Tensor:
    if aux is None:
        image, text, scale = model(images, tokens, Mask(0.5, noise))
        loss = contrastive_loss(image, text, scale)
    else:
        features = model.forward_features(images, tokens, Mask(0.5, noise))
        loss = aux(features, model.scale(), images, tokens)[0]
    loss.backward()
    return loss.detach()


def assert_same_grads(actual: dict, expected: dict, min_count: int = 11) -> None:
    """Every gradient within 1e-5 relative error (norm of the difference / norm); the
    loss itself is computed in fp32, so elementwise checks on near-zero entries are noise."""
    assert actual.keys() == expected.keys() and len(expected) >= min_count
    for name in expected:
        error = (actual[name] - expected[name]).norm() / expected[name].norm()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("micro", [1, 2, 4, 8])
def test_cached_equals_one_shot_with_masking(micro):
    images, tokens = batch()
    reference, cached = tiny_flip(), tiny_flip()
    torch.manual_seed(7)
    noise = torch.rand(B, reference.visual.num_patches)  # what the cached path draws first
    expected_loss = one_shot(reference, images, tokens, noise.double())
    contrastive_only = objective()
    torch.manual_seed(7)
    loss, parts, scale = cached_backward(
        cached, contrastive_only, images, tokens, masks(cached), micro
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    assert parts.keys() == {"contrastive"}
    assert scale.item() == pytest.approx(1 / 0.07)
    assert_same_grads(grads(cached), grads(reference))


@pytest.mark.parametrize(
    "micro, keep_text_graph", [(2, False), (4, False), (8, False), (2, True), (4, True)]
)
def test_cached_equals_one_shot_with_an_auxiliary_term(micro, keep_text_graph):
    """The per-sample term is added in each micro-batch's backward (first pass for the
    last micro-batch, replay for the others); its parameters get the one-shot gradients
    too, and the reported parts add up to the loss."""
    loss, parts, cached_objective, ref_objective = cached_and_one_shot(
        lambda: objective(aux=True), micro, keep_text_graph=keep_text_graph
    )
    assert parts.keys() == {"contrastive", "penalty"} and parts["penalty"] > 0
    torch.testing.assert_close(parts["contrastive"] + parts["penalty"], loss, rtol=1e-12, atol=0)
    assert_same_grads(grads(cached_objective), grads(ref_objective), min_count=2)


def cached_and_one_shot(make_objective, micro: int, **options):
    """Gradient caching (``options`` to ``cached_backward``) and the one-shot batch with
    the same masks and two copies of one objective; asserts equal losses and model
    gradients. Returns (loss, parts, cached objective, reference objective) for the
    objective's own checks."""
    images, tokens = batch()
    reference, cached = tiny_flip(), tiny_flip()
    ref_objective, cached_objective = make_objective(), make_objective()
    torch.manual_seed(7)
    noise = torch.rand(B, reference.visual.num_patches)
    expected_loss = one_shot(reference, images, tokens, noise.double(), ref_objective)
    torch.manual_seed(7)
    loss, parts, _ = cached_backward(
        cached, cached_objective, images, tokens, masks(cached), micro, **options
    )
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    assert_same_grads(grads(cached), grads(reference))
    return loss, parts, cached_objective, ref_objective


def test_plain_accumulation_would_differ():
    """Sanity check of the test itself: per-micro-batch losses give other gradients."""
    images, tokens = batch()
    reference, accumulated = tiny_flip(), tiny_flip()
    noise = torch.rand(B, reference.visual.num_patches).double()
    one_shot(reference, images, tokens, noise)
    for c in (slice(0, 4), slice(4, 8)):
        image, text, scale = accumulated(images[c], tokens[c], Mask(0.5, noise[c]))
        (contrastive_loss(image, text, scale) / 2).backward()
    name = "visual.blocks.0.attn.qkv.weight"
    assert not torch.allclose(grads(accumulated)[name], grads(reference)[name], rtol=1e-3)


@pytest.mark.parametrize("keep_text_graph", [False, True])
def test_second_pass_replays_dropout_randomness(keep_text_graph):
    """With drop-path on, the replay must see the RNG state of the first pass."""
    images, tokens = batch()
    reference, cached = tiny_flip(drop_path=0.5), tiny_flip(drop_path=0.5)
    micro = 2
    torch.manual_seed(3)  # reference: same RNG order as the cached first pass
    noise = torch.rand(B, reference.visual.num_patches).double()
    features = [
        (reference.encode_image(images[c], Mask(0.5, noise[c])), reference.encode_text(tokens[c]))
        for c in (slice(i, i + micro) for i in range(0, B, micro))
    ]
    image = torch.cat([f[0] for f in features])
    text = torch.cat([f[1] for f in features])
    expected_loss = contrastive_loss(image, text, reference.scale())
    expected_loss.backward()
    after_reference = torch.rand(1)
    contrastive_only = objective()
    torch.manual_seed(3)
    loss, _, _ = cached_backward(
        cached,
        contrastive_only,
        images,
        tokens,
        masks(cached),
        micro,
        keep_text_graph=keep_text_graph,
    )
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-10, atol=0)
    assert_same_grads(grads(cached), grads(reference))
    # the RNG continues where the first pass left it, not replayed twice
    assert torch.equal(torch.rand(1), after_reference)


def test_batch_not_a_multiple_of_the_micro_batch_is_rejected():
    images, tokens = batch()
    with pytest.raises(ValueError, match="batch 8 is not a multiple of the micro-batch 3"):
        model = tiny_flip()
        cached_backward(model, objective(), images, tokens, masks(model), 3)


@pytest.mark.slow
def test_lightning_ddp_two_processes_equals_one_shot(tmp_path):
    """2 gloo ranks x 4 samples, micro-batch 2 (gradient caching) through Lightning's DDP
    and PretrainModule; the synchronised gradients equal the one-process full batch."""
    script = Path(__file__).with_name("ddp_pretrain_step.py")
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=script.parent.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["micro_batches"] == 2.0 and meta["world_size"] == 2
    # one gradient sync per step: as many bucket all-reduces as a one-shot step (micro
    # batch 4 = the whole per-device batch), not one per micro-batch
    one_shot_dir = tmp_path / "one_shot"
    one_shot_dir.mkdir()
    out = subprocess.run(
        [sys.executable, str(script), str(one_shot_dir), "4"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=script.parent.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one_shot_meta = json.loads((one_shot_dir / "meta.json").read_text())
    assert one_shot_meta["micro_batches"] == 1.0
    assert meta["all_reduces"] == one_shot_meta["all_reduces"] >= 1

    from ddp_pretrain_step import NOISE_SEED, build_model  # the script's own setup

    model = build_model()
    # the global batch in rank order (as all_gather concatenates), with each rank's noise
    batches = [torch.load(tmp_path / f"batch{r}.pt") for r in (0, 1)]
    images, tokens = (torch.cat([b[i] for b in batches]) for i in (0, 1))
    assert sorted(tokens[:, 0].tolist()) == sorted(batch(8)[1][:, 0].tolist())  # all 8 items
    noise = []
    for r in (0, 1):  # Lightning's 64-true precision makes float64 the default dtype
        torch.manual_seed(NOISE_SEED + r)
        noise.append(torch.rand(4, model.visual.num_patches, dtype=torch.float64))
    loss = one_shot(model, images, tokens, torch.cat(noise))
    for rank in ranks:  # every rank holds the same averaged gradients
        assert_same_grads(rank["grads"], {"model." + k: v for k, v in grads(model).items()})
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2  # DDP's average of local losses
    torch.testing.assert_close(mean_loss, loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("keep_text_graph", [False, True])
@pytest.mark.parametrize("kind", ["random", "prioritized", "truncate"])
def test_cached_equals_one_shot_with_text_masking(kind, keep_text_graph):
    """Text masking on (half of the 8 tokens kept): the replay reuses each sample's text
    mask (or its kept text graph), so loss and gradients equal the one-shot batch drawn
    with the same noise."""

    images, tokens = batch()
    tokens[::2, 3:] = 0  # half the captions padded after 3 tokens: prioritized drops those
    reference, cached = tiny_flip(), tiny_flip()
    torch.manual_seed(7)  # the order draw_masks draws in: image noise, then text noise
    image_noise = torch.rand(B, reference.visual.num_patches)
    text_noise = None if kind == "truncate" else torch.rand(B, 8)
    features = reference.forward_features(
        images, tokens, Mask(0.5, image_noise.double()), Mask(0.5, text_noise, kind)
    )
    assert features.text_keep.shape == (B, 4)
    expected_loss = contrastive_loss(features.image, features.text, reference.scale())
    expected_loss.backward()
    contrastive_only = objective()  # seeds its own generator: before the masks' seed
    torch.manual_seed(7)
    drawn = masks(cached, text=Mask(0.5, kind=kind))
    loss, _, _ = cached_backward(
        cached, contrastive_only, images, tokens, drawn, 2, keep_text_graph=keep_text_graph
    )
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-10, atol=0)
    assert_same_grads(grads(cached), grads(reference))


@pytest.mark.parametrize("micro", [2, 8])
def test_cached_equals_one_shot_with_the_reconstruction_decoder(micro):
    """The MAE decoder term (Table 1f) is per sample: replayed with each micro-batch's
    mask, loss and every gradient (the decoder's included) equal the one-shot batch."""
    from flip.reconstruction import PixelReconstruction

    def decoder_objective() -> Objective:
        torch.manual_seed(11)
        term = PixelReconstruction(32, SIZE, 8, width=16, depth=2, heads=2, weight=0.5)
        return Objective({"reconstruction": term}).double()

    _, parts, cached_objective, ref_objective = cached_and_one_shot(decoder_objective, micro)
    assert parts.keys() == {"contrastive", "reconstruction"} and parts["reconstruction"] > 0
    decoder_grads = grads(cached_objective)
    assert "auxiliary.reconstruction.mask_token" in decoder_grads
    assert_same_grads(decoder_grads, grads(ref_objective), min_count=10)


class TextTokenPenalty(nn.Module):
    """A per-sample term on the text tower's tokens and kept positions: with the text
    graph kept, it reads the first-pass text features of every micro-batch."""

    weight = 0.5

    def forward(self, features: Features, images, tokens) -> torch.Tensor:
        keep = features.text_keep.to(features.text_tokens.dtype).mean(1)  # (b,)
        return (features.text_tokens**2).mean((1, 2)) * (1 + keep / 8)


@pytest.mark.parametrize("micro", [2, 4])
def test_kept_text_graph_feeds_the_per_sample_terms(micro):
    """keep_text_graph with text masking and a term on the text tokens: loss, the term
    and every gradient equal the one-shot batch."""

    images, tokens = batch()
    reference, cached = tiny_flip(), tiny_flip()
    make = lambda: Objective({"text": TextTokenPenalty()}).double()  # noqa: E731
    ref_objective, cached_objective = make(), make()
    torch.manual_seed(7)  # the order draw_masks draws in: image noise, then text noise
    image_noise, text_noise = torch.rand(B, reference.visual.num_patches), torch.rand(B, 8)
    features = reference.forward_features(
        images, tokens, Mask(0.5, image_noise.double()), Mask(0.5, text_noise)
    )
    expected_loss, expected_parts = ref_objective(features, reference.scale(), images, tokens)
    expected_loss.backward()
    torch.manual_seed(7)
    drawn = masks(cached, text=Mask(0.5))
    loss, parts, _ = cached_backward(
        cached, cached_objective, images, tokens, drawn, micro, keep_text_graph=True
    )
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(parts["text"], expected_parts["text"].detach(), rtol=1e-10, atol=0)
    assert_same_grads(grads(cached), grads(reference))


def tower_calls(model: FLIP) -> dict[str, int]:
    """Counts, updated live, of the forward passes of each tower (its first layer)."""
    calls = {"image": 0, "text": 0}

    def count(tower):
        return lambda *_: calls.__setitem__(tower, calls[tower] + 1)

    model.visual.patch_embed.register_forward_hook(count("image"))
    model.text.token_embed.register_forward_hook(count("text"))
    return calls


@pytest.mark.parametrize(
    "micro, keep_text_graph, expected",
    [
        (2, False, {"image": 7, "text": 7}),  # 4 first-pass forwards + 3 replays, not 4 + 4
        (2, True, {"image": 7, "text": 4}),  # the text tower is never replayed
        (4, False, {"image": 3, "text": 3}),
        (8, False, {"image": 1, "text": 1}),  # one micro-batch: the one-shot step
    ],
)
def test_the_last_micro_batch_is_not_replayed(micro, keep_text_graph, expected):
    model = tiny_flip()
    calls = tower_calls(model)
    cached_backward(
        model, objective(), *batch(), masks(model), micro, keep_text_graph=keep_text_graph
    )
    assert calls == expected


def test_every_backward_but_the_final_one_runs_without_sync():
    """The kept graph is backpropagated first, inside no_sync; the final backward (the
    last replay) is the only synchronised one and the only one with the logit scale."""
    model, inside = tiny_flip(), []

    @contextmanager
    def no_sync():
        inside.append(True)
        yield
        inside.append(False)

    seen = []  # per backward: (inside no_sync, logit scale gradient before it)

    def backward(surrogate):
        seen.append((bool(inside) and inside[-1], model.logit_scale.grad is None))
        surrogate.backward()

    cached_backward(model, objective(), *batch(), masks(model), 2, backward, no_sync)
    assert seen == [(True, True)] * 3 + [(False, True)]
    assert model.logit_scale.grad is not None


@pytest.mark.parametrize("keep_text_graph, text_forwards", [(False, 7), (True, 4)])
def test_pretrain_module_passes_keep_text_graph(keep_text_graph, text_forwards):
    """task.keep_text_graph reaches gradient caching in a Lightning training step."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from flip.tasks.pretrain import PretrainModule

    model = tiny_flip()
    calls = tower_calls(model)
    module = PretrainModule(
        model,
        global_batch=B,
        total_samples=B,
        warmup_samples=0,
        micro_batch=2,
        keep_text_graph=keep_text_graph,
        image_mask={"ratio": 0.5},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(*batch()), batch_size=B))
    assert calls == {"image": 7, "text": text_forwards}


GRAD_CACHE_RESULTS = sorted(
    (Path(__file__).parents[1] / "experiments" / "results").glob("grad-cache-*.json")
)


@pytest.mark.parametrize("path", GRAD_CACHE_RESULTS, ids=lambda p: p.stem)
def test_committed_grad_cache_results_derive_from_their_raw_times(path):
    """Every median, range, ratio and cost-model figure of a committed benchmark result
    recomputed from the per-process raw times; the markdown beside it is the json's."""
    import statistics

    import benchmark_grad_cache as bench  # experiments/benchmark_grad_cache.py

    result = json.loads(path.read_text())
    settings = result["meta"]["settings"]
    timed = [v for v in settings["variants"] if v != "components"]
    assert set(result["rows"]) == set(timed) and "accumulate" in timed
    base = result["rows"]["accumulate"]
    for variant in timed:
        runs, row = result["runs"][variant], result["rows"][variant]
        assert len(runs) == settings["rounds"]
        wall = [t for r in runs for t in r["times"]]
        cpu = [t for r in runs for t in r["cpu_times"]]
        assert row["n"] == len(wall) == len(cpu) == settings["repeats"] * settings["rounds"]
        assert (row["median_s"], row["min_s"], row["max_s"]) == (
            statistics.median(wall),
            min(wall),
            max(wall),
        )
        assert row["cpu_median_s"] == statistics.median(cpu)
        assert row["ratio"] == row["median_s"] / base["median_s"]
        assert row["cpu_ratio"] == row["cpu_median_s"] / base["cpu_median_s"]
        assert row["peak_mib"] == statistics.median(r["peak_mib"] for r in runs)
    if "components" in settings["variants"]:
        n = settings["batch"] // settings["micro"]
        c = result["cost_model"]
        parts = {
            k: statistics.median(t for r in result["runs"]["components"] for t in r[k])
            for k in ("image_inference", "text_inference", "forward_backward")
        }
        graph_free = parts["image_inference"] + parts["text_inference"]
        assert c["predicted_cached"] == pytest.approx(
            1 + (n - 1) / n * graph_free / parts["forward_backward"], rel=1e-12
        )
        assert c["predicted_recompute"] == pytest.approx(
            1 + graph_free / parts["forward_backward"], rel=1e-12
        )
    assert path.with_suffix(".md").read_text() == bench.to_markdown(result)


@pytest.mark.parametrize("keep_text_graph", [False, True])
def test_cached_under_bf16_autocast_gives_every_weight_its_gradient(keep_text_graph):
    """bf16 autocast caches a low-precision copy of each weight for the region: a copy made
    in the graph-free first pass, if reused by the graph passes, carries no gradient back to
    its weight (the whole image tower got none before the cache was cleared). Cached and
    one-shot gradients agree to bf16 precision, and none is missing."""
    images, tokens = batch()
    reference, cached = tiny_flip().float(), tiny_flip().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # unmasked: the same tokens in both
        loss = contrastive_loss(*reference(images.float(), tokens))
        loss.backward()
        no_masks = Mask(), Mask()
        cached_backward(
            cached,
            objective().float(),
            images.float(),
            tokens,
            no_masks,
            2,
            keep_text_graph=keep_text_graph,
        )
    expected, actual = grads(reference), grads(cached)
    assert actual.keys() == expected.keys() and len(expected) >= 11
    for name in expected:
        error = (actual[name] - expected[name]).norm() / expected[name].norm()
        assert error < 0.05, f"{name}: relative error {error:.2e}"
