"""Evaluate a pre-trained checkpoint: zero-shot classification, retrieval, robustness,
linear probing, or a suite of them; one results table. Evaluation's part of a run
(``flip.run.evaluate`` prepares the run, builds the Trainer and records the metrics).

``evaluate(cfg, trainer)`` rebuilds the model from the checkpoint alone (its stored model config,
``flip.checkpoint.build_model``; an explicit ``model=`` must agree with it), then runs, for
every dataset of ``cfg.eval_data`` and every protocol that ``cfg.eval_task`` asks for, a
LightningModule (``flip.eval.zeroshot`` / ``retrieval`` / ``linear_probe``) through
``Trainer.test`` with the configured accelerator and devices. Datasets are built by
``_target_`` (``flip.data.benchmarks.datasets``). Results are printed as a markdown table and written
to ``<output_dir>/results.json`` and ``<output_dir>/results.md``. ``mask`` and
``masked_views`` give zero-shot and retrieval masked inference (Table 1d,
``flip.eval.masked_views``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from flip.checkpoint import build_model
from flip.config import check_mask
from flip.data.benchmarks.datasets import class_names, prompt_templates
from flip.data.benchmarks.readers import DatasetNotFound
from flip.errors import ConfigError
from flip.eval.linear_probe import FeatureExtractor, LinearProbe
from flip.eval.masked_views import check_views, num_views
from flip.eval.retrieval import ZeroShotRetrieval
from flip.eval.zeroshot import ZeroShotClassification, format_zero_shot
from flip.tokenizer import Tokenizer

log = logging.getLogger(__name__)

HELDOUT = (
    "heldout"  # the eval_data entry whose zero-shot top-1 is also reported as val/zeroshot_top1
)


def load_model(cfg: DictConfig) -> nn.Module:
    """The checkpoint's model; sets ``cfg.image_size`` to its input size (an explicit
    ``image_size`` must agree with the checkpoint)."""
    override = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None
    model = build_model(cfg.ckpt_path, override)
    size = model.visual.patch_embed.img_size[0]
    if cfg.image_size is not None and cfg.image_size != size:
        raise ConfigError(
            f"image_size={cfg.image_size} contradicts {cfg.ckpt_path}, whose model "
            f"takes image.image_size={size}; drop image_size=…"
        )
    cfg.image_size = size
    return model


def check_masked_inference(cfg: DictConfig, model: nn.Module) -> None:
    """``mask`` in [0, 1), ``masked_views`` known (an ensemble's views must tile the
    patches), and no linear probe asked for with them (its features see every patch)."""
    check_mask(cfg)
    check_views(cfg.masked_views)
    if cfg.masked_views == "ensemble":
        num_views(model.visual.num_patches, cfg.mask)
    if cfg.mask == 0 and cfg.masked_views == "single":
        return
    probed = [
        n for n, e in cfg.eval_data.items() if "linear_probe" in protocols_for(cfg.eval_task, n, e)
    ]
    if probed:
        raise ConfigError(
            f"mask={cfg.mask} masked_views={cfg.masked_views} applies to zero-shot "
            f"and retrieval only, but eval_data.{probed[0]} runs a linear probe, "
            "whose features see every patch; evaluate it without mask=…"
        )


def protocols_for(task: DictConfig, name: str, entry: DictConfig) -> list[str]:
    """The protocols ``eval_task`` runs on dataset ``name``: its own (eval_task=suite), or
    the task's protocol if the dataset's kind is one the task accepts."""
    if task.protocol is None:
        return list(entry.protocols)
    if entry.kind not in task.kinds:
        raise ConfigError(
            f"eval_data.{name} is a {entry.kind} dataset; eval_task={task.name} runs "
            f"{task.protocol} on {' or '.join(task.kinds)} datasets only "
            "(eval_task=suite runs each dataset's own protocols)"
        )
    return [task.protocol]


def build_split(name: str, entry: DictConfig, role: str):
    """``entry.dataset`` instantiated with the arguments of ``entry.splits.<role>``
    (``test``: the evaluated split; ``train``: what a linear probe trains on)."""
    if entry.get("dataset") is None:
        raise ConfigError(
            f"eval_data.{name}.dataset is null: the data config has no held-out "
            "set (data.zeroshot); choose one with one (data=shapes, data=digits) "
            "or other eval_data"
        )
    splits = entry.get("splits") or {}
    if role not in splits:
        raise ConfigError(
            f"eval_data.{name}.splits has no {role!r} split"
            + (" for a linear probe" if role == "train" else "")
        )
    try:
        return hydra.utils.instantiate(entry.dataset, **OmegaConf.to_container(splits[role]))
    except hydra.errors.InstantiationException as err:  # unwrap our one-sentence errors
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def _trainer(cfg: DictConfig, **overrides) -> L.Trainer:
    return hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[], **overrides)


def run_zeroshot(name, entry, model, cfg, trainer, classifiers) -> dict[str, float]:
    """``classifiers`` caches class embeddings by (class names, templates) across datasets
    (ImageNet and its variants share one)."""
    ds = build_split(name, entry, "test")
    classnames = class_names(entry, ds)
    templates = prompt_templates(entry, ds, cfg.zeroshot.imagenet_templates)
    key = (tuple(classnames), tuple(templates))
    pm = entry.get("pm") or {"pm0": 0, "pm10": None}
    module = ZeroShotClassification(
        model,
        ds,
        classnames,
        templates,
        Tokenizer(model.text.context_length),
        getattr(ds, "groups", None),
        pmsets=getattr(ds, "pmsets", None),
        pm_offsets=getattr(ds, "pm_offsets", None),
        pm_names=list(pm),
        pm_ks=list(pm.values()),
        classifier=classifiers.get(key),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        mask=cfg.mask,
        masked_views=cfg.masked_views,
        mask_seed=cfg.seed,
    )
    trainer.test(module, verbose=False)
    classifiers[key] = module.classifier
    return module.results


def run_retrieval(name, entry, model, cfg, trainer, classifiers) -> dict[str, float]:
    module = ZeroShotRetrieval(
        model,
        build_split(name, entry, "test"),
        Tokenizer(model.text.context_length),
        ks=list(cfg.retrieval.ks),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        mask=cfg.mask,
        masked_views=cfg.masked_views,
        mask_seed=cfg.seed,
    )
    trainer.test(module, verbose=False)
    return module.results


def run_linear_probe(name, entry, model, cfg, trainer, classifiers) -> dict[str, float]:
    feats = {}
    for role in ("train", "test"):
        ds = build_split(name, entry, role)
        extractor = FeatureExtractor(
            model, ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers
        )
        trainer.test(extractor, verbose=False)
        feats[role] = (extractor.features, extractor.labels)
    num_classes = len(getattr(ds, "groups", None) or class_names(entry, ds))
    lp = cfg.linear_probe
    module = LinearProbe(
        *feats["train"],
        *feats["test"],
        num_classes,
        epochs=lp.epochs,
        batch_size=lp.batch_size,
        base_lr=lp.base_lr,
        warmup_epochs=lp.warmup_epochs,
        momentum=lp.momentum,
        weight_decay=lp.weight_decay,
    )
    fit = _trainer(
        cfg,
        max_epochs=lp.epochs,
        max_steps=-1,
        val_check_interval=1.0,
        check_val_every_n_epoch=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    fit.fit(module)
    fit.test(module, verbose=False)
    return module.results


RUNNERS = {"zeroshot": run_zeroshot, "retrieval": run_retrieval, "linear_probe": run_linear_probe}


def format_table(rows: list[dict]) -> str:
    lines = [
        "| dataset | protocol | metric | value | other metrics | samples |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("missing"):
            lines.append(
                f"| {r['title']} | {r['protocol']} | {r['metric']} | missing | {r['missing']} | |"
            )
            continue
        m = r["metrics"]
        n = m.get("num_samples", m.get("num_images", 0))
        others = ", ".join(
            f"{k} {100 * v:.2f}"
            for k, v in m.items()
            if k != r["metric"] and not k.startswith("num_")
        )
        lines.append(
            f"| {r['title']} | {r['protocol']} | {r['metric']} | "
            f"{100 * r['value']:.2f} | {others} | {int(n)} |"
        )
    return "\n".join(lines)


def headline(protocol: str, entry: DictConfig, metrics: dict[str, float]) -> str:
    """The reported metric: the entry's ``metric`` (a name, or a list whose first computed
    name wins, e.g. VOC2007's [map_11pt, mean_per_class]); top-1 for linear probes."""
    if protocol == "linear_probe":
        return "top1"
    spec = entry.get("metric") or ("image_to_text_R@1" if protocol == "retrieval" else "top1")
    names = [spec] if isinstance(spec, str) else list(spec)
    return next((n for n in names if n in metrics), names[0])


def evaluate(cfg: DictConfig, trainer: L.Trainer) -> tuple[dict[str, float], list[dict]]:
    """Run ``cfg.eval_task`` on every dataset of ``cfg.eval_data`` with ``trainer``; returns
    flat metrics ``<dataset>/<protocol>/<metric>`` (and ``val/zeroshot_top1`` for the
    held-out set) and the rows of the results table."""
    if not cfg.get("eval_data"):
        raise ConfigError("eval_data is empty: choose datasets, e.g. eval_data=imagenet")
    model = load_model(cfg)
    check_masked_inference(cfg, model)
    rows, flat, classifiers = [], {}, {}
    for name, entry in cfg.eval_data.items():
        for protocol in protocols_for(cfg.eval_task, name, entry):
            if protocol not in RUNNERS:
                raise ConfigError(
                    f"eval_data.{name}: unknown protocol {protocol!r}; use one of {sorted(RUNNERS)}"
                )
            row = {
                "dataset": name,
                "title": entry.get("title", name),
                "protocol": protocol,
                "metric": headline(protocol, entry, {}),
            }
            try:
                metrics = RUNNERS[protocol](name, entry, model, cfg, trainer, classifiers)
            except DatasetNotFound as err:
                if not cfg.skip_missing:
                    raise
                log.warning("skipping %s: %s", name, err)
                rows.append({**row, "missing": str(err).split(";")[0]})
                continue
            row["metric"] = headline(protocol, entry, metrics)
            if row["metric"] not in metrics:
                raise ConfigError(
                    f"eval_data.{name}.metric={row['metric']!r} is not computed for "
                    f"this data; available: {sorted(metrics)}"
                )
            rows.append({**row, "value": metrics[row["metric"]], "metrics": metrics})
            flat.update({f"{name}/{protocol}/{k}": v for k, v in metrics.items()})
    if (top1 := flat.get(f"{HELDOUT}/zeroshot/top1")) is not None:
        flat["val/zeroshot_top1"] = top1
    return flat, rows


def report(cfg: DictConfig, rows: list[dict]) -> None:
    """``<output_dir>/results.json`` and ``results.md``; the table and the held-out line
    printed."""
    write_results(cfg, rows)
    print(format_table(rows))
    heldout = next(
        (
            r
            for r in rows
            if r["dataset"] == HELDOUT and r["protocol"] == "zeroshot" and "value" in r
        ),
        None,
    )
    if heldout is not None:
        print(format_zero_shot(heldout["metrics"]["top1"], int(heldout["metrics"]["num_classes"])))


def write_results(cfg: DictConfig, rows: list[dict]) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "ckpt_path": str(cfg.ckpt_path),
        "eval_task": cfg.eval_task.name,
        "image_size": cfg.image_size,
        "mask": cfg.mask,
        "masked_views": cfg.masked_views,
        "results": rows,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(f"# Evaluation of {cfg.ckpt_path}\n\n{format_table(rows)}\n")
    log.info("results written to %s/results.{json,md}", out)
