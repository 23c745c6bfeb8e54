"""Labelled images for fine-tuning: ImageNet in the ImageFolder layout and a shapes miniature.

A classification set is any dataset of ``(image (3, S, S) float, label int)`` items with
``classes`` (one name per label) and ``targets`` (every item's label, read without decoding
an image) — torchvision's ``ImageFolder`` is one (``root/<wnid>/*.JPEG``, labels in sorted
folder order), ``ShapesClasses`` is the other.

``ClassificationDataModule`` builds the transforms, as MAE's fine-tuning does
(``util/datasets.py: build_transform``): training is timm's ``create_transform``
(random-resized crop, flip, RandAugment, random erasing, bicubic), evaluation resizes the
short side to ``image_size / crop_pct`` (256 for 224) and centre-crops. It hands both
datasets their transform (``train`` and ``val`` are dataset constructors taking
``transform``), so the transforms follow ``image_size``, which a transfer run takes from its
checkpoint.

``ShapesClasses``: single-object scenes of the shapes generator (``flip.data.shapes``),
labelled with their colour x shape pair: 40 classes, the pairs held out of pre-training
included. Item ``i`` has class ``i % 40`` (balanced); the scene is drawn from its own seed
stream ``(seed, split, i)``, so ``train`` and ``val`` never share an image, and neither
shares one with pre-training (captions) or its zero-shot set.
"""

import random
from collections import Counter
from collections.abc import Callable, Mapping

import lightning as L
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset

from flip.data.shapes import ALL_COMBOS, Scene, render, sample_scene
from flip.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# MAE main_finetune.py defaults (FINETUNE.md commands add --reprob 0.25): RandAugment
# m9 with magnitude noise 0.5 and increasing severity, random erasing of per-pixel noise,
# no colour jitter under RandAugment, bicubic; timm's crop scale (0.08, 1) and flip 0.5
MAE_AUGMENT = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "re_prob": 0.25,
    "re_mode": "pixel",
    "re_count": 1,
    "color_jitter": None,
    "scale": (0.08, 1.0),
    "hflip": 0.5,
}


def mae_eval_crop(image_size: int) -> float:
    """MAE's evaluation crop: 224/256 of the resized image up to 224 px, the whole of it
    above (``util/datasets.py``)."""
    return 224 / 256 if image_size <= 224 else 1.0


class ShapesClasses(Dataset):
    """(image (3, S, S) float, label int): one object whose colour x shape is the label."""

    classes = [f"{c} {s}" for c, s in ALL_COMBOS]

    def __init__(
        self,
        split: str = "train",
        size: int = 4000,
        image_size: int = 64,
        seed: int = 0,
        transform: Callable | None = None,
    ):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.transform = transform
        self.targets = [i % len(self.classes) for i in range(size)]

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> tuple[Scene, int]:
        """The ground-truth scene and label of item ``index`` (no rendering)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} images")
        label = self.targets[index]
        # str seeds hash with SHA-512: the same scene in every process and worker
        rng = random.Random(f"flip-shapes/classes/{self.seed}/{self.split}/{index}")
        return sample_scene(rng, [ALL_COMBOS[label]], max_objects=1), label

    def __getitem__(self, index: int):
        scene, label = self.sample(index)
        image = render(scene, self.image_size)
        return (self.transform(image) if self.transform else image), label


class ClassificationDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: Callable[..., Dataset],  # dataset constructor taking transform=
        val: Callable[..., Dataset],
        image_size: int = 224,  # model input; a transfer run sets it from its checkpoint
        batch_size: int = 256,  # per device
        num_workers: int = 0,
        pin_memory: bool = False,
        augment: Mapping | None = None,  # timm create_transform arguments; None = MAE's
        eval_crop_pct: float | None = None,  # None = MAE's (224/256 up to 224 px, else 1)
    ):
        super().__init__()
        self.image_size, self.batch_size = image_size, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        augment = dict(MAE_AUGMENT if augment is None else augment)
        if augment.get("scale") is not None:
            augment["scale"] = tuple(augment["scale"])
        self.train_transform = create_transform(
            image_size,
            is_training=True,
            interpolation="bicubic",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            **augment,
        )
        self.eval_transform = create_transform(
            image_size,
            is_training=False,
            interpolation="bicubic",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            crop_pct=mae_eval_crop(image_size) if eval_crop_pct is None else eval_crop_pct,
        )
        self.train_set = train(transform=self.train_transform)
        self.val_set = val(transform=self.eval_transform)
        classes = list(self.train_set.classes)
        if list(self.val_set.classes) != classes:
            missing = sorted(set(classes) ^ set(self.val_set.classes))
            raise ValueError(
                f"the training and validation sets have different classes ({len(classes)} "
                f"vs {len(self.val_set.classes)}; differing: {', '.join(missing[:5])}): "
                "labels would not mean the same class"
            )
        # the trivial baseline predicts the most frequent training class
        majority = Counter(self.train_set.targets).most_common(1)[0][0]
        self.task_args = {"num_classes": len(classes), "majority_class": majority}

    def setup(self, stage: str) -> None:
        if stage == "fit" and len(self.train_set) < self.batch_size:
            raise ValueError(
                f"the training set has {len(self.train_set)} images, fewer than "
                f"one batch ({self.batch_size}); lower batch.global or add data"
            )

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        # full batches only: mixup pairs the batch with its reverse (an even size)
        return self._loader(self.train_set, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
