"""The score stage goes through one scorer interface: the engine named by `reward.backend`
(icr.scoring.SCORERS), the reward's definition from icr.reward, the translate variant before any
engine loads."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import REPO


def _cfg(tiny_pair, tmp_path, *sets):
    from icr.config import load_config
    from icr.loop import resolve_placeholders

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run_root={tmp_path}", "generation.shard_size=2",
                                                       "generation.n=2", "generation.max_new_tokens=6", *sets])
    return resolve_placeholders(cfg, tiny_pair["root"])


class RecordingEngine:
    """A stand-in log-prob engine: lp_policy = number of response ids, lp_reference = 0.5 x that,
    except rows with more than `limit` ids, which it cannot take (too_long)."""

    events: list[str] = []
    limit = 10**9

    def __init__(self, cfg, policy_path, reference_path, tokenizer):
        RecordingEngine.events.append(f"load {policy_path} {reference_path}")

    def logprobs(self, batches, desc):
        for prompt_ids, response_ids in batches:
            RecordingEngine.events.append(f"batch {len(prompt_ids)}")
            n = np.array([float(len(r)) for r in response_ids])
            too_long = np.array([len(r) > self.limit for r in response_ids])
            yield {"logp_policy": np.where(too_long, np.nan, n), "logp_reference": np.where(too_long, np.nan, n / 2),
                   "too_long": too_long}

    def close(self):
        RecordingEngine.events.append("close engine")


def test_the_score_stage_takes_its_engine_from_the_registry(tiny_pair, tmp_path, monkeypatch):
    from icr import scoring
    from icr.plan import iteration_plan
    from icr.runs import read_json, read_jsonl, read_shards
    from icr.stages import run_generate, run_score

    cfg = _cfg(tiny_pair, tmp_path)
    plan = iteration_plan(cfg, tmp_path / "run", 1)
    run_generate(cfg, plan)
    shards = sorted(plan.generate_dir.glob("shard-*.jsonl"))
    assert len(shards) >= 2
    RecordingEngine.events, RecordingEngine.limit = [], 3
    monkeypatch.setitem(scoring.SCORERS, "hf", RecordingEngine)
    counts = run_score(cfg, plan)

    # one engine for the stage, asked for one batch per shard, closed at the end
    assert RecordingEngine.events == ([f"load {tiny_pair['dpo']} {tiny_pair['sft']}"]
                                      + [f"batch {len(read_jsonl(p))}" for p in shards] + ["close engine"])
    records = read_shards(plan.score_dir)
    assert len(records) == counts["scored"] == sum(len(read_jsonl(p)) for p in shards)
    long = [r for r in records if r["reward_tokens"] > 3]
    assert long and counts["too_long"] == len(long) == counts["nonfinite"]
    for r in records:  # r = lp_policy - lp_reference (icr.reward), rows the engine could not take: None
        if r["reward_tokens"] > 3:
            assert r["reward"] is None and r["too_long"] is True
        else:
            assert r["reward"] == pytest.approx(r["reward_tokens"] / 2) and "too_long" not in r
    assert read_json(plan.score_dir / "manifest.json")["counts"] == counts


def test_an_unknown_scorer_is_one_line_naming_the_field(tiny_pair, tmp_path, monkeypatch):
    from icr import scoring
    from icr.errors import IcrError
    from icr.plan import iteration_plan

    cfg = _cfg(tiny_pair, tmp_path)
    monkeypatch.delitem(scoring.SCORERS, "hf")
    with pytest.raises(IcrError, match=r"reward.backend: unknown backend 'hf' \(available: vllm\)"):
        scoring.load_engine(cfg, "a", "b", None)
    assert iteration_plan(cfg, tmp_path, 1)  # the config itself is fine


def test_the_translator_leaves_before_the_engine_loads(tiny_pair, tmp_path, monkeypatch):
    """translate_to_english: pi_{t-1} translates every shard (English answers kept as they are), its
    backend is closed, and only then the reward models load (never both in memory)."""
    from icr import generation, scoring
    from icr.generation import Sample
    from icr.plan import iteration_plan
    from icr.runs import read_shards
    from icr.stages import run_generate, run_score

    cfg = _cfg(tiny_pair, tmp_path, "reward.variant=translate_to_english")
    plan = iteration_plan(cfg, tmp_path / "run", 1)
    run_generate(cfg, plan)
    RecordingEngine.events, RecordingEngine.limit = [], 10**9

    class Translator:
        tokenizer = None

        def __init__(self, path, **options):
            RecordingEngine.events.append(f"translator {path}")

        def generate(self, convs, params, desc=None):
            assert params.temperature == 0.0 and params.n == 1
            return [[Sample(text="translated", finished=True, n_tokens=1)] for _ in convs]

        def close(self):
            RecordingEngine.events.append("close translator")

    monkeypatch.setitem(generation.BACKENDS, "hf", Translator)
    monkeypatch.setitem(scoring.SCORERS, "hf", RecordingEngine)
    run_score(cfg, plan)
    events = RecordingEngine.events
    assert events[0] == f"translator {plan.policy}"
    assert events.index("close translator") < events.index(f"load {plan.reward_policy} {plan.reward_reference}")
    records = read_shards(plan.score_dir)
    assert {r["translation"] for r in records if r["lang"] != "en"} == {"translated"}
    assert all(r["translation"] == r["response"] for r in records if r["lang"] == "en")
