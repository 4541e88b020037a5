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


# ---------------------------------------------------------------------------------------------
# Intervals for figures over prompts that languages share (issue 21): the unit of independence is the
# prompt (its translations are not independent draws), so answers are resampled by prompt.
# ---------------------------------------------------------------------------------------------

def clustered_mean(values: list[float], clusters: list) -> dict:
    """Mean of `values` and its cluster-robust standard error, clusters = the prompt each value
    belongs to: SE² = G/(G-1) · Σ_g (Σ_{i∈g} (x_i − x̄))² / N² (the sandwich estimator with the usual
    small-sample factor); the 95% interval uses t_{0.975, G-1}."""
    if len(values) != len(clusters) or not values:
        raise ValueError("values and clusters: same non-zero length expected")
    n = len(values)
    mean = sum(values) / n
    sums: dict = {}
    for v, c in zip(values, clusters):
        sums[c] = sums.get(c, 0.0) + (v - mean)
    g = len(sums)
    if g < 2:
        raise ValueError("a clustered standard error needs at least 2 clusters")
    se = math.sqrt(g / (g - 1) * sum(s * s for s in sums.values())) / n
    half = t975(g - 1) * se
    return {"mean": mean, "se": se, "clusters": g, "ci_95": [mean - half, mean + half]}


def clustered_mean_of_means(groups: dict) -> dict:
    """The mean over groups (languages) of each group's mean, and its cluster-robust standard error
    when the clusters (prompt ids) cut across the groups: `groups` is {group: {cluster: value}}.

    Why not `clustered_mean`: that weights every value alike, while a report's average over languages
    weights every language alike; the two agree only when each language has the same prompts. Here the
    estimate is linearised: value x of group l moves it by (x − mean_l) / (K · n_l); summed within each
    cluster to s_g, SE² = G/(G−1) · Σ_g s_g² (the same sandwich as `clustered_mean`). When every group has
    every cluster this is the standard error of the per-prompt averages, sd(a_g) / √G. "shared" counts
    the clusters present in more than one group (none: the groups were independent samples after all);
    the 95% interval uses t_{0.975, G-1}."""
    if not groups or any(not values for values in groups.values()):
        raise ValueError("clustered_mean_of_means: at least one group, none empty")
    k = len(groups)
    group_mean = {group: sum(values.values()) / len(values) for group, values in groups.items()}
    mean = sum(group_mean.values()) / k
    sums: dict = {}
    groups_of_cluster: dict = {}
    for group, values in groups.items():
        for cluster, x in values.items():
            sums[cluster] = sums.get(cluster, 0.0) + (x - group_mean[group]) / (k * len(values))
            groups_of_cluster[cluster] = groups_of_cluster.get(cluster, 0) + 1
    g = len(sums)
    if g < 2:
        raise ValueError("a clustered standard error needs at least 2 clusters")
    se = math.sqrt(g / (g - 1) * sum(s * s for s in sums.values()))
    half = t975(g - 1) * se
    return {"mean": mean, "se": se, "clusters": g, "shared": sum(n > 1 for n in groups_of_cluster.values()),
            "ci_95": [mean - half, mean + half]}


def cluster_bootstrap(values: list[float], clusters: list, statistic=None, n_boot: int = 2000,
                      seed: int = 0, strata: list | None = None) -> dict:
    """Percentile 95% interval of `statistic` (default: the mean) over `n_boot` resamples of whole
    clusters with replacement (every value of a drawn prompt, in every language, goes in together).
    With `strata` (one label per value, constant within a cluster, e.g. the build seed), each stratum's
    clusters are resampled within it, as many as it has: independent experiments keep their sizes.
    Seeded: the same inputs give the same interval."""
    import random

    statistic = statistic or (lambda xs: sum(xs) / len(xs))
    strata = strata if strata is not None else [None] * len(values)
    if not (len(values) == len(clusters) == len(strata)) or not values:
        raise ValueError("values, clusters (and strata): same non-zero length expected")
    groups: dict = {}
    stratum_of: dict = {}
    for v, c, s in zip(values, clusters, strata):
        groups.setdefault(c, []).append(v)
        if stratum_of.setdefault(c, s) != s:
            raise ValueError(f"cluster {c!r} lies in two strata ({stratum_of[c]!r}, {s!r})")
    by_stratum: dict = {}
    for c, s in stratum_of.items():
        by_stratum.setdefault(s, []).append(c)
    rng = random.Random(seed)
    draws = []
    for _ in range(n_boot):
        sample = [v for keys in by_stratum.values() for _ in keys for v in groups[keys[rng.randrange(len(keys))]]]
        draws.append(statistic(sample))
    draws.sort()
    lo, hi = draws[int(0.025 * (n_boot - 1))], draws[int(math.ceil(0.975 * (n_boot - 1)))]
    return {"estimate": statistic(values), "ci_95": [lo, hi], "n_boot": n_boot, "draws": draws}
