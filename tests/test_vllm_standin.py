"""The vllm backend against a stand-in engine (no vllm install): every sample of a run gets its own
seed under vLLM's n>1 rule (child k of a request seeded with seed + k), and a prompt longer than the
engine's max_model_len is skipped and reported, not sent."""

from __future__ import annotations

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
    result = run_generate(cfg, tiny_pair["dpo"], prompts, tmp_path / "gen", seed=42)

    too_long = sum(n == lengths[-1] for n in lengths)
    assert result["shards"] >= 3 and result["skipped_long_prompts"] == too_long >= 1
    assert result["samples"] == (len(items) - too_long) * 4
    assert len(engine.sample_seeds) == result["samples"]
    assert len(set(engine.sample_seeds)) == len(engine.sample_seeds)  # was: neighbouring prompts overlapped
    skipped = [r for p in sorted((tmp_path / "gen").glob("skipped-*.jsonl")) for r in read_jsonl(p)]
    assert [r["prompt_tokens"] for r in skipped] == [lengths[-1]] * too_long
