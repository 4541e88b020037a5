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


def reward_agreement(scored: list[dict], judge, max_pairs_per_prompt: int = 45) -> dict:
    """`{lang: {kind: {"agree": share, "n": pairs}}}` with kind "all" always present.

    Pairs tied by the judge are skipped (no preference to agree with); reward ties count as half.
    """
    items = [JudgeItem(id=r["id"], lang=r["lang"], instruction=r["prompt"], output=r["response"]) for r in scored]
    judge_scores = judge.score(items)
    kind_of = getattr(judge, "pair_kind", None)
    if kind_of is None and hasattr(judge, "judge"):  # a CachedJudge wraps the real one
        kind_of = getattr(judge.judge, "pair_kind", None)
    groups = defaultdict(list)
    for rec, s in zip(scored, judge_scores):
        if rec.get("reward") is not None and not math.isnan(rec["reward"]):
            groups[(rec["lang"], rec["id"])].append((rec, s))
    tallies: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (lang, pid), members in sorted(groups.items()):
        for (a, sa), (b, sb) in itertools.islice(itertools.combinations(members, 2), max_pairs_per_prompt):
            if sa == sb or a["response"] == b["response"]:
                continue
            if a["reward"] == b["reward"]:
                hit = 0.5
            else:
                hit = float((a["reward"] > b["reward"]) == (sa > sb))
            tallies[lang]["all"].append(hit)
            if kind_of is not None:
                tallies[lang][kind_of(a["response"], b["response"], pid, lang)].append(hit)
    return {lang: {kind: {"agree": sum(v) / len(v), "n": len(v)} for kind, v in sorted(kinds.items())}
            for lang, kinds in sorted(tallies.items())}
