"""The evaluation path as the authors ran it (issue 20): answers judged stripped of surrounding
whitespace (their utils/inference.py:144), and alpaca_eval's length-controlled win rate with each
answer's per-instruction difficulty found by the prompt's id, not its row."""

import json

import numpy as np
import pytest

from icr.config import EvaluationConfig
from icr.errors import IcrError
from icr.evaluation.evaluate import _generation_key, eval_params, evaluate_model, generate_outputs
from icr.evaluation.export import write_model_outputs
from icr.evaluation.judges import FakeJudge
from icr.generation import Sample
from icr.runs import write_json

PROMPTS = {"en": [{"id": "1", "instruction": "one"}, {"id": "2", "instruction": "two"}]}
REFS = {"en": {"1": "xxxx", "2": "xxxx"}}


class PaddedBackend:
    """Answers `ab` wrapped in whitespace: 2 characters stripped, 7 as sampled."""

    def __init__(self):
        self.calls = 0

    def generate(self, conversations, params, desc=None):
        self.calls += 1
        return [[Sample(text="  ab \n\n", finished=True, n_tokens=3)] for _ in conversations]

    def close(self):
        pass


class Ident:
    def identify_many(self, texts):
        return ["en" for _ in texts]


def test_answers_are_judged_stripped(tmp_path):
    """The judge prefers the longer answer: stripped, `ab` (2) loses to the 4-character reference;
    as sampled (7 characters) it would win."""
    rows = evaluate_model("m", "M1", 1, PROMPTS, REFS, FakeJudge(), EvaluationConfig(), tmp_path,
                          backend=PaddedBackend(), identifier=Ident())
    assert rows[0]["wr"] == 0.0 and rows[0]["mean_len"] == 2.0
    saved = json.loads((tmp_path / "M1" / "en" / "model_outputs.json").read_text())
    assert [r["output"] for r in saved] == ["ab", "ab"]
    generation = json.loads((tmp_path / "M1" / "en" / "generation.json").read_text())
    assert generation["stripped"] == 2 and generation["key"]["output"] == "stripped"


def test_outputs_saved_unstripped_are_stripped_once_and_recorded(tmp_path):
    """Outputs saved before stripping (their key has no `output`) are not judged as they are, nor
    sampled again: stripped in place, and generation.json records how many changed."""
    cfg = EvaluationConfig()
    lang_dir = tmp_path / "M1" / "en"
    key = _generation_key("m", eval_params(cfg, 42), None, PROMPTS["en"])
    old_key = {k: v for k, v in key.items() if k != "output"}
    write_model_outputs(lang_dir / "model_outputs.json",
                        [{"instruction": p["instruction"], "output": text, "generator": "M1", "dataset": "d",
                          "id": p["id"]} for p, text in zip(PROMPTS["en"], [" ab\n", "abcdef"])])
    write_json(lang_dir / "generation.json", {"key": old_key, "n": 2})
    backend = PaddedBackend()
    outputs = generate_outputs("m", "M1", PROMPTS, cfg, tmp_path, backend=backend)
    assert backend.calls == 0 and [r["output"] for r in outputs["en"]] == ["ab", "abcdef"]
    generation = json.loads((lang_dir / "generation.json").read_text())
    assert generation["key"] == key and generation["stripped_when_reused"] == 1
    assert [r["output"] for r in json.loads((lang_dir / "model_outputs.json").read_text())] == ["ab", "abcdef"]
    # another model's old outputs are not taken
    write_json(lang_dir / "generation.json", {"key": {**old_key, "model_path": "other"}, "n": 2})
    generate_outputs("m", "M1", PROMPTS, cfg, tmp_path, backend=backend)
    assert backend.calls == 1
