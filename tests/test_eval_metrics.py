"""Evaluation metrics against independent computations: retrieval recall against a
brute-force loop, top-k / mean per-class against numpy, PM-k and 11-point AP on hand-built
cases, template averaging, and the class-subset / class-group projection."""

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from flip.eval.module import StridedSampler
from flip.eval.retrieval import ZeroShotRetrieval
from flip.eval.zeroshot import ZeroShotClassification, build_zero_shot_classifier, group_max
from flip.metrics.zeroshot import (
    average_precision_11pt,
    dedupe_by_index,
    mean_average_precision_11pt,
    pm_k,
    retrieval_recall,
)


# -- retrieval --------------------------------------------------------------------------------
def brute_force_recall(img, txt, owner, ks):
    sim = (img @ txt.T).numpy()
    out = {}
    for k in ks:
        hits = 0
        for i in range(sim.shape[0]):
            top = np.argsort(-sim[i], kind="stable")[:k]
            hits += any(owner[t] == i for t in top)
        out[f"image_to_text_R@{k}"] = hits / sim.shape[0]
    for k in ks:
        hits = 0
        for t in range(sim.shape[1]):
            top = np.argsort(-sim[:, t], kind="stable")[:k]
            hits += owner[t] in top
        out[f"text_to_image_R@{k}"] = hits / sim.shape[1]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recall_matches_a_brute_force_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n_img = 37
    counts = torch.randint(1, 7, (n_img,), generator=g)  # 1..6 captions per image
    owner = torch.repeat_interleave(torch.arange(n_img), counts)
    img = F.normalize(torch.randn(n_img, 8, generator=g), dim=-1)
    # captions near their image, plus noise: recall between 0 and 1
    txt = F.normalize(img[owner] + 0.9 * torch.randn(len(owner), 8, generator=g), dim=-1)
    got = retrieval_recall(img, txt, owner, ks=(1, 5, 10), chunk=7)  # chunking exercised
    want = brute_force_recall(img, txt, owner.tolist(), (1, 5, 10))
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["image_to_text_R@1"] < 1 and 0 < got["text_to_image_R@1"] < 1


def test_retrieval_recall_hand_built_case():
    # 3 images on the axes; texts 0,1 describe image 0, text 2 image 1, text 3 image 2.
    img = torch.eye(3)
    txt = torch.tensor(
        [
            [0.1, 0.9, 0.0],  # of image 0 but closest to image 1
            [0.6, 0.0, 0.8],  # of image 0, closest to image 2, then image 0
            [0.0, 1.0, 0.0],  # of image 1: exact
            [0.0, 0.2, 0.3],
        ]
    )  # of image 2: image 2 first
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(img, txt, owner, ks=(1, 2))
    # image->text: img0's best caption is text1 (0.6), beaten by nothing? sims of img0:
    # [0.1, 0.6, 0, 0] -> text1 first: hit@1. img1: [0.9, 0, 1.0, 0.2] -> text2: hit@1.
    # img2: [0, 0.8, 0, 0.3] -> text1 (of img0) first, text3 second: miss@1, hit@2.
    assert r["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@2"] == pytest.approx(1.0)
    # text->image: t0 ranks img1 > img0: miss@1 hit@2; t1 img2 > img0: miss@1 hit@2;
    # t2 img1: hit@1; t3 img2: hit@1.
    assert r["text_to_image_R@1"] == pytest.approx(2 / 4)
    assert r["text_to_image_R@2"] == pytest.approx(1.0)


# -- PM-k, 11-point AP ------------------------------------------------------------------------
def test_pm_k_counts_a_set_only_when_every_frame_within_k_is_correct():
    correct = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    pmsets = {1: [0, 2], 4: [3, 5], 7: [6], 2: []}
    offsets = {1: [-1, 1], 4: [-5, 1], 7: [-1], 2: []}
    assert pm_k(correct, pmsets, 0) == 1.0  # every anchor is right
    assert pm_k(correct, pmsets, None) == 2 / 4  # anchors 1 and 2 (empty set) survive
    assert pm_k(correct, pmsets, 2, offsets) == 3 / 4  # frame 3 is 5 away from anchor 4
    assert pm_k(torch.zeros(8, dtype=torch.bool), pmsets, None) == 0


def test_average_precision_11pt_hand_case():
    # ranking: +, -, +, -, - (2 positives): precision at the hits 1, 2/3; recall 0.5, 1.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)
    # t in {0..0.5}: max precision with recall >= t is 1 (6 thresholds); t in {0.6..1}: 2/3 (5)
    assert average_precision_11pt(scores, targets) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert average_precision_11pt(scores, torch.zeros(5, dtype=torch.bool)) == 0.0
    both = torch.stack([targets, targets.flip(0)], 1)
    s2 = torch.stack([scores, scores], 1)
    # the second column: positives at ranks 4 and 5 (of the reversed list: 0,0,1,0,1 reversed)
    ap2 = average_precision_11pt(scores, targets.flip(0))
    assert mean_average_precision_11pt(s2, both) == pytest.approx(
        ((6 * 1 + 5 * 2 / 3) / 11 + ap2) / 2
    )


def test_dedupe_by_index_sorts_and_drops_repeats():
    idx, val = dedupe_by_index(torch.tensor([3, 1, 3, 0]), torch.tensor([30, 10, 31, 0]))
    assert idx.tolist() == [0, 1, 3] and val.tolist() == [0, 10, 30]


def test_strided_sampler_covers_every_index_once():
    parts = [list(StridedSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and [len(p) for p in parts] == [4, 3, 3]
    assert [len(StridedSampler(10, r, 3)) for r in range(3)] == [4, 3, 3]


# -- classifier construction ------------------------------------------------------------------
class PromptTokenizer:
    """Tokens = the index of each prompt in a fixed vocabulary of prompts."""

    def __init__(self, prompts):
        self.index = {p: i for i, p in enumerate(prompts)}

    def __call__(self, texts):
        return torch.tensor([[self.index[t]] for t in texts])


def test_class_embedding_is_normalised_mean_of_normalised_prompts():
    classes, templates = ["cat", "dog"], ["a {}.", "a photo of a {}.", "art of the {}."]
    prompts = [t.format(c) for c in classes for t in templates]
    raw = torch.randn(len(prompts), 5, generator=torch.Generator().manual_seed(0)) * 3
    encode = lambda tok: raw[tok[:, 0]]  # noqa: E731 (unnormalised text features)
    W = build_zero_shot_classifier(encode, PromptTokenizer(prompts), classes, templates)
    for c in range(2):
        p = raw[3 * c : 3 * c + 3].numpy()
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        m = p.mean(0)
        np.testing.assert_allclose(W[c].numpy(), m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
    batched = build_zero_shot_classifier(
        encode, PromptTokenizer(prompts), classes, templates, classes_per_batch=2
    )
    torch.testing.assert_close(batched, W)


def test_group_max_and_class_subset():
    logits = torch.tensor([[0.1, 0.9, 0.3, 0.5], [0.7, 0.2, 0.6, 0.0]], dtype=torch.float64)
    # subset {2, 3} (as ImageNet-A's 200 of 1000): the global best (1, 0) is excluded
    assert group_max(logits, [[2], [3]]).tolist() == [[0.3, 0.5], [0.6, 0.0]]
    # ObjectNet-style groups: max over the mapped classes
    assert group_max(logits, [[0, 3], [1, 2], [2]]).tolist() == [[0.5, 0.9, 0.3], [0.7, 0.6, 0.6]]


# -- the LightningModules on a stub model -----------------------------------------------------
class StubModel(nn.Module):
    """encode_image: the 'image' is already its feature vector; encode_text: a lookup table."""

    def __init__(self, text_table):
        super().__init__()
        self.table = text_table
        self.visual = nn.Identity()

    def encode_image(self, x):
        return F.normalize(x, dim=-1)

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]


class Pairs(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _run(module):
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.test(module, verbose=False)
    return module.results


def test_zero_shot_module_metrics_match_numpy():
    g = torch.Generator().manual_seed(0)
    C, N, D = 8, 61, 6
    classes = [f"c{i}" for i in range(C)]
    templates = ["{}", "a {}"]
    prompts = [t.format(c) for c in classes for t in templates]
    table = torch.randn(len(prompts), D, generator=g)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C - 1, (N,), generator=g)  # class C-1 never occurs in the labels
    module = ZeroShotClassification(
        StubModel(table), Pairs(x, y), classes, templates, PromptTokenizer(prompts), batch_size=16
    )
    r = _run(module)
    W = build_zero_shot_classifier(
        StubModel(table).encode_text, PromptTokenizer(prompts), classes, templates
    ).numpy()
    logits = F.normalize(x, dim=-1).numpy() @ W.T
    pred = logits.argmax(1)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    yn = y.numpy()
    assert r["top1"] == pytest.approx((pred == yn).mean(), abs=1e-6)
    assert r["top5"] == pytest.approx(np.mean([yn[i] in top5[i] for i in range(N)]), abs=1e-6)
    per_class = [np.mean(pred[yn == c] == c) for c in range(C) if (yn == c).any()]
    assert r["mean_per_class"] == pytest.approx(np.mean(per_class), abs=1e-6)
    assert r["num_samples"] == N


def test_zero_shot_module_roc_auc_and_groups():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(4, 3, generator=g)  # 4 "ImageNet" classes, 1 template
    x = torch.randn(40, 3, generator=g)
    y = torch.randint(0, 2, (40,), generator=g)
    classes = ["a", "b", "c", "d"]
    module = ZeroShotClassification(
        StubModel(table),
        Pairs(x, y),
        classes,
        ["{}"],
        PromptTokenizer(classes),
        groups=[[0, 2], [1, 3]],
    )
    r = _run(module)
    W = F.normalize(table, dim=-1)
    logits = F.normalize(x, dim=-1) @ W.T
    two = torch.stack([logits[:, [0, 2]].max(1).values, logits[:, [1, 3]].max(1).values], 1)
    assert r["top1"] == pytest.approx((two.argmax(1) == y).float().mean().item(), abs=1e-6)
    score = (two[:, 1] - two[:, 0]).numpy()
    pos, neg = score[y.numpy() == 1], score[y.numpy() == 0]
    auc = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])  # Mann-Whitney U
    assert r["roc_auc"] == pytest.approx(auc, abs=1e-6)


class Captions(Dataset):
    def __init__(self, x, caps):
        self.x, self.caps = x, caps

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.caps[i]


def test_retrieval_module_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    n, D = 13, 5
    caps = [[f"t{i}_{j}" for j in range(1 + i % 3)] for i in range(n)]
    flat = [c for cs in caps for c in cs]
    owner = [i for i, cs in enumerate(caps) for _ in cs]
    x = torch.randn(n, D, generator=g)
    table = F.normalize(x[owner] + torch.randn(len(flat), D, generator=g), dim=-1)
    module = ZeroShotRetrieval(
        StubModel(table), Captions(x, caps), PromptTokenizer(flat), ks=(1, 5), batch_size=4
    )
    r = _run(module)
    want = brute_force_recall(F.normalize(x, dim=-1), table, owner, (1, 5))
    assert {k: r[k] for k in want} == pytest.approx(want, abs=1e-6)
    assert r["num_images"] == n and r["num_texts"] == len(flat)
