"""Optimiser groups and the logit-scale clip, through PretrainModule's own step."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flip.tasks.pretrain import PretrainModule
from tests.test_grad_cache import batch, tiny_flip


def official_no_decay(names: list[str]) -> set[str]:
    """The official FLIP filters, restated on our parameter names: t5x
    ``filter_bias_and_norm`` (leaf 'bias' or 'scale' = LayerNorm scale) and
    ``filter_posembed`` ('pos_embedding')."""
    return {
        n
        for n in names
        if n.endswith(".bias") or n.split(".")[-2] in ("norm", "norm1", "norm2") or "pos_embed" in n
    }


def groups(policy: str) -> tuple[set[str], set[str]]:
    module = PretrainModule(
        tiny_flip(), global_batch=8, total_samples=80, warmup_samples=0, no_decay=policy
    )
    by_id = {id(p): n for n, p in module.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    decay, rest = ({by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["weight_decay"] == 0.2
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    return decay, rest


def test_official_groups_decay_class_token_and_logit_scale():
    decay, rest = groups("official")
    names = sorted(decay | rest)
    assert not decay & rest
    assert rest == official_no_decay(names)
    assert {
        "model.visual.cls_token",
        "model.logit_scale",
        "model.visual.patch_embed.proj.weight",
        "model.text.token_embed.weight",
        "model.image_proj.weight",
    } <= decay
    assert {
        "model.text.pos_embed",
        "model.visual.norm.weight",
        "model.visual.norm.bias",
        "model.text.blocks.0.norm1.weight",
        "model.visual.blocks.1.mlp.fc2.bias",
    } <= rest


def test_config_comment_groups_also_spare_class_token_and_logit_scale():
    decay, rest = groups("config_comment")
    official_decay, official_rest = groups("official")
    assert rest == official_rest | {"model.visual.cls_token", "model.logit_scale"}
    assert decay == official_decay - {"model.visual.cls_token", "model.logit_scale"}


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="no_decay must be"):
        PretrainModule(
            tiny_flip(), global_batch=8, total_samples=80, warmup_samples=0, no_decay="none"
        )


class ScaleGrads(L.Callback):
    """The logit scale's gradient at each optimiser step."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads.append(module.model.logit_scale.grad.item())


def _steps(policy: str, logit_scale: float, steps: int = 2) -> tuple[PretrainModule, list]:
    module = PretrainModule(
        tiny_flip(),
        global_batch=8,
        total_samples=80,
        warmup_samples=0,
        base_lr=1e-3,
        no_decay=policy,
    )
    with torch.no_grad():
        module.model.logit_scale.fill_(logit_scale)
    seen = ScaleGrads()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(TensorDataset(*batch(16)), batch_size=8))
    return module, seen.grads


@pytest.mark.parametrize("policy", ["official", "config_comment"])
def test_a_scale_above_the_clip_comes_back_and_trains_again(policy):
    """Above log 100 the clipped scale has no gradient; before the fix a parameter there
    (not decayed) stayed for good. Now the step leaves it at the bound, where the next
    step's gradient flows again."""
    module, grads = _steps(policy, 6.0)
    assert grads[0] == 0.0  # above the clip: no gradient
    assert grads[1] != 0.0  # back at the bound: it trains again
    assert module.model.logit_scale.item() <= math.log(100) + 1e-12


# -- AdamW implementation (task.optimizer_impl) ----------------------------------------


def _fit(impl: str | None, steps: int = 3) -> L.Trainer:
    kw = {} if impl is None else {"optimizer_impl": impl}
    module = PretrainModule(
        tiny_flip(), global_batch=8, total_samples=80, warmup_samples=0, base_lr=1e-3, **kw
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(TensorDataset(*batch(8 * steps)), batch_size=8))
    return trainer


def test_default_adamw_is_fused_on_cpu():
    optimizer = _fit(None, steps=1).optimizers[0]
    assert optimizer.defaults["fused"] is True
    assert all(g["fused"] and not g["foreach"] for g in optimizer.param_groups)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_every_implementation_makes_the_for_loop_update(impl):
    """Three steps (random masks, weight decay on one group) from the same start: the
    parameters after them equal torch's reference single-tensor AdamW's."""
    reference = _fit("for_loop").lightning_module.model
    other = _fit(impl)
    kernel = other.optimizers[0].defaults
    assert (kernel["fused"], kernel["foreach"]) == (impl == "fused", impl == "foreach")
    moved = 0
    for (name, p), (_, q) in zip(
        other.lightning_module.model.named_parameters(), reference.named_parameters()
    ):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
        moved += not torch.equal(p, tiny_flip().get_parameter(name))
    assert moved == len(list(reference.parameters()))  # every parameter was updated


def test_fused_falls_back_to_foreach_where_the_device_has_no_fused_kernel(caplog):
    from flip.tasks.pretrain import adamw_kernel

    cpu = [torch.zeros(2)]
    assert adamw_kernel("fused", cpu) == {"fused": True, "foreach": False}
    assert adamw_kernel("foreach", cpu) == {"fused": False, "foreach": True}
    assert adamw_kernel("for_loop", cpu) == {"fused": False, "foreach": False}
    # the meta device, like XLA, is not among torch's fused-kernel devices
    with caplog.at_level("INFO", logger="flip.tasks.pretrain"):
        assert adamw_kernel("fused", cpu + [torch.zeros(2, device="meta")]) == {
            "fused": False,
            "foreach": True,
        }
    assert "no fused kernel on meta" in caplog.text
    with pytest.raises(RuntimeError, match="supported devices"):  # why it must fall back
        p = torch.zeros(2, device="meta", requires_grad=True)
        p.grad = torch.zeros(2, device="meta")
        torch.optim.AdamW([p], fused=True).step()


def test_a_loaded_optimizer_state_keeps_this_runs_kernel():
    """Resuming a checkpoint saved by another implementation (or on another device) steps
    with the configured one: loading a state would otherwise restore its kernel flags."""
    saved = _fit("for_loop", steps=1).optimizers[0].state_dict()
    assert not saved["param_groups"][0]["fused"]
    module = PretrainModule(tiny_flip(), global_batch=8, total_samples=80, warmup_samples=0)
    optimizer = module.configure_optimizers()["optimizer"]
    optimizer.load_state_dict(saved)
    assert all(g["fused"] and not g["foreach"] for g in optimizer.param_groups)
    assert len(optimizer.state) == len(list(module.parameters()))  # the state did load


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="optimizer_impl must be one of fused, foreach, for_loop"):
        PretrainModule(
            tiny_flip(), global_batch=8, total_samples=80, warmup_samples=0, optimizer_impl="adamw"
        )
