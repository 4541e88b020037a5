"""The alignment-tax check (`evaluation.harness`, the paper's Table 4) through lm-evaluation-harness,
offline: a small multiple-choice task per language, written here as lm-eval task YAMLs over local
JSONL files, run by `icr evaluate` on the tiny checkpoints.

Checked: lm-eval's accuracy equals the accuracy computed here independently from the checkpoint's
own log-likelihoods of each choice (so the harness ran on that model, with those questions); one
results.json row per (language, task, metric); the report's Table-4 section; reuse on rerun; bad
settings refused by `icr validate` with one line."""

from __future__ import annotations

import json

import pytest

from .conftest import REPO

pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'icr[harness]')")

QUESTIONS = {
    "en": [("The sky on a clear day is", ["blue", "green", "loud", "salty"], 0),
           ("Two plus two equals", ["five", "four", "seven", "nine"], 1),
           ("A cat says", ["moo", "quack", "meow", "baa"], 2),
           ("Water freezes into", ["steam", "sand", "glass", "ice"], 3),
           ("The opposite of hot is", ["cold", "tall", "red", "fast"], 0),
           ("A week has this many days:", ["three", "ten", "seven", "two"], 2)],
    "es": [("El cielo en un día despejado es", ["azul", "verde", "ruidoso", "salado"], 0),
           ("Dos más dos es", ["cinco", "cuatro", "siete", "nueve"], 1),
           ("Un gato dice", ["mu", "cuac", "miau", "bee"], 2),
           ("El agua se congela en", ["vapor", "arena", "vidrio", "hielo"], 3),
           ("Lo contrario de caliente es", ["frío", "alto", "rojo", "rápido"], 0)],
}

TASK_YAML = """task: icr_mc_{lang}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for lang, qs in QUESTIONS.items():
        data = folder / f"mc_{lang}.jsonl"
        data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in qs))
        (folder / f"icr_mc_{lang}.yaml").write_text(TASK_YAML.format(lang=lang, data=data))


def independent_accuracy(model_path: str, lang: str) -> float:
    """acc as lm-eval defines it for multiple choice: the choice (after a space) with the highest
    summed log-likelihood given the question, computed here with plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    correct = 0
    for question, choices, label in QUESTIONS[lang]:
        scores = []
        for choice in choices:
            context = tok(question, add_special_tokens=False)["input_ids"]
            whole = tok(question + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(context):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            scores.append(sum(float(logp[len(context) - 1 + k, t]) for k, t in enumerate(cont)))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == label)
    return correct / len(QUESTIONS[lang])


@pytest.fixture()
def harness_config(tmp_path, tiny_pair):
    write_tasks(tmp_path / "tasks")
    return ["--set", f"run_root={tmp_path / 'runs'}", "--set", "evaluation.enabled=true",
            "--set", "evaluation.judge=fake", "--set", "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl",
            "--set", "evaluation.max_new_tokens=8", "--set", "languages=[en, es]",
            "--set", f"evaluation.harness.include_path={tmp_path / 'tasks'}",
            "--set", "evaluation.harness.tasks={en: [icr_mc_en], es: [icr_mc_es]}"]


def test_harness_rows_match_an_independent_computation_and_reach_the_report(tmp_path, tiny_pair, cli,
                                                                            harness_config, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    config = REPO / "configs" / "tiny.yaml"
    models = {"sft": tiny_pair["sft"], "M0": tiny_pair["dpo"]}
    for t, (label, path) in enumerate(models.items()):
        code, out, err = cli("evaluate", config, "--model", path, "--label", label, "--iteration", t - 1,
                             *harness_config)
        assert code == 0, err
    run_dir = tmp_path / "runs" / "tiny"
    rows = json.loads((run_dir / "results.json").read_text())
    harness = [r for r in rows if r.get("kind") == "harness"]
    assert {(r["model"], r["lang"], r["task"], r["metric"]) for r in harness} == {
        (m, lang, f"icr_mc_{lang}", metric) for m in models for lang in QUESTIONS for metric in ("acc", "acc_norm")}
    for r in harness:
        assert r["n"] == len(QUESTIONS[r["lang"]]) and r["num_fewshot"] == 0 and r["stderr"] is not None
        if r["metric"] == "acc":
            assert r["value"] == pytest.approx(independent_accuracy(models[r["model"]], r["lang"]))
    assert sum(r.get("kind") is None for r in rows) == 4  # the judge's rows are still there, 2 models x 2 langs

    from icr.report import write_report

    report = write_report(run_dir).read_text()
    assert "## Alignment tax — lm-evaluation-harness" in report
    section = report.split("## Alignment tax")[1].split("\n## ")[0]
    assert "| Task | Lang | Metric | n | Shots | sft | M0 |" in section
    assert section.count("| icr_mc_") == 4

    # A rerun with the same model and settings reuses lm-eval's numbers (no second run).
    saved = run_dir / "eval" / "M0" / "harness.json"
    before = saved.stat().st_mtime_ns
    code, out, err = cli("evaluate", config, "--model", tiny_pair["dpo"], "--label", "M0", *harness_config)
    assert code == 0, err
    assert saved.stat().st_mtime_ns == before


@pytest.mark.parametrize("setting, expected", [
    ("evaluation.harness.tasks={en: [no_such_task_xyz]}", "evaluation.harness.tasks.en: lm-eval has no task 'no_such_task_xyz'"),
    ("evaluation.harness.tasks={de: [icr_mc_en]}", "evaluation.harness.tasks.de: 'de' is not one of the run's languages"),
    ("evaluation.harness.tasks={en: icr_mc_en}", "evaluation.harness.tasks.en: expected a non-empty list"),
    ("evaluation.harness.include_path=/nonexistent/tasks", "evaluation.harness.include_path: /nonexistent/tasks is not a folder"),
])
def test_bad_harness_settings_are_one_line_at_validation(setting, expected, tmp_path, cli, harness_config):
    code, out, err = cli("validate", REPO / "configs" / "tiny.yaml", *harness_config, "--set", setting)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


def test_harness_rows_are_checked_by_the_results_schema(tmp_path):
    from icr.errors import IcrError
    from icr.evaluation.results import append_results

    good = {"kind": "harness", "model": "M1", "iteration": 1, "lang": "es", "task": "arc_es", "metric": "acc",
            "value": 0.41, "stderr": 0.01, "n": 1117, "num_fewshot": 25}
    judge = {"model": "M1", "iteration": 1, "lang": "es", "judge": "fake", "n": 3, "wr": 50.0, "wr_se": 1.0,
             "lc": None, "lc_method": None, "fidelity": 1.0, "mean_len": 3.0}
    rows = append_results(tmp_path / "results.json", [good, judge])
    assert len(rows) == 2
    assert len(append_results(tmp_path / "results.json", [{**good, "value": 0.5}])) == 2  # same key: replaced
    for bad, message in (({**good, "task": ""}, "field 'task'"), ({**good, "kind": "other"}, "field 'kind'"),
                         ({**good, "wr": 3.0}, "unknown field 'wr'"), ({**good, "value": float("inf")}, "'value'")):
        with pytest.raises(IcrError, match=message):
            append_results(tmp_path / "results.json", [bad])

