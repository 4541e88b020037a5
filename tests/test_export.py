import json
from pathlib import Path

import pytest

from icr.config import PromptSource
from icr.errors import DataError, IcrError
from icr.evaluation.export import (load_eval_prompts, load_references, read_model_outputs, to_model_outputs,
                                   write_model_outputs)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "x-alpacaeval-sample"


def test_model_outputs_round_trip(tmp_path):
    prompts = [{"id": "1", "instruction": "¿Qué tal?", "dataset": "helpful_base"}, {"id": "2", "instruction": "Привет"}]
    rows = to_model_outputs(prompts, ["Bien", "Здравствуй"], generator="M1")
    assert rows[1] == {"instruction": "Привет", "output": "Здравствуй", "generator": "M1",
                       "dataset": "x_alpaca_eval", "id": "2"}
    path = tmp_path / "es" / "model_outputs.json"
    write_model_outputs(path, rows)
    assert read_model_outputs(path) == rows
    assert "Здравствуй" in path.read_text(encoding="utf-8")  # readable, not \u-escaped
    with pytest.raises(ValueError):
        to_model_outputs(prompts, ["one"], "M1")


def test_read_model_outputs_names_the_bad_row(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]))
    with pytest.raises(DataError, match=r"m.json: row 1: missing or non-string field\(s\) output"):
        read_model_outputs(path)
    path.write_text("{}")
    with pytest.raises(DataError, match="expected a JSON array"):
        read_model_outputs(path)
    with pytest.raises(IcrError, match="not found"):
        read_model_outputs(tmp_path / "nope.json")


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"sample data not present at {SAMPLE} (only in the dev workspace)")
def test_loads_the_x_alpacaeval_sample():
    prompts = load_eval_prompts(PromptSource(path=str(SAMPLE / "{lang}.json"), limit=10), ["es", "ru"])
    assert [len(v) for v in prompts.values()] == [10, 10]
    assert [p["id"] for p in prompts["es"]] == [p["id"] for p in prompts["ru"]] == [str(i) for i in range(1, 11)]
    refs = load_references(str(SAMPLE / "{lang}.reference_outputs.json"), ["es", "ru"])
    assert len(refs["es"]) == 60 and refs["es"]["1"].startswith("Claro")
    # the reference file is itself in model-output format
    assert read_model_outputs(SAMPLE / "es.reference_outputs.json")[0]["generator"] == "gpt-4-turbo-2024-04-09"


def test_jsonl_positions_and_errors(tmp_path):
    (tmp_path / "de.jsonl").write_text('{"instruction": "a"}\n{"instruction": "b"}\n')
    prompts = load_eval_prompts(PromptSource(path=str(tmp_path / "{lang}.jsonl")), ["de"])
    assert prompts["de"] == [{"id": "1", "instruction": "a", "dataset": "x_alpaca_eval"},
                             {"id": "2", "instruction": "b", "dataset": "x_alpaca_eval"}]
    (tmp_path / "fr.json").write_text(json.dumps([{"id": 3, "instruction": "a"}, {"id": 3, "instruction": "b"}]))
    with pytest.raises(DataError, match=r"fr.json: duplicate id '3' \(record 1\)"):
        load_eval_prompts(PromptSource(path=str(tmp_path / "{lang}.json")), ["fr"])
    with pytest.raises(IcrError, match="sw.json: not found"):
        load_eval_prompts(PromptSource(path=str(tmp_path / "{lang}.json")), ["sw"])
    (tmp_path / "it.json").write_text(json.dumps([{"id": 1, "instruction": "q"}]))
    with pytest.raises(DataError, match="has no string field 'output'"):
        load_references(str(tmp_path / "{lang}.json"), ["it"])


def test_hugging_face_dataset_by_name(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = tmp_path / "x-alpacaeval"  # a local dataset folder stands in for a hub name
    repo.mkdir()
    rows = [{"id": i, "lang": lang, "instruction": f"{lang}-{i}", "output": f"ref {lang} {i}"}
            for lang in ("es", "de") for i in (1, 2)]
    (repo / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_eval_prompts(PromptSource(path=str(repo), format="hf", split="test"), ["de"])
    assert [p["instruction"] for p in prompts["de"]] == ["de-1", "de-2"]
    assert load_references(str(repo), ["es"], fmt="hf")["es"] == {"1": "ref es 1", "2": "ref es 2"}
    with pytest.raises(IcrError, match="no rows with lang == 'fr'"):
        load_references(str(repo), ["fr"], fmt="hf")
    with pytest.raises(IcrError, match="cannot load"):
        load_references("no-such-owner/no-such-dataset", ["es"])
