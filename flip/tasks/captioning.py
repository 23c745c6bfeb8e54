"""Image captioning on a pre-trained FLIP image encoder (paper Table 7: COCO, nocaps).

"Our captioning implementation follows the cross-entropy training baseline in [7]
[Barraco et al., CVPR-W 2022] ... the fine-tuning model has a newly initialized
captioner" (paper Sec. 4.3). So: the FLIP image tower (fine-tuned, or frozen with
``freeze_encoder``) and a new ``CaptionDecoder`` that cross-attends to all of the tower's
output tokens, trained with token-level cross-entropy under teacher forcing (label
smoothing optional, 0 by default: the plain cross-entropy baseline; no CIDEr
optimisation / SCST). AdamW, linear warm-up then cosine to 0, per optimiser step.

Validation (every ``task.eval_every`` epochs, on the data's ``val`` split) and the test (once,
after training, on its ``test`` split when it has one) decode every image (greedy, or beam search with ``beam_size``),
scores the captions with the COCO caption metrics (``flip.metrics.captions``, x 100)
and scores, on the same images with the same metrics, the trivial baseline: one constant
caption for every image (the most frequent training caption, chosen by the datamodule).
Logged: ``val/CIDEr``, ``val/BLEU-4``, ``val/METEOR``, ``val/ROUGE-L`` (``val/SPICE`` when
SPICE can run offline), ``val/baseline_<metric>``, ``val/loss`` (teacher-forced, first
reference); the same under ``test/`` for the test split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from flip.metrics.captions import score_captions
from flip.models.caption_decoder import CaptionDecoder
from flip.schedule import warmup_cosine
from flip.tasks.transfer import TransferModule, build_tower, part_param_groups
from flip.tokenizer import Tokenizer

log = logging.getLogger(__name__)

REPORTED = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L")  # the summary line's metrics, in order


class CaptioningModule(TransferModule):
    pretrained_parts = {"visual": "visual"}

    def __init__(
        self,
        model_config: Mapping,  # the pre-training checkpoint's model config
        # from the datamodule (task_args)
        vocab: list[int],  # decoder id -> WordPiece id of the tokenizer's vocabulary
        bos_id: int,  # decoder ids of [CLS], [SEP], [PAD]
        eos_id: int,
        pad_id: int,
        max_length: int,  # decoder positions ([CLS] + word pieces)
        constant_caption: str,  # the trivial baseline's caption
        # length (read by the runner)
        epochs: int = 10,
        # decoder (newly initialised)
        decoder_width: int = 512,
        decoder_depth: int = 3,
        decoder_heads: int = 8,
        decoder_mlp_ratio: float = 4.0,
        decoder_dropout: float = 0.1,
        tie_embeddings: bool = True,
        # encoder
        freeze_encoder: bool = False,  # true: the FLIP tower is a fixed feature extractor
        drop_path: float = 0.0,
        # optimisation
        lr: float = 1e-4,  # peak, decoder
        encoder_lr_scale: float = 1.0,  # encoder peak lr = lr x this
        weight_decay: float = 0.05,  # not on biases, norm scales, position embeddings
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.0,
        # decoding and metrics
        beam_size: int = 1,  # 1 = greedy
        length_penalty: float = 0.0,
        decode_max_length: int | None = None,  # generated tokens incl. [SEP]; None = max_length
        spice: bool = True,  # SPICE when its CoreNLP jars are present (never downloaded)
    ):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters()
        self.visual = build_tower(model_config, "visual", drop_path=drop_path)
        self.decoder = CaptionDecoder(
            len(vocab),
            self.visual.width,
            decoder_width,
            decoder_depth,
            decoder_heads,
            decoder_mlp_ratio,
            max_length,
            decoder_dropout,
            bos_id,
            eos_id,
            pad_id,
            tie_embeddings,
        )
        if freeze_encoder:
            self.visual.requires_grad_(False)
        self.tokenizer = Tokenizer(max_length - 1)  # WordPiece ids -> text
        self._captions: dict[int, str] = {}  # validation image index -> generated caption
        self._references: dict[int, list[str]] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.hparams.freeze_encoder:  # a fixed feature extractor: no drop path
            self.visual.eval()
        return self

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> all output tokens of the image tower (B, [1 +] N, D), unmasked."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.freeze_encoder):
            return self.visual.forward_features(images)[0]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens (B, T) ``[CLS] … [SEP] [PAD]…`` -> logits (B, T - 1, V)
        predicting ``tokens[:, 1:]``."""
        return self.decoder(self.image_tokens(images), tokens[:, :-1])

    def loss(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy per word piece ([SEP] included, [PAD] not); the
        output projection runs on the predicted positions only."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        hidden = self.decoder.hidden(self.decoder.project_memory(image_tokens), inputs)
        keep = targets != self.hparams.pad_id
        return F.cross_entropy(
            self.decoder.head(hidden[keep]).float(),
            targets[keep],
            label_smoothing=self.hparams.label_smoothing,
        )

    def training_step(self, batch, batch_idx):
        images, tokens = batch
        loss = self.loss(self.image_tokens(images), tokens)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[-1]["lr"])
        return loss

    def captions(self, images: torch.Tensor) -> list[str]:
        """Generated captions (text) of a batch of images, with the configured decoding."""
        return self._decode(self.image_tokens(images))

    def _decode(self, image_tokens: torch.Tensor) -> list[str]:
        hp = self.hparams
        ids = self.decoder.generate(
            image_tokens, hp.beam_size, hp.decode_max_length, hp.length_penalty
        )
        # decoder ids -> WordPiece ids -> text (word pieces merged)
        return [self.tokenizer.decode([hp.vocab[i] for i in seq]) for seq in ids]

    # validation (every task.eval_every epochs) and test (once, after training) score alike
    def validation_step(self, batch, batch_idx):
        self._decode_batch(batch, "val")

    def test_step(self, batch, batch_idx):
        self._decode_batch(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _decode_batch(self, batch, split: str) -> None:
        images, tokens, references, indices = batch
        image_tokens = self.image_tokens(images)
        loss = self.loss(image_tokens, tokens)
        self.log(f"{split}/loss", loss, sync_dist=True, batch_size=len(images))
        for i, caption, refs in zip(indices.tolist(), self._decode(image_tokens), references):
            self._captions[i] = caption
            self._references[i] = refs

    def _score(self, split: str) -> None:
        captions, references = self._captions, self._references
        self._captions, self._references = {}, {}
        if self.trainer.world_size > 1:  # every rank decoded a share of the images
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (captions, references))
            for c, r in gathered:
                captions.update(c)
                references.update(r)
        scores = None
        if self.trainer.is_global_zero:
            constant = {i: [self.hparams.constant_caption] for i in references}
            scores = score_captions(
                references,
                {"model": {i: [c] for i, c in captions.items()}, "baseline": constant},
                spice=self.hparams.spice,
            )
            for i in sorted(captions)[:3]:
                log.info(
                    "caption of %s image %d: %r (first reference %r)",
                    split,
                    i,
                    captions[i],
                    references[i][0],
                )
        scores = self.trainer.strategy.broadcast(scores, src=0)
        for name, prefix in (("model", f"{split}/"), ("baseline", f"{split}/baseline_")):
            for metric, value in scores[name].items():
                if not math.isnan(value):  # SPICE offline: absent, with the warning logged
                    self.log(prefix + metric, value)

    def configure_optimizers(self):
        hp = self.hparams
        groups = part_param_groups(
            [
                ("visual", self.visual, hp.lr * hp.encoder_lr_scale),
                ("decoder", self.decoder, hp.lr),
            ],
            hp.weight_decay,
        )
        optimizer = torch.optim.AdamW(groups, betas=tuple(hp.betas), eps=hp.eps)
        total = self.trainer.estimated_stepping_batches
        warmup = round(total * hp.warmup_epochs / hp.epochs)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def summary(self, metrics: Mapping[str, float]) -> str:
        """The test split's scores when the data has one, else the validation split's."""
        split = "test" if f"test/{REPORTED[0]}" in metrics else "val"
        model = " ".join(f"{m} {metrics[f'{split}/{m}']:.1f}" for m in REPORTED)
        spice = (
            f" SPICE {metrics[f'{split}/SPICE']:.1f}"
            if f"{split}/SPICE" in metrics
            else " (SPICE unavailable offline)"
        )
        baseline = " ".join(f"{m} {metrics[f'{split}/baseline_{m}']:.1f}" for m in REPORTED)
        return (
            f"captioning ({split}) {model}{spice}; constant caption baseline "
            f"({self.hparams.constant_caption!r}): {baseline}"
        )
