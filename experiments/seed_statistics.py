"""Statistics over seeds for the result tables and the accuracy-vs-compute speed-ups.

- :func:`spread`: mean, sample standard deviation (n - 1) and standard error of the mean.
- :func:`differs`: two rows differ only when their means are more than 2 standard errors
  of the difference apart (sqrt(se_a^2 + se_b^2)).
- :func:`time_to_accuracy`: the first time (CPU s, wall s or FLOPs) at which a validation
  curve reaches a target accuracy, linearly interpolated between the two points around the
  crossing.
- :func:`paired_speedups`: mask-0 time / masked time to mask 0's final accuracy, seed by
  seed, summarised with :func:`spread`.

This is tooling beside the library (``experiments/collect.py`` uses it), not part of ``flip``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def spread(values: Iterable[float]) -> dict[str, float]:
    """``{"mean", "std", "se", "n"}`` of the finite values; std and se are NaN below 2."""
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "se": math.nan, "n": 0}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "std": math.nan, "se": math.nan, "n": 1}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return {"mean": mean, "std": std, "se": std / math.sqrt(n), "n": n}


def differs(a: Iterable[float], b: Iterable[float]) -> bool:
    """True when the means of ``a`` and ``b`` are more than 2 standard errors of their
    difference apart; False when that error is unknown (fewer than 2 values in either)."""
    sa, sb = spread(a), spread(b)
    se = math.sqrt(sa["se"] ** 2 + sb["se"] ** 2)
    return not math.isnan(se) and abs(sa["mean"] - sb["mean"]) > 2 * se


def time_to_accuracy(times: Iterable[float], accs: Iterable[float], target: float) -> float | None:
    """The first time a curve reaches ``target``, linearly interpolated between the two
    validation points around the crossing; None if it never does."""
    pts = list(zip(times, accs))
    for i, (t, a) in enumerate(pts):
        if a >= target:
            if i == 0:
                return t
            (t0, a0) = pts[i - 1]
            return t0 + (target - a0) / (a - a0) * (t - t0)
    return None


def paired_speedups(base: dict, masked: dict) -> dict:
    """Speed-up of a masked row over mask 0, seed by seed.

    ``base``: seed -> (final accuracy, total time) of the mask-0 run; ``masked``: seed ->
    (times, accuracies) of the masked run's validation curve. For each seed present in
    both, the target is that seed's mask-0 final accuracy and the speed-up is the mask-0
    total time over the masked run's interpolated time to reach it. Returns the
    :func:`spread` of the speed-ups and of the times to target, and the seeds that never
    reach the target (they count in neither spread).
    """
    ups, times, missed = [], [], []
    for seed in sorted(set(base) & set(masked)):
        target, total = base[seed]
        t = time_to_accuracy(*masked[seed], target)
        if t is None or t <= 0:
            missed.append(seed)
            continue
        ups.append(total / t)
        times.append(t)
    return {"speedup": spread(ups), "time": spread(times), "missed": missed}
