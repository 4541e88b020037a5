"""Spread of a figure measured across independent repeats (build seeds, machines).

Why here and not scipy: scipy is not one of icr's dependencies, and the one quantity needed, a
two-sided Student-t quantile for a handful of degrees of freedom, is a short table.
"""

from __future__ import annotations

import math

# Two-sided 95% Student-t quantiles t_{0.975, df} (any statistics table, to 3 decimals).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """t_{0.975, df}; between table rows the next smaller df (a wider interval), 1.96 past 30."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


def spread(values: list[float], lower: float | None = None, upper: float | None = None) -> dict:
    """Mean, sample standard deviation, min, max of `values` (n >= 2), and the 95% prediction
    interval for one more repeat, mean ± t_{0.975,n-1} · sd · sqrt(1 + 1/n) (normal repeats),
    clipped to [lower, upper] when given (a share cannot leave [0, 1])."""
    n = len(values)
    if n < 2:
        raise ValueError(f"a spread needs at least 2 values, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd * math.sqrt(1 + 1 / n)
    lo, hi = mean - half, mean + half
    if lower is not None:
        lo = max(lo, lower)
    if upper is not None:
        hi = min(hi, upper)
    return {"n": n, "mean": mean, "sd": sd, "min": min(values), "max": max(values),
            "prediction_95": [lo, hi]}
