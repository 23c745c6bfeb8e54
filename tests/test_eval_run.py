"""`evaluate(cfg)` / `eval.py` end to end on fixtures in the real formats: every task
(zeroshot, robustness, retrieval, linear_probe, suite) runs through Trainer.test, writes
results.json + results.md, and its numbers equal an independent computation with the
same weights."""
import json

import hydra
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from flip.data.transforms import eval_transform
from flip.evaluate import evaluate
from flip.evaluation import metadata, testing
from flip.evaluation.common import load_model
from flip.tokenizer import Tokenizer
from flip.zeroshot import build_zero_shot_classifier
from tests.conftest import CONF, FAST

MODEL = [o for o in FAST if o.startswith("model.")]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "data.num_workers=0", "data.zeroshot.size=40", "batch_size=16"]


def compose_eval(*overrides, tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("eval", overrides=[f"output_dir={tmp_path / 'run'}", *MODEL, *QUIET,
                                          *overrides])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A Lightning-style checkpoint of a randomly initialised fast model (no training)."""
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=["ckpt_path=unused", "output_dir=/tmp/x", *MODEL])
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.model)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def reference_logits(cfg, pil_images, classnames, templates):
    """Cosine logits computed directly with the checkpoint's model, outside Lightning."""
    model = load_model(cfg.model, cfg.ckpt_path)
    tf = eval_transform(cfg.image_size)
    with torch.no_grad():
        feats = model.encode_image(torch.stack([tf(im) for im in pil_images]))
        W = build_zero_shot_classifier(model.encode_text, Tokenizer(32), classnames, templates,
                                       classes_per_batch=50)
    return (feats @ W.T).numpy()


def results_of(tmp_path):
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (tmp_path / "run" / "results.md").read_text().startswith("# Evaluation of")
    return {(r["dataset"], r["protocol"]): r for r in record["results"]}


def test_zeroshot_on_a_webdataset_export(ckpt, tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
    pil = [testing.solid_image(i) for i in range(23)]
    labels = [i % 10 for i in range(23)]
    testing.write_wds(tmp_path / "cifar10", "test", list(zip(pil, labels)), classes,
                      ["unused {}"], per_shard=5, image_format="png")
    cfg = compose_eval(f"ckpt_path={ckpt}", "eval_data=cifar10", f"data_root={tmp_path}",
                       tmp_path=tmp_path)
    flat = evaluate(cfg)
    logits = reference_logits(cfg, pil, classes, metadata.templates("clip:CIFAR10"))
    top1 = np.mean(logits.argmax(1) == np.array(labels))
    assert flat["cifar10/zeroshot/top1"] == pytest.approx(top1, abs=1e-6)
    row = results_of(tmp_path)[("cifar10", "zeroshot")]
    assert row["metric"] == "top1" and row["metrics"]["num_samples"] == 23


def test_robustness_subsets_objectnet_video_and_missing_sets(ckpt, tmp_path):
    a = metadata.label_space("imagenet_a")
    pil = [testing.solid_image(100 + i) for i in range(6)]
    testing.write_folders(tmp_path / "imagenet-a", {a[0]: pil[:3], a[7]: pil[3:]})
    testing.write_objectnet(tmp_path / "objectnet", {
        "banana": ("Banana", [954], pil[:2]), "mug": ("Mug", [504, 968], pil[2:4])})
    vid = {f"v{k}": [(testing.solid_image(10 * k + j), [k % 2]) for j in range(3)] for k in range(3)}
    testing.write_video_pm(tmp_path / "imagenet_vid_ytbb_robust" / "imagenet-vid-robust", vid,
                           groups=[[1, 2], [3]])
    cfg = compose_eval(f"ckpt_path={ckpt}", "eval_task=robustness", f"data_root={tmp_path}",
                       "skip_missing=true", tmp_path=tmp_path)
    flat = evaluate(cfg)
    rows = results_of(tmp_path)
    assert {k for k, r in rows.items() if "missing" in r} == {
        ("imagenet_v2", "zeroshot"), ("imagenet_r", "zeroshot"),
        ("imagenet_sketch", "zeroshot"), ("ytbb", "zeroshot")}
    # ImageNet-A: the 1000-way classifier restricted to the 200 rows of its classes
    logits = reference_logits(cfg, pil, list(metadata.imagenet_classnames()),
                              list(metadata.imagenet_templates("simple7")))
    inet = metadata.imagenet_wnid_index()
    sub = logits[:, [inet[w] for w in a]]
    want = np.mean(sub.argmax(1) == np.array([0, 0, 0, 7, 7, 7]))
    assert flat["imagenet_a/zeroshot/top1"] == pytest.approx(want, abs=1e-6)
    assert rows[("imagenet_a", "zeroshot")]["metrics"]["num_classes"] == 200
    # ObjectNet: max over each class's ImageNet rows
    on = np.stack([logits[:4, [954]].max(1), logits[:4, [504, 968]].max(1)], 1)
    assert flat["objectnet/zeroshot/top1"] == pytest.approx(np.mean(on.argmax(1) == [0, 0, 1, 1]), abs=1e-6)
    # ImageNet-Vid: PM-0 over anchors, PM-10 needs all three frames of a video right
    assert rows[("imagenet_vid", "zeroshot")]["metric"] == "pm0"
    assert 0 <= flat["imagenet_vid/zeroshot/pm10"] <= flat["imagenet_vid/zeroshot/pm0"] <= 1
    assert flat["imagenet_vid/zeroshot/num_samples"] == 3


def test_retrieval_karpathy_and_caption_list(ckpt, tmp_path):
    items = [(testing.solid_image(200 + i), [f"a photo number {i} {w}" for w in
                                            ("red", "blue", "one", "two", "three")]) for i in range(6)]
    testing.write_karpathy(tmp_path / "flickr30k", "dataset_flickr30k.json", "flickr30k-images", items)
    testing.write_caption_list(tmp_path / "coco", "coco_karpathy_test.json", items[:4])
    cfg = compose_eval(f"ckpt_path={ckpt}", "eval_task=retrieval", f"data_root={tmp_path}",
                       "eval_data.coco.options.captions.ann_file=coco_karpathy_test.json",
                       tmp_path=tmp_path)
    flat = evaluate(cfg)
    assert flat["flickr30k/retrieval/num_images"] == 6 and flat["flickr30k/retrieval/num_texts"] == 30
    assert flat["coco/retrieval/num_images"] == 4
    model = load_model(cfg.model, ckpt)
    tf = eval_transform(cfg.image_size)
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
    cfg = compose_eval(f"ckpt_path={ckpt}", "eval_task=suite", "linear_probe.epochs=3", "logger=csv",
                       "linear_probe.batch_size=16", "linear_probe.warmup_epochs=1",
                       tmp_path=tmp_path)
    flat = evaluate(cfg)
    rows = results_of(tmp_path)
    assert set(rows) == {("heldout", "zeroshot"), ("heldout", "linear_probe"),
                         ("heldout_retrieval", "retrieval")}
    assert flat["val/zeroshot_top1"] == flat["heldout/zeroshot/top1"]
    assert flat["heldout/linear_probe/num_train"] == 40 and flat["heldout/linear_probe/num_samples"] == 40
    assert flat["heldout_retrieval/retrieval/num_images"] == 40
    logged = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "eval/heldout/zeroshot/top1" in logged and "eval/heldout/linear_probe/top1" in logged
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("held-out zero-shot top-1:") and "| held-out | linear_probe | top1 |" in "\n".join(out)


def test_linear_probe_learns_separable_features():
    """The probe head itself: well-separated features are classified perfectly."""
    import lightning as L

    from flip.tasks.linear_probe import LinearProbe

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    y = torch.arange(4).repeat(20)
    x = centers[y] + 0.1 * torch.randn(80, 16, generator=g)
    probe = LinearProbe(x, y, x, y, 4, epochs=6, batch_size=40, base_lr=1.0, warmup_epochs=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(probe)
    trainer.test(probe, verbose=False)
    assert probe.results["top1"] == 1.0
    assert isinstance(probe.head[0], torch.nn.BatchNorm1d) and not probe.head[0].affine


def test_missing_dataset_is_one_sentence_at_the_entry_point(ckpt, tmp_path):
    from flip.config import run_or_exit  # what eval.py's main does with evaluate

    cfg = compose_eval(f"ckpt_path={ckpt}", "eval_data=flickr30k", "eval_task=retrieval",
                       f"data_root={tmp_path}", tmp_path=tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_or_exit(evaluate, cfg)
    msg = str(exit_.value)
    assert msg.startswith(f"error: dataset flickr30k not found at {tmp_path}/flickr30k")
    assert "dataset_flickr30k.json" in msg and "nshards.txt" in msg and "\n" not in msg


def test_wrong_task_for_dataset_kind(ckpt, tmp_path):
    from flip.config import ConfigError

    cfg = compose_eval(f"ckpt_path={ckpt}", "eval_task=zeroshot", "eval_data=flickr30k",
                       tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="eval_data.flickr30k is a retrieval dataset"):
        evaluate(cfg)
