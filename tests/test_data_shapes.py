"""Synthetic shape scenes: determinism, hold-out guarantees and caption truthfulness."""

import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flip.data import shapes
from flip.data.shapes import (
    ALL_COMBOS,
    COLOURS,
    SHAPES,
    ShapesCaptions,
    ShapesZeroShot,
    describe,
    heldout_combos,
    render,
    sample_scene,
)
from flip.data.transforms import IMAGENET_MEAN, IMAGENET_STD

N_SCENES = 2000
SINGULAR = {shapes.plural(s): s for s in SHAPES} | {s: s for s in SHAPES}
COLOUR_RE = "|".join(COLOURS)
SHAPE_RE = "|".join(sorted(SINGULAR, key=len, reverse=True))
POSITION_OF = {p: cell for cell, ps in shapes._POSITIONS.items() for p in ps}
POSITION_RE = "|".join(sorted(POSITION_OF, key=len, reverse=True))  # longest first
SINGLE_RE = re.compile(
    rf"\b(?:a|an|one) (?:(small|large) )?({COLOUR_RE}) ({SHAPE_RE})\b(?: ({POSITION_RE})\b)?"
)
GROUP_RE = re.compile(rf"\b(two|three) (?:(small|large) )?({COLOUR_RE}) ({SHAPE_RE})\b")


@pytest.fixture(scope="module")
def train_samples():
    ds = ShapesCaptions(split="train", size=N_SCENES)
    return ds, [ds.sample(i) for i in range(N_SCENES)]


def words(caption):
    return re.findall(r"[a-z]+", caption)


def test_heldout_combos_balanced_and_seeded():
    held = heldout_combos(seed=0, fraction=0.25)
    assert len(ALL_COMBOS) == 40 and len(held) == 10
    assert held == heldout_combos(seed=0, fraction=0.25)
    assert held != heldout_combos(seed=1, fraction=0.25)
    assert heldout_combos(seed=0, fraction=0.0) == frozenset()
    per_colour = Counter(c for c, _ in held)
    per_shape = Counter(s for _, s in held)
    assert max(per_colour.values()) <= 2 and max(per_shape.values()) == 2
    for colour in COLOURS:  # every colour keeps >= 3 of its 5 shapes in training
        assert sum((colour, s) not in held for s in SHAPES) >= 3
    for shape in SHAPES:  # every shape keeps >= 6 of its 8 colours in training
        assert sum((c, shape) not in held for c in COLOURS) >= 6
    with pytest.raises(ValueError):
        heldout_combos(fraction=0.75)


def test_training_never_shows_heldout_combos(train_samples):
    ds, samples = train_samples
    objects = [o for scene, _ in samples for o in scene.objects]
    seen = {(o.colour, o.shape) for o in objects}
    assert not seen & ds.heldout
    assert seen == set(ALL_COMBOS) - ds.heldout  # every training pair does occur
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.size for o in objects} == {"small", "large"}
    n_objects = Counter(len(scene.objects) for scene, _ in samples)
    assert set(n_objects) == {1, 2, 3} and n_objects[1] > N_SCENES / 3
    assert {(o.row, o.col) for o in objects} == set(shapes._POSITIONS)
    # no two objects share a grid cell, so they never overlap
    assert all(len({(o.row, o.col) for o in s.objects}) == len(s.objects) for s, _ in samples)


def test_items_deterministic_and_normalised():
    ds = ShapesCaptions(size=100, image_size=64, seed=0)
    image, caption = ds[7]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert isinstance(caption, str) and caption
    again = ShapesCaptions(size=100, image_size=64, seed=0)[7]  # fresh instance
    assert torch.equal(image, again[0]) and caption == again[1]
    other = ds[8]
    assert not torch.equal(image, other[0])
    assert not torch.equal(image, ShapesCaptions(split="val", size=100)[7][0])
    assert not torch.equal(image, ShapesCaptions(size=100, seed=1)[7][0])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = image * std + mean  # back to [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert abs(image.mean().item()) < 1.5  # normalised, not raw 0..255
    assert ShapesCaptions(size=3, image_size=32)[0][0].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        ds[100]
    with pytest.raises(ValueError):
        ShapesCaptions(split="training")


def test_single_object_caption_and_pixels(train_samples):
    _, samples = train_samples
    singles = [(s, c) for s, c in samples if len(s.objects) == 1]
    assert len(singles) > 500
    for scene, caption in singles:
        (obj,) = scene.objects
        w = words(caption)
        assert {x for x in w if x in COLOURS} == {obj.colour}, caption
        assert {SINGULAR[x] for x in w if x in SINGULAR} == {obj.shape}, caption
        assert {x for x in w if x in ("small", "large")} <= {obj.size}, caption
        assert not {"two", "three"} & set(w), caption
        positions = re.findall(POSITION_RE, caption)
        assert all(POSITION_OF[p] == (obj.row, obj.col) for p in positions), caption
        # the object is drawn in its own colour at its centre, on a grey background
        image = np.asarray(render(scene, 64))  # (64, 64, 3) uint8
        centre = image[int(obj.y * 64), int(obj.x * 64)]
        assert tuple(centre) == obj.rgb
        nearest = min(COLOURS, key=lambda c: np.abs(np.subtract(COLOURS[c], centre)).sum())
        assert nearest == obj.colour
        corner = image[0, 0].astype(int)
        assert abs(corner - np.array(scene.background)).max() <= shapes.NOISE_AMPLITUDE
    # positions and sizes are described in a good share of captions
    assert sum(bool(re.search(POSITION_RE, c)) for _, c in singles) > len(singles) / 5
    assert sum(bool(re.search(r"\b(small|large)\b", c)) for _, c in singles) > len(singles) / 5


def test_multi_object_captions_are_true(train_samples):
    _, samples = train_samples
    n_groups = n_singles = 0
    for scene, caption in samples:
        objs = scene.objects
        w = words(caption)
        assert {x for x in w if x in COLOURS} == {o.colour for o in objs}, caption
        assert {SINGULAR[x] for x in w if x in SINGULAR} == {o.shape for o in objs}, caption
        for number, size, colour, shape in GROUP_RE.findall(caption):
            group = [o for o in objs if (o.colour, o.shape) == (colour, SINGULAR[shape])]
            assert len(group) == {"two": 2, "three": 3}[number], caption
            assert not size or all(o.size == size for o in group), caption
            n_groups += 1
        for size, colour, shape, position in SINGLE_RE.findall(caption):
            matches = [o for o in objs if (o.colour, o.shape) == (colour, shape)]
            assert len(matches) == 1, caption
            assert not size or matches[0].size == size, caption
            assert not position or POSITION_OF[position] == (matches[0].row, matches[0].col)
            n_singles += 1
        total = re.match(r"(two|three) shapes:", caption)
        if total:
            assert len(objs) == {"two": 2, "three": 3}[total.group(1)], caption
    assert n_groups > 100 and n_singles > 1000  # the patterns did match real captions


def test_phrasings_vary():
    scene = sample_scene(random.Random(3), [("red", "circle")], max_objects=1)
    captions = {describe(scene, random.Random(k)) for k in range(200)}
    assert len(captions) >= 15
    assert all("red" in c and "circle" in c for c in captions)
    ds = ShapesCaptions(size=500)
    openings = Counter(" ".join(ds.sample(i)[1].split()[:2]) for i in range(500))
    assert len(openings) >= 30 and max(openings.values()) < 0.2 * 500


def test_zero_shot_classes_and_mix():
    zs = ShapesZeroShot(size=400)
    assert len(zs.classnames) == 40 and len(set(zs.classnames)) == 40
    assert zs.classnames[0] == "red circle"
    assert len(zs.templates) >= 4 and all(t.count("{}") == 1 for t in zs.templates)
    held = heldout_combos(0, 0.25)
    assert {ALL_COMBOS[i] for i in zs.unseen_labels} == held
    labels = []
    for i in range(len(zs)):
        scene, label = zs.sample(i)
        (obj,) = scene.objects  # one object per image
        assert (obj.colour, obj.shape) == ALL_COMBOS[label]
        labels.append(label)
    assert Counter(labels) == Counter({k: 10 for k in range(40)})  # balanced
    assert sum(label in zs.unseen_labels for label in labels) == 100  # 25 % unseen
    image, label = zs[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 40
    assert torch.equal(image, ShapesZeroShot(size=400)[0][0])


def test_zero_shot_unseen_and_seen_restrictions():
    unseen = ShapesZeroShot(size=50, combos="unseen")
    seen = ShapesZeroShot(size=50, combos="seen")
    assert len(unseen.classnames) == len(seen.classnames) == 40  # chance stays 1/40
    assert {unseen.sample(i)[1] for i in range(50)} == set(unseen.unseen_labels)
    assert not {seen.sample(i)[1] for i in range(50)} & seen.unseen_labels
    with pytest.raises(ValueError):
        ShapesZeroShot(combos="some")
    with pytest.raises(ValueError):
        ShapesZeroShot(combos="unseen", heldout_fraction=0.0)


def test_zero_shot_stream_differs_from_training():
    train = ShapesCaptions(size=20)
    zs = ShapesZeroShot(size=20)
    assert all(train.sample(i)[0] != zs.sample(i)[0] for i in range(20))
    assert all(not torch.equal(train[i][0], zs[i][0]) for i in range(20))


def test_dataloader_workers_reproduce_items():
    ds = ShapesCaptions(size=16)
    images, captions = next(iter(DataLoader(ds, batch_size=16, num_workers=2)))
    assert images.shape == (16, 3, 64, 64)
    for i in range(16):
        assert torch.equal(images[i], ds[i][0]) and captions[i] == ds[i][1]


def test_antialias_render_keeps_object_centre_colour():
    scene = sample_scene(random.Random(0), [("blue", "star")], max_objects=1)
    (obj,) = scene.objects
    image = np.asarray(render(scene, 64, antialias=True))
    assert tuple(image[int(obj.y * 64), int(obj.x * 64)]) == obj.rgb
    assert not np.array_equal(image, np.asarray(render(scene, 64)))  # edges differ


def test_zero_shot_prompts_use_training_vocabulary(train_samples):
    _, samples = train_samples
    vocab = {x for _, caption in samples for x in caption.split()}
    zs = ShapesZeroShot(size=1)
    prompts = {t.format(name) for t in zs.templates for name in zs.classnames}
    assert {x for p in prompts for x in p.split()} <= vocab
