"""Reward-judge agreement is computed in one place (`icr.diagnostics.pair_agreement`): the loop's
diagnostics and both sandbox premises (pairs of pi_SFT samples, pairs of pi0's own samples) go
through it, with the numbers each computed before."""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict

import pytest

from icr.diagnostics import agreement, pair_agreement, reward_agreement
from icr.runs import write_json
from icr.sandbox import build
from icr.sandbox.world import LANGUAGES, QUALITIES, build_world, render_response


def test_pair_agreement_rules():
    ids = ["a", "a", "a", "b", "b"]
    responses = ["x", "y", "x", "p", "q"]
    rewards = [1.0, 0.0, 2.0, 5.0, 5.0]
    scores = [1.0, 0.5, 0.2, 0.3, 0.1]
    kind = lambda ra, rb, pid: f"{pid}-kind"  # noqa: E731
    got = pair_agreement(ids, responses, rewards, scores, kind)
    # a: (x, y) agrees, (x, x) identical answers skipped, (y, x) reversed; b: reward tie = 0.5
    assert got == {"all": [1.0, 0.0, 0.5], "a-kind": [1.0, 0.0], "b-kind": [0.5]}
    assert pair_agreement(ids, responses, rewards, [0.0] * 5) == {"all": []}  # judge ties: no pair
    # the cap counts a prompt's pairs before ties are dropped
    assert pair_agreement(ids, responses, rewards, scores, max_pairs_per_prompt=2)["all"] == [1.0, 0.5]
    assert agreement(1, 1, 0, 1) == 0.5 and agreement(2, 1, 1, 0) == 1.0 and agreement(2, 1, 0, 1) == 0.0


def _old_premise_agreement(oracle, rows, rewards, lang):
    """The premises' own loop before it went through pair_agreement (build.measure_premise, gemma)."""
    ys = [y for _, y in rows]
    by_id = defaultdict(list)
    for j, (t, _) in enumerate(rows):
        by_id[t.id].append(j)
    acc, kinds = [], defaultdict(list)
    for tid, js in by_id.items():
        for a, b in itertools.combinations(js, 2):
            sa, sb = oracle.score_text(ys[a], tid, lang), oracle.score_text(ys[b], tid, lang)
            if sa == sb:
                continue
            r_a, r_b = rewards[a], rewards[b]
            acc.append(0.5 if r_a == r_b else 1.0 if (r_a > r_b) == (sa > sb) else 0.0)
            kinds[oracle.pair_kind(ys[a], ys[b], tid, lang)].append(acc[-1])
    return acc, dict(kinds)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_premise_agreement_is_the_old_loop(tmp_path, seed):
    from icr.sandbox.oracle import OracleJudge

    world = build_world(seed, 4, 12, 4, 4, 4)
    write_json(tmp_path / "world.json", world.to_json())
    oracle = OracleJudge(tmp_path)
    rng = random.Random(seed)
    for lang in LANGUAGES:
        rows = [(t, y) for t in world.split("dev")
                for y in dict.fromkeys(render_response(t, lang, rng.choice(QUALITIES), rng) for _ in range(5))]
        rewards = [rng.choice([0.0, 1.0, -1.0, rng.gauss(0, 1)]) for _ in rows]
        got = build.oracle_agreement(oracle, rows, rewards, lang)
        acc, kinds = _old_premise_agreement(oracle, rows, rewards, lang)
        assert got.pop("all") == acc and got == kinds
        assert build.oracle_agreement(oracle, rows, rewards, lang, kinds=False) == {"all": acc}


def test_reward_agreement_is_unchanged():
    """The loop's diagnostics on a fixed case, numbers as computed before pair_agreement existed."""
    class Judge:
        def score(self, items):
            return [{"good": 1.0, "ok": 0.5, "bad": 0.0, "bad2": 0.0}[it.output] for it in items]

        def pair_kind(self, a, b, pid, lang):
            return "quality" if "bad" in (a + b) else "other"

    scored = [{"id": i, "lang": lang, "prompt": "p", "response": y, "reward": r}
              for i, lang, y, r in [("1", "en", "good", 2.0), ("1", "en", "ok", 1.0), ("1", "en", "bad", 1.5),
                                    ("1", "en", "bad2", float("nan")), ("2", "en", "good", 0.0),
                                    ("2", "en", "bad", 0.0), ("1", "es", "ok", 1.0), ("1", "es", "good", 3.0),
                                    ("1", "sw", "good", 1.0), ("1", "sw", "good", 2.0)]]
    got = reward_agreement(scored, Judge())
    assert json.dumps(got, sort_keys=True) == (
        '{"en": {"all": {"agree": 0.625, "n": 4}, "other": {"agree": 1.0, "n": 1}, '
        '"quality": {"agree": 0.5, "n": 3}}, "es": {"all": {"agree": 1.0, "n": 1}, '
        '"other": {"agree": 1.0, "n": 1}}}')
    assert reward_agreement(scored, Judge(), max_pairs_per_prompt=1)["en"]["all"] == {"agree": 0.75, "n": 2}
