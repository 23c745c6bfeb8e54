"""Visual question answering data, served by one datamodule: the official VQAv2 files
(``flip.data.vqav2``) or the shapes miniature (``flip.data.shapes_vqa``).

``VQADataModule``: the answer vocabulary (the ``num_answers`` most frequent normalised
``multiple_choice_answer`` of the training questions, plus the validation questions when
``vocab_includes_val``: VQAv2's standard 3,129-answer list counts train + val), the
most-frequent-answer baseline (from the training questions only), question tokenisation and
soft targets (``flip.metrics.vqa.answer_scores``). ``shuffle_images`` gives each training
question the image of another (``flip.data.indexed.unpair``): the question-only control.
Batches are dicts: ``images`` (B, 3, S, S), ``tokens`` (B, L), ``targets`` (B, A) and, for
the metric, ``answers`` (the human answers), ``answer_types`` and ``question_ids``.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from flip.data.indexed import unpair
from flip.data.quality import QualityMixin, SharedStats, stats_of_dataset
from flip.data.vqav2 import VQARecord
from flip.metrics.vqa import answer_scores, answer_vocabulary, normalize_answer
from flip.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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
        shuffle_images: bool = False,  # true: train on other questions' images (question-only)
    ):
        super().__init__()
        self.init_quality(max_skip_rate, skip_rate_min_samples)
        self.train_set, self.val_set = train, val
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.pin_memory, self.shuffle_images = pin_memory, shuffle_images
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
        images = torch.stack(images)
        if stats is not None and self.shuffle_images:  # training only
            images = unpair(images)
        return {
            "images": images,
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
