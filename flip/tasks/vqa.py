"""Visual question answering (paper Table 7, VQAv2) on FLIP's two towers.

``python train.py task=vqa init_from=<pre-training checkpoint>`` (default data: the shapes
miniature; ``data=vqav2`` for the real files).

Model: both pre-trained towers (unmasked) encode the image and the question; a newly
initialised fusion Transformer reads both token sequences and an answer classifier scores
every answer of the vocabulary (``flip/models/fusion.py``). Training: binary cross-entropy
with logits against soft scores (``flip.metrics.vqa.answer_scores``), summed over the
answers and averaged over the batch (ViLT's/METER's ``compute_vqa``: the mean times the
number of answers, after jnhwkim/ban-vqa's ``instance_bce_with_logits``). AdamW with three
learning rates, as METER fine-tunes (``task_finetune_vqa_clip_bert``: lr 5e-6 for the
pre-trained encoders, x5 for the new cross-modal layers, x50 for the head), weight decay
0.01 on all but biases, norm scales and position embeddings; linear warm-up over
``warmup_fraction`` of the steps (METER: 0.1), then cosine to 0 (METER decays linearly).

Validation: the official VQA accuracy (``flip.metrics.vqa``) of the top-scoring answer,
overall and per answer type, beside the same accuracy of the most frequent training answer
given to every question (``val/baseline_acc*``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from flip.metrics.vqa import ANSWER_TYPES, VQAAccuracy
from flip.models.fusion import AnswerClassifier, FusionTransformer
from flip.schedule import warmup_cosine
from flip.tasks.transfer import TransferModule, build_tower, part_param_groups
from flip.tokenizer import PAD_ID

_TYPE_KEYS = {"yes/no": "yes_no", "number": "number", "other": "other"}  # metric names


class VQAModule(TransferModule):
    pretrained_parts = {"visual": "visual", "text": "text"}

    def __init__(
        self,
        model_config: Mapping,  # the pre-training checkpoint's (both towers)
        answers: Sequence[str],  # the answer vocabulary (data.task_args); decodes predictions
        baseline_answer: str | None = None,  # most frequent training answer (data.task_args)
        fusion_width: int = 768,
        fusion_depth: int = 6,
        fusion_heads: int = 12,
        lr: float = 5e-6,  # pre-trained towers (METER's VQA fine-tuning)
        fusion_lr_mult: float = 5.0,  # new fusion Transformer: lr x this (METER: 5)
        head_lr_mult: float = 50.0,  # new answer classifier: lr x this (METER: 50)
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_fraction: float = 0.1,  # of the optimiser steps
        drop_path: float = 0.0,  # image tower and fusion, stochastic depth of the last block
        epochs: int = 10,  # read by the runner (flip.run)
    ):
        super().__init__()
        if not answers:
            raise ValueError("the VQA task needs a non-empty answer vocabulary (answers)")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.save_hyperparameters()
        self.answers = list(answers)
        self.baseline_answer = baseline_answer if baseline_answer is not None else answers[0]
        self.visual = build_tower(model_config, "visual", drop_path=drop_path)
        self.text = build_tower(model_config, "text")
        self.fusion = FusionTransformer(
            self.visual.width,
            self.text.width,
            fusion_width,
            fusion_depth,
            fusion_heads,
            drop_path=drop_path,
        )
        self.classifier = AnswerClassifier(self.fusion.out_features, len(self.answers))
        self.val_acc = VQAAccuracy(ANSWER_TYPES)
        self.val_baseline = VQAAccuracy(ANSWER_TYPES)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), question tokens (B, L) -> answer logits (B, A)."""
        image_tokens, _ = self.visual.forward_features(images)
        text_tokens, _ = self.text.forward_features(tokens)
        return self.classifier(self.fusion(image_tokens, text_tokens, tokens == PAD_ID))

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """BCE with logits against the soft scores, summed over answers, mean over questions."""
        return (
            nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
            / logits.shape[0]
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["images"], batch["tokens"]), batch["targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["images"]))
        self.log(
            "train/lr",
            self.trainer.optimizers[0].param_groups[0]["lr"],
            batch_size=len(batch["images"]),
        )
        return loss

    def predict_answers(self, logits: torch.Tensor) -> list[str]:
        return [self.answers[i] for i in logits.argmax(dim=1).tolist()]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["images"], batch["tokens"])
        n = len(batch["images"])
        self.log("val/loss", self.loss(logits, batch["targets"]), batch_size=n, sync_dist=True)
        self.val_acc.update(self.predict_answers(logits), batch["answers"], batch["answer_types"])
        self.val_baseline.update(
            [self.baseline_answer] * n, batch["answers"], batch["answer_types"]
        )

    def on_validation_epoch_end(self) -> None:
        for prefix, metric in (
            ("val/vqa_acc", self.val_acc),
            ("val/baseline_acc", self.val_baseline),
        ):
            values = metric.compute()
            self.log(prefix, values["all"])
            for kind, key in _TYPE_KEYS.items():
                if not torch.isnan(values[kind]):  # a type the validation set has
                    self.log(f"{prefix}_{key}", values[kind])
            metric.reset()

    def configure_optimizers(self):
        hp = self.hparams
        groups = part_param_groups(
            [
                ("visual", self.visual, hp.lr),
                ("text", self.text, hp.lr),
                ("fusion", self.fusion, hp.lr * hp.fusion_lr_mult),
                ("classifier", self.classifier, hp.lr * hp.head_lr_mult),
            ],
            hp.weight_decay,
            also_no_decay={"fusion.type_embed.weight"},
        )
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        warmup = int(hp.warmup_fraction * total)
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(step + 1, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def summary(self, metrics: Mapping[str, float]) -> str:
        def per_type(prefix: str) -> str:
            parts = [
                f"{kind} {metrics[f'{prefix}_{key}']:.1%}"
                for kind, key in _TYPE_KEYS.items()
                if f"{prefix}_{key}" in metrics
            ]
            return f" ({', '.join(parts)})" if parts else ""

        return (
            f"VQA accuracy {metrics['val/vqa_acc']:.1%}{per_type('val/vqa_acc')}; "
            f"most-frequent-answer baseline {metrics['val/baseline_acc']:.1%} "
            f'("{self.baseline_answer}"){per_type("val/baseline_acc")}'
        )
