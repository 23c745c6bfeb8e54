"""End-to-end fine-tuning of the pre-trained image encoder for classification (paper
Table 3: "Our fine-tuning implementation follows MAE").

The recipe is MAE's (facebookresearch/mae ``main_finetune.py``, ``models_vit.py``,
``util/lr_decay.py``, ``util/lr_sched.py``), with timm's pieces where MAE used them:

- head: average of the patch tokens (class token left out, MAE ``global_pool``), a new
  LayerNorm (``fc_norm``), a Linear layer with weights from trunc_normal(std 2e-5) and zero
  bias. MAE deletes the encoder's final norm when it pools; here the tower keeps its
  pre-trained final norm (FLIP pooled its features after it) and ``fc_norm`` follows;
- drop path rising linearly over the blocks from 0 to ``drop_path`` (the tower's blocks
  follow timm's rule, as MAE's ``VisionTransformer(drop_path_rate=…)``);
- AdamW (β 0.9, 0.999) with layer-wise lr decay: timm ``param_groups_layer_decay`` gives
  block ``i`` the scale ``layer_decay ** (depth - i)``, the patch embedding and class token
  ``layer_decay ** (depth + 1)``, the head, ``fc_norm`` and the final norm 1; no weight
  decay on biases, norms and the class token (MAE ``no_weight_decay``);
- lr = base_lr x global batch / 256; per step linear warm-up over ``warmup_epochs`` from 0,
  then half-cosine down to ``min_lr``;
- mixup/cutmix (timm ``Mixup``, label smoothing in its soft targets) with
  ``SoftTargetCrossEntropy``; without mixup, cross-entropy with label smoothing;
- optional EMA of the weights (timm ``ModelEmaV3``; MAE has none), validated beside them;
- ``freeze_encoder``: the same recipe with the tower frozen (no drop path), i.e. a linear
  probe of the checkpoint on the same data (the control of the fine-tuning miniature).

Validation: top-1/top-5 of the live weights (``val/top1``, ``val/top5``), of the EMA
(``val/ema_top1``, ``val/ema_top5``) when on, and the trivial baseline that always answers
the most frequent training class (``val/baseline_majority``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from flip.errors import ConfigError
from flip.schedule import warmup_cosine
from flip.tasks.transfer import TransferModule, build_tower


class ViTClassifier(nn.Module):
    """Pre-trained image tower + MAE's classification head; ``group_matcher`` and
    ``no_weight_decay`` are the hooks timm's layer-decay grouping reads."""

    def __init__(self, visual: nn.Module, num_classes: int, head_init_std: float = 2e-5):
        super().__init__()
        self.visual = visual
        width = visual.width
        self.fc_norm = nn.LayerNorm(width, eps=visual.norm.eps)
        self.head = nn.Linear(width, num_classes)
        trunc_normal_(self.head.weight, std=head_init_std)  # MAE main_finetune.py
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> logits (B, classes)."""
        tokens, _ = self.visual.forward_features(images)  # (B, [1 +] N, D)
        if self.visual.cls_token is not None:
            tokens = tokens[:, 1:]  # MAE global_pool: patches only
        return self.head(self.fc_norm(tokens.mean(dim=1)))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layers for lr decay: 0 the stem, 1..depth the blocks; the rest (final norm,
        fc_norm, head) unmatched, i.e. the top layer (MAE ``get_layer_id_for_vit``)."""
        return {"stem": r"^visual\.(?:cls_token|patch_embed)", "blocks": r"^visual\.blocks\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        # MAE/timm: pos_embed and cls_token; FLIP's position embedding is a fixed buffer
        return {"visual.cls_token"}


class FinetuneModule(TransferModule):
    pretrained_parts = {"visual": "visual"}

    def __init__(
        self,
        model_config: Mapping,  # the pre-training checkpoint's (stored in this one's hparams)
        num_classes: int,
        majority_class: int = 0,  # most frequent training label: the trivial baseline
        epochs: int = 100,
        global_batch: int = 1024,
        base_lr: float = 5e-4,  # per 256 samples
        min_lr: float = 1e-6,  # end of the cosine (MAE main_finetune.py)
        warmup_epochs: float = 5,
        layer_decay: float = 0.65,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),  # torch AdamW defaults, as MAE
        drop_path: float = 0.1,
        mixup: float = 0.8,  # mixup alpha; 0 = off
        cutmix: float = 1.0,  # cutmix alpha; 0 = off
        mixup_prob: float = 1.0,  # probability of mixing a batch at all
        mixup_switch_prob: float = 0.5,  # of cutmix instead of mixup when both are on
        mixup_mode: str = "batch",  # batch | pair | elem
        smoothing: float = 0.1,  # label smoothing
        head_init_std: float = 2e-5,
        ema: bool = False,  # also keep (and validate) an EMA of the weights
        ema_decay: float = 0.9999,
        freeze_encoder: bool = False,  # true: a linear probe (only fc_norm and head train)
    ):
        super().__init__()
        self.save_hyperparameters()
        # frozen: no drop path either, the tower is a fixed feature extractor
        visual = build_tower(model_config, "visual", drop_path=0.0 if freeze_encoder else drop_path)
        self.model = ViTClassifier(visual, num_classes, head_init_std)
        if freeze_encoder:  # timm's layer-decay grouping skips parameters without grad
            self.model.visual.requires_grad_(False)
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema else None
        if self.ema is not None:  # updated by averaging, never by the optimiser; in the
            # module's mode like the rest (Lightning switches all to eval to validate)
            self.ema.requires_grad_(False).train()
        self.lr = base_lr * global_batch / 256
        self.mixup = None
        if mixup > 0 or cutmix > 0:  # smoothing then lives in the soft targets
            self.mixup = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode=mixup_mode,
                label_smoothing=smoothing,
                num_classes=num_classes,
            )
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=smoothing)
        self.top_k = min(5, num_classes)
        self.val_metrics = nn.ModuleDict(
            {
                f"{prefix}top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for prefix in (("", "ema_") if ema else ("",))
                for k in sorted({1, self.top_k})
            }
        )
        self.val_loss, self.val_baseline = MeanMetric(), MeanMetric()

    @property
    def visual(self) -> nn.Module:  # where load_pretrained puts the checkpoint's tower
        return self.model.visual

    def load_pretrained(self, state, source) -> None:
        super().load_pretrained(state, source)
        if self.ema is not None:  # the average starts from the pre-trained weights
            self.ema.set(self.model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_fit_start(self) -> None:
        batch = getattr(self.trainer.datamodule, "batch_size", None)
        if self.mixup is not None and batch is not None and batch % 2:
            raise ConfigError(
                f"mixup/cutmix mixes each batch with its reverse and needs an "
                f"even per-device batch, got {batch}: change batch.global"
            )

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = self.loss(images, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=labels.shape[0])
        self.log(
            "train/lr",
            max(g["lr"] for g in self.optimizers().param_groups),
            batch_size=labels.shape[0],
        )
        return loss

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch: mixed (in place) into soft targets when mixup or
        cutmix is on."""
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)  # soft targets (B, classes)
        return self.criterion(self(images), targets)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.val_loss.update(nn.functional.cross_entropy(logits, labels), labels.shape[0])
        self.val_baseline.update((labels == self.hparams.majority_class).float())
        ema_logits = self.ema(images) if self.ema is not None else None
        for name, metric in self.val_metrics.items():
            metric.update(ema_logits if name.startswith("ema_") else logits, labels)
        self.log_dict(
            {f"val/{k}": m for k, m in self.val_metrics.items()}, batch_size=labels.shape[0]
        )
        self.log("val/loss", self.val_loss, batch_size=labels.shape[0])
        self.log("val/baseline_majority", self.val_baseline, batch_size=labels.shape[0])

    def param_groups(self) -> list[dict]:
        """AdamW groups with layer-wise lr decay (each group's ``lr_scale``, its lr set to
        the peak lr times it) and weight decay (0 for biases, norms, class token)."""
        hp = self.hparams
        groups = param_groups_layer_decay(
            self.model,
            hp.weight_decay,
            no_weight_decay_list=self.model.no_weight_decay(),
            layer_decay=hp.layer_decay,
        )
        for group in groups:
            group["lr"] = self.lr * group["lr_scale"]
        return groups

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches
        warmup = round(hp.warmup_epochs * total / hp.epochs)
        schedule = LambdaLR(optimizer, lambda step: self.lr_factor(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_factor(self, step: int, warmup: int, total: int) -> float:
        """Multiplier of the peak lr before optimiser step ``step`` (MAE
        ``adjust_learning_rate`` at the step's fractional epoch)."""
        factor = warmup_cosine(step, warmup, total)
        if step < warmup or self.lr == 0:
            return factor
        return (self.hparams.min_lr + (self.lr - self.hparams.min_lr) * factor) / self.lr

    def summary(self, metrics: Mapping[str, float]) -> str:
        k = self.top_k
        kind = "linear probe" if self.hparams.freeze_encoder else "fine-tune"
        line = (
            f"{kind} top-1: {100 * metrics['val/top1']:.1f}% "
            f"(top-{k} {100 * metrics[f'val/top{k}']:.1f}%)"
        )
        if self.ema is not None:
            line += (
                f"; EMA top-1: {100 * metrics['val/ema_top1']:.1f}% "
                f"(top-{k} {100 * metrics[f'val/ema_top{k}']:.1f}%)"
            )
        return (
            line + "; trivial baseline: most frequent class "
            f"{100 * metrics['val/baseline_majority']:.1f}%, "
            f"chance {100 / self.hparams.num_classes:.1f}%"
        )
