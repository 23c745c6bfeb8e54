"""Captioning on shapes scenes: the miniature of COCO captions (training scenes with one
true caption each, a fixed set of scenes with 5 independent references each)."""

from __future__ import annotations

import functools
import random

from torch.utils.data import Dataset

from flip.data.shapes import ShapesCaptions, describe, render, sample_scene
from flip.data.transforms import to_normalized_tensor


class ShapesTrainCaptions(ShapesCaptions):
    """Shapes scenes with one caption each, every index a new scene (all 40 colour x shape
    pairs: captioning holds nothing out)."""

    def __init__(self, size: int = 20000, image_size: int = 64, seed: int = 0):
        super().__init__("train", size, image_size, seed, heldout_fraction=0.0)

    @functools.cached_property
    def captions(self) -> list[str]:
        return [self.sample(i)[1] for i in range(len(self))]


class ShapesReferences(Dataset):
    """A fixed set of shapes scenes, each with ``references`` true captions drawn
    independently (5, as COCO): ``(image, [captions])``. Its own seed stream: no scene of
    the training stream."""

    def __init__(
        self,
        size: int = 200,
        image_size: int = 64,
        seed: int = 0,
        references: int = 5,
        split: str = "val",
    ):
        self.size, self.image_size, self.seed = size, image_size, seed
        self.references, self.split = references, split
        self.transform = to_normalized_tensor()  # no crops or flips: captions state positions

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        rng = random.Random(f"flip-shapes/captioning/{self.seed}/{self.split}/{index}")
        scene = sample_scene(rng)
        return scene, [describe(scene, rng) for _ in range(self.references)]

    def __getitem__(self, index: int):
        scene, refs = self.sample(index)
        return self.transform(render(scene, self.image_size)), refs
