"""The official VQAv2 files, read from disk.

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
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from flip.data.images import DEFAULT_MAX_PIXELS, BadSample, decode_image, to_rgb
from flip.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from flip.errors import DataPathError

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
        raise DataPathError(
            f"{questions}: not a VQA questions file (needs the keys "
            f"'questions' and 'data_subtype'; has {sorted(data)})"
        )
    notes = {}
    if annotations is not None:
        annotations = Path(annotations)
        ann = _load_json(annotations, "annotations")
        if "annotations" not in ann:
            raise DataPathError(f"{annotations}: not a VQA annotations file (no 'annotations' key)")
        notes = {a["question_id"]: a for a in ann["annotations"]}
    records = []
    for q in data["questions"]:
        a = notes.get(q["question_id"])
        if annotations is not None and a is None:
            raise DataPathError(
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
        raise DataPathError(f"{questions} holds no questions")
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
