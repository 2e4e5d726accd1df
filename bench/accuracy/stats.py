"""Intervals and paired tests for accuracies of 0/1 outcomes.

* :func:`wilson_interval`: 95% score interval of one accuracy (one run).
* :func:`bootstrap_mean_interval`: percentile bootstrap over problems of a mean of
  per-problem values (e.g. the accuracy averaged over seeds, which keeps problems,
  not runs, as the unit of sampling).
* :func:`paired_bootstrap_difference`: the same for per-problem differences between
  two settings on the same problems (same seeds).
* :func:`mcnemar_exact`: exact two-sided McNemar test on two paired 0/1 vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for ``correct / total``; ``(0, 1)`` when ``total == 0``."""
    if total <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= total:
        raise ValueError(f"correct must be in [0, {total}], got {correct}")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean_interval(
    values: Sequence[float], *, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``mean(values)``, resampling entries."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.size, size=(resamples, data.size))
    means = data[idx].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def paired_bootstrap_difference(
    treatment: Sequence[float],
    baseline: Sequence[float],
    *,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean difference, 95% low, 95% high) of ``treatment - baseline`` per problem."""
    a = np.asarray(treatment, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in shape: {a.shape} vs {b.shape}")
    diff = a - b
    low, high = bootstrap_mean_interval(diff, resamples=resamples, seed=seed)
    return float(diff.mean()) if diff.size else math.nan, low, high


def mcnemar_exact(
    treatment: Sequence[int], baseline: Sequence[int]
) -> tuple[int, int, float]:
    """Exact McNemar test: (only treatment right, only baseline right, p-value).

    Under the null hypothesis each discordant pair is a fair coin; the two-sided
    p-value is ``min(1, 2 * P(Binomial(n, 1/2) <= min(b, c)))``.
    """
    if len(treatment) != len(baseline):
        raise ValueError(
            f"paired vectors differ in length: {len(treatment)} vs {len(baseline)}"
        )
    only_treatment = sum(
        1 for t, b in zip(treatment, baseline, strict=True) if t and not b
    )
    only_baseline = sum(
        1 for t, b in zip(treatment, baseline, strict=True) if b and not t
    )
    n = only_treatment + only_baseline
    if n == 0:
        return 0, 0, 1.0
    k = min(only_treatment, only_baseline)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return only_treatment, only_baseline, min(1.0, 2 * tail)
