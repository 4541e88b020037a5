"""`prepare.call` as a file path (`path/to/file.py:function`, from the working directory): how the
Gemma recipe, research code outside the package, is run by configs/sandbox-gemma.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from icr.config import config_from_dict
from icr.errors import IcrError
from icr.loop import prepared_dir, run_prepare

REPO = Path(__file__).resolve().parents[1]

BUILDER = '''
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Recipe:  # a dataclass in a file-loaded module needs the module registered while it loads
    size: int = 1


def build(out_dir, **args):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    calls = Path(out_dir) / "calls.json"
    seen = json.loads(calls.read_text()) if calls.exists() else []
    calls.write_text(json.dumps(seen + [{"args": args, "recipe": Recipe(**args).size}]))
'''


def _cfg(call: str, args: dict | None = None):
    return config_from_dict({"name": "x", "languages": ["en"], "prepare": {"call": call, "args": args or {}},
                             "models": {"dpo": "{prepared}/dpo", "sft": "{prepared}/sft"},
                             "prompts": {"path": "{prepared}/{lang}.jsonl"}})


def test_a_file_call_runs_once_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "research").mkdir()
    (tmp_path / "research" / "builder.py").write_text(BUILDER)
    cfg = _cfg("research/builder.py:build", {"size": 3})
    out = run_prepare(cfg)
    assert out == prepared_dir(cfg)
    assert out.parent.name == "prepared" and out.name.startswith("research_builder.py.build-")  # one flat folder
    assert json.loads((out / "calls.json").read_text()) == [{"args": {"size": 3}, "recipe": 3}]
    assert run_prepare(cfg) == out  # built: not called again
    assert len(json.loads((out / "calls.json").read_text())) == 1


def test_a_missing_file_or_function_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IcrError, match=r"^prepare\.call: no file research/none\.py \(a \.py path is relative to the "
                                       r"working directory .*\)$"):
        run_prepare(_cfg("research/none.py:build"))
    (tmp_path / "builder.py").write_text(BUILDER)
    with pytest.raises(IcrError, match=r"^prepare\.call: builder\.py has no function 'nope'$"):
        run_prepare(_cfg("builder.py:nope"))


def test_module_calls_still_import(tmp_path):
    with pytest.raises(IcrError, match=r"prepare\.call: cannot import 'icr\.sandbox:nope'"):
        run_prepare(_cfg("icr.sandbox:nope"))


def test_the_gemma_config_names_the_recipe_file():
    call = yaml.safe_load((REPO / "configs" / "sandbox-gemma.yaml").read_text())["prepare"]["call"]
    path, _, fn = call.rpartition(":")
    assert (REPO / path).is_file() and f"\ndef {fn}(" in (REPO / path).read_text()
    assert not (REPO / "src" / "icr" / "sandbox" / "gemma.py").exists()  # the recipe is out of the package
