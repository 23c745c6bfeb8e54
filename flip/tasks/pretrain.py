"""Masked CLIP pre-training (FLIP) as a LightningModule.

Owns the model, the training masks (``image_mask``, ``text_mask``: ratio and kind, drawn
each step and passed to the model's forward; the model itself masks nothing unless
asked), the objective (global-batch contrastive loss plus optional per-sample
terms, ``flip/objective.py``), the held-out zero-shot metric and the optimiser.
lr = base_lr x global_batch / 256, linear warm-up then cosine to 0, both counted in
samples seen (global_step x global_batch).

Optimisation is manual so that one step can contrast a per-device batch larger than
fits in memory: with ``micro_batch`` smaller than the per-device batch the step runs
gradient caching (``flip/grad_cache.py``), still one optimiser step and one
data-parallel gradient sync per global batch.
"""

import logging
import time
from contextlib import nullcontext
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.optim.lr_scheduler import LambdaLR
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from torchmetrics.classification import MulticlassAccuracy

from flip.eval.zeroshot import build_zero_shot_classifier
from flip.grad_cache import cached_backward
from flip.masking import Mask
from flip.models.clip import FLIP, no_decay_names
from flip.objective import Objective
from flip.schedule import warmup_cosine

log = logging.getLogger(__name__)

ADAMW_IMPLS = ("fused", "foreach", "for_loop")  # task.optimizer_impl


class PretrainModule(L.LightningModule):
    def __init__(
        self,
        model: FLIP,
        global_batch: int,  # contrastive batch over all devices
        total_samples: int,  # training length in samples seen
        warmup_samples: int,
        objective: Objective | None = None,  # default: the contrastive loss alone
        image_mask: dict | None = None,  # Mask fields {ratio, kind}; None: no masking
        text_mask: dict | None = None,  # Mask fields {ratio, kind} (Table 1c); None: none
        model_config: dict | None = None,  # stored in checkpoints: eval/export rebuild the model
        micro_batch: int | None = None,  # per device; None = the whole per-device batch
        keep_text_graph: bool = False,  # gradient caching: text tower not replayed, its graphs kept
        base_lr: float = 4e-6,  # per 256 samples (official FLIP)
        weight_decay: float = 0.2,
        # official: decay all but biases, norm scales, position embeddings (FLIP code);
        # config_comment: also spare the class token and the logit scale
        no_decay: Literal["official", "config_comment"] = "official",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        nonfinite: str = "stop",  # a non-finite loss/gradient: "stop" the run or "skip" the step
        seed: int = 0,  # masks of step s come from seed, s and the rank: resumable
        compile: bool = False,  # torch.compile the encoders (static shapes: fixed mask count)
        # turn bf16 autocast on around the step (TPU: weights and loss stay fp32); false
        # leaves the precision to the Trainer (bf16-mixed autocasts the step itself)
        bf16_autocast: bool = False,
        # AdamW kernel: fused (falls back to foreach where the device has none, e.g. XLA),
        # foreach or for_loop; the same update, different speed
        optimizer_impl: Literal["fused", "foreach", "for_loop"] = "fused",
    ):
        super().__init__()
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if no_decay not in ("official", "config_comment"):
            raise ValueError(f"no_decay must be 'official' or 'config_comment', got {no_decay!r}")
        if optimizer_impl not in ADAMW_IMPLS:
            raise ValueError(
                f"optimizer_impl must be one of {', '.join(ADAMW_IMPLS)}, got {optimizer_impl!r}"
            )
        self.save_hyperparameters(ignore=["model", "objective"])
        self.model = model
        self.objective = objective if objective is not None else Objective()
        self.image_mask, self.text_mask = Mask(**(image_mask or {})), Mask(**(text_mask or {}))
        if self.image_mask.kind != "random":  # the kinds of Table 1c are for text
            raise ValueError(
                f"image masking is random only; mask kind {self.image_mask.kind!r} is for text"
            )
        self.automatic_optimization = False  # one step may span several micro-batches
        self.lr = base_lr * global_batch / 256
        self._last_step_time: float | None = None
        self.skipped_steps = 0  # non-finite steps skipped (nonfinite="skip")

    def configure_model(self) -> None:
        if self.hparams.compile:  # in place: parameter names (checkpoints) are unchanged
            self.model.visual.compile()
            self.model.text.compile()

    @property
    def total_steps(self) -> int:
        return self.hparams.total_samples // self.hparams.global_batch

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.model(images, tokens)

    def draw_masks(self, batch: int, device: torch.device | str) -> tuple[Mask, Mask]:
        """The (image, text) masks of a training batch, noise drawn now (image first) so
        that any part of the batch can be re-run with the same mask."""
        return (
            self.image_mask.drawn(batch, self.model.visual.num_patches, device),
            self.text_mask.drawn(batch, self.model.text.num_tokens, device),
        )

    def training_step(self, batch, batch_idx):
        images, tokens = batch
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        # random masks (and dropout) depend on (seed, step, rank) only: a resumed run
        # draws the same masks as an uninterrupted one
        world, rank = self.trainer.world_size, self.global_rank
        torch.manual_seed(self.hparams.seed + self.global_step * world + rank)
        micro = self.hparams.micro_batch or images.shape[0]
        masks = self.draw_masks(images.shape[0], images.device)
        loss, parts, scale = self._backward(images, tokens, masks, micro, optimizer)
        grad_norm = torch.linalg.vector_norm(
            torch.stack(
                torch._foreach_norm([p.grad for p in self.parameters() if p.grad is not None])
            )
        )
        if not self._finite(loss, grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return None
        lr = schedule.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        self.model.clamp_logit_scale_()  # a clipped scale must be able to come back
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        self._log_train(loss, scale, lr, images.shape[0], images.shape[0] // micro)
        if len(parts) > 1:
            self.log_dict(
                {f"train/loss_{k}": v for k, v in parts.items()}, batch_size=images.shape[0]
            )
        self.log("train/grad_norm", grad_norm, batch_size=images.shape[0])
        return loss

    def _backward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        masks: tuple[Mask, Mask],
        micro: int,
        optimizer,
    ):
        """Gradients of the objective on this rank's batch under the (image, text)
        ``masks`` into ``.grad``: in one pass, or by gradient caching over micro-batches.
        Returns (loss, its parts, logit scale)."""
        # never switch off an autocast the Trainer's precision turned on
        bf16 = (
            torch.autocast(self.device.type, torch.bfloat16)
            if self.hparams.bf16_autocast
            else nullcontext()
        )
        with bf16:
            if micro < images.shape[0]:
                return cached_backward(
                    self.model,
                    self.objective,
                    images,
                    tokens,
                    masks,
                    micro,
                    self.manual_backward,
                    lambda: optimizer.toggle_model(sync_grad=False),
                    self.hparams.keep_text_graph,
                )
            features = self.model.forward_features(images, tokens, *masks)
            scale = self.model.scale()
            loss, parts = self.objective(features, scale, images, tokens)
            self.manual_backward(loss)
            return loss.detach(), parts, scale.detach()

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """False (step skipped, counted) or an error naming the step and the last
        checkpoint when the loss or a gradient is not finite."""
        if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):  # one host sync
            return True
        if self.hparams.nonfinite == "skip":
            self.skipped_steps += 1
            self.log("train/skipped_nonfinite_steps", float(self.skipped_steps))
            return False
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none yet"
        raise FloatingPointError(
            f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) at step "
            f"{self.global_step}; last good checkpoint: {checkpoint}. Resume from it with a "
            "lower schedule.base_lr, or set task.nonfinite=skip to skip such steps"
        )

    def _log_train(
        self, loss: torch.Tensor, scale: torch.Tensor, lr: float, batch: int, micro_batches: int
    ) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            rate = self.hparams.global_batch / (now - self._last_step_time)
            self.log("train/samples_per_sec", rate, rank_zero_only=True)
        self._last_step_time = now
        self.log("train/loss", loss, prog_bar=True, batch_size=batch)
        self.log_dict(
            {
                "train/logit_scale": scale,
                "train/lr": lr,
                "train/samples_seen": float(self.global_step * self.hparams.global_batch),
                "train/global_batch": float(self.hparams.global_batch),
                "train/micro_batches": float(micro_batches),
            },
            batch_size=batch,
        )

    # -- held-out zero-shot classification -------------------------------------------
    def setup(self, stage: str) -> None:
        classnames = getattr(self.trainer.datamodule, "classnames", None)
        if classnames:  # runs before the module moves to its device
            self.zeroshot_top1 = MulticlassAccuracy(len(classnames), average="micro")

    def on_validation_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        self.classifier = build_zero_shot_classifier(
            self.model.encode_text, dm.tokenizer, dm.classnames, dm.templates, self.device
        )

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.model.encode_image(images) @ self.classifier.T  # (B, C)
        self.zeroshot_top1(logits, labels)
        self.log("val/zeroshot_top1", self.zeroshot_top1, batch_size=images.shape[0])

    # -- optimisation -----------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        official = hp.no_decay == "official"
        no_decay = {f"model.{n}" for n in self.model.no_weight_decay(official)} | {
            f"objective.{n}" for n in no_decay_names(self.objective)
        }
        decay, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (rest if name in no_decay else decay).append(p)
        # Lightning calls this after moving the module to its device: the kernel fits it
        kernel = adamw_kernel(hp.optimizer_impl, decay + rest)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=self.lr,
            betas=tuple(hp.betas),
            eps=hp.eps,
            **kernel,
        )

        # loading a state restores its groups' kernel flags too: a resumed run steps with
        # this run's kernel (a fused GPU checkpoint resumed on a TPU would fail otherwise)
        def keep_kernel(opt: torch.optim.Optimizer) -> None:
            for group in opt.param_groups:
                group.update(kernel)

        optimizer.register_load_state_dict_post_hook(keep_kernel)
        schedule = LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                (step + 1) * hp.global_batch, hp.warmup_samples, hp.total_samples
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def adamw_kernel(impl: str, params: list[torch.Tensor]) -> dict[str, bool]:
    """``torch.optim.AdamW`` keyword arguments selecting its implementation for ``params``.

    fused: one kernel per parameter group and dtype, where torch has it for every
    parameter's device (CPU, CUDA, XPU, MPS, ...); faster than torch's default there (a
    loop of ops per tensor on CPU, foreach on CUDA): ~10 % of a ViT-B/16 CPU step. XLA has no
    fused kernel (the step would fail): foreach there, said in the log. foreach: a few
    ops over lists of tensors. for_loop: the ops per tensor. All give the same update.
    """
    if impl == "fused":
        supported = _get_fused_kernels_supported_devices()
        without = sorted({p.device.type for p in params if p.device.type not in supported})
        if not without:
            return {"fused": True, "foreach": False}
        if rank_zero_only.rank == 0:  # our logger: quiet_console hides Lightning's info lines
            log.info(
                "AdamW: torch has no fused kernel on %s (it has on %s); "
                "task.optimizer_impl=fused uses foreach",
                ", ".join(without),
                ", ".join(supported),
            )
        impl = "foreach"
    return {"fused": False, "foreach": impl == "foreach"}
