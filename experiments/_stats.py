"""Small statistics for the studies: mean and standard deviation over seeds, and paired 95% intervals.

No scipy: the two-sided 95% Student t quantiles for 1-30 degrees of freedom are the standard
table's values (beyond 30, the normal 1.96, which is within 4% of t there).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 values), got df={df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None)


def paired_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``a[i] - b[i]`` (pairs share a seed) and its 95% t interval (low, high)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_interval needs two equally long lists of at least 2 values, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = mean_sd(diffs)
    half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    """What an interval of (variant - reference) says: better, worse, or no evidence of a difference."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no evidence"
