"""Captioning (paper Table 7): COCO caption metrics against pycocoevalcap and hand-computed
values, SPICE reported unavailable without a download, greedy and beam decoding (beam 1 =
greedy, full-width beam = exhaustive search), a tiny captioner that memorises its captions,
real-format COCO/Karpathy and nocaps fixtures, the configs, and `train.py task=captioning`."""

import csv
import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import Dataset

import flip.metrics.captions as cm
from flip.checkpoint import save_flip_checkpoint
from flip.data.benchmarks.readers import DatasetNotFound
from flip.data.captions import BOS_ID, EOS_ID, CaptionDataModule
from flip.data.coco_captions import coco_format_images
from flip.data.shapes_captions import ShapesReferences, ShapesTrainCaptions
from flip.errors import DataError
from flip.models.caption_decoder import CaptionDecoder
from flip.tasks.captioning import CaptioningModule
from flip.tokenizer import PAD_ID, VOCAB_SIZE
from tests.conftest import CONF, FAST, compose_fast, compose_train

TINY_TOWERS = [o for o in FAST if o.startswith("model.")]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only waits for a
    core (measured 20x slower steps under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- metrics ---------------------------------------------------------------------------------
REFS = {
    1: ["A man is riding a brown horse.", "A person rides a horse on the beach."],
    2: ["Two dogs play with a red ball in the grass.", "Dogs playing on a lawn."],
    3: ["A plate of food with broccoli and rice.", "A dinner plate with vegetables."],
}
CANDIDATES = {
    "exact": {
        1: ["A man is riding a brown horse."],
        2: ["Two dogs play with a red ball in the grass."],
        3: ["A plate of food with broccoli and rice."],
    },
    "partial": {1: ["a man riding a horse"], 2: ["a dog with a ball"], 3: ["a plate with food"]},
    "unrelated": {1: ["zebra"], 2: ["umbrella"], 3: ["kite"]},
}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One pycocoevalcap run (Java) for all metric tests, with SPICE's CoreNLP absent and
    its download made to fail loudly if attempted."""
    import pycocoevalcap.spice.get_stanford_models as models

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(cm.__name__).addHandler(handler)

    def no_download(*args, **kwargs):
        raise AssertionError("SPICE tried to download Stanford CoreNLP")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cm, "SPICE_LIB", tmp_path_factory.mktemp("no_spice"))
        mp.setattr(models, "urlretrieve", no_download)
        scores = cm.score_captions(REFS, CANDIDATES)
    logging.getLogger(cm.__name__).removeHandler(handler)
    return scores, [r.getMessage() for r in records]


def test_metrics_equal_pycocoevalcap_called_directly(scored):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({k: [{"caption": c} for c in v] for k, v in CANDIDATES["partial"].items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    expected = {
        "BLEU-1": bleu[0],
        "BLEU-4": bleu[3],
        "METEOR": Meteor().compute_score(gts, res)[0],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr": Cider().compute_score(gts, res)[0],
    }
    got = scored[0]["partial"]
    for name, value in expected.items():
        assert got[name] == pytest.approx(100 * value, abs=1e-9), name
    assert 0 < got["CIDEr"] < scored[0]["exact"]["CIDEr"]


def test_metrics_by_hand(scored):
    exact, partial, unrelated = (scored[0][k] for k in ("exact", "partial", "unrelated"))
    # an exact copy of a reference (>= 4 words): every n-gram precision 1, no brevity penalty
    for n in (1, 2, 3, 4):
        assert exact[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-6)
    assert exact["ROUGE-L"] == pytest.approx(100.0)
    # no word in common with any reference
    for metric in ("BLEU-1", "ROUGE-L", "CIDEr"):
        assert unrelated[metric] == pytest.approx(0.0, abs=1e-6), metric
    # ROUGE-L of "a man riding a horse" vs image 1: LCS 5 with the first reference
    # (7 words): P = 1, R = 5/7; with the second ("a person rides a horse on the beach",
    # LCS "a a horse" = 3): P = 3/5, R = 3/8. pycocoevalcap takes max P and max R, beta 1.2.
    p, r, b2 = 1.0, 5 / 7, 1.2**2
    rouge1 = (1 + b2) * p * r / (r + b2 * p)
    # image 2 "a dog with a ball" vs "two dogs play with a red ball in the grass" (LCS "with
    # a ball" = 3: P 3/5, R 3/10) and "dogs playing on a lawn" (LCS "a" = 1: P 1/5, R 1/5)
    p, r = 3 / 5, 3 / 10
    rouge2 = (1 + b2) * p * r / (r + b2 * p)
    # image 3 "a plate with food" vs "a plate of food with broccoli and rice" (LCS "a plate
    # with" or "a plate food" = 3: P 3/4, R 3/8) and "a dinner plate with vegetables" (LCS
    # "a plate with" = 3: P 3/4, R 3/5)
    p, r = 3 / 4, 3 / 5
    rouge3 = (1 + b2) * p * r / (r + b2 * p)
    assert partial["ROUGE-L"] == pytest.approx(100 * (rouge1 + rouge2 + rouge3) / 3)


def test_spice_is_reported_unavailable_without_a_download(scored):
    scores, messages = scored
    assert all(math.isnan(s["SPICE"]) for s in scores.values())
    assert any("SPICE unavailable offline" in m for m in messages)


def test_constant_caption_is_the_most_frequent_training_caption():
    caps = ["A dog.", "a cat", "A  Cat", "a dog.", "a cat "]
    assert cm.constant_caption(caps) == "a cat"
    assert cm.constant_caption(["x", "y"]) == "x"  # a tie: the first seen
    with pytest.raises(ValueError, match="no training captions"):
        cm.constant_caption([])


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="different images"):
        cm.caption_metrics({1: ["a"], 2: ["b"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="exactly one hypothesis"):
        cm.caption_metrics({1: ["a"]}, {1: ["a", "b"]})


# -- decoding --------------------------------------------------------------------------------
def _decoder(vocab=40, max_length=8, seed=0):
    torch.manual_seed(seed)
    dec = CaptionDecoder(
        vocab,
        memory_width=12,
        width=16,
        depth=2,
        heads=2,
        max_length=max_length,
        dropout=0.0,
        bos_id=1,
        eos_id=2,
        pad_id=0,
    ).eval()
    with torch.no_grad():  # sharper, more varied distributions than the 0.02 init
        for p in dec.parameters():
            p.mul_(30.0 if p.dim() > 1 else 1.0)
    return dec


def test_beam_size_one_equals_greedy():
    dec = _decoder()
    memory = torch.randn(6, 5, 12)
    greedy = dec.generate(memory, beam_size=1)
    assert greedy == dec._beam(dec.project_memory(memory), dec.max_length, 1, 0.0)
    assert len({tuple(g) for g in greedy}) > 1 and any(len(g) > 1 for g in greedy)


@torch.no_grad()
def _sequence_log_prob(dec, memory, seq):
    """log p of generating ``seq`` (ended by [SEP] unless it fills max_length)."""
    tokens = torch.tensor([[dec.bos_id] + seq])
    logp = dec._next_log_probs
    total = 0.0
    for t, tok in enumerate(seq):
        total += float(logp(dec.project_memory(memory), tokens[:, : t + 1])[0, tok])
    return total


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_full_width_beam_search_is_exhaustive_search(alpha):
    """5 ids ([PAD], [CLS], [SEP], 2 words), 3 steps: 15 hypotheses in all, so a beam of 15
    keeps every one and must return the best of an exhaustive enumeration."""
    dec = _decoder(vocab=5, max_length=3, seed=1)
    for image in range(4):
        memory = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(image))
        hypotheses = []
        for n in range(1, 4):
            for words in itertools.product([3, 4], repeat=n - 1):
                hypotheses.append(list(words) + [dec.eos_id])
        hypotheses += [list(w) for w in itertools.product([3, 4], repeat=3)]
        scored = [(_sequence_log_prob(dec, memory, h) / len(h) ** alpha, h) for h in hypotheses]
        best = max(scored)[1]
        expected = best[:-1] if best[-1] == dec.eos_id else best
        assert dec.generate(memory, beam_size=15, length_penalty=alpha) == [expected]


def test_generation_limits():
    dec = _decoder(max_length=8)
    memory = torch.randn(2, 5, 12)
    assert all(len(s) <= 3 for s in dec.generate(memory, beam_size=3, max_length=3))
    with pytest.raises(ValueError, match="max_length must be in"):
        dec.generate(memory, max_length=9)
    with pytest.raises(ValueError, match="beam_size"):
        dec.generate(memory, beam_size=0)


# -- module and data on tiny in-memory sets --------------------------------------------------
class Pairs(Dataset):
    def __init__(self, images, captions):
        self.images, self.captions = images, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.images[i], self.captions[i]


class Refs(Pairs):
    def __getitem__(self, i):
        return self.images[i], [self.captions[i]]


def _tiny_model_config(image_size=16):
    cfg = compose_train(*TINY_TOWERS, f"data.image_size={image_size}", "model.image.patch_size=8")
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.model, resolve=True)


def test_tokens_start_with_cls_end_with_sep_in_decoder_ids():
    caps = ["a red circle", "two blue squares on the left and a star"]
    images = torch.zeros(2, 3, 16, 16)
    dm = CaptionDataModule(
        Pairs(images, caps), Refs(images, caps), image_size=16, batch_size=2, max_length=6
    )
    tokens = dm.tokens(caps)
    vocab = torch.tensor(dm.vocab)
    words = vocab[tokens]  # back to WordPiece ids
    assert words[0].tolist() == [
        BOS_ID,
        *dm.tokenizer(["a red circle"])[0, :3].tolist(),
        EOS_ID,
        PAD_ID,
        PAD_ID,
    ]
    assert (
        words[1, 0] == BOS_ID and words[1, -1] == EOS_ID and tokens.shape == (2, 7)
    )  # cut to 5 + [SEP]
    assert dm.vocab == sorted(set(dm.tokenizer(caps).flatten().tolist()) | {0, 100, 101, 102})
    assert (
        len(
            CaptionDataModule(
                Pairs(images, caps), Refs(images, caps), image_size=16, output_vocab="full"
            ).vocab
        )
        == VOCAB_SIZE
    )
    args = dm.task_args
    assert dm.vocab[args["bos_id"]] == BOS_ID and dm.vocab[args["eos_id"]] == EOS_ID
    assert args["pad_id"] == 0 and args["constant_caption"] == "a red circle"


def test_shuffle_images_pairs_each_training_caption_with_another_image():
    """data.shuffle_images=true (the image-blind control): each training caption gets the
    next one's image (none keeps its own); captions and validation batches are unchanged."""
    caps = ["a red circle", "a blue star", "two green squares", "a pink cross"]
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16)
    plain = CaptionDataModule(Pairs(images, caps), Refs(images, caps), image_size=16)
    control = CaptionDataModule(
        Pairs(images, caps), Refs(images, caps), image_size=16, shuffle_images=True
    )
    batch = [(images[i], caps[i]) for i in range(4)]
    (same, tokens), (shuffled, shuffled_tokens) = (
        plain._train_collate(batch),
        control._train_collate(batch),
    )
    assert torch.equal(same, images) and torch.equal(shuffled_tokens, tokens)
    assert shuffled[:, 0, 0, 0].tolist() == [3.0, 0.0, 1.0, 2.0]
    val = [(i, images[i], [caps[i]]) for i in range(4)]
    assert torch.equal(control._val_collate(val)[0], images)


def test_tiny_captioner_memorises_eight_captions():
    """8 images, 8 different captions: after training, greedy decoding returns each caption
    verbatim (teacher forcing and free-running decoding agree)."""
    torch.manual_seed(0)
    caps = [
        "a red circle",
        "a blue square on the left",
        "two green stars",
        "a small pink cross",
        "three yellow triangles at the top",
        "a large cyan circle",
        "an orange star",
        "a purple square and a red cross",
    ]
    images = torch.randn(8, 3, 16, 16)
    dm = CaptionDataModule(
        Pairs(images, caps), Refs(images, caps), image_size=16, batch_size=8, max_length=12
    )
    module = CaptioningModule(
        _tiny_model_config(),
        **dm.task_args,
        decoder_width=64,
        decoder_depth=2,
        decoder_heads=2,
        decoder_dropout=0.0,
    )
    batch_images, tokens = dm._train_collate([dm.train_set[i] for i in range(8)])
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.0)
    module.train()
    for _ in range(150):
        loss = module.loss(module.image_tokens(batch_images), tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    assert loss.item() < 0.05
    assert module.captions(batch_images) == caps
    module.hparams.beam_size = 3
    assert module.captions(batch_images) == caps


def test_label_smoothing_changes_the_loss_as_its_formula():
    torch.manual_seed(0)
    caps = ["a red circle", "two blue squares"]
    images = torch.randn(2, 3, 16, 16)
    dm = CaptionDataModule(Pairs(images, caps), Refs(images, caps), image_size=16, max_length=8)
    plain = CaptioningModule(
        _tiny_model_config(),
        **dm.task_args,
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
        decoder_dropout=0.0,
    ).eval()
    smooth = CaptioningModule(
        _tiny_model_config(),
        **dm.task_args,
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
        decoder_dropout=0.0,
        label_smoothing=0.1,
    ).eval()
    smooth.load_state_dict(plain.state_dict())
    _, tokens = dm._train_collate([dm.train_set[i] for i in range(2)])
    with torch.no_grad():
        logp = plain(images, tokens).log_softmax(-1)
        target = tokens[:, 1:]
        keep = target != 0
        nll = -logp.gather(-1, target[..., None])[..., 0][keep].mean()
        uniform = -logp.mean(-1)[keep].mean()
        assert plain.loss(plain.image_tokens(images), tokens) == pytest.approx(float(nll), rel=1e-5)
        assert smooth.loss(smooth.image_tokens(images), tokens) == pytest.approx(
            float(0.9 * nll + 0.1 * uniform), rel=1e-5
        )


def test_frozen_encoder_has_no_gradients_and_no_drop_path():
    caps = ["a red circle", "two blue squares"]
    images = torch.randn(2, 3, 16, 16)
    dm = CaptionDataModule(Pairs(images, caps), Refs(images, caps), image_size=16, max_length=8)
    module = CaptioningModule(
        _tiny_model_config(),
        **dm.task_args,
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
        freeze_encoder=True,
        drop_path=0.5,
    )
    module.train()
    assert not module.visual.training and module.decoder.training
    _, tokens = dm._train_collate([dm.train_set[i] for i in range(2)])
    module.loss(module.image_tokens(images), tokens).backward()
    assert all(p.grad is None for p in module.visual.parameters())
    assert module.decoder.token_embed.weight.grad is not None


# -- real formats ----------------------------------------------------------------------------
def _jpeg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path, "JPEG")


WORDS = ["dog", "cat", "horse", "bus", "pizza", "kite", "boat", "train"]


def write_karpathy(root):
    """dataset_coco.json in Karpathy's schema, with its JPEGs (train2014/val2014)."""
    images, sentid = [], 0
    for i, split in enumerate(["train", "train", "restval", "restval", "val", "test", "test"]):
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        _jpeg(root / folder / name, i)
        raws = [f"A {WORDS[i]} number {k} in the picture." for k in range(5)]
        sentences = [
            {"tokens": r.lower().strip(".").split(), "raw": r, "imgid": i, "sentid": sentid + k}
            for k, r in enumerate(raws)
        ]
        images.append(
            {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": name,
                "imgid": i,
                "split": split,
                "sentences": sentences,
                "cocoid": 1000 + i,
            }
        )
        sentid += 5
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))


def write_nocaps(root, n_images=3):
    images, annotations = [], []
    for i in range(n_images):
        name = f"{i:016x}.jpg"
        _jpeg(root / "val" / name, 100 + i)
        images.append(
            {
                "id": i,
                "open_images_id": f"{i:016x}",
                "height": 20,
                "width": 24,
                "coco_url": f"https://s3.amazonaws.com/nocaps/val/{name}",
                "file_name": name,
                "license": 0,
                "date_captured": "2018-11-06 11:04:33",
                "domain": ["in-domain", "near-domain", "out-domain"][i % 3],
            }
        )
        annotations += [
            {"image_id": i, "id": 10 * i + k, "caption": f"{WORDS[i]} seen {k}"} for k in range(10)
        ]
    (root / "nocaps_val_4500_captions.json").write_text(
        json.dumps({"licenses": [], "info": {}, "images": images, "annotations": annotations})
    )


def _data(*overrides, batch_size=4):
    cfg = compose_train("task=captioning", "data.num_workers=0", *overrides)
    return instantiate(cfg.data, batch_size=batch_size)


def test_karpathy_coco_fixture_trains_and_its_loss_falls(tmp_path):
    write_karpathy(tmp_path / "coco")
    data = _data("data=coco_captions", f"data_root={tmp_path}", "data.image_size=16")
    assert len(data.train_set) == 4 * 5  # train + restval, one sample per caption
    assert len(data.val_set) == 1  # Karpathy val, while training
    assert len(data.test_set) == 2 and data.test_set[0][1][0] == "A kite number 0 in the picture."
    assert data.constant_caption == "A dog number 0 in the picture."  # all count 1: the first
    data.setup("fit")
    torch.manual_seed(0)
    module = CaptioningModule(
        _tiny_model_config(),
        **data.task_args,
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
        decoder_dropout=0.0,
    )
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        for images, tokens in data.train_dataloader():
            assert images.shape == (4, 3, 16, 16)
            loss = module.loss(module.image_tokens(images), tokens)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    images, tokens, refs, indices = next(iter(data.test_dataloader()))
    assert refs == [
        [f"A {w} number {k} in the picture." for k in range(5)] for w in ("kite", "boat")
    ]
    assert images.shape == (2, 3, 16, 16) and indices.tolist() == [0, 1]
    assert torch.tensor(data.vocab)[tokens[0]].tolist()[:2] == [BOS_ID, data.tokenizer("a")[0, 0]]


def test_karpathy_split_selection(tmp_path):
    write_karpathy(tmp_path / "coco")
    data = _data(
        "data=coco_captions", f"data_root={tmp_path}", "data.image_size=16", "data.val.splits=[val]"
    )
    assert [refs[0] for _, refs in data.val_set.items] == ["A pizza number 0 in the picture."]


def test_nocaps_reader_and_datamodule(tmp_path):
    write_karpathy(tmp_path / "coco")
    write_nocaps(tmp_path / "nocaps")
    data = _data("data=nocaps", f"data_root={tmp_path}", "data.image_size=16")
    assert len(data.train_set) == 20  # COCO Karpathy train + restval
    assert len(data.val_set) == 3
    image, refs = data.val_set[1]
    assert image.shape == (3, 16, 16) and refs == [f"cat seen {k}" for k in range(10)]
    (tmp_path / "nocaps" / "val" / f"{2:016x}.jpg").unlink()
    with pytest.raises(DatasetNotFound, match="1 images missing"):
        coco_format_images(
            tmp_path / "nocaps", lambda im: im, "nocaps_val_4500_captions.json", "val"
        )
    with pytest.raises(DatasetNotFound, match="COCO-format captions"):
        coco_format_images(tmp_path, lambda im: im, "nope.json")


def test_shapes_miniature_references_are_fixed_and_true():
    val = ShapesReferences(size=5, image_size=32, seed=0, references=5)
    scene, refs = val.sample(3)
    assert refs == val.sample(3)[1] and len(refs) == 5
    for ref in refs:  # every reference names each colour of the scene
        assert all(obj.colour in ref for obj in scene.objects)
    train = ShapesTrainCaptions(size=50, image_size=32)
    assert len(train.captions) == 50 and train.captions[7] == train[7][1]


# -- configs and the run ---------------------------------------------------------------------
def test_captioning_configs_compose():
    cfg = compose_train("task=captioning")
    assert cfg.data._target_ == "flip.data.captions.CaptionDataModule"
    assert cfg.data.val._target_.endswith("ShapesReferences") and cfg.task.label_smoothing == 0.0
    assert (cfg.data.val.get("split", "val"), cfg.data.test.split) == ("val", "test")
    for name, val_target in (("coco", "karpathy_images"), ("nocaps", "coco_format_images")):
        cfg = compose_train(f"experiment=table7_captioning_{name}", "init_from=/x.ckpt")
        assert cfg.task._target_ == "flip.tasks.captioning.CaptioningModule"
        assert cfg.data.val._target_.endswith(val_target)
        assert cfg.data.train.images.splits == ["train", "restval"]
        assert cfg.task.label_smoothing == 0.0 and cfg.task.freeze_encoder is False
        assert cfg.task.beam_size == 5 and cfg.group == "table7"
    cfg = compose_train("experiment=table7_captioning_coco", "init_from=/x.ckpt")
    # validated on Karpathy val while training; the paper's number: Karpathy test, once
    assert cfg.data.val.splits == ["val"] and cfg.data.test.splits == ["test"]


@pytest.mark.slow
def test_train_py_captioning_prints_the_summary_line(tmp_path):
    """`python train.py task=captioning init_from=<tiny FLIP>` end to end, tiny sizes: the
    validation split is scored after each of 2 epochs and after the run, the test split once,
    at the end, and the closing line reports the test split."""
    cfg = compose_fast(output_dir=tmp_path)
    model = instantiate(cfg.model)
    from omegaconf import OmegaConf

    ckpt = tmp_path / "tiny.ckpt"
    save_flip_checkpoint(ckpt, model, OmegaConf.to_container(cfg.model, resolve=True))
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "task=captioning",
            f"init_from={ckpt}",
            "batch.global=16",
            "data.train.size=32",
            "data.val.size=6",
            "data.test.size=6",
            "data.val_batch_size=6",
            "data.num_workers=0",
            "task.epochs=2",
            "task.eval_every=1",
            "task.decoder_width=32",
            "task.decoder_depth=1",
            "task.decoder_heads=2",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            f"output_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=CONF.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # see one_thread
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"captioning \(test\) CIDEr [\d.]+ BLEU-4 [\d.]+ METEOR [\d.]+ ROUGE-L [\d.]+ "
        r"\(SPICE unavailable offline\); constant caption baseline \('.+'\): "
        r"CIDEr [\d.]+ BLEU-4 [\d.]+ METEOR [\d.]+ ROUGE-L [\d.]+",
        line,
    ), line
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert "val/baseline_CIDEr" in record["metrics"] and "val/CIDEr" in record["metrics"]
    assert line.startswith(f"captioning (test) CIDEr {record['metrics']['test/CIDEr']:.1f} ")
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    assert sum(bool(r.get("val/CIDEr")) for r in rows) == 3  # epochs 1, 2, after the run
    assert sum(bool(r.get("test/CIDEr")) for r in rows) == 1  # once


def test_optimizer_groups_and_schedule():
    """Decoder at lr, tower at lr x encoder_lr_scale; no decay on biases, norm scales and
    position embeddings; linear warm-up over warmup_epochs, then cosine to 0."""
    from types import SimpleNamespace

    caps = ["a red circle", "two blue squares"]
    images = torch.randn(2, 3, 16, 16)
    dm = CaptionDataModule(Pairs(images, caps), Refs(images, caps), image_size=16, max_length=8)
    module = CaptioningModule(
        _tiny_model_config(),
        **dm.task_args,
        decoder_width=32,
        decoder_depth=1,
        decoder_heads=2,
        lr=1e-3,
        encoder_lr_scale=0.1,
        weight_decay=0.05,
        epochs=4,
        warmup_epochs=1.0,
    )
    module.trainer = SimpleNamespace(estimated_stepping_batches=40)
    config = module.configure_optimizers()
    opt, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    groups = {g["name"]: g for g in opt.param_groups}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(module.decoder.pos_embed) in ids["decoder/no_decay"]
    assert id(module.decoder.token_embed.weight) in ids["decoder/decay"]  # = the tied head
    assert id(module.visual.blocks[0].attn.qkv.weight) in ids["visual/decay"]
    assert id(module.visual.norm.weight) in ids["visual/no_decay"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(module.parameters()))
    assert (
        groups["decoder/no_decay"]["weight_decay"] == 0
        and groups["visual/decay"]["weight_decay"] == 0.05
    )
    lrs = []
    for _ in range(40):
        lrs.append((groups["decoder/decay"]["lr"], groups["visual/decay"]["lr"]))
        opt.step()
        schedule.step()
    assert lrs[0] == (0.0, 0.0) and lrs[5][0] == pytest.approx(5e-4)  # warm-up: 10 steps
    assert lrs[10] == pytest.approx((1e-3, 1e-4))
    assert lrs[25][0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))


def test_datamodule_checks_the_image_size():
    val = ShapesReferences(size=2, image_size=32)
    dm = CaptionDataModule(ShapesTrainCaptions(size=4, image_size=32), val, image_size=16)
    with pytest.raises(DataError, match="data.image_size is 16"):
        dm.setup("fit")


@pytest.mark.slow
def test_two_process_validation_scores_every_image_once():
    """DDP (2 gloo processes): each rank decodes a share of 5 images (the sampler repeats
    one to even the ranks); the gathered captions are scored once, as in one process."""
    import lightning as L

    torch.manual_seed(0)
    caps = ["a red circle", "a blue square", "two green stars", "a pink cross", "an orange star"]
    images = torch.randn(5, 3, 16, 16)

    def run(devices):
        dm = CaptionDataModule(
            Pairs(images, caps), Refs(images, caps), image_size=16, batch_size=2, max_length=8
        )
        torch.manual_seed(0)
        module = CaptioningModule(
            _tiny_model_config(),
            **dm.task_args,
            decoder_width=32,
            decoder_depth=1,
            decoder_heads=2,
            spice=False,
        )
        trainer = L.Trainer(
            accelerator="cpu",
            devices=devices,
            logger=False,
            strategy="ddp_spawn" if devices > 1 else "auto",
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        return trainer.validate(module, datamodule=dm, verbose=False)[0]

    one, two = run(1), run(2)
    for key in ("val/CIDEr", "val/BLEU-1", "val/ROUGE-L", "val/baseline_CIDEr"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
