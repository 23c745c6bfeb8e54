"""sklearn digits with captions: split, determinism, caption truth, zero-shot set."""

import re
from collections import Counter

import numpy as np
import pytest
import torch

from flip.data.digits import WORDS, DigitsCaptions, DigitsZeroShot, _raw, digits_split
from flip.data.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_split_disjoint_complete_and_stratified():
    train, held = digits_split(seed=0)
    labels = _raw()[1]
    assert len(labels) == 1797 and len(train) == 1437 and len(held) == 360
    assert not set(train) & set(held)
    assert sorted(set(train) | set(held)) == list(range(1797))
    per_class = Counter(labels)
    held_per_class = Counter(labels[held])
    for digit in range(10):
        assert abs(held_per_class[digit] - 0.2 * per_class[digit]) <= 1
    again = digits_split(seed=0)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(digits_split(seed=1)[1], held)


def test_items_deterministic_grey_rgb_and_normalised():
    ds = DigitsCaptions(split="train", image_size=32, seed=0)
    assert len(ds) == 1437
    image, caption = ds[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    again = DigitsCaptions(split="train", image_size=32, seed=0)[3]
    assert torch.equal(image, again[0]) and caption == again[1]
    assert not torch.equal(image, ds[4][0])
    pixels = image * STD + MEAN  # (3, 32, 32) in [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5)  # grey -> RGB
    assert torch.allclose(pixels[0], pixels[2], atol=1e-5)
    assert pixels.max() > 0.9 and pixels.min() < 0.3  # white paper, dark ink
    assert DigitsZeroShot(image_size=48)[0][0].shape == (3, 48, 48)
    with pytest.raises(IndexError):
        ds[1437]
    with pytest.raises(ValueError):
        DigitsCaptions(split="test")


def test_captions_name_the_right_digit_only():
    ds = DigitsCaptions(split="train")
    n_word = n_numeral = 0
    templates = set()
    for i in range(400):
        label = int(ds.labels[i])
        caption = ds[i][1]
        tokens = re.findall(r"[a-z]+|\d", caption)
        named = {WORDS.index(t) for t in tokens if t in WORDS} | {
            int(t) for t in tokens if t.isdigit()
        }
        assert named == {label}, caption
        n_word += WORDS[label] in tokens
        n_numeral += str(label) in tokens
        templates.add(caption.replace(WORDS[label], "W").replace(str(label), "N"))
    assert n_word > 150 and n_numeral > 100 and len(templates) >= 10
    assert "an one" not in " ".join(ds[i][1] for i in range(400))


def test_augmentation_and_cycling():
    aug = DigitsCaptions(split="train")
    plain = DigitsCaptions(split="train", augment=False)
    assert sum(not torch.equal(aug[i][0], plain[i][0]) for i in range(20)) >= 18
    long = DigitsCaptions(split="train", size=3000)
    assert len(long) == 3000
    assert long.labels[5] == long.labels[(5 + 1437) % 1437]
    assert not torch.equal(long[5][0], long[5 + 1437][0])  # same digit, new jitter
    assert not DigitsCaptions(split="heldout").augment


def test_zero_shot_over_heldout_digits():
    zs = DigitsZeroShot(image_size=32, seed=0)
    assert zs.classnames == [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    ]
    assert len(zs.templates) >= 3 and all(t.count("{}") == 1 for t in zs.templates)
    assert len(zs) == 360 and np.array_equal(zs.indices, digits_split(0)[1])
    labels = [zs[i][1] for i in range(len(zs))]
    assert all(isinstance(label, int) for label in labels)
    assert set(labels) == set(range(10))
    assert labels == list(_raw()[1][zs.indices])
    # held-out images are shown as is (no augmentation)
    plain = DigitsCaptions(split="heldout", augment=False)
    assert torch.equal(zs[10][0], plain[10][0])


def test_zero_shot_prompts_use_training_vocabulary():
    ds = DigitsCaptions(split="train")
    vocab = {x for i in range(len(ds)) for x in ds[i][1].split()}
    zs = DigitsZeroShot()
    prompts = {t.format(name) for t in zs.templates for name in zs.classnames}
    assert {x for p in prompts for x in p.split()} <= vocab
