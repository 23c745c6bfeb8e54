"""Moved to :mod:`flip.eval.zeroshot`; this re-export goes once ``flip.tasks.pretrain`` and
``flip.train`` import from there."""
from flip.eval.zeroshot import build_zero_shot_classifier, format_zero_shot  # noqa: F401
