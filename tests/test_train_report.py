"""Training reports what it really did (issue "Nothing lost, nothing silently wrong").

TRL's DPOTrainer drops every pair whose prompt fills `train.max_length` and cuts the answers of the
pairs that do not fit; the train manifest and report.md say how many.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pairs(n: int = 8) -> list[dict]:
    """Prompts growing by 12 tokens each in the tiny pair's template (25, 37, ... 109 prompt tokens,
    answers 14 tokens): at max_length 64, pairs 0-2 fit, pair 3 is truncated, pairs 4-7 are dropped."""
    return [{"prompt": "Question " + "word " * (3 * i) + "?", "chosen": f"A short answer {i}.",
             "rejected": f"no {i} no no no", "lang": "en"} for i in range(n)]


def _expected(model_path: str, pairs: list[dict], max_length: int) -> dict:
    """The counts by icr's own tokenisation (TRL's conversational tokenisation, icr.reward.tokenize_pair):
    the prompt is the shorter common prefix of prompt and prompt + answer, as in TRL."""
    from icr.models import load_tokenizer
    from icr.reward import tokenize_pair

    tok = load_tokenizer(model_path, None, what="policy")
    dropped = truncated = 0
    for p in pairs:
        conv = [{"role": "user", "content": p["prompt"]}]
        (pc, c), (pr, r) = tokenize_pair(tok, conv, p["chosen"]), tokenize_pair(tok, conv, p["rejected"])
        prompt = min(len(pc), len(pr))
        if prompt >= max_length:
            dropped += 1
        elif max(len(pc) + len(c), len(pr) + len(r)) > max_length:
            truncated += 1
    return {"pairs": len(pairs), "pairs_trained": len(pairs) - dropped, "pairs_dropped_too_long": dropped,
            "pairs_truncated": truncated}


def _cfg(tiny_pair, tmp_path, *sets):
    from icr.config import load_config
    from icr.loop import resolve_placeholders

    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"run_root={tmp_path}", "train.per_device_batch_size=2", "train.save_steps=1000",
                       "train.logging_steps=1", *sets])
    return resolve_placeholders(cfg, tiny_pair["root"])


def _plan_with_pairs(cfg, run_dir: Path, pairs: list[dict]):
    from icr.plan import iteration_plan
    from icr.runs import write_json, write_jsonl

    plan = iteration_plan(cfg, run_dir, 1)
    plan.pairs_dir.mkdir(parents=True)
    write_jsonl(plan.pairs_dir / "pairs.jsonl", pairs)
    write_json(plan.pairs_dir / "manifest.json", {"key": {"stage": "pairs", "test": True}})
    return plan


@pytest.mark.slow
def test_pairs_trl_drops_or_truncates_for_max_length_are_in_the_manifest_and_report(tiny_pair, tmp_path, caplog):
    from icr.report import write_report
    from icr.runs import read_json
    from icr.stages import run_train

    pairs = _pairs()
    expected = _expected(tiny_pair["dpo"], pairs, 64)
    assert expected == {"pairs": 8, "pairs_trained": 4, "pairs_dropped_too_long": 4, "pairs_truncated": 1}
    cfg = _cfg(tiny_pair, tmp_path, "train.max_length=64", "train.warmup_ratio=0.0", "train.lr_scheduler=constant")
    plan = _plan_with_pairs(cfg, tmp_path / "run", pairs)
    with caplog.at_level(logging.WARNING, logger="icr"):
        counts = run_train(cfg, plan)
    manifest = read_json(plan.train_dir / "manifest.json")
    assert {k: manifest["counts"][k] for k in expected} == expected
    assert counts["steps"] == math.ceil(4 / 2)  # TRL trained on the 4 pairs it kept
    assert any("4 were dropped" in r.getMessage() and "1 truncated" in r.getMessage()
               and "train.max_length" in r.getMessage() for r in caplog.records), caplog.text

    text = write_report(tmp_path / "run").read_text()
    assert "## Training" in text and "| 1 | 8 | 4 | 4 | 1 | 2 |" in text, text


def test_too_long_warning_past_the_share():
    from icr.train import TOO_LONG_WARN_SHARE, too_long_warning

    assert TOO_LONG_WARN_SHARE == 0.10
    few = {"pairs": 100, "pairs_dropped_too_long": 6, "pairs_truncated": 4}
    assert too_long_warning(few, 512) is None  # 10%: not more than the share
    many = {"pairs": 100, "pairs_dropped_too_long": 6, "pairs_truncated": 5}
    assert "11%" in too_long_warning(many, 512) and "train.max_length = 512" in too_long_warning(many, 512)
