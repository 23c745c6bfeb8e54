"""Evaluation, in one place: ``runner`` (``evaluate(cfg)``, what ``eval.py`` runs), the
LightningModules run by ``Trainer.test`` (``zeroshot``: classifier from prompts and the
zero-shot module; ``retrieval``; ``linear_probe``; their base in ``module``), datasets built
by ``_target_`` (``datasets``: CLIP_benchmark's builders; ``readers``: our own), ``metrics``,
class names and templates (``metadata``, data files in ``metadata/``), and the periodic
zero-shot ``callback`` for training runs. The config groups are ``conf/eval_task`` and
``conf/eval_data``."""
