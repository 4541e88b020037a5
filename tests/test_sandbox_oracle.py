"""The sandbox oracle on hand-written answers in every language."""

import json
from dataclasses import dataclass

import pytest

from icr.sandbox.oracle import OracleJudge, judge_text, parse
from icr.sandbox.world import LANGUAGES, TAGS, build_world


@dataclass(frozen=True)
class Item:
    id: str
    lang: str
    instruction: str
    output: str
    reference: str


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    world = build_world(seed=3, n_eval=10, n_dev=5, n_train=5, n_pref=5, n_sft=5)
    (d / "world.json").write_text(json.dumps(world.to_json(), ensure_ascii=False))
    return d, world


# Hand-written: the task "What is 3 + 4?" has answer 7.
HAND = {
    "en": ("Answer: 7.", "Answer: 8.", "Respuesta: 7.", "Answer: ... 7.", "Answer: 7 7 7 7 7 7"),
    "es": ("Respuesta: 7.", "Respuesta: 6.", "Answer: 7.", "Respuesta: ... ... 7.", "Respuesta:"),
    "de": ("Antwort: 7.", "Antwort: 9.", "Answer: 7.", "Antwort: ... 7.", "Antwort: Antwort: Antwort:"),
    "fr": ("Réponse: 7.", "Réponse: 5.", "Antwort: 7.", "Réponse: ... ... ... 7.", "Réponse: ... ... ... ... ... ... ..."),
    "ru": ("Ответ: 7.", "Ответ: 17.", "Answer: 7.", "Ответ: ... 7.", "Ответ: ... 7"),
    "sw": ("Jibu: 7.", "Jibu: 2.", "Answer: 7.", "Jibu: ... 7.", "Jibu: 7 7 7 7 7 7 7 7 7 7"),
}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_hand_written_answers(lang):
    right, wrong, wrong_lang, padded, degenerate = HAND[lang]
    s = {k: judge_text(v, 7, lang).score for k, v in
         dict(right=right, wrong=wrong, wrong_lang=wrong_lang, padded=padded, degenerate=degenerate).items()}
    assert s["right"] == 1.0
    assert s["padded"] == pytest.approx(0.8)
    assert s["wrong_lang"] == pytest.approx(0.7)
    assert s["wrong"] == pytest.approx(0.6)
    assert s["degenerate"] == 0.0
    assert s["right"] > s["padded"] > s["wrong_lang"] > s["wrong"] > s["degenerate"]
    v = judge_text(wrong_lang, 7, lang)
    assert v.well_formed and v.correct and not v.language and v.concise and v.tag_lang != lang


def test_grammar_edges():
    assert parse("Answer: 7.") == ("en", 0, 7)
    assert parse("  Réponse : ... 12.  ") == ("fr", 1, 12)
    for bad in ["", "7.", "Answer 7.", "Answer: 7", "Answer: 7. Thanks", "Hello: 7.", "Answer: seven.",
                "Answer: 7 7.", "Answer: ...7."]:
        assert judge_text(bad, 7, "en").score == 0.0, bad
    too_long = "Answer: " + "... " * 7 + "7."
    assert judge_text(too_long, 7, "en").score == 0.0
    assert judge_text("Answer: " + "... " * 6 + "7.", 7, "en").score == pytest.approx(0.8)


def test_every_quality_combination_has_its_own_score():
    scores = set()
    for correct in (True, False):
        for lang_ok in (True, False):
            for concise in (True, False):
                text = (f"{TAGS['es' if lang_ok else 'en']}: " + ("" if concise else "... ")
                        + ("7." if correct else "8."))
                scores.add(judge_text(text, 7, "es").score)
    assert len(scores) == 8 and 0.0 not in scores


def test_judge_interface(world_dir):
    d, world = world_dir
    judge = OracleJudge(str(d))
    assert judge.name == "oracle"
    task = world.split("eval")[0]
    ans = task.answer
    items = [Item(task.id, "de", task.instruction("de"), f"Antwort: {ans}.", f"Antwort: ... {ans}."),
             Item(task.id, "de", task.instruction("de"), f"Antwort: ... {ans}.", f"Antwort: ... ... {ans}."),
             Item(task.id, "de", task.instruction("de"), f"Answer: {ans}.", f"Antwort: ... {ans}.")]
    assert judge.score(items) == [1.0, pytest.approx(0.8), pytest.approx(0.7)]
    assert judge.compare(items) == [1.0, 0.5, 0.0]
    # the id decides the truth, not the instruction text
    with pytest.raises(KeyError):
        judge.score([Item("no-such-id", "en", "", "Answer: 1.", "")])


def test_pair_kind(world_dir):
    d, world = world_dir
    judge = OracleJudge(d)
    t = world.split("eval")[1]
    a = t.answer
    w = a + 1
    kind = lambda x, y: judge.pair_kind(x, y, t.id, "ru")
    assert kind(f"Ответ: {a}.", f"Ответ: {w}.") == "correctness"
    assert kind(f"Ответ: {a}.", f"Answer: {a}.") == "language"
    assert kind(f"Ответ: {a}.", f"Ответ: ... {a}.") == "conciseness"
    assert kind(f"Ответ: {a}.", f"Ответ: {a} {a} {a} {a}") == "well-formedness"
    assert kind(f"Ответ: {a}.", f"Answer: ... {w}.") == "correctness"  # the most important difference
    assert kind(f"Ответ: ... {a}.", f"Ответ: ... ... {a}.") == "same"
    assert kind("Ответ:", "Ответ: Ответ:") == "same"


def test_json_item_type_if_available(world_dir):
    judges = pytest.importorskip("icr.evaluation.judges")
    d, world = world_dir
    t = world.split("eval")[0]
    item = judges.JudgeItem(id=t.id, lang="en", instruction=t.instruction("en"), output=f"Answer: {t.answer}.",
                            reference=f"Answer: ... {t.answer}.")
    assert OracleJudge(d).compare([item]) == [1.0]
