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


def test_clustered_mean_of_means_by_hand():
    from icr.stats import clustered_mean_of_means

    # every language has every prompt: the SE of the per-prompt averages (1, 0, 0.5): 0.5 / √3, as clustered_mean
    balanced = clustered_mean_of_means({"en": {"a": 1, "b": 0, "c": 1}, "de": {"a": 1, "b": 0, "c": 0}})
    assert balanced["mean"] == 0.5 and balanced["clusters"] == 3 and balanced["shared"] == 3
    assert balanced["se"] == pytest.approx(0.5 / math.sqrt(3))
    assert balanced["se"] == pytest.approx(clustered_mean([1, 0, 1, 1, 0, 0], list("abcabc"))["se"])
    assert balanced["ci_95"] == pytest.approx([0.5 - 4.303 * 0.5 / math.sqrt(3), 0.5 + 4.303 * 0.5 / math.sqrt(3)])
    # unbalanced: A (a 1, b 0), B (a 1, b 1, c 0); means 1/2, 2/3 -> 7/12. Per value (x - mean_l) / (2 n_l):
    # a: 1/8 + 1/18 = 13/72, b: -1/8 + 1/18 = -5/72, c: -1/9 = -8/72; SE² = 3/2 · (169 + 25 + 64) / 72²
    r = clustered_mean_of_means({"A": {"a": 1, "b": 0}, "B": {"a": 1, "b": 1, "c": 0}})
    assert r["mean"] == pytest.approx(7 / 12) and r["shared"] == 2 and r["clusters"] == 3
    assert r["se"] == pytest.approx(math.sqrt(1.5 * 258) / 72)
    # one language: the plain standard error of its mean (ddof 1)
    single = clustered_mean_of_means({"en": {"a": 1, "b": 0, "c": 1}})
    assert single["se"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3)) and single["shared"] == 0
    with pytest.raises(ValueError):
        clustered_mean_of_means({"en": {}})
