"""Real handwritten digits with captions, from scikit-learn's bundled ``load_digits``.

1797 8x8 greyscale scans (ships inside the sklearn package: no download), drawn as dark
ink on white paper, upscaled to ``image_size`` (bicubic) and returned as RGB. A
stratified, seed-determined split keeps ``heldout_fraction`` (20 %) of every digit for
the zero-shot evaluation; training items get a light random shift/scale/rotation and a
caption from varied templates mixing words and numerals ("a handwritten seven",
"the digit 7"). Items are deterministic functions of (seed, split, index).
"""

import functools
import random

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from flip.data.transforms import to_normalized_tensor

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (  # {w}: word, {a_w}: "a"/"an" + word, {n}: numeral
    "a handwritten {w}",
    "the digit {n}",
    "a scan of the number {w} written by hand",
    "the number {n}",
    "the number {w}",
    "a handwritten digit {n}",
    "a picture of a handwritten {w}",
    "{a_w} written by hand",
    "a low resolution scan of the digit {w}",
    "the numeral {n}",
    "an image of the number {w}",
    "a handwritten {n}",
    "the digit {w}",
    "a blurry handwritten {w} ({n})",
)
ZERO_SHOT_TEMPLATES = [  # training-caption wording, no trailing "." (never in captions)
    "a handwritten {}",
    "the number {}",
    "the digit {}",
    "a scan of the number {} written by hand",
    "a picture of a handwritten {}",
]
_SPLITS = ("train", "heldout")


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) uint8 ink-on-paper images (0 = black ink, 255 = paper), (N,) labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = 255 - np.round(d.images * (255 / 16)).astype(np.uint8)  # values 0..16
    return images, d.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _upscaled(image_size: int) -> np.ndarray:
    """(N, S, S) uint8: every digit resized bicubically to image_size."""
    images, _ = _raw()
    return np.stack(
        [
            np.asarray(
                Image.fromarray(x).resize((image_size, image_size), Image.Resampling.BICUBIC)
            )
            for x in images
        ]
    )


def digits_split(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train_indices, heldout_indices) into the 1797 digits, sorted."""
    from sklearn.model_selection import train_test_split

    _, labels = _raw()
    train, heldout = train_test_split(
        np.arange(len(labels)), test_size=heldout_fraction, stratify=labels, random_state=seed
    )
    return np.sort(train), np.sort(heldout)


def _augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """Light affine jitter: scale 0.9-1.1, shift +-8 % of the side, rotation +-10 deg."""
    S = img.size[0]
    scale = rng.uniform(0.9, 1.1)
    tx, ty = (rng.uniform(-0.08, 0.08) * S for _ in range(2))
    return img.rotate(
        rng.uniform(-10, 10), Image.Resampling.BILINEAR, center=(S / 2, S / 2), fillcolor=255
    ).transform(  # output (x, y) samples input ((x - c - tx) / scale + c, ...)
        (S, S),
        Image.Transform.AFFINE,
        (1 / scale, 0, S / 2 - (S / 2 + tx) / scale, 0, 1 / scale, S / 2 - (S / 2 + ty) / scale),
        Image.Resampling.BILINEAR,
        fillcolor=255,
    )


class _DigitsBase(Dataset):
    def __init__(self, split, size, image_size, seed, heldout_fraction, transform):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        train, heldout = digits_split(seed, heldout_fraction)
        self.indices = train if split == "train" else heldout  # into the 1797 digits
        self.labels = _raw()[1][self.indices]  # (n,)
        self.split, self.image_size, self.seed = split, image_size, seed
        self.size = len(self.indices) if size is None else size
        self.transform = transform if transform is not None else to_normalized_tensor()

    def __len__(self) -> int:
        return self.size

    def _base(self, index: int) -> tuple[Image.Image, int]:
        """The un-augmented greyscale image and label of item ``index``."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for dataset of size {self.size}")
        k = index % len(self.indices)  # size > n cycles through the images
        img = Image.fromarray(_upscaled(self.image_size)[self.indices[k]])  # (S, S) L
        return img, int(self.labels[k])


class DigitsCaptions(_DigitsBase):
    """(image (3, S, S) float, caption str). Item i shows digit indices[i % n].

    split: "train" or "heldout". size: dataset length (default: one pass over the split;
    larger sizes revisit images with fresh augmentation and captions).
    augment: default True for "train", False otherwise.
    """

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        image_size: int = 32,
        seed: int = 0,
        heldout_fraction: float = 0.2,
        augment: bool | None = None,
        transform=None,
    ):
        super().__init__(split, size, image_size, seed, heldout_fraction, transform)
        self.augment = split == "train" if augment is None else augment

    def __getitem__(self, index: int):
        img, label = self._base(index)
        rng = random.Random(f"flip-digits/{self.seed}/{self.split}/{index}")
        if self.augment:
            img = _augment(img, rng)
        word = WORDS[label]
        caption = rng.choice(CAPTION_TEMPLATES).format(
            w=word,
            n=label,
            a_w=("an " if word == "eight" else "a ") + word,  # "a one"
        )
        return self.transform(img), caption


class DigitsZeroShot(_DigitsBase):
    """(image (3, S, S) float, label int) over the held-out digits; 10 classes, chance 10 %."""

    classnames = list(WORDS)
    templates = ZERO_SHOT_TEMPLATES

    def __init__(
        self,
        split: str = "heldout",
        image_size: int = 32,
        seed: int = 0,
        heldout_fraction: float = 0.2,
        transform=None,
    ):
        super().__init__(split, None, image_size, seed, heldout_fraction, transform)

    def __getitem__(self, index: int):
        img, label = self._base(index)
        return self.transform(img), label
