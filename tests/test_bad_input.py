"""The bad-input catalogue through the real CLI: exit code 2, one line naming the problem, no
traceback, and no run folder left behind."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import REPO


def _good_prompts(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"en": ["Name a colour.", "Name a fruit."], "es": ["Nombra un color.", "Nombra un fruto."]}
    for lang, texts in rows.items():
        (folder / f"{lang}.jsonl").write_text(
            "".join(json.dumps({"instruction_id": f"p{i}", "instruction": t}) + "\n" for i, t in enumerate(texts)))


def _config(tmp_path, tiny_pair, **changes):
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg.pop("prepare")
    cfg.update(languages=["en", "es"], run_root=str(tmp_path / "runs"),
               models={"dpo": tiny_pair["dpo"], "sft": tiny_pair["sft"]},
               prompts={"path": str(tmp_path / "prompts" / "{lang}.jsonl")})
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


CASES = {
    # name: (config changes, prompt-file edit (lang, raw bytes) or None, expected text in the one line)
    "malformed-jsonl": ({}, ("es", b'{"instruction_id": "p0", "instruction": "Hola"}\n{oops\n'), "es.jsonl:2: invalid JSON"),
    "non-utf8": ({}, ("es", b'{"instruction_id": "p0", "instruction": "\xff\xfe"}\n'), "es.jsonl:1: not valid UTF-8"),
    "missing-english-counterpart": ({}, ("es", b'{"instruction_id": "zz", "instruction": "Hola"}\n'),
                                    "has no English counterpart"),
    "duplicate-id": ({}, ("es", b'{"instruction_id": "p0", "instruction": "a"}\n{"instruction_id": "p0", "instruction": "b"}\n'),
                     "es.jsonl:2: duplicate id p0"),
    "empty-instruction": ({}, ("es", b'{"instruction_id": "p0", "instruction": ""}\n'), "es.jsonl:1: empty instruction"),
    "unknown-language": ({"languages": ["en", "xx"]}, None, "languages: unknown language code 'xx'"),
    "language-without-prompts": ({"languages": ["en", "es", "de"]}, None, "de.jsonl: prompt file not found"),
    "unknown-field": ({"generation__temprature": 0.5}, None, "generation.temprature: unknown field (did you mean 'temperature'?)"),
    "n-below-2": ({"generation__n": 1}, None, "generation.n: must be >= 2"),
    "temperature-out-of-range": ({"generation__temperature": -0.5}, None, "generation.temperature: must be >= 0.0"),
    "top-p-out-of-range": ({"generation__top_p": 1.5}, None, "generation.top_p: must be <= 1.0"),
    "wrong-type": ({"train__epochs": "two"}, None, "train.epochs: expected float"),
    "missing-model": ({"models__dpo": "/nonexistent/model"}, None, "models.dpo: model path '/nonexistent/model' does not exist"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, tmp_path, tiny_pair, cli):
    changes, edit, expected = CASES[name]
    _good_prompts(tmp_path / "prompts")
    if edit is not None:
        (tmp_path / "prompts" / f"{edit[0]}.jsonl").write_bytes(edit[1])
    code, out, err = cli("run", _config(tmp_path, tiny_pair, **changes))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("icr: error: ") and "Traceback" not in err, err
    assert expected in lines[0]
    assert not (tmp_path / "runs").exists()


def test_model_without_chat_template_exits_2(tmp_path, tiny_pair, cli):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_pair["dpo"], bare)
    (bare / "chat_template.jinja").unlink()
    cfg_json = json.loads((bare / "tokenizer_config.json").read_text())
    cfg_json.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg_json))
    _good_prompts(tmp_path / "prompts")
    code, _, err = cli("run", _config(tmp_path, tiny_pair, models__dpo=str(bare)))
    assert code == 2 and "has no chat template; set models.chat_template" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path, tiny_pair, cli):
    _good_prompts(tmp_path / "prompts")
    from icr.errors import IcrError

    with pytest.raises(IcrError):
        cli("run", _config(tmp_path, tiny_pair, generation__n=1), "--debug")
