import json

import pytest

from icr.errors import DataError, IcrError
from icr.evaluation.export import read_model_outputs, to_model_outputs, write_model_outputs


def test_model_outputs_round_trip(tmp_path):
    prompts = [{"id": 1, "instruction": "¿Qué tal?", "dataset": "helpful_base"}, {"id": "2", "instruction": "Привет"}]
    rows = to_model_outputs(prompts, ["Bien", "Здравствуй"], generator="run/M1")
    assert rows[0]["id"] == 1 and rows[0]["dataset"] == "helpful_base"  # the source's id type and dataset kept
    assert rows[1] == {"instruction": "Привет", "output": "Здравствуй", "generator": "run/M1",
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
