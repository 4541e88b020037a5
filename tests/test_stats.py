"""icr.stats' clustered intervals against hand-computed cases (issue 21: languages share prompts, so
prompts, not answers, are the independent units)."""

from __future__ import annotations

import math

import pytest

from icr.stats import cluster_bootstrap, clustered_mean


def test_clustered_standard_error_by_hand():
    # prompts a, b, c with answers (1, 0), (1, 1), (0, 0): mean 0.5; residual sums per prompt 0, +1, -1;
    # SE² = 3/2 · (0 + 1 + 1) / 6² = 1/12; t_{0.975,2} = 4.303
    r = clustered_mean([1, 0, 1, 1, 0, 0], ["a", "a", "b", "b", "c", "c"])
    assert r["mean"] == 0.5 and r["clusters"] == 3
    assert r["se"] == pytest.approx(math.sqrt(1 / 12))
    assert r["ci_95"] == pytest.approx([0.5 - 4.303 * math.sqrt(1 / 12), 0.5 + 4.303 * math.sqrt(1 / 12)])
    # the same six answers as six independent prompts: a smaller SE (sqrt(6/5 · 6·0.25) / 6 = 0.2236)
    assert clustered_mean([1, 0, 1, 1, 0, 0], list("uvwxyz"))["se"] == pytest.approx(math.sqrt(6 / 5 * 1.5) / 6)
    with pytest.raises(ValueError):
        clustered_mean([1, 0], ["a", "a"])


def test_cluster_bootstrap_resamples_whole_prompts():
    # two prompts of two answers each, means 1 and 0: every resample is AA (1), AB or BA (0.5) or BB (0),
    # with probabilities 1/4, 1/2, 1/4; answers of one prompt never split
    r = cluster_bootstrap([1, 1, 0, 0], ["a", "a", "b", "b"], n_boot=4000, seed=3)
    counts = {v: r["draws"].count(v) / 4000 for v in (0.0, 0.5, 1.0)}
    assert set(r["draws"]) == {0.0, 0.5, 1.0}
    assert counts[0.5] == pytest.approx(0.5, abs=0.03) and counts[1.0] == pytest.approx(0.25, abs=0.03)
    assert r["ci_95"] == [0.0, 1.0] and r["estimate"] == 0.5
    assert cluster_bootstrap([1, 1, 0, 0], ["a", "a", "b", "b"], n_boot=200, seed=3)["ci_95"] == \
        cluster_bootstrap([1, 1, 0, 0], ["a", "a", "b", "b"], n_boot=200, seed=3)["ci_95"]  # seeded


def test_stratified_bootstrap_resamples_within_each_seed():
    # seed 1: prompts a (1) and b (0); seed 2: prompts c and d, both 1. Within seed 2 every resample is
    # (1, 1); within seed 1 it is 1, 0.5 or 0 with probabilities 1/4, 1/2, 1/4; so the pooled mean of 4
    # values is (2 + 2·m1)/4 ∈ {1, 0.75, 0.5}: never 0.25 or 0, which unstratified draws would give
    # (e.g. b, b, b, a); and a cluster may not straddle two strata.
    vals, clus, strata = [1, 0, 1, 1], ["a", "b", "c", "d"], [1, 1, 2, 2]
    r = cluster_bootstrap(vals, clus, n_boot=4000, seed=5, strata=strata)
    assert set(r["draws"]) == {0.5, 0.75, 1.0}
    assert r["draws"].count(0.75) / 4000 == pytest.approx(0.5, abs=0.03)
    assert r["ci_95"] == [0.5, 1.0] and r["estimate"] == 0.75
    assert min(cluster_bootstrap(vals, clus, n_boot=4000, seed=5)["draws"]) < 0.5
    with pytest.raises(ValueError, match="two strata"):
        cluster_bootstrap([1, 0], ["a", "a"], strata=[1, 2])
