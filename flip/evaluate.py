"""Evaluate a pre-trained checkpoint: zero-shot classification, retrieval, robustness,
linear probing, or a suite of them; one results table.

``evaluate(cfg)`` loads the FLIP weights of ``cfg.ckpt_path`` into
``hydra.utils.instantiate(cfg.model)`` (independent of the training module), then runs,
for every dataset of ``cfg.eval_data`` and every protocol that ``cfg.eval_task`` asks
for, a LightningModule (``flip.tasks.zeroshot`` / ``retrieval`` / ``linear_probe``)
through ``Trainer.test`` with the configured accelerator and devices. Results are
printed as a markdown table and written to ``<output_dir>/results.json`` and
``<output_dir>/results.md``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from flip.config import ConfigError, check_hardware
from flip.data.transforms import eval_transform
from flip.evaluation.common import load_model
from flip.evaluation.datasets import build_eval_set
from flip.evaluation.readers import DatasetNotFound
from flip.tokenizer import Tokenizer
from flip.zeroshot import format_zero_shot

log = logging.getLogger(__name__)

PROTOCOLS = ("zeroshot", "retrieval", "linear_probe")
KINDS = {"zeroshot": ("classification", "video"), "retrieval": ("retrieval",),
         "linear_probe": ("classification",)}
DEFAULT_SUITE = {"classification": ["zeroshot"], "video": ["zeroshot"], "retrieval": ["retrieval"]}
HELDOUT = "heldout"  # the eval_data entry whose zero-shot top-1 is also reported as val/zeroshot_top1


def protocols_for(task: DictConfig, name: str, entry: DictConfig) -> list[str]:
    """The protocols ``eval_task`` runs on dataset ``name``."""
    if task.protocol == "suite":
        return list(entry.get("suite") or DEFAULT_SUITE[entry.kind])
    if task.protocol not in PROTOCOLS:
        raise ConfigError(f"eval_task.protocol={task.protocol!r}: use one of {PROTOCOLS + ('suite',)}")
    if entry.kind not in KINDS[task.protocol]:
        raise ConfigError(
            f"eval_data.{name} is a {entry.kind} dataset; eval_task={task.name} runs "
            f"{task.protocol} on {' or '.join(KINDS[task.protocol])} datasets only "
            "(eval_task=suite runs each dataset's own protocols)")
    return [task.protocol]


def _trainer(cfg: DictConfig, **overrides) -> L.Trainer:
    return hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[], **overrides)


def run_protocol(protocol: str, name: str, entry: DictConfig, model, cfg: DictConfig,
                 trainer: L.Trainer, classifiers: dict | None = None) -> dict[str, float]:
    """Run one protocol on one dataset; ``classifiers`` caches zero-shot class embeddings
    by (class names, templates) across datasets (the ImageNet variants share one)."""
    from flip.tasks.linear_probe import FeatureExtractor, LinearProbe
    from flip.tasks.retrieval import ZeroShotRetrieval
    from flip.tasks.zeroshot import ZeroShotClassification

    transform = eval_transform(cfg.image_size)
    tokenizer = Tokenizer(cfg.model.text.context_length)
    loader = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers}
    if protocol == "zeroshot":
        es = build_eval_set(name, entry, entry.split, transform, cfg)
        pm = entry.get("pm") or {"pm0": 0, "pm10": None}
        key = (tuple(es.classnames), tuple(es.templates))
        cache = classifiers if classifiers is not None else {}
        module = ZeroShotClassification(
            model, es.dataset, es.classnames, es.templates, tokenizer, es.groups,
            pm_names=list(pm), pm_ks=list(pm.values()), classifier=cache.get(key),
            **es.extra, **loader)
        trainer.test(module, verbose=False)
        cache[key] = module.classifier
        return module.results
    elif protocol == "retrieval":
        es = build_eval_set(name, entry, entry.split, transform, cfg)
        module = ZeroShotRetrieval(model, es.dataset, tokenizer, ks=list(cfg.retrieval.ks), **loader)
    elif protocol == "linear_probe":
        if not entry.get("train_split"):
            raise ConfigError(f"eval_data.{name} has no train_split for a linear probe")
        sets = {s: build_eval_set(name, entry, getattr(entry, s), transform, cfg)
                for s in ("train_split", "split")}
        feats = {}
        for s, es in sets.items():
            extractor = FeatureExtractor(model, es.dataset, **loader)
            trainer.test(extractor, verbose=False)
            feats[s] = (extractor.features, extractor.labels)
        num_classes = len(sets["split"].groups or sets["split"].classnames)
        lp = cfg.linear_probe
        module = LinearProbe(*feats["train_split"], *feats["split"], num_classes,
                             epochs=lp.epochs, batch_size=lp.batch_size, base_lr=lp.base_lr,
                             warmup_epochs=lp.warmup_epochs, momentum=lp.momentum,
                             weight_decay=lp.weight_decay)
        fit = _trainer(cfg, max_epochs=lp.epochs, max_steps=-1, val_check_interval=1.0,
                       check_val_every_n_epoch=1, limit_val_batches=0, num_sanity_val_steps=0,
                       enable_checkpointing=False, enable_model_summary=False,
                       use_distributed_sampler=False)
        fit.fit(module)
        fit.test(module, verbose=False)
        return module.results
    else:
        raise ConfigError(f"unknown protocol {protocol!r}")
    trainer.test(module, verbose=False)
    return module.results


def format_table(rows: list[dict]) -> str:
    lines = ["| dataset | protocol | metric | value | other metrics | samples |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['title']} | {r['protocol']} | {r['metric']} | missing | "
                         f"{r['missing']} | |")
            continue
        m = r["metrics"]
        n = m.get("num_samples", m.get("num_images", 0))
        others = ", ".join(f"{k} {100 * v:.2f}" for k, v in m.items()
                           if k != r["metric"] and not k.startswith("num_"))
        lines.append(f"| {r['title']} | {r['protocol']} | {r['metric']} | "
                     f"{100 * r['value']:.2f} | {others} | {int(n)} |")
    return "\n".join(lines)


def headline(protocol: str, entry: DictConfig, metrics: dict[str, float]) -> str:
    """The reported metric: the entry's ``metric`` (a name, or a list whose first computed
    name wins, e.g. VOC2007's [map_11pt, mean_per_class]); top-1 for linear probes."""
    if protocol == "linear_probe":
        return "top1"
    spec = entry.get("metric") or ("image_to_text_R@1" if protocol == "retrieval" else "top1")
    names = [spec] if isinstance(spec, str) else list(spec)
    return next((n for n in names if n in metrics), names[0])


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run ``cfg.eval_task`` on every dataset of ``cfg.eval_data``; returns flat metrics
    ``<dataset>/<protocol>/<metric>`` (and ``val/zeroshot_top1`` for the held-out set)."""
    check_hardware(cfg.trainer.accelerator)
    L.seed_everything(cfg.seed, workers=True)
    if not cfg.get("eval_data"):
        raise ConfigError("eval_data is empty: choose datasets, e.g. eval_data=imagenet")
    model = load_model(cfg.model, cfg.ckpt_path)
    trainer = _trainer(cfg, use_distributed_sampler=False)
    rows, flat, classifiers = [], {}, {}
    for name, entry in cfg.eval_data.items():
        for protocol in protocols_for(cfg.eval_task, name, entry):
            row = {"dataset": name, "title": entry.get("title", name), "protocol": protocol,
                   "metric": headline(protocol, entry, {})}
            try:
                metrics = run_protocol(protocol, name, entry, model, cfg, trainer, classifiers)
            except DatasetNotFound as err:
                if not cfg.skip_missing:
                    raise
                log.warning("skipping %s: %s", name, err)
                rows.append({**row, "missing": str(err).split(";")[0]})
                continue
            row["metric"] = headline(protocol, entry, metrics)
            if row["metric"] not in metrics:
                raise ConfigError(f"eval_data.{name}.metric={row['metric']!r} is not computed for "
                                  f"this data; available: {sorted(metrics)}")
            rows.append({**row, "value": metrics[row["metric"]], "metrics": metrics})
            flat.update({f"{name}/{protocol}/{k}": v for k, v in metrics.items()})
    if (top1 := flat.get(f"{HELDOUT}/zeroshot/top1")) is not None:
        flat["val/zeroshot_top1"] = top1
    if trainer.is_global_zero:
        write_results(cfg, rows)
        log_results(cfg, flat)
        print(format_table(rows))
        heldout = next((r for r in rows if r["dataset"] == HELDOUT and r["protocol"] == "zeroshot"
                        and "value" in r), None)
        if heldout is not None:
            print(format_zero_shot(heldout["metrics"]["top1"], int(heldout["metrics"]["num_classes"])))
    return flat


def log_results(cfg: DictConfig, flat: dict[str, float]) -> None:
    """Send the final metrics (``<dataset>/<protocol>/<metric>``) to ``cfg.logger``, if any."""
    if not cfg.get("logger"):
        return
    logger = hydra.utils.instantiate(cfg.logger)
    logger.log_hyperparams({"ckpt_path": str(cfg.ckpt_path), "eval_task": cfg.eval_task.name,
                            "eval_data": list(cfg.eval_data)})
    logger.log_metrics({f"eval/{k}": v for k, v in flat.items()}, step=0)
    logger.finalize("success")


def write_results(cfg: DictConfig, rows: list[dict]) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"ckpt_path": str(cfg.ckpt_path), "eval_task": cfg.eval_task.name,
              "model": OmegaConf.to_container(cfg.model, resolve=True), "results": rows}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text(
        f"# Evaluation of {cfg.ckpt_path}\n\n{format_table(rows)}\n")
    log.info("results written to %s/results.{json,md}", out)
