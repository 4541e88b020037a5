"""bench/transfer_arms.py (issue 21): the arms' figures and paired contrasts from a record, checked on a
hand-made record whose answers are known; and bench/sandbox_premise.py's agreement table."""

from __future__ import annotations

import pytest

from .conftest import load_bench

LANGS = ["en", "es", "de", "fr", "ru", "sw"]


def record(correct: dict[str, str]) -> dict:
    """One seed's eval_verdicts: every arm answers prompts p0..p3 in every language with the given
    correctness bits (the same in every language), in the prompt's language, concise, well-formed."""
    ids = ["p0", "p1", "p2", "p3"]
    return {arm: {lang: {"ids": ids, "win": [float(c) for c in bits], "correct": bits, "language": "1111",
                         "concise": "1111", "well_formed": "1111"} for lang in LANGS}
            for arm, bits in correct.items()}


def test_arms_contrasts_and_oracle_share_by_hand():
    ta = load_bench("transfer_arms")
    rec = record({"sft": "0000", "M0": "1000", "icr": "1110", "icr-filter": "1100", "oracle-pairs": "1111",
                  "random-pairs": "1000"})
    res = ta.analyze({0: rec, 1: rec})
    assert res["arms"]["M0"]["correct"]["non_en"]["mean"] == 0.25
    assert res["arms"]["icr"]["correct"]["es"]["mean"] == 0.75 and res["arms"]["icr"]["correct"]["es"]["n"] == 8
    # icr - random: per prompt 0, 1, 1, 0 -> 0.5; the interval resamples whole prompts of both seeds
    c = res["contrasts"]["icr - random-pairs"]["correct"]["non_en"]
    assert c["mean"] == 0.5 and c["n"] == 40 and c["ci_95"][0] <= 0.5 <= c["ci_95"][1]
    assert res["contrasts"]["icr-filter - icr"]["correct"]["en"]["mean"] == -0.25
    # (icr - random) / (oracle - random) = (2/4) / (3/4)
    assert res["oracle_gain_recovered"]["icr"]["non_en"]["mean"] == pytest.approx(2 / 3, abs=1e-4)
    assert res["oracle_gain_recovered"]["icr-filter"]["en"]["mean"] == pytest.approx(1 / 3, abs=1e-4)
    assert "| icr | 0.75 [" in ta.markdown(res)


def test_inconsistent_records_are_refused():
    ta = load_bench("transfer_arms")
    rec = record({a: "1010" for a in ta.ARMS})
    rec["random-pairs"]["de"]["ids"] = ["p0", "p1", "p2", "p9"]
    with pytest.raises(SystemExit, match="different evaluation prompts"):
        ta.analyze({0: rec})


def test_premise_agreement_table_clusters_by_prompt():
    sp = load_bench("sandbox_premise")
    t = sp.agreement_table({"correctness": [("a", 1.0), ("a", 1.0), ("b", 0.0)], "language": [("a", 0.5)]}, seed=0)
    assert t["correctness"]["agree"] == pytest.approx(0.6667, abs=1e-4)
    assert t["correctness"]["prompts"] == 2 and t["correctness"]["n"] == 3
    # resampling prompts: {a,a} -> 1, {b,b} -> 0, so the interval spans both ends
    assert t["correctness"]["ci_95"] == [0.0, 1.0]
    assert t["language"]["ci_95"] is None  # one prompt: no interval
