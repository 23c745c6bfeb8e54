"""Visual question answering data: the official VQAv2 files and a shapes miniature.

VQAv2 (Goyal et al., CVPR 2017; files from visualqa.org, as GT-Vision-Lab/VQA's
``PythonHelperTools/vqaTools/vqa.py`` reads them):

* questions ``v2_OpenEnded_mscoco_<subtype>_questions.json``:
  ``{"data_subtype": "train2014", "questions": [{"image_id", "question", "question_id"}]}``;
* annotations ``v2_mscoco_<subtype>_annotations.json``: ``{"annotations": [{"question_id",
  "image_id", "question_type", "answer_type", "multiple_choice_answer", "answers":
  [{"answer", "answer_confidence", "answer_id"} x 10]}]}``;
* COCO images ``<images>/COCO_<subtype>_<image_id:012d>.jpg`` (``<subtype>`` from the
  questions file: train2014, val2014; the test-dev questions name test2015).

Images are resized to image_size x image_size (bicubic) without crop or flip: questions ask
about anything in the picture and about left and right.

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

``VQADataModule``: the answer vocabulary (the ``num_answers`` most frequent normalised
``multiple_choice_answer`` of the training questions, plus the validation questions when
``vocab_includes_val``: VQAv2's standard 3,129-answer list counts train + val), the
most-frequent-answer baseline (from the training questions only), question tokenisation and
soft targets (``flip.eval.vqa_metrics.answer_scores``). Batches are dicts: ``images``
(B, 3, S, S), ``tokens`` (B, L), ``targets`` (B, A) and, for the metric, ``answers`` (the
human answers), ``answer_types`` and ``question_ids``.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from flip.data.images import DEFAULT_MAX_PIXELS, BadSample, decode_image, to_rgb
from flip.data.quality import DataPathError, QualityMixin, SharedStats, stats_of_dataset
from flip.data.shapes import COLOURS, SHAPES, Scene, plural, render, sample_scene
from flip.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_normalized_tensor
from flip.eval.vqa_metrics import answer_scores, answer_vocabulary, normalize_answer
from flip.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_MAX_WARNINGS = 5  # per process; later skips are only counted


@dataclass(frozen=True)
class VQARecord:
    """One question with its human answers (empty for test questions)."""

    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...] = ()
    multiple_choice_answer: str = ""
    answer_type: str = ""
    question_type: str = ""


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataPathError(f"VQA {what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_vqav2(
    questions: str | Path, annotations: str | Path | None = None
) -> tuple[list[VQARecord], str]:
    """(the records in the questions file's order, its ``data_subtype``). Without
    ``annotations`` (test questions) the records have no answers; with it, every question
    must have its annotation."""
    questions = Path(questions)
    data = _load_json(questions, "questions")
    if "questions" not in data or "data_subtype" not in data:
        raise ValueError(
            f"{questions}: not a VQA questions file (needs the keys "
            f"'questions' and 'data_subtype'; has {sorted(data)})"
        )
    notes = {}
    if annotations is not None:
        annotations = Path(annotations)
        ann = _load_json(annotations, "annotations")
        if "annotations" not in ann:
            raise ValueError(f"{annotations}: not a VQA annotations file (no 'annotations' key)")
        notes = {a["question_id"]: a for a in ann["annotations"]}
    records = []
    for q in data["questions"]:
        a = notes.get(q["question_id"])
        if annotations is not None and a is None:
            raise ValueError(
                f"{annotations} has no annotation of question {q['question_id']} "
                f"of {questions} (files of different splits?)"
            )
        records.append(
            VQARecord(
                question_id=q["question_id"],
                image_id=q["image_id"],
                question=q["question"],
                **(
                    {}
                    if a is None
                    else dict(
                        answers=tuple(x["answer"] for x in a["answers"]),
                        multiple_choice_answer=a["multiple_choice_answer"],
                        answer_type=a["answer_type"],
                        question_type=a["question_type"],
                    )
                ),
            )
        )
    if not records:
        raise ValueError(f"{questions} holds no questions")
    return records, data["data_subtype"]


def vqa_transform(image_size: int) -> T.Compose:
    """RGB, resize to (image_size, image_size) bicubic (no crop, no flip), normalise."""
    return T.Compose(
        [
            to_rgb,
            T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class VQAv2(Dataset):
    """(image (3, S, S) float, VQARecord) for the questions of one VQAv2 file.

    skip_unreadable: a missing or undecodable image is counted in ``skipped`` (reasons of
    ``flip.data.quality``), the first few are logged, and the next question is returned
    instead (training); False raises naming the file (evaluation must answer every
    question it reports on).
    """

    def __init__(
        self,
        questions,
        annotations=None,
        images=".",
        image_size: int = 224,
        transform=None,
        skip_unreadable: bool = True,
        max_consecutive_bad: int = 100,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.records, self.subtype = read_vqav2(questions, annotations)
        self.images = Path(images)
        if not self.images.is_dir():
            raise DataPathError(f"VQA image folder not found: {self.images}")
        self.transform = transform if transform is not None else vqa_transform(image_size)
        self.skip_unreadable, self.max_consecutive_bad = skip_unreadable, max_consecutive_bad
        self.max_pixels = max_pixels
        self.skipped, self.converted, self.examples = Counter(), Counter(), {}

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> VQARecord:
        return self.records[index]

    def image_path(self, image_id: int) -> Path:
        return self.images / f"COCO_{self.subtype}_{image_id:012d}.jpg"

    def _image(self, index: int) -> Image.Image | None:
        file = self.image_path(self.records[index].image_id)
        try:
            img, mode = decode_image(file, self.max_pixels)
        except (FileNotFoundError, BadSample) as err:
            reason = err.reason if isinstance(err, BadSample) else "missing_image"
            if not self.skip_unreadable:
                raise BadSample(
                    reason, f"{file} (question {self.records[index].question_id})"
                ) from None
            self.skipped[reason] += 1
            self.examples[reason] = str(file)
            if sum(self.skipped.values()) <= _MAX_WARNINGS:
                log.warning("skipping %s: %s", reason, file)
            return None
        if mode != "RGB":
            self.converted[mode] += 1
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, VQARecord]:
        for offset in range(min(self.max_consecutive_bad, len(self))):
            i = (index + offset) % len(self)
            img = self._image(i)
            if img is not None:
                return self.transform(img), self.records[i]
        raise RuntimeError(
            f"{self.max_consecutive_bad} consecutive questions from {index} "
            f"have no readable image under {self.images}; skipped so far: "
            f"{dict(self.skipped)}"
        )


# -- shapes miniature ------------------------------------------------------------------
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


# -- datamodule ------------------------------------------------------------------------
class VQADataModule(QualityMixin, L.LightningDataModule):
    """Training and validation questions, the answer vocabulary and the baseline answer.

    ``task_args`` (for the task module): ``answers`` (the vocabulary, most frequent first)
    and ``baseline_answer`` (the most frequent training answer).
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        num_answers: int = 3129,  # VQAv2's standard answer list size
        vocab_includes_val: bool = False,  # count the validation answers for the vocabulary
        image_size: int = 224,  # what the model expects; checked against the data
        context_length: int = 32,  # question tokens (the checkpoint's text context)
        batch_size: int = 256,  # per device and loader step
        num_workers: int = 0,
        pin_memory: bool = False,
        max_skip_rate: float = 0.05,  # of training samples skipped; more stops training
        skip_rate_min_samples: int = 1000,  # samples read before the rate is enforced
    ):
        super().__init__()
        self.init_quality(max_skip_rate, skip_rate_min_samples)
        self.train_set, self.val_set = train, val
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.pin_memory = pin_memory
        self.tokenizer = Tokenizer(context_length)
        train_answers = [train.record(i).multiple_choice_answer for i in range(len(train))]
        counted = train_answers + (
            [val.record(i).multiple_choice_answer for i in range(len(val))]
            if vocab_includes_val
            else []
        )
        self.answers = answer_vocabulary(counted, num_answers)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        self.baseline_answer = answer_vocabulary(train_answers, 1)[0]
        covered = sum(normalize_answer(a) in self.answer_index for a in train_answers)
        log.info(
            "VQA: %d answers; they cover %.1f%% of the training questions' answers; "
            "most frequent training answer %r",
            len(self.answers),
            100 * covered / len(train_answers),
            self.baseline_answer,
        )

    @property
    def task_args(self) -> dict:
        return {"answers": list(self.answers), "baseline_answer": self.baseline_answer}

    def targets(self, records: list[VQARecord]) -> torch.Tensor:
        """(B, A) soft scores: the official accuracy of each vocabulary answer."""
        targets = torch.zeros(len(records), len(self.answers))
        for row, r in enumerate(records):
            if r.answers:
                for answer, score in answer_scores(r.answers).items():
                    if answer in self.answer_index:
                        targets[row, self.answer_index[answer]] = score
        return targets

    def collate(self, stats: SharedStats | None, batch: list) -> dict:
        images, records = zip(*batch)
        if stats is not None:  # training: ship the dataset copy's new skip counts
            info = get_worker_info()
            stats.add(
                stats_of_dataset(info.dataset if info is not None else self.train_set, len(batch))
            )
        return {
            "images": torch.stack(images),
            "tokens": self.tokenizer([r.question for r in records]),
            "targets": self.targets(list(records)),
            "answers": [list(r.answers) for r in records],
            "answer_types": [r.answer_type for r in records],
            "question_ids": [r.question_id for r in records],
        }

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"the VQA training set has {len(self.train_set)} questions, fewer "
                f"than one batch ({self.batch_size}); lower batch.global"
            )
        image = self.train_set[0][0]
        if tuple(image.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"data.image_size is {self.image_size} but the training set "
                f"yields {tuple(image.shape)} images"
            )
        # the probe above is not training data: do not report its skips
        self.train_set._skips_reported = Counter(getattr(self.train_set, "skipped", {}))
        self.train_set._converted_reported = Counter(getattr(self.train_set, "converted", {}))

    def _loader(self, dataset: Dataset, stats: SharedStats | None, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=partial(self.collate, stats),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.shared_stats(), shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, None)
