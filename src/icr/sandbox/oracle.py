"""The sandbox's ground-truth judge: scores any answer to any world task from the text alone.

The oracle reads the world's ground truth (`world.json`, keyed by prompt id) and parses an answer
with the world's grammar `<TAG>: [... ]*<NUMBER>.` (see `world.py`). It never looks at a model.
Its weights were fixed when the world was designed, before any model was trained, and are not to
be tuned toward a result.

Score (in [0, 1]):

- 0 if the answer is not well-formed (does not match the grammar: loops, stutters, filler runs,
  empty or unfinished answers, more than MAX_FILLER fillers, unknown tag, stray text);
- otherwise 0.1 (well-formed) + 0.4 (correct number) + 0.3 (tag in the requested language)
  + 0.2 (no filler).

Every combination of qualities gets a distinct score, so the pairwise preference orders any two
answers that differ in a quality, and ties (0.5) only answers equal in every quality. The order of
importance - well-formed, then correct, then in the right language, then concise - is that of a
user: a wrong answer is worse than a right one in the wrong language, which is worse than a right
one with padding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .world import MAX_FILLER, TAGS

WEIGHTS = {"well_formed": 0.1, "correct": 0.4, "language": 0.3, "concise": 0.2}
# pair_kind reports the most important quality in which two answers differ, in this order
KINDS = ("well-formedness", "correctness", "language", "conciseness")
_KIND_FIELD = {"well-formedness": "well_formed", "correctness": "correct", "language": "language",
               "conciseness": "concise"}

_TAG_LANG = {tag: lang for lang, tag in TAGS.items()}
_GRAMMAR = re.compile(r"^(?P<tag>[^\W\d_]+)[ \t]*:[ \t]*(?P<fill>(?:\.\.\.[ \t]+)*)(?P<num>-?\d+)\.$")


@dataclass(frozen=True)
class Verdict:
    well_formed: bool
    correct: bool
    language: bool
    concise: bool
    tag_lang: str | None  # the language of the answer's tag (None when it has no known tag)

    @property
    def score(self) -> float:
        if not self.well_formed:
            return 0.0
        return round(sum(WEIGHTS[k] for k in WEIGHTS if getattr(self, k)), 6)


def parse(text: str) -> tuple[str | None, int, int | None]:
    """(tag language or None, filler count, number or None) of a well-formed answer; None tag and
    number when the text does not match the grammar."""
    m = _GRAMMAR.match(text.strip())
    if not m or m.group("tag") not in _TAG_LANG:
        return None, 0, None
    return _TAG_LANG[m.group("tag")], m.group("fill").count("..."), int(m.group("num"))


def judge_text(text: str, answer: int, lang: str) -> Verdict:
    """The verdict on one answer, given the true number and the language the user asked in."""
    tag_lang, n_fill, number = parse(text)
    if tag_lang is None or n_fill > MAX_FILLER:
        # Not an answer. Still report the tag's language when the text starts with a known tag,
        # for diagnostics; the score is 0 regardless.
        head = re.match(r"\s*([^\W\d_]+)", text or "")
        return Verdict(False, False, False, False, _TAG_LANG.get(head.group(1)) if head else None)
    return Verdict(True, number == answer, tag_lang == lang, n_fill == 0, tag_lang)


class OracleJudge:
    """Ground-truth judge over a world folder (`world_dir/world.json`).

    Items are anything with attributes `id, lang, instruction, output, reference` (for example
    `icr.evaluation.judges.JudgeItem`). The id names the task; `lang` is the language the answer
    should be in (for the cross-lingual reward's prefixed English instruction, the target language).
    """

    name = "oracle"
    scores_single_answers = True

    def __init__(self, world_dir: str | Path):
        path = Path(world_dir)
        path = path / "world.json" if path.is_dir() else path
        data = json.loads(path.read_text(encoding="utf-8"))
        self.answers: dict[str, int] = {tid: int(t["answer"]) for tid, t in data["tasks"].items()}

    def _answer(self, task_id: str) -> int:
        try:
            return self.answers[task_id]
        except KeyError:
            raise KeyError(f"oracle: prompt id {task_id!r} is not in this world") from None

    def verdict(self, output: str, task_id: str, lang: str) -> Verdict:
        return judge_text(output, self._answer(task_id), lang)

    def score_text(self, output: str, task_id: str, lang: str) -> float:
        return self.verdict(output, task_id, lang).score

    def score(self, items) -> list[float]:
        """Quality in [0, 1] of each item's `output`."""
        return [self.score_text(it.output, it.id, it.lang) for it in items]

    def compare(self, items) -> list[float]:
        """Preference of each item's `output` over its `reference`: 1, 0 or 0.5 for a tie."""
        out = []
        for it in items:
            a = self.score_text(it.output, it.id, it.lang)
            b = self.score_text(it.reference, it.id, it.lang)
            out.append(1.0 if a > b else 0.0 if a < b else 0.5)
        return out

    def pair_kind(self, output_a: str, output_b: str, id: str, lang: str) -> str:
        """The most important quality in which two answers differ (`well-formedness`,
        `correctness`, `language`, `conciseness`), or `same` when they agree in every quality."""
        va, vb = self.verdict(output_a, id, lang), self.verdict(output_b, id, lang)
        if not va.well_formed and not vb.well_formed:
            return "same"  # both degenerate: the oracle sees no difference (both score 0)
        for kind in KINDS:
            if getattr(va, _KIND_FIELD[kind]) != getattr(vb, _KIND_FIELD[kind]):
                return kind
        return "same"
