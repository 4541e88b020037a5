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
    from safetensors.torch import load_file

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

    # how far the weights moved, recorded from the weights in memory: equal to the saved model's change
    change = manifest["weight_change"]
    w0, w1 = load_file(Path(plan.policy) / "model.safetensors"), load_file(plan.model_dir / "model.safetensors")
    delta = math.sqrt(sum((w1[k].double() - w0[k].double()).square().sum().item() for k in w1))
    norm = math.sqrt(sum(w0[k].double().square().sum().item() for k in w1))
    assert change["sampled"] is False and change["tensors"] == len(w1)  # tied head: one tensor
    assert change["relative_l2"] == pytest.approx(delta / norm, rel=1e-6) and change["changed_share"] > 0.5
    assert change["max_abs"] == pytest.approx(max((w1[k] - w0[k]).abs().max().item() for k in w1), rel=1e-6)

    text = write_report(tmp_path / "run").read_text()
    assert "## Training" in text, text
    assert f"| 1 | 8 | 4 | 4 | 1 | 2 | {counts['train_loss']:.4g} | {change['relative_l2']:.3g} | " in text, text


@pytest.mark.slow
def test_the_accelerate_launched_train_stage_records_the_same(tiny_pair, tmp_path, caplog):
    """Through `accelerate launch` (2 CPU processes) the counts and the weight change come back in the
    main process's metrics; the warning, logged in the launched processes' log file, is repeated."""
    from icr.runs import read_json
    from icr.stages import run_train

    pairs = _pairs()
    cfg = _cfg(tiny_pair, tmp_path, "train.max_length=64", "train.warmup_ratio=0.0", "train.lr_scheduler=constant",
               "train.per_device_batch_size=1", "train.accelerate_config=cpu_2proc")
    plan = _plan_with_pairs(cfg, tmp_path / "run", pairs)
    with caplog.at_level(logging.WARNING, logger="icr"):
        run_train(cfg, plan)
    manifest = read_json(plan.train_dir / "manifest.json")
    expected = _expected(tiny_pair["dpo"], pairs, 64)
    assert {k: manifest["counts"][k] for k in expected} == expected and manifest["counts"]["steps"] == 2
    assert manifest["weight_change"]["changed_share"] > 0.5 and manifest["weight_change"]["relative_l2"] > 0
    assert any("4 were dropped" in r.getMessage() for r in caplog.records), caplog.text


def test_too_long_warning_past_the_share():
    from icr.train import TOO_LONG_WARN_SHARE, too_long_warning

    assert TOO_LONG_WARN_SHARE == 0.10
    few = {"pairs": 100, "pairs_dropped_too_long": 6, "pairs_truncated": 4}
    assert too_long_warning(few, 512) is None  # 10%: not more than the share
    many = {"pairs": 100, "pairs_dropped_too_long": 6, "pairs_truncated": 5}
    assert "11%" in too_long_warning(many, 512) and "train.max_length = 512" in too_long_warning(many, 512)


# ---------------------------------------------------------------------------------------------
# A run whose optimizer steps cannot move the weights does not say it trained
# ---------------------------------------------------------------------------------------------

def _train_cfg(**kw):
    from icr.config import TrainConfig

    base = dict(learning_rate=1e-3, per_device_batch_size=4, save_steps=1000, logging_steps=1, max_length=128)
    return TrainConfig(**{**base, **kw})


def test_one_optimizer_step_under_warmup_is_refused_before_a_model_is_loaded(tiny_pair, tmp_path, monkeypatch):
    """4 pairs, batch 4: one optimizer step; the default warm-up (ratio 0.1 = 1 step) holds its
    learning rate at 0, so the "trained" model would be the starting policy."""
    import icr.train
    from icr.errors import IcrError

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded for a run that cannot train")

    monkeypatch.setattr(icr.train, "load_causal_lm", no_loading)
    cfg = _train_cfg()
    assert cfg.warmup_ratio == 0.1 and cfg.lr_scheduler == "cosine"  # the defaults
    with pytest.raises(IcrError, match=r"all 1 optimizer step\(s\) would run at learning rate 0") as err:
        icr.train.train_dpo(_pairs(4), tiny_pair["dpo"], tiny_pair["dpo"], cfg, tmp_path, tmp_path / "model",
                            device="cpu")
    for field in ("train.warmup_ratio", "train.per_device_batch_size", "train.gradient_accumulation_steps",
                  "train.epochs"):
        assert field in str(err.value)


def test_the_steps_and_learning_rates_are_the_trainers(tmp_path):
    """optimizer_steps is transformers' count (a last partial accumulation group is a step; epochs
    rounded up) and the learning rate of step k is the scheduler's k-th value."""
    from icr.errors import IcrError
    from icr.train import check_learning_rate, dpo_config, optimizer_steps

    def args(**kw):
        return dpo_config(_train_cfg(**kw), tmp_path, 1, "cpu", 0)

    assert optimizer_steps(7, args(per_device_batch_size=2, gradient_accumulation_steps=3)) == 2  # 4 batches
    assert optimizer_steps(8, args(per_device_batch_size=4, epochs=1.5)) == 3
    assert optimizer_steps(1, args(per_device_batch_size=4, gradient_accumulation_steps=8)) == 1
    assert check_learning_rate(8, args()) == 2  # warm-up 1 step: step 2 has a learning rate
    assert check_learning_rate(4, args(warmup_ratio=0.0)) == 1
    assert check_learning_rate(4, args(lr_scheduler="constant")) == 1  # no warm-up in that scheduler
    # warm-up over (nearly) all steps: ceil(0.99 x 2) = 2, learning rates 0, then 1/2 of the peak
    assert check_learning_rate(8, args(warmup_ratio=0.99, lr_scheduler="constant_with_warmup")) == 2
    with pytest.raises(IcrError):
        check_learning_rate(4, args(warmup_ratio=0.99, lr_scheduler="linear"))
    with pytest.raises(IcrError):
        check_learning_rate(4, args(per_device_batch_size=2, gradient_accumulation_steps=2))


def test_train_optimizer_is_the_trainers_optim_and_its_default_is_what_transformers_picks(tmp_path):
    """train.optimizer reaches TRL's DPOConfig as `optim`. Its default is the optimizer transformers
    picks when none is named (adamw_torch_fused with torch >= 2.8), so a config without the setting
    trains as before the setting existed."""
    import dataclasses

    from trl import DPOConfig

    from icr.train import dpo_config

    unnamed = {f.name: f.default for f in dataclasses.fields(DPOConfig)}["optim"]  # transformers' own pick
    assert _train_cfg().optimizer == "adamw_torch_fused" == unnamed
    assert dpo_config(_train_cfg(), tmp_path, 1, "cpu", 0).optim == unnamed
    for name in ("adamw_torch", "adamw_bnb_8bit"):
        assert dpo_config(_train_cfg(optimizer=name), tmp_path, 1, "cpu", 0).optim == name


@pytest.mark.slow
def test_8bit_adamw_trains_and_keeps_the_state_resources_counts(tiny_pair, tmp_path, monkeypatch):
    """With bitsandbytes installed (skipped otherwise; 0.50.2 steps on a CPU too): train.optimizer
    adamw_bnb_8bit trains the tiny policy with bitsandbytes' AdamW, whose fp32 moments cover exactly
    the parameters icr.resources.fp32_state_count counts (the embedding and tensors below 4096
    values) and whose other moments are uint8."""
    pytest.importorskip("bitsandbytes")
    import torch

    import icr.train
    from icr.resources import fp32_state_count, model_shapes, parameter_count

    trainers = []
    build = icr.train._dpo_trainer
    monkeypatch.setattr(icr.train, "_dpo_trainer", lambda *a, **k: trainers.append(build(*a, **k)) or trainers[-1])
    cfg = _train_cfg(optimizer="adamw_bnb_8bit", warmup_ratio=0.0, lr_scheduler="constant")
    result = icr.train.train_dpo(_pairs(8), tiny_pair["dpo"], tiny_pair["dpo"], cfg, tmp_path, tmp_path / "model",
                                 device="cpu")
    optimizer = getattr(trainers[0].optimizer, "optimizer", trainers[0].optimizer)
    assert type(optimizer).__module__.startswith("bitsandbytes.")
    moments = {}
    for state in optimizer.state.values():
        moments[state["state1"].dtype] = moments.get(state["state1"].dtype, 0) + state["state1"].numel()
    shapes = model_shapes(tiny_pair["dpo"])
    assert moments[torch.float32] == fp32_state_count(shapes) > 0
    assert moments[torch.uint8] == parameter_count(shapes) - fp32_state_count(shapes) > 0
    assert result["weight_change"]["changed_share"] > 0.5


@pytest.mark.slow
def test_the_learning_rate_check_counts_the_pairs_trl_keeps(tiny_pair, tmp_path):
    """8 pairs at batch 4 are 2 steps (warm-up 1: the second trains), but TRL drops 4 of them at
    max_length 64: 1 step, at learning rate 0. Refused after TRL's preparation, before training."""
    from icr.errors import IcrError
    from icr.train import train_dpo

    with pytest.raises(IcrError, match=r"all 1 optimizer step\(s\)"):
        train_dpo(_pairs(8), tiny_pair["dpo"], tiny_pair["dpo"], _train_cfg(max_length=64), tmp_path,
                  tmp_path / "model", device="cpu")
    assert not list(tmp_path.glob("checkpoints/checkpoint-*")) and not (tmp_path / "model").exists()


@pytest.mark.slow
def test_training_that_leaves_the_weights_unchanged_is_an_error(tiny_pair, tmp_path, monkeypatch):
    """Past the learning-rate check (switched off here), the trained weights are compared with the
    start: one step under warm-up trains at learning rate 0, the weights come out identical, and the
    stage fails instead of saving the starting policy as the trained one."""
    import icr.train
    from icr.errors import IcrError

    monkeypatch.setattr(icr.train, "check_learning_rate", lambda n, args: 1)
    with pytest.raises(IcrError, match="left every trained weight exactly as it started"):
        icr.train.train_dpo(_pairs(4), tiny_pair["dpo"], tiny_pair["dpo"], _train_cfg(), tmp_path,
                            tmp_path / "model", device="cpu")
    assert not (tmp_path / "model").exists()
