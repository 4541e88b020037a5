"""References matched to evaluation prompts by id or instruction, never by position; one loader for
prompts and references (formats, fields, datasets)."""

import json

import pytest

from icr.config import PromptSource, ReferenceSource
from icr.data import load_prompt_set, load_references
from icr.errors import DataError

from .conftest import shared_data

PROMPTS = {"en": ["Name a colour.", "Name a fruit.", "Count to  three."],
           "es": ["Nombra un color.", "Nombra una fruta.", "Cuenta hasta tres."]}


def _prompts(tmp_path, ids=(1, 2, 3)):
    for lang, texts in PROMPTS.items():
        (tmp_path / f"{lang}.json").write_text(json.dumps(
            [{"id": i, "dataset": "d", "instruction": t} for i, t in zip(ids, texts)]))
    return load_prompt_set(PromptSource(path=str(tmp_path / "{lang}.json")), ["en", "es"])


def _refs(tmp_path, lang, rows):
    (tmp_path / f"{lang}.ref.json").write_text(json.dumps(rows))


def _load(tmp_path, prompts, scores_alone=False, **kw):
    return load_references(ReferenceSource(path=str(tmp_path / "{lang}.ref.json"), **kw), prompts, ["en", "es"],
                           judge_scores_alone=scores_alone, judge_name="alpaca_eval")


def test_ids_kept_as_the_source_wrote_them(tmp_path):
    prompts = _prompts(tmp_path)
    assert [p.id for p in prompts.by_lang["es"]] == ["1", "2", "3"]  # the key: a string
    rows = prompts.as_rows()["es"]
    assert rows[0] == {"id": 1, "instruction": "Nombra un color.", "dataset": "d"}  # export: int stays int


def test_matched_by_id_in_any_order_and_by_instruction_without_ids(tmp_path):
    prompts = _prompts(tmp_path)
    # English references without ids, reordered, extra whitespace: matched by instruction
    _refs(tmp_path, "en", [{"instruction": " Count to three. ", "output": "1 2 3"},
                           {"instruction": "Name a fruit.", "output": "apple"},
                           {"instruction": "Name a colour.", "output": "red"},
                           {"instruction": "Something else.", "output": "unused"}])
    _refs(tmp_path, "es", [{"id": 3, "instruction": "Cuenta hasta tres.", "output": "uno dos tres"},
                           {"id": 1, "instruction": "Nombra un color.", "output": "rojo"},
                           {"id": 2, "instruction": "Nombra una fruta.", "output": "manzana"}])
    refs = _load(tmp_path, prompts)
    assert refs == {"en": {"1": "red", "2": "apple", "3": "1 2 3"},
                    "es": {"1": "rojo", "2": "manzana", "3": "uno dos tres"}}


@pytest.mark.parametrize("lang,rows,match", [
    # an id that matches but the instruction is another prompt's (e.g. English references for Spanish)
    ("es", [{"id": 1, "instruction": "Name a colour.", "output": "red"}, {"id": 2, "instruction": "x", "output": "y"},
            {"id": 3, "instruction": "z", "output": "w"}],
     r"es.ref.json row 1: reference id 1 is for the instruction 'Name a colour.', but the es prompt with that id "
     r"is 'Nombra un color.'"),
    ("es", [{"id": 1, "output": "rojo"}, {"id": 3, "output": "tres"}],
     r"es.ref.json: no reference with id 2 \(es evaluation prompt 2\)"),
    ("en", [{"instruction": "Name a colour.", "output": "red"}, {"instruction": "Name a fruit!", "output": "a"}],
     r"en.ref.json: no reference whose instruction matches en evaluation prompt 2 \(id 2: 'Name a fruit.'\)"),
    ("es", [{"id": 1, "instruction": "Nombra un color.", "output": "rojo"}, {"instruction": "b", "output": "c"}],
     r"es.ref.json row 2: reference without an id, while other references have ids"),
    ("es", [{"id": 1, "instruction": "Nombra un color.", "output": 5}],
     r"es.ref.json row 1: output field 'output' must be a string, got int"),
    ("es", [{"id": 1, "output": "a"}, {"id": 1, "output": "b"}], r"es.ref.json row 2: duplicate id 1"),
    ("es", [], r"es.ref.json: no references"),
])
def test_any_mismatch_names_the_first_bad_item(tmp_path, lang, rows, match):
    prompts = _prompts(tmp_path)
    good = {"en": [{"instruction": t, "output": "o"} for t in PROMPTS["en"]],
            "es": [{"id": i, "instruction": t, "output": "o"} for i, t in enumerate(PROMPTS["es"], 1)]}
    for other in good:
        _refs(tmp_path, other, rows if other == lang else good[other])
    with pytest.raises(DataError, match=match):
        _load(tmp_path, prompts)


def test_path_without_lang_is_refused(tmp_path):
    prompts = _prompts(tmp_path)
    _refs(tmp_path, "en", [{"instruction": t, "output": "o"} for t in PROMPTS["en"]])
    with pytest.raises(DataError, match=r"evaluation.references.path: .*en.ref.json' needs a \{lang\} placeholder"):
        load_references(ReferenceSource(path=str(tmp_path / "en.ref.json")), prompts, ["en", "es"],
                        judge_scores_alone=False)


def test_language_without_references_needs_a_judge_that_scores_alone(tmp_path):
    prompts = _prompts(tmp_path)
    _refs(tmp_path, "en", [{"instruction": t, "output": "o"} for t in PROMPTS["en"]])  # no es file
    with pytest.raises(DataError, match=r"evaluation.references: no reference file for es .*judge 'alpaca_eval' "
                                        r"compares each answer with a reference"):
        _load(tmp_path, prompts)
    assert set(_load(tmp_path, prompts, scores_alone=True)) == {"en"}  # es judged alone
    with pytest.raises(DataError, match=r"evaluation.references: not set"):
        load_references(ReferenceSource(), prompts, ["en"], judge_scores_alone=False)


def test_field_mapping_and_jsonl_like_prompts(tmp_path):
    prompts = _prompts(tmp_path)
    for lang in ("en", "es"):
        (tmp_path / f"{lang}.ref.jsonl").write_text("\ufeff" + "".join(  # a byte-order mark is accepted
            json.dumps({"qid": i, "q": t, "answer": f"{lang}{i}"}) + "\n" for i, t in enumerate(PROMPTS[lang], 1)))
    refs = load_references(ReferenceSource(path=str(tmp_path / "{lang}.ref.jsonl"), id_field="qid",
                                           instruction_field="q", output_field="answer"),
                           prompts, ["en", "es"], judge_scores_alone=False)
    assert refs["es"] == {"1": "es1", "2": "es2", "3": "es3"}


def test_hugging_face_dataset_with_a_lang_column(tmp_path):
    pytest.importorskip("datasets")
    repo = tmp_path / "x-alpacaeval"  # a local dataset folder stands in for a hub name
    repo.mkdir()
    rows = [{"id": i, "lang": lang, "instruction": t, "output": f"ref {lang} {i}"}
            for lang in ("en", "es") for i, t in enumerate(PROMPTS[lang], 1)]
    (repo / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hf = PromptSource(path=str(repo), format="hf", split="test")
    prompts = load_prompt_set(hf, ["en", "es"], field="evaluation.prompts")
    assert [p.instruction for p in prompts.by_lang["es"]] == PROMPTS["es"]
    refs = load_references(ReferenceSource(path=str(repo), format="hf"), prompts, ["en", "es"],
                           judge_scores_alone=False)
    assert refs["es"] == {"1": "ref es 1", "2": "ref es 2", "3": "ref es 3"}
    with pytest.raises(DataError, match="no rows with lang == 'fr'"):
        load_prompt_set(hf, ["fr"])
    with pytest.raises(DataError, match="cannot load dataset"):
        load_prompt_set(PromptSource(path="no-such-owner/no-such-dataset"), ["es"])


def test_the_x_alpacaeval_sample_english_references_have_no_ids():
    folder = shared_data("x-alpacaeval-sample")
    langs = ["en", "es", "de", "fr", "ru"]
    prompts = load_prompt_set(PromptSource(path=str(folder / "{lang}.json"), limit=20), langs)
    refs = load_references(ReferenceSource(path=str(folder / "{lang}.reference_outputs.json")), prompts, langs,
                           judge_scores_alone=False)
    assert all(len(refs[lang]) == 20 for lang in langs)
    en_file = json.loads((folder / "en.reference_outputs.json").read_text())
    assert "id" not in en_file[0]  # matched by instruction
    assert refs["en"]["1"] == en_file[0]["output"] and refs["es"]["1"].startswith("Claro")
    assert prompts.as_rows()["es"][0]["id"] == 1 and prompts.as_rows()["es"][0]["dataset"] == "helpful_base"


def test_the_x_alpacaeval_sample_english_references_for_spanish_are_refused(tmp_path):
    folder = shared_data("x-alpacaeval-sample")
    (tmp_path / "es.json").write_bytes((folder / "en.reference_outputs.json").read_bytes())
    prompts = load_prompt_set(PromptSource(path=str(folder / "{lang}.json"), limit=5), ["es"])
    with pytest.raises(DataError, match=r"es.json: no reference whose instruction matches es evaluation prompt 1"):
        load_references(ReferenceSource(path=str(tmp_path / "{lang}.json")), prompts, ["es"],
                        judge_scores_alone=False)
    # and a reordered English file still pairs every answer with its own reference
    rows = json.loads((folder / "en.reference_outputs.json").read_text())[::-1]
    (tmp_path / "en.json").write_text(json.dumps(rows))
    en = load_prompt_set(PromptSource(path=str(folder / "{lang}.json"), limit=5), ["en"])
    refs = load_references(ReferenceSource(path=str(tmp_path / "{lang}.json")), en, ["en"], judge_scores_alone=False)
    by_instruction = {r["instruction"]: r["output"] for r in rows}
    assert all(refs["en"][p.id] == by_instruction[p.instruction] for p in en.by_lang["en"])
