import json

import pytest

from icr.config import PromptSource
from icr.data import load_prompt_set
from icr.errors import DataError, IcrError

from .conftest import shared_data


def _write(tmp_path, lang, rows, raw=None):
    path = tmp_path / f"{lang}.jsonl"
    path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _src(tmp_path, **kw):
    return PromptSource(path=str(tmp_path / "{lang}.jsonl"), **kw)


def _ok(tmp_path):
    _write(tmp_path, "en", [{"instruction_id": "a", "instruction": "Hi"}, {"instruction_id": "b", "instruction": "Yo"}])
    _write(tmp_path, "es", [{"instruction_id": "a", "instruction": "Hola"}, {"instruction_id": "b", "instruction": "Eh"}])


def test_parallel_jsonl(tmp_path):
    _ok(tmp_path)
    ps = load_prompt_set(_src(tmp_path), ["en", "es"])
    assert [p.id for p in ps.by_lang["es"]] == ["a", "b"]
    assert ps.english("b").instruction == "Yo"


def test_english_loaded_even_when_not_a_target(tmp_path):
    _ok(tmp_path)
    ps = load_prompt_set(_src(tmp_path), ["es"])
    assert ps.languages == ["es"] and ps.english("a").instruction == "Hi"


@pytest.mark.parametrize("rows,raw,match", [
    (None, b'{"instruction_id": "a", "instruction": "Hola"}\n{"instruction_id": "b", "instr', r"es.jsonl:2: invalid JSON"),
    ([{"instruction_id": "a", "instruction": "Hola"}, {"instruction_id": "a", "instruction": "Eh"}], None,
     r"es.jsonl:2: duplicate id a \(first at 1\)"),
    ([{"instruction_id": "a", "instruction": "  "}], None, r"es.jsonl:1: empty instruction"),
    ([{"instruction_id": "zz", "instruction": "Hola"}], None, r"prompt 1 \(id zz\) has no English counterpart"),
    ([{"instruction": "Hola"}], None, r"es.jsonl:1: missing id field 'id'"),
    (None, b'{"instruction_id": "a", "instruction": "Hola"}\n{"instruction_id": "b", "instruction": "\xff"}\n',
     r"es.jsonl:2: not valid UTF-8"),
    (None, b'[1, 2]\n', r"es.jsonl:1: expected a JSON object"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, rows, raw, match):
    _ok(tmp_path)
    _write(tmp_path, "es", rows, raw)
    with pytest.raises(DataError, match=match):
        load_prompt_set(_src(tmp_path), ["en", "es"])


def test_unknown_language_and_missing_file(tmp_path):
    _ok(tmp_path)
    with pytest.raises(IcrError, match="unknown language code 'xx'"):
        load_prompt_set(_src(tmp_path), ["en", "xx"])
    with pytest.raises(DataError, match="de.jsonl: prompt file not found"):
        load_prompt_set(_src(tmp_path), ["en", "de"])


def test_limit_keeps_parallel_ids(tmp_path):
    _ok(tmp_path)
    ps = load_prompt_set(_src(tmp_path, limit=1), ["en", "es"])
    assert [p.id for p in ps.by_lang["es"]] == ["a"] and [p.id for p in ps.by_lang["en"]] == ["a"]


def test_shared_ultrafeedback_sample_loads():
    folder = shared_data("ultrafeedback-multilingual-sample")
    ps = load_prompt_set(PromptSource(path=str(folder / "{lang}.jsonl"), limit=50), ["en", "es", "ru", "de", "fr"])
    assert all(len(v) == 50 for v in ps.by_lang.values())
    first = ps.by_lang["ru"][0]
    assert len(first.id) == 64 and ps.english(first.id).instruction


def test_shared_x_alpacaeval_json_arrays_load():
    folder = shared_data("x-alpacaeval-sample")
    ps = load_prompt_set(PromptSource(path=str(folder / "{lang}.json")), ["en", "de", "sw"])
    assert len(ps.by_lang["sw"]) == 60 and ps.english(ps.by_lang["sw"][5].id)


def test_a_language_missing_prompts_is_a_warning(tmp_path, caplog):
    import logging

    _write(tmp_path, "en", [{"instruction_id": i, "instruction": f"Q{i}"} for i in "abc"])
    _write(tmp_path, "es", [{"instruction_id": "a", "instruction": "Pa"}])
    log = logging.getLogger("icr")  # the CLI's handler may have stopped it propagating to caplog's
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="icr"):
            load_prompt_set(_src(tmp_path), ["en", "es"])
            _ok(tmp_path)
            load_prompt_set(_src(tmp_path), ["en", "es"])  # parallel: nothing said
    finally:
        log.removeHandler(caplog.handler)
    assert {r.getMessage() for r in caplog.records} == {  # a set: propagated and direct, one message
        "prompts: es has 1 of the 3 English prompts (missing ids b, c); the languages are not parallel"}
