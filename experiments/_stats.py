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


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        raise ValueError("a correlation needs values that vary in both lists")
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the (tie-averaged) ranks."""
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"spearman needs two equally long lists of at least 3 values, got {len(x)} and {len(y)}")
    return pearson(ranks(x), ranks(y))


def spearman_p(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided exact permutation p-value of rho >= the observed one (all n! orderings; n <= 8)."""
    import itertools

    if len(x) > 8:
        raise ValueError(f"the exact permutation test enumerates n! orderings: n = {len(x)} is over 8")
    rx, ry = ranks(x), ranks(y)
    observed = pearson(rx, ry)
    perms = list(itertools.permutations(ry))
    hits = sum(1 for p in perms if pearson(rx, p) >= observed - 1e-12)
    return hits / len(perms)
