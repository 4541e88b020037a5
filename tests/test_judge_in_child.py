"""No model in the `icr run` process (issue 19): the reward-model judge is built without its
weights (preflight builds it in the parent), loads them on its first judgement, and with stages
isolated the evaluation judges in a child process (job kind `eval_judge`)."""

from __future__ import annotations

import json

import pytest

from .conftest import REPO
from .test_workers import live_models

TINY = REPO / "configs" / "tiny.yaml"


def _reward_model(folder, num_labels: int = 1) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from icr.tiny import build_tokenizer

    tok = build_tokenizer(["hola mundo que tal", "hello world how are you", "hallo welt wie geht"] * 20,
                          vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=num_labels, pad_token_id=tok.pad_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    return _reward_model(tmp_path_factory.mktemp("rm") / "rm")


def test_the_reward_model_judge_loads_its_weights_on_the_first_judgement_only(reward_model, tmp_path):
    from icr.errors import IcrError
    from icr.evaluation.judges import CachedJudge, JudgeItem, get_judge

    before = live_models()
    judge = CachedJudge(get_judge("reward_model", model=reward_model, device="cpu"), tmp_path / "cache.jsonl")
    assert live_models() == before  # built, nothing loaded
    from icr.evaluation.judges import loads_model

    assert loads_model(judge) and not judge.judge.loaded
    first = judge.score([JudgeItem("1", "es", "hola", "mundo")])
    assert judge.judge.loaded and live_models() - before
    judge.close()
    assert not judge.judge.loaded and live_models() == before
    again = get_judge("reward_model", model=reward_model, device="cpu").score([JudgeItem("1", "es", "hola", "mundo")])
    assert again == first  # the same judgement from a fresh load
    # what loading checked before is still checked when the judge is built
    with pytest.raises(IcrError, match="has 2 labels; a reward model has exactly one"):
        get_judge("reward_model", model=_reward_model(tmp_path / "two", num_labels=2))
    (tmp_path / "noweights").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "noweights" / name).write_bytes((tmp_path / "two" / name).read_bytes())
    with pytest.raises(IcrError, match="evaluation.judge_args.model: .* has no weight files"):
        get_judge("reward_model", model=str(tmp_path / "noweights"))


def _cfg(tiny_pair, root, reward_model, *sets):
    from icr.config import load_config
    from icr.loop import resolve_placeholders

    cfg = load_config(TINY, [f"run_root={root}", "iterations=1", "generation.max_new_tokens=8",
                             "evaluation.enabled=true", "evaluation.judge=reward_model",
                             f"evaluation.judge_args={{model: {reward_model}, device: cpu}}", "evaluation.models=[M0]",
                             "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl",
                             "evaluation.max_new_tokens=8", *sets])
    return resolve_placeholders(cfg, tiny_pair["root"])


def test_preflight_builds_the_reward_model_judge_without_its_model(tiny_pair, reward_model, tmp_path):
    from icr.loop import preflight

    before = live_models()
    judge = preflight(_cfg(tiny_pair, tmp_path, reward_model))
    assert live_models() == before
    assert judge.loads_model and not judge.judge.loaded and judge.spec["judge"] == "reward_model"


@pytest.mark.slow
def test_an_isolated_run_judges_in_a_child_and_holds_no_reward_model(tiny_pair, reward_model, tmp_path,
                                                                      monkeypatch):
    """`icr run` with stages isolated: the reward model is loaded only in the `eval_judge` child
    (never in this process), and the rows are those of the in-process run."""
    import transformers

    from icr.loop import run_experiment

    def refused(*args, **kwargs):
        pytest.fail("the reward model was loaded in the icr run process")

    with monkeypatch.context() as here:  # in this process only: the children load it
        here.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refused)
        isolated = _isolated_run(tiny_pair, reward_model, tmp_path)
    inline = run_experiment(_cfg(tiny_pair, tmp_path / "inline", reward_model, "isolate_stages=false"))

    def rows(run):
        return json.loads((run / "results.json").read_text())

    ours = rows(isolated)
    assert len(ours) == 6 and all(r["judge"] == "reward_model:rm" for r in ours)
    assert ours == rows(inline)


def _isolated_run(tiny_pair, reward_model, tmp_path):
    from icr.loop import run_experiment

    before = live_models()
    held = {}
    isolated = run_experiment(_cfg(tiny_pair, tmp_path / "isolated", reward_model, "isolate_stages=true"),
                              on_stage=lambda stage, result: held.setdefault(stage, live_models() - before))
    assert list(held) == ["evaluate/M0", "iter1/generate", "iter1/score", "iter1/pairs", "iter1/train",
                          "iter1/evaluate"]
    assert all(not new for new in held.values()), held
    for label in ("M0", "M1"):  # judged there: its log kept, its job folder gone
        assert (isolated / "eval" / label / "judge" / "logs" / "worker-0.log").is_file()
        assert not (isolated / "eval" / label / "judge.workers").exists()
    return isolated


@pytest.mark.slow
def test_with_stages_isolated_the_harness_runs_in_a_child(tiny_pair, tmp_path, cli, monkeypatch):
    """lm-evaluation-harness loads the evaluated model: with stages isolated, in the `eval_judge`
    child (never in this process); its rows are those of the in-process run."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'icr[harness]')")
    import icr.evaluation.harness

    from .test_harness import write_tasks

    write_tasks(tmp_path / "tasks")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def evaluate(root, isolate):
        code, _, err = cli("evaluate", TINY, "--model", tiny_pair["dpo"], "--label", "M0", "--iteration", 0,
                           "--set", f"run_root={root}", "--set", f"isolate_stages={isolate}",
                           "--set", "evaluation.judge=fake", "--set", "evaluation.max_new_tokens=8",
                           "--set", "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl",
                           "--set", "languages=[en, es]", "--set", f"evaluation.harness.include_path={tmp_path / 'tasks'}",
                           "--set", "evaluation.harness.tasks={en: [icr_mc_en], es: [icr_mc_es]}")
        assert code == 0, err
        return json.loads((root / "tiny" / "results.json").read_text())

    def refused(*args, **kwargs):
        pytest.fail("the harness ran in the icr evaluate process")

    with monkeypatch.context() as here:
        here.setattr(icr.evaluation.harness, "evaluate_harness", refused)
        isolated = evaluate(tmp_path / "isolated", "true")
    assert (tmp_path / "isolated" / "tiny" / "eval" / "M0" / "judge" / "logs" / "worker-0.log").is_file()
    inline = evaluate(tmp_path / "inline", "false")
    assert sum(r.get("kind") == "harness" for r in isolated) == 4 and isolated == inline
