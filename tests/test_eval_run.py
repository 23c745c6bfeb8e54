"""`evaluate(cfg)` / `eval.py` end to end on fixtures in the real formats: every task
(zeroshot, robustness, retrieval, linear_probe, suite) runs through Trainer.test, writes
results.json + results.md, and its numbers equal an independent computation with the
same weights (a plain loop over encode_image / encode_text and an argmax)."""

import json
import subprocess
import sys

import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from flip.checkpoint import build_model, save_flip_checkpoint
from flip.data.benchmarks import metadata
from flip.data.transforms import eval_transform
from flip.errors import ConfigError
from flip.eval.zeroshot import build_zero_shot_classifier
from flip.masking import Mask
from flip.run import evaluate
from flip.tokenizer import Tokenizer
from tests import eval_fixtures as fx
from tests.conftest import CONF, FAST

MODEL = [o for o in FAST if o.startswith("model.")]
QUIET = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.num_workers=0",
    "data.zeroshot.size=40",
    "batch_size=16",
]


def compose_eval(*overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval", overrides=[f"output_dir={tmp_path / 'run'}", *QUIET, *overrides])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of a randomly initialised fast model (no training) with its model config,
    as training stores it."""
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "eval", overrides=["ckpt_path=unused", "output_dir=/tmp/x", "model=tiny", *MODEL]
        )
    torch.manual_seed(0)
    save_flip_checkpoint(
        path, hydra.utils.instantiate(cfg.model), OmegaConf.to_container(cfg.model, resolve=True)
    )
    return path


def reference_logits(ckpt, pil_images, classnames, templates):
    """Cosine logits computed directly with the checkpoint's model, outside Lightning."""
    model = build_model(ckpt)
    tf = eval_transform(64)  # the tiny model's input size
    with torch.no_grad():
        feats = model.encode_image(torch.stack([tf(im) for im in pil_images]))
        W = build_zero_shot_classifier(
            model.encode_text, Tokenizer(32), classnames, templates, classes_per_batch=50
        )
    return (feats @ W.T).numpy()


def results_of(tmp_path):
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (tmp_path / "run" / "results.md").read_text().startswith("# Evaluation of")
    return {(r["dataset"], r["protocol"]): r for r in record["results"]}


def test_zeroshot_on_a_webdataset_export(ckpt, tmp_path):
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    pil = [fx.solid_image(i) for i in range(23)]
    labels = [i % 10 for i in range(23)]
    fx.write_wds(
        tmp_path / "cifar10",
        "test",
        list(zip(pil, labels)),
        classes,
        ["unused {}"],
        per_shard=5,
        image_format="png",
    )
    cfg = compose_eval(
        f"ckpt_path={ckpt}", "eval_data=cifar10", f"data_root={tmp_path}", tmp_path=tmp_path
    )
    flat = evaluate(cfg)
    assert cfg.image_size == 64  # from the checkpoint's model config
    logits = reference_logits(ckpt, pil, classes, metadata.templates("clip:CIFAR10"))
    top1 = np.mean(logits.argmax(1) == np.array(labels))
    assert flat["cifar10/zeroshot/top1"] == pytest.approx(top1, abs=1e-6)
    row = results_of(tmp_path)[("cifar10", "zeroshot")]
    assert row["metric"] == "top1" and row["metrics"]["num_samples"] == 23


def test_robustness_subsets_objectnet_video_and_missing_sets(ckpt, tmp_path):
    a = metadata.label_space("imagenet_a")
    pil = [fx.solid_image(100 + i) for i in range(len(a))]  # one image per ImageNet-A class
    fx.write_folders(tmp_path / "imagenet-a", {w: [im] for w, im in zip(a, pil)})
    fx.write_objectnet(
        tmp_path / "objectnet",
        {"banana": ("Banana", [954], pil[:2]), "mug": ("Mug", [504, 968], pil[2:4])},
    )
    vid = {f"v{k}": [(fx.solid_image(10 * k + j), [k % 2]) for j in range(3)] for k in range(3)}
    fx.write_video_pm(
        tmp_path / "imagenet_vid_ytbb_robust" / "imagenet-vid-robust", vid, groups=[[1, 2], [3]]
    )
    cfg = compose_eval(
        f"ckpt_path={ckpt}",
        "eval_task=robustness",
        f"data_root={tmp_path}",
        "skip_missing=true",
        tmp_path=tmp_path,
    )
    flat = evaluate(cfg)
    rows = results_of(tmp_path)
    assert {k for k, r in rows.items() if "missing" in r} == {
        ("imagenet_v2", "zeroshot"),
        ("imagenet_r", "zeroshot"),
        ("imagenet_sketch", "zeroshot"),
        ("ytbb", "zeroshot"),
    }
    # ImageNet-A: the ImageNet classifier's rows of its 200 classes
    names, templates = (
        list(metadata.imagenet_classnames()),
        list(metadata.imagenet_templates("simple7")),
    )
    inet = metadata.imagenet_wnid_index()
    logits = reference_logits(ckpt, pil, names, templates)
    sub = logits[:, [inet[w] for w in a]]
    want = np.mean(sub.argmax(1) == np.arange(len(a)))
    assert flat["imagenet_a/zeroshot/top1"] == pytest.approx(want, abs=1e-6)
    assert rows[("imagenet_a", "zeroshot")]["metrics"]["num_classes"] == 200
    # ObjectNet: max over each class's ImageNet rows
    on = np.stack([logits[:4, [954]].max(1), logits[:4, [504, 968]].max(1)], 1)
    assert flat["objectnet/zeroshot/top1"] == pytest.approx(
        np.mean(on.argmax(1) == [0, 0, 1, 1]), abs=1e-6
    )
    # ImageNet-Vid: PM-0 over the anchors (middle frames), PM-10 needs all three frames right
    frames = [im for k in range(3) for im, _ in vid[f"v{k}"]]
    fl = reference_logits(ckpt, frames, names, templates)
    pred = np.stack([fl[:, [1, 2]].max(1), fl[:, [3]].max(1)], 1).argmax(1).reshape(3, 3)
    right = pred == (np.arange(3) % 2)[:, None]  # (video, frame)
    assert rows[("imagenet_vid", "zeroshot")]["metric"] == "pm0"
    assert flat["imagenet_vid/zeroshot/pm0"] == pytest.approx(right[:, 1].mean())
    assert flat["imagenet_vid/zeroshot/pm10"] == pytest.approx(right.all(1).mean())
    assert flat["imagenet_vid/zeroshot/num_samples"] == 3


def test_retrieval_karpathy_and_caption_list(ckpt, tmp_path):
    items = [
        (
            fx.solid_image(200 + i),
            [f"a photo number {i} {w}" for w in ("red", "blue", "one", "two", "three")],
        )
        for i in range(6)
    ]
    fx.write_karpathy(tmp_path / "flickr30k", "dataset_flickr30k.json", "flickr30k-images", items)
    fx.write_caption_list(tmp_path / "coco", "coco_karpathy_test.json", items[:4])
    cfg = compose_eval(
        f"ckpt_path={ckpt}",
        "eval_task=retrieval",
        f"data_root={tmp_path}",
        "eval_data.coco.dataset.otherwise.ann_file=coco_karpathy_test.json",
        tmp_path=tmp_path,
    )
    flat = evaluate(cfg)
    assert (
        flat["flickr30k/retrieval/num_images"] == 6 and flat["flickr30k/retrieval/num_texts"] == 30
    )
    assert flat["coco/retrieval/num_images"] == 4
    model = build_model(ckpt)
    tf = eval_transform(64)
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(im) for im, _ in items]))
        txt = model.encode_text(Tokenizer(32)([c for _, cs in items for c in cs]))
    sim = (img @ txt.T).numpy()
    owner = np.repeat(np.arange(6), 5)
    for k in (1, 5, 10):
        i2t = np.mean([owner[np.argsort(-sim[i])[:k]].tolist().count(i) > 0 for i in range(6)])
        t2i = np.mean([t // 5 in np.argsort(-sim[:, t])[:k] for t in range(30)])
        assert flat[f"flickr30k/retrieval/image_to_text_R@{k}"] == pytest.approx(i2t)
        assert flat[f"flickr30k/retrieval/text_to_image_R@{k}"] == pytest.approx(t2i)


def test_suite_on_the_held_out_data_with_linear_probe(ckpt, tmp_path, capsys):
    cfg = compose_eval(
        f"ckpt_path={ckpt}",
        "eval_task=suite",
        "linear_probe.epochs=3",
        "logger=csv",
        "linear_probe.batch_size=16",
        "linear_probe.warmup_epochs=1",
        tmp_path=tmp_path,
    )
    flat = evaluate(cfg)
    rows = results_of(tmp_path)
    assert set(rows) == {
        ("heldout", "zeroshot"),
        ("heldout", "linear_probe"),
        ("heldout_retrieval", "retrieval"),
    }
    # held-out zero-shot top-1 = a plain loop over the data config's held-out set
    heldout = hydra.utils.instantiate(cfg.data.zeroshot)
    model = build_model(ckpt)
    with torch.no_grad():
        W = build_zero_shot_classifier(
            model.encode_text, Tokenizer(32), heldout.classnames, heldout.templates
        )
        hits = [int((model.encode_image(x[None]) @ W.T).argmax()) == y for x, y in heldout]
    assert len(hits) == 40
    assert flat["heldout/zeroshot/top1"] == pytest.approx(np.mean(hits), abs=1e-6)
    assert flat["val/zeroshot_top1"] == flat["heldout/zeroshot/top1"]
    assert (
        flat["heldout/linear_probe/num_train"] == 40
        and flat["heldout/linear_probe/num_samples"] == 40
    )
    # held-out retrieval R@1 = no other caption (image) strictly closer than the own one
    pairs = hydra.utils.instantiate(cfg.data.train, split="heldout", size=40)
    with torch.no_grad():
        img = model.encode_image(torch.stack([x for x, _ in pairs]))
        txt = model.encode_text(Tokenizer(32)([c for _, c in pairs]))
    sim = (img @ txt.T).numpy()
    own = np.diag(sim)
    assert flat["heldout_retrieval/retrieval/num_images"] == 40
    assert flat["heldout_retrieval/retrieval/image_to_text_R@1"] == pytest.approx(
        np.mean((sim > own[:, None]).sum(1) == 0), abs=1e-6
    )
    assert flat["heldout_retrieval/retrieval/text_to_image_R@1"] == pytest.approx(
        np.mean((sim > own[None, :]).sum(0) == 0), abs=1e-6
    )
    logged = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "eval/heldout/zeroshot/top1" in logged and "eval/heldout/linear_probe/top1" in logged
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(
        "held-out zero-shot top-1:"
    ) and "| held-out | linear_probe | top1 |" in "\n".join(out)


def test_linear_probe_learns_separable_features():
    """The probe head itself: well-separated features are classified perfectly."""
    import lightning as L

    from flip.eval.linear_probe import LinearProbe

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    y = torch.arange(4).repeat(20)
    x = centers[y] + 0.1 * torch.randn(80, 16, generator=g)
    probe = LinearProbe(x, y, x, y, 4, epochs=6, batch_size=40, base_lr=1.0, warmup_epochs=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(probe)
    trainer.test(probe, verbose=False)
    assert probe.results["top1"] == 1.0
    assert isinstance(probe.head[0], torch.nn.BatchNorm1d) and not probe.head[0].affine


def test_missing_dataset_is_one_sentence_at_the_entry_point(ckpt, tmp_path):
    from flip.cli import run_or_exit  # what eval.py's main does with evaluate

    cfg = compose_eval(
        f"ckpt_path={ckpt}",
        "eval_data=flickr30k",
        "eval_task=retrieval",
        f"data_root={tmp_path}",
        tmp_path=tmp_path,
    )
    with pytest.raises(SystemExit) as exit_:
        run_or_exit(evaluate, cfg)
    msg = str(exit_.value)
    assert msg.startswith(f"error: dataset flickr30k not found at {tmp_path}/flickr30k")
    assert "dataset_flickr30k.json" in msg and "nshards.txt" in msg and "\n" not in msg


def test_wrong_task_for_dataset_kind(ckpt, tmp_path):
    cfg = compose_eval(
        f"ckpt_path={ckpt}", "eval_task=zeroshot", "eval_data=flickr30k", tmp_path=tmp_path
    )
    with pytest.raises(ConfigError, match="eval_data.flickr30k is a retrieval dataset"):
        evaluate(cfg)


def test_held_out_evaluation_needs_a_data_config_with_a_held_out_set(ckpt, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "eval", overrides=[f"ckpt_path={ckpt}", f"output_dir={tmp_path}", "data=folder"]
        )
    with pytest.raises(ConfigError, match=r"eval_data.heldout.dataset is null"):
        evaluate(cfg)


def _view_noise(index: int, seed: int = 0) -> torch.Tensor:
    """The documented masked-inference noise of sample ``index`` (64 patches)."""
    return torch.tensor(np.random.default_rng([seed, index]).random(64), dtype=torch.float32)


def test_masked_inference_zero_shot_on_the_held_out_set(ckpt, tmp_path):
    """eval.py mask=0.5: each held-out image encoded with 32 of its 64 patches, sample i's
    patches drawn from its documented noise; the command line gives the same number."""
    cfg = compose_eval(f"ckpt_path={ckpt}", "mask=0.5", tmp_path=tmp_path)
    flat = evaluate(cfg)
    heldout = hydra.utils.instantiate(cfg.data.zeroshot)
    model = build_model(ckpt)
    with torch.no_grad():
        W = build_zero_shot_classifier(
            model.encode_text, Tokenizer(32), heldout.classnames, heldout.templates
        )
        masked = torch.cat(
            [
                model.encode_image(x[None], Mask(0.5, _view_noise(i)[None]))
                for i, (x, _) in enumerate(heldout)
            ]
        )
        plain = model.encode_image(torch.stack([x for x, _ in heldout]))
    labels = np.array([y for _, y in heldout])
    assert not torch.allclose(masked, plain, atol=1e-3)  # masking changed the embeddings
    top1 = np.mean((masked @ W.T).argmax(1).numpy() == labels)
    assert flat["heldout/zeroshot/top1"] == pytest.approx(top1, abs=1e-6)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (record["mask"], record["masked_views"]) == (0.5, "single")
    out = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"ckpt_path={ckpt}",
            "mask=0.5",
            *QUIET,
            f"hydra.run.dir={tmp_path / 'cli'}",
        ],
        cwd=CONF.parent,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())["results"][0]
    assert cli["value"] == pytest.approx(top1, abs=1e-6)


def test_ensemble_of_complementary_views_in_retrieval(ckpt, tmp_path):
    """mask=0.75 masked_views=ensemble: 4 views of 16 patches, the chunks of one permutation
    per image, their normalised embeddings averaged and normalised."""
    cfg = compose_eval(
        f"ckpt_path={ckpt}",
        "eval_task=retrieval",
        "eval_data=heldout_retrieval",
        "mask=0.75",
        "masked_views=ensemble",
        tmp_path=tmp_path,
    )
    flat = evaluate(cfg)
    pairs = hydra.utils.instantiate(cfg.data.train, split="heldout", size=40)
    model = build_model(ckpt)
    images = []
    with torch.no_grad():
        for i, (x, _) in enumerate(pairs):
            perm = torch.argsort(_view_noise(i))
            views = []
            for v in range(4):  # keep exactly chunk v: noise 0 there, 1 elsewhere
                noise = torch.ones(1, 64).scatter(1, perm[None, 16 * v : 16 * (v + 1)], 0.0)
                views.append(model.encode_image(x[None], Mask(0.75, noise)))
            images.append(torch.nn.functional.normalize(torch.cat(views).mean(0), dim=-1))
        img = torch.stack(images)
        txt = model.encode_text(Tokenizer(32)([c for _, c in pairs]))
    sim = (img @ txt.T).numpy()
    own = np.diag(sim)
    assert flat["heldout_retrieval/retrieval/image_to_text_R@1"] == pytest.approx(
        np.mean((sim > own[:, None]).sum(1) == 0), abs=1e-6
    )
    assert flat["heldout_retrieval/retrieval/text_to_image_R@1"] == pytest.approx(
        np.mean((sim > own[None, :]).sum(0) == 0), abs=1e-6
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["mask=0.3", "masked_views=ensemble"],
            r"masked_views=ensemble at mask=0.3 keeps k=44 of "
            r"the model's 64 patches and 44 does not divide 64",
        ),
        (
            ["mask=0.5", "eval_task=suite"],
            r"mask=0.5 masked_views=single applies to zero-shot and "
            r"retrieval only, but eval_data.heldout runs a linear probe",
        ),
        (["masked_views=all"], r"masked_views='all' is invalid: use one of single, ensemble"),
        (["mask=1.0"], r"mask=1.0 is invalid"),
    ],
)
def test_bad_masked_inference_is_one_sentence(ckpt, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(compose_eval(f"ckpt_path={ckpt}", *overrides, tmp_path=tmp_path))


def test_explicit_model_and_image_size_are_checked_against_the_checkpoint(ckpt, tmp_path):
    # the same architecture, named explicitly: accepted, same number as without it
    same = evaluate(
        compose_eval(f"ckpt_path={ckpt}", "model=tiny", *MODEL, "image_size=64", tmp_path=tmp_path)
    )
    plain = evaluate(compose_eval(f"ckpt_path={ckpt}", tmp_path=tmp_path))
    assert same["val/zeroshot_top1"] == plain["val/zeroshot_top1"]
    with pytest.raises(ConfigError, match=r"model.embed_dim=24 .* model.embed_dim=16"):
        evaluate(
            compose_eval(
                f"ckpt_path={ckpt}", "model=tiny", *MODEL, "model.embed_dim=24", tmp_path=tmp_path
            )
        )
    with pytest.raises(ConfigError, match=r"image_size=32 .* image.image_size=64"):
        evaluate(compose_eval(f"ckpt_path={ckpt}", "image_size=32", tmp_path=tmp_path))
