"""Procedurally generated shape scenes with true, varied captions (offline CLIP data).

A scene holds 1-3 objects on a grey, lightly noisy background. Each object has a
colour (8), a shape (5), a size (small/large) and a cell of a 3x3 grid ("in the top
left corner", "on the right", ...); repeated colour+shape pairs give counts ("two red
circles"). Captions are drawn from many phrasings and never state anything false.

Three pure functions do the work and are public so tests can inspect the ground truth:
``sample_scene(rng) -> Scene``, ``render(scene, image_size) -> PIL.Image`` and
``describe(scene, rng) -> str``; ``rng`` is a ``random.Random``.

Compositional hold-out: ``heldout_combos(seed, fraction)`` picks a fixed set of
colour x shape pairs (balanced: at most ceil(n/8) per colour and ceil(n/5) per shape,
so every colour and every shape keeps seen partners). ``ShapesCaptions`` never draws
them; ``ShapesZeroShot`` classifies single objects over all 40 pairs, seen and unseen.

Every item is a deterministic function of (seed, dataset kind, split, index): no cache,
safe with DataLoader workers.
"""

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from torch.utils.data import Dataset

from flip.data.transforms import to_normalized_tensor

COLOURS = {  # name -> nominal RGB (each object jitters it by up to +-COLOUR_JITTER)
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 25),
    "purple": (130, 45, 175),
    "orange": (245, 130, 20),
    "pink": (250, 130, 200),
    "cyan": (30, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "large")
ALL_COMBOS = tuple((c, s) for c in COLOURS for s in SHAPES)  # 40 classes, colour-major
COLOUR_JITTER = 12
NOISE_AMPLITUDE = 6  # background noise, grey levels

# Radius r as a fraction of the image side. Shapes reach at most ~1.2 r from their
# centre and a grid cell is 1/3 wide; the centre jitter is capped so that every object
# stays (within half a pixel) inside its own cell: objects never overlap.
_RADIUS = {"small": (0.075, 0.095), "large": (0.12, 0.14)}
_POSITIONS = {  # (row, col) -> phrasings
    (0, 0): ("in the top left corner", "at the top left"),
    (0, 1): ("at the top", "in the top centre"),
    (0, 2): ("in the top right corner", "at the top right"),
    (1, 0): ("on the left", "on the left side"),
    (1, 1): ("in the centre", "in the middle"),
    (1, 2): ("on the right", "on the right side"),
    (2, 0): ("in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom centre"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}
_NUMBERS = {1: "one", 2: "two", 3: "three"}
_SINGLE_TEMPLATES = (  # {a}: "a [size] colour shape"; {p}: position; {z} {c} {s}: words
    "{a} {p}",
    "{a}",
    "there is {a} {p}",
    "an image showing {a}",
    "a picture of {a} {p}",
    "a photo of {a}",
    "{a} on a plain background",
    "{p} there is {a}",
    "a single {c} {s}",
    "one {z} {c} {s}",
    "{a_s} that is {c}",
    "a {z} {s} in {c}",
)
_MULTI_TEMPLATES = (  # {list}: "a red circle, two blue squares and a small star"
    "{list}",
    "{there} {list}",
    "an image showing {list}",
    "a picture of {list}",
    "a scene with {list}",
    "{list} on a plain background",
    "{k} shapes: {list}",
)
# Only words and punctuation that training captions use (no trailing "."), so no
# prompt token is one the text encoder never saw. ("a orange ..." is the one slip.)
ZERO_SHOT_TEMPLATES = [
    "a {}",
    "a single {}",
    "a picture of a {}",
    "an image showing a {}",
    "a {} on a plain background",
    "a photo of a {}",
    "there is a {}",
]
_STREAMS = ("train", "val", "heldout", "test")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    row: int  # grid cell, 0..2 top to bottom
    col: int  # grid cell, 0..2 left to right
    x: float  # centre, fraction of the image width
    y: float  # centre, fraction of the image height
    radius: float  # fraction of the image side
    angle: float  # degrees (0 for circles)
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]
    noise_seed: int


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def heldout_combos(seed: int = 0, fraction: float = 0.25) -> frozenset[tuple[str, str]]:
    """The colour x shape pairs never shown in training (round(fraction * 40) of them)."""
    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"heldout_fraction must be in [0, 0.5], got {fraction}")
    n = round(fraction * len(ALL_COMBOS))
    cap_c, cap_s = math.ceil(n / len(COLOURS)), math.ceil(n / len(SHAPES))
    rng = random.Random(f"flip-shapes/heldout/{seed}/{n}")
    for _ in range(1000):  # greedy fill of a shuffled list under per-colour/shape caps
        chosen, per_c, per_s = [], {}, {}
        for c, s in rng.sample(ALL_COMBOS, len(ALL_COMBOS)):
            if len(chosen) < n and per_c.get(c, 0) < cap_c and per_s.get(s, 0) < cap_s:
                chosen.append((c, s))
                per_c[c], per_s[s] = per_c.get(c, 0) + 1, per_s.get(s, 0) + 1
        if len(chosen) == n:
            return frozenset(chosen)
    raise RuntimeError("could not pick balanced held-out combinations")  # not reached


def sample_scene(rng: random.Random, combos=ALL_COMBOS, max_objects: int = 3) -> Scene:
    """Draw a scene whose objects use only the (colour, shape) pairs in ``combos``."""
    combos = list(combos)
    weights = (0.5, 0.3, 0.2)[:max_objects]
    n = rng.choices(range(1, len(weights) + 1), weights=weights)[0]
    objects = []
    for cell in rng.sample(range(9), n):
        if objects and rng.random() < 0.3:  # repeat the first pair -> counts
            colour, shape = objects[0].colour, objects[0].shape
        else:
            colour, shape = rng.choice(combos)
        size = rng.choice(SIZES)
        radius = rng.uniform(*_RADIUS[size])
        slack = 0.9 * max(0.0, 1 / 6 - 1.15 * radius)  # max centre jitter in the cell
        row, col = divmod(cell, 3)
        rgb = tuple(
            min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER)))
            for v in COLOURS[colour]
        )
        objects.append(
            Obj(
                colour=colour,
                shape=shape,
                size=size,
                row=row,
                col=col,
                x=(col + 0.5) / 3 + rng.uniform(-slack, slack),
                y=(row + 0.5) / 3 + rng.uniform(-slack, slack),
                radius=radius,
                angle=0.0 if shape == "circle" else rng.uniform(-15.0, 15.0),
                rgb=rgb,
            )
        )
    grey = rng.randint(95, 165)
    background = tuple(grey + rng.randint(-8, 8) for _ in range(3))
    return Scene(tuple(objects), background, rng.getrandbits(31))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list:
    """Vertices (pixel coords) of a non-circle shape centred on (cx, cy)."""
    if shape == "square":  # half-side 0.85 r
        polar = [(0.85 * math.sqrt(2) * r, 45 + 90 * k) for k in range(4)]
    elif shape == "triangle":  # equilateral, pointing up
        polar = [(1.1 * r, -90 + 120 * k) for k in range(3)]
    elif shape == "star":  # five points
        polar = [((1.15 if k % 2 == 0 else 0.5) * r, -90 + 36 * k) for k in range(10)]
    elif shape == "cross":  # plus sign: arms of half-width w and length r
        w, a = 0.35 * r, 1.05 * r
        pts = [
            (w, -a),
            (w, -w),
            (a, -w),
            (a, w),
            (w, w),
            (w, a),
            (-w, a),
            (-w, w),
            (-a, w),
            (-a, -w),
            (-w, -w),
            (-w, -a),
        ]
        polar = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [
        (cx + d * math.cos(math.radians(t + angle)), cy + d * math.sin(math.radians(t + angle)))
        for d, t in polar
    ]


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, side: int, fill) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r, obj.angle), fill=fill)


@functools.lru_cache(maxsize=8)
def _noise_field(image_size: int) -> Image.Image:
    """A fixed (2S, 2S) RGB field of grey noise centred on 128; scenes crop windows of it."""
    noise = np.random.default_rng(0).integers(
        -NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(2 * image_size, 2 * image_size, 1)
    )  # (2S, 2S, 1): same offset on the three channels
    return Image.fromarray(np.repeat(noise + 128, 3, axis=2).astype(np.uint8))


def render(scene: Scene, image_size: int = 64, antialias: bool = False) -> Image.Image:
    """RGB image (image_size x image_size). Noise only on the background; objects flat.

    antialias: draw the objects at 4x and box-downsample them (about 1.5x slower).
    """
    S = image_size
    ox, oy = scene.noise_seed % S, (scene.noise_seed // S) % S  # noise window offset
    window = _noise_field(S).crop((ox, oy, ox + S, oy + S))
    img = ImageChops.add(Image.new("RGB", (S, S), scene.background), window, offset=-128)
    if not antialias:
        draw = ImageDraw.Draw(img)
        for obj in scene.objects:
            _draw(draw, obj, image_size, obj.rgb)
        return img
    big = 4 * image_size
    layer = Image.new("RGB", (big, big), scene.background)
    mask = Image.new("L", (big, big), 0)
    draw_layer, draw_mask = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
    for obj in scene.objects:
        _draw(draw_layer, obj, big, obj.rgb)
        _draw(draw_mask, obj, big, 255)
    return Image.composite(layer.reduce(4), img, mask.reduce(4))


def _object_phrase(objs: list[Obj], rng: random.Random, position: bool) -> str:
    """'a large red circle in the top left corner' / 'two blue squares'."""
    colour, shape, n = objs[0].colour, objs[0].shape, len(objs)
    sizes = {o.size for o in objs}
    size = f"{objs[0].size} " if len(sizes) == 1 and rng.random() < 0.4 else ""
    if n > 1:
        return f"{_NUMBERS[n]} {size}{colour} {plural(shape)}"
    phrase = _article(f"{size}{colour} {shape}")
    if position:
        phrase += " " + rng.choice(_POSITIONS[objs[0].row, objs[0].col])
    return phrase


def describe(scene: Scene, rng: random.Random) -> str:
    """A true caption of ``scene``; the phrasing is drawn from ``rng``."""
    groups: dict[tuple[str, str], list[Obj]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.colour, obj.shape), []).append(obj)
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        return rng.choice(_SINGLE_TEMPLATES).format(
            a=_object_phrase([obj], rng, position=False),
            a_s=_article(obj.shape),
            p=rng.choice(_POSITIONS[obj.row, obj.col]),
            c=obj.colour,
            s=obj.shape,
            z=obj.size,
        )
    items = list(groups.values())
    if rng.random() < 0.5:
        rng.shuffle(items)
    with_position = rng.random() < 0.5
    phrases = [_object_phrase(objs, rng, with_position) for objs in items]
    listing = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return rng.choice(_MULTI_TEMPLATES).format(
        list=listing,
        there="there are" if len(items[0]) > 1 else "there is",
        k=_NUMBERS[len(scene.objects)],
    )


def _rng(kind: str, seed: int, split: str, index: int) -> random.Random:
    # str seeds are hashed with SHA-512: identical in every process (no PYTHONHASHSEED)
    return random.Random(f"flip-shapes/{kind}/{seed}/{split}/{index}")


def _check(split: str, index: int, size: int) -> None:
    if split not in _STREAMS:
        raise ValueError(f"split must be one of {_STREAMS}, got {split!r}")
    if not 0 <= index < size:
        raise IndexError(f"index {index} out of range for dataset of size {size}")


class ShapesCaptions(Dataset):
    """(image (3, S, S) float, caption str) pairs; held-out colour x shape pairs never occur.

    split: "train" or "val" (any of "train", "val", "heldout", "test": independent
    streams). size: dataset length. transform: PIL -> tensor, default
    ``to_normalized_tensor()`` (no crops/flips: captions state positions).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10000,
        image_size: int = 64,
        seed: int = 0,
        heldout_fraction: float = 0.25,
        antialias: bool = False,
        transform=None,
    ):
        _check(split, 0, 1)
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.antialias = antialias
        self.heldout = heldout_combos(seed, heldout_fraction)
        self.combos = [c for c in ALL_COMBOS if c not in self.heldout]
        self.transform = transform if transform is not None else to_normalized_tensor()

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> tuple[Scene, str]:
        """The ground-truth scene and caption of item ``index`` (no rendering)."""
        _check(self.split, index, self.size)
        rng = _rng("captions", self.seed, self.split, index)
        scene = sample_scene(rng, self.combos)
        return scene, describe(scene, rng)

    def __getitem__(self, index: int):
        scene, caption = self.sample(index)
        return self.transform(render(scene, self.image_size, self.antialias)), caption


class ShapesZeroShot(Dataset):
    """(image (3, S, S) float, label int) single-object images over all 40 pairs.

    Labels always index ``classnames`` (all 40 "colour shape" pairs; chance 1/40), so
    the classifier must also reject the pairs it saw in training. ``combos`` selects
    which images are generated: "all" (balanced over the 40 classes, item i has class
    i % 40, so the mix is round(fraction*40)/40 unseen = 10/40 by default), "unseen"
    (only the held-out pairs) or "seen" (only the training pairs). Images come from
    their own seed stream, disjoint from ``ShapesCaptions``'.
    ``unseen_labels``: the labels of the held-out pairs, for per-group accuracy.
    """

    classnames = [f"{c} {s}" for c, s in ALL_COMBOS]
    templates = ZERO_SHOT_TEMPLATES

    def __init__(
        self,
        split: str = "heldout",
        size: int = 2000,
        image_size: int = 64,
        seed: int = 0,
        heldout_fraction: float = 0.25,
        combos: str = "all",
        antialias: bool = False,
        transform=None,
    ):
        _check(split, 0, 1)
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.antialias = antialias
        heldout = heldout_combos(seed, heldout_fraction)
        self.unseen_labels = frozenset(i for i, c in enumerate(ALL_COMBOS) if c in heldout)
        keep = {
            "all": lambda i: True,
            "unseen": lambda i: i in self.unseen_labels,
            "seen": lambda i: i not in self.unseen_labels,
        }
        if combos not in keep:
            raise ValueError(f"combos must be 'all', 'unseen' or 'seen', got {combos!r}")
        self.labels = [i for i in range(len(ALL_COMBOS)) if keep[combos](i)]
        if not self.labels:
            raise ValueError(f"combos={combos!r} is empty at heldout_fraction={heldout_fraction}")
        self.transform = transform if transform is not None else to_normalized_tensor()

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> tuple[Scene, int]:
        """The ground-truth scene and label of item ``index`` (no rendering)."""
        _check(self.split, index, self.size)
        label = self.labels[index % len(self.labels)]
        rng = _rng("zeroshot", self.seed, self.split, index)
        return sample_scene(rng, [ALL_COMBOS[label]], max_objects=1), label

    def __getitem__(self, index: int):
        scene, label = self.sample(index)
        return self.transform(render(scene, self.image_size, self.antialias)), label
