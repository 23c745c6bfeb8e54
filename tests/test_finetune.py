"""Fine-tuning (paper Table 3, MAE's recipe): layer-decay groups, the mixup/soft-target loss,
the head, the schedule, EMA, the ImageFolder and shapes data, `train.py task=finetune` and
the full-scale experiment configs."""

import json
import math
import re
import subprocess
import sys
from functools import partial

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torchvision.datasets import ImageFolder

from flip.checkpoint import load_checkpoint, model_state, save_flip_checkpoint
from flip.data.classification import ClassificationDataModule, ShapesClasses
from flip.data.shapes import ALL_COMBOS, COLOUR_JITTER, COLOURS, render
from flip.errors import ConfigError
from flip.tasks.finetune import FinetuneModule
from tests.conftest import CONF, compose_train

# a tiny tower: 32 px images on 8-px patches (16 patches), width 32
TINY = [
    "model.image.width=32",
    "model.image.heads=1",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=1",
    "model.embed_dim=16",
    "data.image_size=32",
]
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def tiny_model_config(depth: int = 1) -> dict:
    cfg = compose_train(*TINY, f"model.image.depth={depth}")
    return OmegaConf.to_container(cfg.model, resolve=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pre-training checkpoint of a tiny FLIP (random weights), as training writes it."""
    path = tmp_path_factory.mktemp("pre") / "flip.ckpt"
    model_cfg = tiny_model_config()
    torch.manual_seed(0)
    save_flip_checkpoint(path, hydra.utils.instantiate(model_cfg), model_cfg)
    return path


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------
# optimiser: layer-wise lr decay and weight decay, by parameter name


def test_layer_decay_groups_match_the_hand_table():
    """Depth 3, decay 0.5: block i gets 0.5^(3 + 1 - (i + 1)), the stem 0.5^4, the final
    norm, fc_norm and head 1 (MAE get_layer_id_for_vit); weight decay on matrices only
    (not on biases, norms, class token)."""
    module = FinetuneModule(
        tiny_model_config(depth=3),
        num_classes=7,
        layer_decay=0.5,
        weight_decay=0.05,
        base_lr=1e-3,
        global_batch=512,
    )
    name_of = {id(p): n for n, p in module.model.named_parameters()}
    got = {
        name_of[id(p)]: (g["lr_scale"], g["weight_decay"], g["lr"])
        for g in module.param_groups()
        for p in g["params"]
    }
    d = 0.5
    expected = {
        "visual.cls_token": (d**4, 0.0),
        "visual.patch_embed.proj.weight": (d**4, 0.05),
        "visual.patch_embed.proj.bias": (d**4, 0.0),
        "visual.norm.weight": (1.0, 0.0),
        "visual.norm.bias": (1.0, 0.0),
        "fc_norm.weight": (1.0, 0.0),
        "fc_norm.bias": (1.0, 0.0),
        "head.weight": (1.0, 0.05),
        "head.bias": (1.0, 0.0),
    }
    for i, scale in enumerate([d**3, d**2, d**1]):
        for part in ("norm1", "norm2"):
            expected |= {
                f"visual.blocks.{i}.{part}.weight": (scale, 0.0),
                f"visual.blocks.{i}.{part}.bias": (scale, 0.0),
            }
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            expected |= {
                f"visual.blocks.{i}.{part}.weight": (scale, 0.05),
                f"visual.blocks.{i}.{part}.bias": (scale, 0.0),
            }
    assert {n: v[:2] for n, v in got.items()} == expected
    peak = 1e-3 * 512 / 256  # base_lr x global batch / 256
    assert all(lr == pytest.approx(peak * scale) for scale, _, lr in got.values())


def test_lr_schedule_is_mae_warmup_then_cosine_to_min_lr():
    module = FinetuneModule(
        tiny_model_config(), num_classes=3, base_lr=1e-3, global_batch=256, min_lr=1e-5
    )
    warmup, total = 10, 110
    f = [module.lr_factor(s, warmup, total) for s in (0, 5, 10, 60, 110)]
    # MAE adjust_learning_rate: lr x t / warmup, then min + (lr - min) x (1 + cos) / 2
    assert f == pytest.approx([0.0, 0.5, 1.0, (1e-5 + (1e-3 - 1e-5) * 0.5) / 1e-3, 1e-2])


# ----------------------------------------------------------------------------------------
# head, pooling, drop path, pre-trained weights


def test_head_shape_initialisation_and_patch_pooling(checkpoint):
    cfg = tiny_model_config()
    module = FinetuneModule(cfg, num_classes=1000, drop_path=0.1)
    model = module.model
    assert model.head.weight.shape == (1000, 32) and model.head.bias.abs().sum() == 0
    assert model.head.weight.std().item() == pytest.approx(2e-5, rel=0.05)  # MAE trunc_normal
    assert torch.equal(model.fc_norm.weight, torch.ones(32))
    # MAE global pool: patch tokens only, the class token left out
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    tokens, _ = model.visual.forward_features(images)
    assert tokens.shape == (2, 17, 32)
    expected = model.head(model.fc_norm(tokens[:, 1:].mean(1)))
    with_cls = model.head(model.fc_norm(tokens.mean(1)))
    assert torch.allclose(module(images), expected) and not torch.allclose(expected, with_cls)
    # timm/MAE stochastic depth rule: 0 .. drop_path linearly over the blocks
    deeper = FinetuneModule(tiny_model_config(depth=3), num_classes=3, drop_path=0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in deeper.model.visual.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    # load_pretrained: the tower gets the checkpoint's image encoder
    module.load_pretrained(model_state(load_checkpoint(checkpoint)), "test")
    state = model_state(load_checkpoint(checkpoint))
    assert all(torch.equal(t, state[f"visual.{k}"]) for k, t in model.visual.state_dict().items())


def test_freeze_encoder_is_a_linear_probe_with_the_same_recipe(checkpoint):
    """freeze_encoder=true (the fine-tuning miniature's linear-probe control): the optimiser
    holds only fc_norm and the head, two epochs of training move them and leave every
    tower weight at the checkpoint's, no drop path, and the summary says what ran."""
    module = FinetuneModule(
        tiny_model_config(depth=3),
        num_classes=40,
        epochs=2,
        global_batch=8,
        base_lr=1.0,  # lr 0.03: four AdamW steps move the head visibly
        warmup_epochs=0,
        mixup=0.0,
        cutmix=0.0,
        drop_path=0.2,
        freeze_encoder=True,
    )
    assert all(getattr(b.drop_path1, "drop_prob", 0.0) == 0 for b in module.model.visual.blocks)
    trained = {id(p) for g in module.param_groups() for p in g["params"]}
    expected = [*module.model.fc_norm.parameters(), *module.model.head.parameters()]
    assert trained == {id(p) for p in expected}
    tower = {k: v.clone() for k, v in module.model.visual.state_dict().items()}
    head = module.model.head.weight.detach().clone()
    trainer(max_epochs=2, limit_val_batches=0).fit(module, datamodule=shapes_data())
    assert all(torch.equal(v, tower[k]) for k, v in module.model.visual.state_dict().items())
    assert (module.model.head.weight - head).abs().max() > 1e-3
    line = module.summary({"val/top1": 0.5, "val/top5": 1.0, "val/baseline_majority": 0.025})
    assert line.startswith("linear probe top-1: 50.0% (top-5 100.0%)")
    module.hparams.freeze_encoder = False
    assert module.summary({"val/top1": 0.5, "val/top5": 1.0, "val/baseline_majority": 0.025})[
        :16
    ] == ("fine-tune top-1:")


# ----------------------------------------------------------------------------------------
# losses


def test_mixup_loss_is_timms_soft_target_loss_on_the_same_mixed_batch():
    module = FinetuneModule(
        tiny_model_config(), num_classes=10, mixup=0.8, cutmix=1.0, smoothing=0.1
    ).eval()  # eval: no drop path, same forward twice
    torch.nn.init.normal_(module.model.head.weight)  # logits that depend on the image
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    np.random.seed(3)  # Mixup draws lambda and mixup-or-cutmix from numpy
    loss = module.loss(images.clone(), labels)
    np.random.seed(3)
    mixed, soft = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)(
        images.clone(), labels
    )
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    assert soft.min() == pytest.approx(0.1 / 10)  # smoothing inside the mixed targets
    assert not torch.equal(mixed, images)
    reference = SoftTargetCrossEntropy()(module(mixed), soft).item()
    assert loss.item() == pytest.approx(reference, rel=1e-6)
    unmixed = SoftTargetCrossEntropy()(module(images), soft).item()
    assert abs(unmixed - reference) > 1e-3  # the images were mixed, not only the targets


def test_without_mixup_the_loss_is_label_smoothing_cross_entropy():
    module = FinetuneModule(
        tiny_model_config(), num_classes=10, mixup=0.0, cutmix=0.0, smoothing=0.1
    ).eval()
    torch.nn.init.normal_(module.model.head.weight)
    assert module.mixup is None
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 9])
    loss = module.loss(images, labels)
    # MAE's criterion without mixup (timm LabelSmoothingCrossEntropy), by hand
    logp = module(images).log_softmax(-1)
    by_hand = (0.9 * -logp[torch.arange(6), labels] + 0.1 * -logp.mean(-1)).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert loss.item() == pytest.approx(
        LabelSmoothingCrossEntropy(0.1)(module(images), labels).item(), rel=1e-6
    )


def test_mixup_with_an_odd_batch_stops_at_start():
    module = FinetuneModule(tiny_model_config(), num_classes=40, mixup=0.8, cutmix=1.0)
    with pytest.raises(ConfigError, match="even per-device batch, got 7"):
        trainer(max_epochs=1).fit(module, datamodule=shapes_data(batch_size=7, size=14))


# ----------------------------------------------------------------------------------------
# data


def write_image_folder(root, classes, per_class, size=(48, 40), seed=0):
    """ImageNet's layout with real JPEG files: root/<wnid>/<wnid>_<i>.JPEG; each class is a
    colour with noise."""
    rng = np.random.default_rng(seed)
    for wnid, rgb in classes.items():
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(
                root / wnid / f"{wnid}_{i}.JPEG", quality=90
            )


CLASSES = {"n01440764": (200, 40, 40), "n01443537": (40, 180, 60), "n01484850": (40, 60, 200)}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_image_folder(root / "train", CLASSES, per_class=16, seed=0)
    write_image_folder(root / "val", CLASSES, per_class=6, seed=1)
    return root


def imagenet_data(root, batch_size, *overrides):
    cfg = compose_train(
        "task=finetune",
        "data=imagenet",
        f"data.train.root={root / 'train'}",
        f"data.val.root={root / 'val'}",
        "data.image_size=32",
        "data.num_workers=0",
        *overrides,
    )
    return hydra.utils.instantiate(cfg.data, batch_size=batch_size)


@pytest.mark.slow
def test_imagenet_folder_few_steps_loss_falls(imagenet, checkpoint):
    """Real JPEGs in ImageNet's layout through conf/data/imagenet.yaml (MAE's RandAugment,
    random erasing, bicubic crops): labels from the sorted wnids, and a few epochs lower
    the validation loss and beat chance."""
    data = imagenet_data(imagenet, 12)
    assert data.task_args == {"num_classes": 3, "majority_class": 0}
    assert data.train_set.classes == sorted(CLASSES) and len(data.val_set) == 18
    image, label = data.val_set[7]
    assert image.shape == (3, 32, 32) and label == 1
    L.seed_everything(0)
    module = FinetuneModule(
        tiny_model_config(),
        **data.task_args,
        epochs=8,
        base_lr=0.05,
        global_batch=12,
        warmup_epochs=1,
        mixup=0.0,
        cutmix=0.0,
    )
    module.load_pretrained(model_state(load_checkpoint(checkpoint)), "test")
    # no inference mode: metric states first made in validate() stay usable in fit
    run = trainer(max_epochs=8, inference_mode=False)
    before = run.validate(module, datamodule=data, verbose=False)[0]
    run.fit(module, datamodule=data)
    after = run.validate(module, datamodule=data, verbose=False)[0]
    assert before["val/loss"] == pytest.approx(math.log(3), abs=1e-3)  # head starts ~0
    assert after["val/loss"] < 0.7 * before["val/loss"]
    assert after["val/top1"] > 0.6
    assert after["val/baseline_majority"] == pytest.approx(1 / 3)
    # the schedule ran to its end: every group at min_lr x its layer scale
    for group in module.optimizers().param_groups:
        assert group["lr"] == pytest.approx(1e-6 * group["lr_scale"])


def test_imagenet_folders_with_different_classes_are_refused(tmp_path):
    write_image_folder(tmp_path / "train", CLASSES, per_class=1)
    write_image_folder(tmp_path / "val", dict(list(CLASSES.items())[:2]), per_class=1)
    with pytest.raises(ValueError, match="different classes .*n01484850"):
        ClassificationDataModule(
            partial(ImageFolder, tmp_path / "train"),
            partial(ImageFolder, tmp_path / "val"),
            image_size=32,
        )


def test_mae_transforms():
    dm = ClassificationDataModule(
        partial(ShapesClasses, size=4), partial(ShapesClasses, size=4), image_size=224
    )
    names = [type(t).__name__ for t in dm.train_transform.transforms]
    assert names == [
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "RandAugment",
        "MaybeToTensor",
        "Normalize",
        "RandomErasing",
    ]
    erase = dm.train_transform.transforms[-1]
    assert erase.probability == 0.25 and erase.mode == "pixel"
    resize, crop = dm.eval_transform.transforms[:2]
    assert resize.size == 256 and crop.size == (224, 224)  # MAE: 224 / (224 / 256)


def test_shapes_labels_match_the_rendered_scene():
    train = ShapesClasses("train", size=80, image_size=64, seed=0)
    val = ShapesClasses("val", size=80, image_size=64, seed=0)
    assert len(train.classes) == 40 and train.targets == [i % 40 for i in range(80)]
    for i in range(0, 80, 7):
        scene, label = train.sample(i)
        (obj,) = scene.objects
        assert ALL_COMBOS[label] == (obj.colour, obj.shape) == tuple(train.classes[label].split())
        image, item_label = train[i]
        assert item_label == label and image.tobytes() == render(scene, 64).tobytes()
        # the object's colour is at its centre, within the generator's jitter (+1 for rounding)
        centre = np.asarray(image)[int(obj.y * 64), int(obj.x * 64)]
        assert np.abs(centre.astype(int) - COLOURS[obj.colour]).max() <= COLOUR_JITTER + 1
    # validation images come from another seed stream: no scene is shared
    assert not {train.sample(i)[0] for i in range(80)} & {val.sample(i)[0] for i in range(80)}


# ----------------------------------------------------------------------------------------
# EMA


def shapes_data(batch_size=8, size=16):
    return ClassificationDataModule(
        partial(ShapesClasses, split="train", size=size, image_size=32),
        partial(ShapesClasses, split="val", size=size, image_size=32),
        image_size=32,
        batch_size=batch_size,
        augment={"auto_augment": None, "color_jitter": None},
        eval_crop_pct=1.0,
    )


class LiveWeights(L.Callback):
    """The live head weight after each optimiser step (callbacks run before the module's
    on_train_batch_end, i.e. before the EMA update)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, *args):
        self.seen.append(module.model.head.weight.detach().clone())


@pytest.mark.parametrize("ema", [True, False])
def test_ema_weights_and_validation_keys(checkpoint, ema):
    data = shapes_data()
    module = FinetuneModule(
        tiny_model_config(),
        **data.task_args,
        epochs=1,
        base_lr=0.5,
        global_batch=8,
        warmup_epochs=0,
        ema=ema,
        ema_decay=0.9,
    )
    module.load_pretrained(model_state(load_checkpoint(checkpoint)), "test")
    if ema:  # the average starts at the pre-trained weights, not the random init
        state = model_state(load_checkpoint(checkpoint))
        assert torch.equal(
            module.ema.module.visual.blocks[0].mlp.fc1.weight,
            state["visual.blocks.0.mlp.fc1.weight"],
        )
    live = LiveWeights()
    run = trainer(max_epochs=1, callbacks=[live])
    run.fit(module, datamodule=data)
    metrics = run.validate(module, datamodule=data, verbose=False)[0]
    assert len(live.seen) == 2
    assert {"val/top1", "val/top5", "val/loss", "val/baseline_majority"} <= set(metrics)
    assert ({"val/ema_top1", "val/ema_top5"} <= set(metrics)) == ema
    if ema:
        # timm ModelEmaV3: step 1 copies (decay 0), step 2 averages with decay 0.9
        w1, w2 = live.seen
        expected = 0.9 * w1 + 0.1 * w2
        assert torch.allclose(module.ema.module.head.weight, expected, atol=1e-7)
        assert not torch.allclose(module.ema.module.head.weight, module.model.head.weight)
        assert "EMA top-1" in module.summary(metrics)


# ----------------------------------------------------------------------------------------
# the run and the full-scale configs


@pytest.mark.slow
def test_train_py_finetune_prints_the_summary_line(checkpoint, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "task=finetune",
            f"init_from={checkpoint}",
            "data.train.size=32",
            "data.val.size=40",
            "data.num_workers=0",
            "batch.global=16",
            "task.epochs=1",
            *QUIET,
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=CONF.parent,
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"fine-tune top-1: \d+\.\d% \(top-5 \d+\.\d%\); trivial baseline: most "
        r"frequent class 2\.5%, chance 2\.5%",
        line,
    ), line
    record = json.loads((tmp_path / "result.json").read_text())
    assert f"{100 * record['metrics']['val/top1']:.1f}%" in line
    assert record["config"]["data"]["image_size"] == 32  # from the checkpoint
    # the fine-tuned checkpoint rebuilds its module from its own hyper-parameters
    tuned = FinetuneModule.load_from_checkpoint(
        tmp_path / "checkpoints" / "last.ckpt", weights_only=False
    )
    assert tuned.hparams.num_classes == 40 and tuned.model.visual.width == 32


EXPECTED = {  # facebookresearch/mae FINETUNE.md: epochs, blr, layer_decay, drop_path
    "vit_b16": (100, 5e-4, 0.65, 0.1),
    "vit_l16": (50, 1e-3, 0.75, 0.2),
    "vit_l14": (50, 1e-3, 0.75, 0.2),
    "vit_h14": (50, 1e-3, 0.75, 0.3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_table3_configs_compose_with_maes_values(name):
    cfg = compose_train(
        f"experiment=table3_{name}",
        "init_from=/ckpt/last.ckpt",
        "data.train.root=/in/train",
        "data.val.root=/in/val",
    )
    task = cfg.task
    assert (task.epochs, task.base_lr, task.layer_decay, task.drop_path) == EXPECTED[name]
    assert task._target_ == "flip.tasks.finetune.FinetuneModule"
    assert cfg.batch["global"] == 1024 and task.global_batch == 1024
    assert (task.weight_decay, task.warmup_epochs, task.min_lr) == (0.05, 5, 1e-6)
    assert (task.mixup, task.cutmix, task.smoothing, task.head_init_std) == (0.8, 1.0, 0.1, 2e-5)
    assert list(task.betas) == [0.9, 0.999] and not task.ema and task.eval_every == 1
    assert cfg.data._target_ == "flip.data.classification.ClassificationDataModule"
    assert cfg.data.train._target_ == "torchvision.datasets.ImageFolder"
    assert cfg.data.augment is None and cfg.data.image_size == 224
    assert cfg.group == "table3" and name in cfg.tags
