"""GPU stages in child processes: the parent holds no model after a stage, a worker's bad-input error
is the parent's one-line error, and in-process stages give their models back."""

from __future__ import annotations

import gc

import pytest

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"


def live_models() -> set[int]:
    """ids of the transformers models alive in this process (after collecting reference cycles)."""
    import warnings

    from transformers import PreTrainedModel

    gc.collect()
    with warnings.catch_warnings():  # isinstance on some deprecated module objects warns
        warnings.simplefilter("ignore")
        return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}


def _cfg(tiny_pair, tmp_path, *sets):
    from icr.config import load_config
    from icr.loop import resolve_placeholders

    cfg = load_config(TINY, [f"run_root={tmp_path}", "generation.max_new_tokens=8", *sets])
    return resolve_placeholders(cfg, tiny_pair["root"])


def test_an_in_process_stage_gives_its_model_back_and_a_kept_reference_is_seen(tiny_pair, tmp_path, monkeypatch):
    from icr.data import load_prompt_set
    from icr.generation.hf import HFBackend
    from icr.plan import iteration_plan
    from icr.workers import run_stage

    cfg = _cfg(tiny_pair, tmp_path, "prompts.limit=2")
    prompts = load_prompt_set(cfg.prompts, cfg.languages)
    before = live_models()
    run_stage("generate", cfg, iteration_plan(cfg, tmp_path / "a", 1), prompts=prompts, isolate=False)
    assert live_models() - before == set()
    # The check itself: a stage that keeps its model (here: close() stashes it) is caught.
    kept = []
    monkeypatch.setattr(HFBackend, "close", lambda self: kept.append(self.model))
    run_stage("generate", cfg, iteration_plan(cfg, tmp_path / "b", 1), prompts=prompts, isolate=False)
    assert live_models() - before  # the model (and its inner decoder, also a PreTrainedModel)


@pytest.mark.slow
def test_a_worker_error_is_the_parents_one_line_error(tiny_pair, tmp_path):
    import dataclasses

    from icr.data import load_prompt_set
    from icr.errors import IcrError
    from icr.plan import iteration_plan
    from icr.workers import run_stage

    cfg = _cfg(tiny_pair, tmp_path, "prompts.limit=1")
    prompts = load_prompt_set(cfg.prompts, cfg.languages)
    a, b = (dataclasses.replace(iteration_plan(cfg, tmp_path / x, 1), policy=str(tmp_path / "no-model"))
            for x in ("a", "b"))
    with pytest.raises(IcrError) as here:
        run_stage("generate", cfg, a, prompts=prompts, isolate=False)
    with pytest.raises(IcrError) as there:
        run_stage("generate", cfg, b, prompts=prompts, isolate=True)
    assert str(there.value) == str(here.value) and "no-model" in str(here.value)
    assert (b.dir / "generate" / "logs" / "worker-0.log").is_file()  # kept (icr.launch.worker_log)


@pytest.mark.slow
def test_isolated_loop_holds_no_model_and_writes_the_same_files(tiny_pair, tmp_path):
    """`icr run` with every GPU stage in its own process (as on CUDA): after each stage the parent
    holds no model, and the files are those of the in-process run."""
    import hashlib

    from icr.loop import run_experiment

    def digests(run):
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                for pattern in ("iter1/*/shard-*.jsonl", "iter1/pairs/pairs.jsonl", "iter1/model/model.safetensors",
                                "eval/*/*/model_outputs.json")
                for p in sorted(run.glob(pattern))}

    sets = ["iterations=1", "evaluation.enabled=true", "evaluation.judge=fake", "evaluation.models=[M0]",
            "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl", "evaluation.max_new_tokens=8"]
    before = live_models()
    held = {}
    isolated = run_experiment(_cfg(tiny_pair, tmp_path / "isolated", "isolate_stages=true", *sets),
                              on_stage=lambda stage, result: held.setdefault(stage, live_models() - before))
    assert list(held) == ["evaluate/M0", "iter1/generate", "iter1/score", "iter1/pairs", "iter1/train",
                          "iter1/evaluate"]
    assert all(not new for new in held.values()), held
    assert not list(isolated.rglob("*.workers"))  # job folders removed after success
    inline = run_experiment(_cfg(tiny_pair, tmp_path / "inline", "isolate_stages=false", *sets))
    ours = digests(isolated)
    assert len(ours) >= 6 and ours == digests(inline)
