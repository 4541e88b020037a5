"""Did the reward transfer? Agreement of the implicit reward with a judge, per language and pair kind.

For every prompt, every pair of its sampled responses that the judge tells apart is a test: the
reward agrees when it orders the two as the judge does. Agreement per language is the direct
measure of whether English preferences transfer; per *kind* of pair (when the judge can say which
quality two answers differ in, as the sandbox oracle can: correctness, language, conciseness,
well-formedness) it shows where they do and where they do not. Any judge that scores single
answers works (the sandbox oracle, a reward model); nothing here is sandbox-specific.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

from .evaluation.judges import JudgeItem


def agreement(reward_a: float, reward_b: float, judge_a: float, judge_b: float) -> float:
    """1 when the reward orders two answers as the judge does, 0 when it reverses them, 0.5 when the
    reward ties them (for two answers the judge tells apart)."""
    if reward_a == reward_b:
        return 0.5
    return float((reward_a > reward_b) == (judge_a > judge_b))


def pair_agreement(ids: list[str], responses: list[str], rewards: list[float], judge_scores: list[float],
                   kind_of=None, max_pairs_per_prompt: int | None = None) -> dict[str, list[float]]:
    """Agreement of each pair of answers to the same prompt: `{"all": [hit, ...], kind: [hit, ...]}`.

    Row j is answer `responses[j]` to prompt `ids[j]` with `rewards[j]` and `judge_scores[j]`. The
    pairs of a prompt are its rows' combinations in row order, the first `max_pairs_per_prompt` of
    them (None: all); pairs the judge ties, or of identical answers, are skipped (no preference to
    agree with). `kind_of(response_a, response_b, id)` names the quality a pair differs in; each hit
    is also listed under it. The one place where the reward is checked against a judge: the loop's
    diagnostics (`reward_agreement`) and the sandbox premises use it.
    """
    by_id: dict[str, list[int]] = defaultdict(list)
    for j, pid in enumerate(ids):
        by_id[pid].append(j)
    tallies: dict[str, list[float]] = {"all": []}
    for pid, rows in by_id.items():
        for a, b in itertools.islice(itertools.combinations(rows, 2), max_pairs_per_prompt):
            if judge_scores[a] == judge_scores[b] or responses[a] == responses[b]:
                continue
            hit = agreement(rewards[a], rewards[b], judge_scores[a], judge_scores[b])
            tallies["all"].append(hit)
            if kind_of is not None:
                tallies.setdefault(kind_of(responses[a], responses[b], pid), []).append(hit)
    return tallies


def reward_agreement(scored: list[dict], judge, max_pairs_per_prompt: int = 45) -> dict:
    """`{lang: {kind: {"agree": share, "n": pairs}}}` with kind "all" always present.

    Pairs tied by the judge are skipped (no preference to agree with); reward ties count as half.
    """
    items = [JudgeItem(id=r["id"], lang=r["lang"], instruction=r["prompt"], output=r["response"]) for r in scored]
    judge_scores = judge.score(items)
    kind_of = getattr(judge, "pair_kind", None)  # declared by the judge (a CachedJudge passes it on)
    by_lang = defaultdict(list)
    for rec, s in zip(scored, judge_scores):
        if rec.get("reward") is not None and not math.isnan(rec["reward"]):
            by_lang[rec["lang"]].append((rec, s))
    out = {}
    for lang, members in sorted(by_lang.items()):
        members.sort(key=lambda m: m[0]["id"])  # stable: a prompt's answers keep their order
        tallies = pair_agreement([r["id"] for r, _ in members], [r["response"] for r, _ in members],
                                 [r["reward"] for r, _ in members], [s for _, s in members],
                                 None if kind_of is None else lambda a, b, pid, lang=lang: kind_of(a, b, pid, lang),
                                 max_pairs_per_prompt)
        if tallies["all"]:
            out[lang] = {kind: {"agree": sum(v) / len(v), "n": len(v)} for kind, v in sorted(tallies.items())}
    return out
