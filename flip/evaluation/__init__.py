"""Evaluation suite: dataset readers (``readers``, ``datasets``), metrics (``metrics``),
class names and templates (``metadata``, data files in ``metadata/``), the eval config
groups (``conf/``: ``eval_task``, ``eval_data``), fixture writers (``testing``) and the
periodic zero-shot callback (``callback``). The LightningModules live in ``flip.tasks``;
``flip.evaluate.evaluate`` / ``eval.py`` run them."""
