"""Evaluation of a checkpoint, in one place: ``runner`` (``evaluate(cfg)``, what ``eval.py``
runs) and the LightningModules it runs through ``Trainer.test`` (``zeroshot``: classifier
from prompts and the zero-shot module; ``retrieval``; ``linear_probe``; their base in
``module``; masked inference in ``masked_views``). The datasets are ``flip.data.benchmarks``,
the metrics ``flip.metrics``; the config groups are ``conf/eval_task`` and
``conf/eval_data``."""
