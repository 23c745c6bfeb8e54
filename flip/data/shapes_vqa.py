"""Visual question answering on shapes scenes: the miniature of VQAv2.

Shapes miniature (``ShapesVQA``): scenes of ``flip.data.shapes`` with questions whose answers
are read from the scene's ground truth (``ask``): counts ("how many circles are there?"),
colours and shapes ("what colour is the square?", "what shape is at the top left?") and
existence ("is there a blue star?"), in VQAv2's answer types yes/no / number / other. The
mix is balanced so that no answer is common: answer types 1/4, 1/4, 1/2; yes and no
equally often, half of the "no" questions about a colour or shape that *is* in the scene
with another partner; count questions pick their answer uniformly among the counts the
scene offers. Each question carries 10 identical answers: the generator knows the one true
answer, and inventing disagreeing humans would only add noise; so on the miniature the VQA
accuracy is exact-match accuracy and every soft target is 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from flip.data.shapes import COLOURS, SHAPES, Scene, plural, render, sample_scene
from flip.data.transforms import to_normalized_tensor
from flip.data.vqav2 import VQARecord

_AT = {  # (row, col) -> where, as a question says it
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
_ANSWER_TYPE_WEIGHTS = {"yes/no": 0.25, "number": 0.25, "other": 0.5}


@dataclass(frozen=True)
class ShapesQuestion:
    question: str
    answer: str
    answer_type: str  # yes/no | number | other
    question_type: str


def _count_question(scene: Scene, rng: random.Random) -> ShapesQuestion:
    objs = scene.objects
    asks = [("how many shapes are there?", len(objs))]
    asks += [(f"how many {plural(s)} are there?", sum(o.shape == s for o in objs)) for s in SHAPES]
    asks += [(f"how many {c} shapes are there?", sum(o.colour == c for o in objs)) for c in COLOURS]
    answer = rng.choice(sorted({n for _, n in asks}))  # uniform over the counts on offer
    question = rng.choice([q for q, n in asks if n == answer])
    return ShapesQuestion(question, str(answer), "number", "how many")


def _yes_no_question(scene: Scene, rng: random.Random) -> ShapesQuestion:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        # hard negatives: the colour or the shape is in the scene, with another partner
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = rng.choice(near if near and rng.random() < 0.5 else absent)
        answer = "no"
    article = "an" if colour[0] in "aeiou" else "a"
    return ShapesQuestion(f"is there {article} {colour} {shape}?", answer, "yes/no", "is there a")


def _other_question(scene: Scene, rng: random.Random) -> ShapesQuestion:
    objs = scene.objects
    colour_of = [(f"what colour is the shape {_AT[o.row, o.col]}?", o.colour) for o in objs]
    colour_of += [
        (f"what colour is the {o.shape}?", o.colour)
        for o in objs
        if sum(p.shape == o.shape for p in objs) == 1
    ]
    shape_of = [(f"what shape is {_AT[o.row, o.col]}?", o.shape) for o in objs]
    shape_of += [
        (f"what shape is the {o.colour} one?", o.shape)
        for o in objs
        if sum(p.colour == o.colour for p in objs) == 1
    ]
    if rng.random() < 0.5:
        question, answer = rng.choice(colour_of)
        return ShapesQuestion(question, answer, "other", "what colour is the")
    question, answer = rng.choice(shape_of)
    return ShapesQuestion(question, answer, "other", "what shape is")


def ask(scene: Scene, rng: random.Random) -> ShapesQuestion:
    """A question about ``scene`` and its true answer (see the module docstring)."""
    kind = rng.choices(list(_ANSWER_TYPE_WEIGHTS), weights=list(_ANSWER_TYPE_WEIGHTS.values()))[0]
    return {"yes/no": _yes_no_question, "number": _count_question, "other": _other_question}[kind](
        scene, rng
    )


class ShapesVQA(Dataset):
    """(image (3, S, S) float, VQARecord): one shapes scene and one question per index.

    split: "train" or "val" (independent streams). Every item is a deterministic function
    of (seed, split, index); the record needs no rendering (``record``).
    """

    ANSWERS_PER_QUESTION = 10

    def __init__(
        self,
        split: str = "train",
        size: int = 20000,
        image_size: int = 64,
        seed: int = 0,
        transform=None,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.transform = transform if transform is not None else to_normalized_tensor()

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> tuple[Scene, ShapesQuestion]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for dataset of size {self.size}")
        rng = random.Random(f"flip-shapes-vqa/{self.seed}/{self.split}/{index}")
        scene = sample_scene(rng)
        return scene, ask(scene, rng)

    def record(self, index: int) -> VQARecord:
        _, q = self.sample(index)
        return VQARecord(
            question_id=index,
            image_id=index,
            question=q.question,
            answers=(q.answer,) * self.ANSWERS_PER_QUESTION,
            multiple_choice_answer=q.answer,
            answer_type=q.answer_type,
            question_type=q.question_type,
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, VQARecord]:
        scene, _ = self.sample(index)
        return self.transform(render(scene, self.image_size)), self.record(index)
