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


def _stand_in_gamed(path, n, rng):
    """A local stand-in for alpaca_eval's df_gamed.csv (per-instruction difficulty, strongly varying,
    and its two length-gamed baselines), with the columns alpaca_eval reads."""
    import pandas as pd

    difficulty = rng.normal(0, 2, n)
    rows = []
    for model, sign in (("gamed_verbose", 1.0), ("gamed_concise", -1.0)):
        delta = sign * np.abs(rng.normal(1.0, 0.5, n))
        pref = 1 / (1 + np.exp(-(difficulty + 0.8 * np.tanh(delta))))
        rows.append(pd.DataFrame({"model": model, "index": range(n), "preference": pref, "std_delta_len": delta,
                                  "instruction_difficulty": difficulty, "not_gamed_baseline": False}))
    pd.concat(rows).to_csv(path, index=False)


class DifficultyJudge:
    """Prefers the model by how easy its instruction is (the stand-in difficulty of AlpacaEval row id - 1)."""

    name = "difficulty"

    def __init__(self, difficulty):
        self.difficulty = list(difficulty)

    def compare(self, items):
        known = range(1, len(self.difficulty) + 1)
        return [float(1 / (1 + np.exp(-(self.difficulty[int(it.id) - 1] + 1.0)))) if int(it.id) in known else 0.5
                for it in items]


class LengthBackend:
    """Answers whose length depends on the prompt (the instruction repeated)."""

    def generate(self, conversations, params, desc=None):
        return [[Sample(text=c[-1]["content"] * 3, finished=True, n_tokens=3)] for c in conversations]

    def close(self):
        pass


def test_alpaca_eval_lc_finds_each_instruction_by_id(tmp_path):
    """A reordered and filtered evaluation set: each answer gets the difficulty of its own
    instruction (id k -> AlpacaEval row k - 1), as alpaca_eval computes it on the rows it means;
    an id alpaca_eval's data lacks is refused in one line."""
    try:
        import pandas as pd
        from alpaca_eval.metrics import glm_winrate
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"alpaca_eval not importable ({type(e).__name__}: {e}); the eval extra installs it")
    rng = np.random.default_rng(3)
    n = 120
    gamed = tmp_path / "gamed"
    gamed.mkdir()
    _stand_in_gamed(gamed / "df_gamed.csv", n, rng)
    difficulty = pd.read_csv(gamed / "df_gamed.csv").drop_duplicates("index")["instruction_difficulty"].tolist()
    ids = [k for k in range(n, 0, -1) if k % 3]  # reversed, every third instruction left out
    # easier instructions get longer answers: only the right difficulty tells the GLM that length did not win
    prompts = {"en": [{"id": k, "instruction": f"{k:03d}" + "w" * int(60 + 25 * (difficulty[k - 1] + 5))} for k in ids]}
    refs = {"en": {str(k): "r" * 400 for k in ids}}
    cfg = EvaluationConfig(lc_method="alpaca_eval", lc_data_dir=str(gamed))
    judge = DifficultyJudge(difficulty)
    row = evaluate_model("m", "M1", 1, prompts, refs, judge, cfg, tmp_path / "eval", backend=LengthBackend(),
                         identifier=Ident())[0]

    outputs = [p["instruction"] * 3 for p in prompts["en"]]
    references = [refs["en"][str(k)] for k in ids]
    prefs = judge.compare([_item(k, p["instruction"], o, r) for k, p, o, r in zip(ids, prompts["en"], outputs, references)])

    def library(index):
        df = pd.DataFrame({"index": index, "output_1": references, "output_2": outputs, "generator_1": "ref",
                           "generator_2": "m", "annotator": "a", "preference": 1.0 + np.asarray(prefs)})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(glm_winrate, "hf_hub_download", lambda **kw: str(gamed / kw["filename"]))
            return glm_winrate.get_length_controlled_winrate(df, save_weights_dir=None)["length_controlled_winrate"]

    assert row["lc"] == pytest.approx(library([k - 1 for k in ids]), abs=1e-9)
    assert abs(row["lc"] - library(list(range(len(ids))))) > 0.5  # by row position it would be another number

    unknown = {"en": prompts["en"] + [{"id": n + 1, "instruction": "new"}]}
    with pytest.raises(IcrError, match=r"prompt id '121' is not one of AlpacaEval's instruction ids 1\.\.120"):
        evaluate_model("m", "M2", 2, unknown, {"en": {**refs["en"], str(n + 1): "r"}}, judge, cfg, tmp_path / "eval",
                       backend=LengthBackend(), identifier=Ident())


def _item(pid, instruction, output, reference):
    from icr.evaluation.judges import JudgeItem

    return JudgeItem(id=str(pid), lang="en", instruction=instruction, output=output, reference=reference)
