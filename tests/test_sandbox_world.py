"""The sandbox world: determinism, disjoint parallel splits, response qualities; prepare() end to end."""

import json
import random

import pytest

from icr.errors import IcrError
from icr.sandbox.oracle import judge_text
from icr.sandbox.world import (DEGENERATE_KINDS, FAMILIES, LANGUAGES, QUALITIES, SPLITS, build_world,
                               reference_answer, render_response, solve)

SMALL = dict(n_eval=20, n_dev=10, n_train=15, n_pref=25, n_sft=30)


def test_deterministic_and_seeded():
    a, b = build_world(seed=1, **SMALL), build_world(seed=1, **SMALL)
    assert a.to_json() == b.to_json() and a.fingerprint() == b.fingerprint()
    assert build_world(seed=2, **SMALL).fingerprint() != a.fingerprint()
    rng1, rng2 = random.Random(5), random.Random(5)
    t = a.split("eval")[0]
    assert [render_response(t, "fr", q, rng1) for q in QUALITIES] == [render_response(t, "fr", q, rng2) for q in QUALITIES]


def test_splits_disjoint_parallel_and_balanced():
    w = build_world(seed=0, **SMALL)
    ids = {s: {t.id for t in w.split(s)} for s in SPLITS}
    for s in SPLITS:
        assert len(ids[s]) == SMALL[f"n_{s}"]
    for s1 in SPLITS:
        for s2 in SPLITS:
            if s1 < s2:
                assert not ids[s1] & ids[s2]
    # no evaluation instruction is seen in training, in any language
    for lang in LANGUAGES:
        ev = {r["instruction"] for r in w.prompts("eval", lang)}
        for s in ("train", "pref", "sft", "dev"):
            assert not ev & {r["instruction"] for r in w.prompts(s, lang)}
    # parallel: the same ids in the same order in every language, different texts
    rows = {lang: w.prompts("eval", lang) for lang in LANGUAGES}
    for lang in LANGUAGES:
        assert [r["instruction_id"] for r in rows[lang]] == [r["instruction_id"] for r in rows["en"]]
    assert len({rows[lang][0]["instruction"] for lang in LANGUAGES}) == len(LANGUAGES)
    assert {t.family for t in w.split("eval")} == set(FAMILIES)


def test_roundtrip_and_answers():
    w = build_world(seed=0, **SMALL)
    again = type(w).from_json(json.loads(json.dumps(w.to_json())))
    assert again.to_json() == w.to_json()
    assert solve("add", (3, 4)) == 7 and solve("larger", (2, 5)) == 5
    assert solve("max", (3, 9, 1)) == 9 and solve("last", (3, 9, 1)) == 1
    assert solve("count", ("* o * * o",)) == 3
    for t in w.tasks.values():
        assert str(t.answer) not in {"", None}
        assert w.to_json()["tasks"][t.id]["answer"] == t.answer


@pytest.mark.parametrize("lang", LANGUAGES)
def test_rendered_qualities_are_what_they_say(lang):
    w = build_world(seed=0, **SMALL)
    rng = random.Random(0)
    for t in w.split("eval"):
        v = {q: judge_text(render_response(t, lang, q, rng), t.answer, lang) for q in QUALITIES if q != "degenerate"}
        assert v["good"].score == 1.0
        assert v["padded"].well_formed and v["padded"].correct and not v["padded"].concise
        assert v["wrong"].well_formed and not v["wrong"].correct and v["wrong"].language
        assert not v["wrong_padded"].correct and not v["wrong_padded"].concise
        assert v["wrong_lang"].correct and not v["wrong_lang"].language
        for kind in DEGENERATE_KINDS:
            assert judge_text(render_response(t, lang, "degenerate", rng, kind), t.answer, lang).score == 0.0
        assert judge_text(reference_answer(t, lang), t.answer, lang).score == pytest.approx(0.8)


TINY = dict(n_eval=4, n_dev=3, n_train=4, n_pref=12, n_sft=40, vocab_size=400, hidden_size=64, num_layers=1,
            pretrain_steps=60, sft_epochs=8, knowledge_repeats=1, knowledge_algorithmic=20, pref_samples=4,
            pref_pairs_per_prompt=2, dpo_epochs=1, dpo_batch_size=8, premise_samples=2, premise_wr_samples=1,
            max_new_tokens=8)


def test_prepare_reduced_recipe_writes_everything(tmp_path):
    pytest.importorskip("trl")
    from icr.sandbox import OracleJudge, prepare

    out = tmp_path / "sandbox"
    result = prepare(out, **TINY)
    for name in ("sft", "dpo"):
        assert (out / name / "config.json").exists()
        assert (out / name / "chat_template.jinja").exists() or (out / name / "tokenizer_config.json").exists()
    for split, n in (("train", 4), ("eval", 4)):
        for lang in LANGUAGES:
            rows = [json.loads(x) for x in (out / "prompts" / split / f"{lang}.jsonl").read_text().splitlines()]
            assert len(rows) == n and set(rows[0]) == {"instruction_id", "instruction"}
    judge = OracleJudge(out)
    for lang in LANGUAGES:
        refs = json.loads((out / "references" / f"{lang}.json").read_text())
        assert len(refs) == 4
        assert set(refs[0]) == {"id", "instruction", "output", "generator", "dataset"}
        assert all(judge.score_text(r["output"], r["id"], lang) == pytest.approx(0.8) for r in refs)
    premise = json.loads((out / "premise.json").read_text())
    assert set(premise["win_rate_pi0_vs_sft"]) == set(LANGUAGES)
    assert set(premise["reward_accuracy"]) == set(LANGUAGES)
    assert result["premise"] == str(out / "premise.json")
    # a second call reuses everything; a different recipe in the same folder is refused
    stamp = (out / "dpo" / "config.json").stat().st_mtime_ns
    prepare(out, **TINY)
    assert (out / "dpo" / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError):
        prepare(out, **{**TINY, "seed": 9})
    with pytest.raises(IcrError, match=r"prepare\.args\.no_such_knob: unknown"):
        prepare(out, no_such_knob=1)


def test_families_keep_only_those_tasks_and_the_default_world_is_unchanged():
    """Issue 21's world keeps one family (`families: [max]`): every split holds only it, sizes as
    asked, still disjoint; the default (None) deals exactly the five-family world as before."""
    w = build_world(seed=0, families=["max"], **SMALL)
    for s in SPLITS:
        assert {t.family for t in w.split(s)} == {"max"} and len(w.split(s)) == SMALL[f"n_{s}"]
    assert w.to_json()["families"] == ["max"]
    assert type(w).from_json(w.to_json()).families == ("max",)
    assert build_world(seed=0, families=list(FAMILIES), **SMALL).to_json() == build_world(seed=0, **SMALL).to_json()
    with pytest.raises(ValueError, match="families: expected a non-empty list"):
        build_world(seed=0, families=["maxx"], **SMALL)


def test_prepare_refuses_unknown_families_before_writing(tmp_path):
    from icr.errors import ConfigError
    from icr.sandbox.build import prepare

    with pytest.raises(ConfigError, match=r"^prepare\.args\.families: expected null or a non-empty list of "):
        prepare(tmp_path / "b", families=["sum"])
    assert not (tmp_path / "b").exists()
