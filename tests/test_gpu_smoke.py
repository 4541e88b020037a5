"""bench/gpu_smoke.py (issue 19's device check) stays runnable: its --dry-run-cpu mode (tiny shapes on
the CPU) runs every part end to end, each ending in one SUMMARY line, without lingua (the GPU image has
none and its wheel cannot travel); saved_update shows the float32 save keeping the update that a bf16
save rounds away; bad arguments are one line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

SCRIPT = REPO / "bench" / "gpu_smoke.py"
PARTS = ["gen", "score", "train", "loop", "saved_update"]  # every part but vllm, which does not import here


def test_gpu_smoke_dry_run_runs_every_part_without_lingua(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "lingua.py").write_text("raise ImportError('gpu_smoke must not import lingua')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker), "HF_HUB_OFFLINE": "1", "ICR_CACHE": str(tmp_path / "cache")}
    # no --parts: the default is every part (vllm too where it imports, which it does not in the test environment)
    parts = [] if importlib.util.find_spec("vllm") is None else ["--parts", ",".join(PARTS)]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", *parts, "--gen-shapes", "2x3x4",
                           "--score-prompts", "3", "--score-responses", "2", "--batch-tokens", "64,256",
                           "--train-steps", "2", "--train-batch", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    results = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]

    # one summary line per part, in order, none failed
    summaries = [line for line in lines if line.startswith("SUMMARY ")]
    assert [line.split(":")[0].removeprefix("SUMMARY ") for line in summaries] == PARTS, summaries
    assert not [line for line in summaries if "FAILED" in line]
    summary = {line.split(":")[0].removeprefix("SUMMARY "): line for line in summaries}

    gen = [r for r in results if r["part"].startswith("gen_hf")]
    assert [(r["shape"], r["tokens"]) for r in gen] == [("2x3x4", 2 * 3 * 4)]  # random weights never stop early
    assert summary["gen"].startswith("SUMMARY gen: hf sampler, bf16, Llama-3-8B shape (prompts x samples x new "
                                     "tokens): 2x3x4 ")
    score = {r["method"]: r for r in results if r["part"].startswith("score_")}
    assert set(score) == {"authors_batch3_full_vocab", "icr_batch_tokens_64", "icr_batch_tokens_256",
                          "floor_packed_unique_tokens"}
    for name in ("icr_batch_tokens_64", "icr_batch_tokens_256"):
        # same rewards as the authors' way within bf16 noise of these tiny random models
        assert score[name]["max_abs_reward_diff_vs_authors"] < 0.05, score[name]
    assert all(r["prompts"] == 3 and r["responses_per_prompt"] == 2 for r in score.values())
    assert "unique-token floor" in summary["score"]
    train = [r for r in results if r["part"] == "train_dpo_nll_trl_small_llama"]
    assert [r["steps"] for r in train] == [2]
    assert summary["train"].startswith("SUMMARY train: TRL DPO+NLL through icr.train.train_dpo")

    # loop: the tiny loop's 8 stages, device memory null with the reason (the CPU has none)
    (loop,) = [r for r in results if r["part"] == "loop_tiny_icr_run"]
    assert [s["stage"] for s in loop["stages"]] == [f"iter{t}/{stage}" for t in (1, 2)
                                                    for stage in ("generate", "score", "pairs", "train")]
    assert not any(s["skipped"] for s in loop["stages"]) and loop["isolated"] is False
    assert loop["before_mib"] is None and all(s["device_used_mib"] is None for s in loop["stages"])
    assert loop["not_measured"].startswith("--dry-run-cpu") and loop["held_after_stages_mib"] is None
    assert summary["loop"].startswith("SUMMARY loop: 8 stages ok (in this process), device memory not measured "
                                      "(--dry-run-cpu")

    # saved_update: the float32 save keeps the weights the iteration changed, the bf16 save rounds most away
    (update,) = [r for r in results if r["part"] == "saved_update_lr5e-7"]
    assert update["learning_rate"] == 5e-7
    fp32, bf16 = update["saves"]["float32"], update["saves"]["bfloat16"]
    assert (fp32["manifest_saved_dtype"], bf16["manifest_saved_dtype"]) == ("float32", "bfloat16")
    assert (fp32["figures"]["saved_tensor_dtypes"], bf16["figures"]["saved_tensor_dtypes"]) == (["float32"],
                                                                                               ["bfloat16"])
    assert fp32["steps"] == bf16["steps"] > 0 and fp32["figures"]["total"] == bf16["figures"]["total"]
    # A save that rounded (or read back the start) would leave fp32's count at bf16's (or at 0).
    assert fp32["figures"]["changed"] > 10 * bf16["figures"]["changed"], update
    # same training, so the bf16 save is the float32 save rounded, bit for bit (CPU kernels are deterministic)
    assert update["bf16_save_is_float32_save_rounded"] is True
    kept = fp32["figures"]["kept_after_rounding"] * fp32["figures"]["changed"]
    assert kept == pytest.approx(bf16["figures"]["changed"])
    assert f"float32 save {fp32['figures']['changed_share']:.2%}" in summary["saved_update"]
    assert "manifests say saved_dtype float32 / bfloat16" in summary["saved_update"]

    # the blocker was met, and the pairs stage went on without lingua (language filter off)
    assert "pairs: lingua cannot be imported (gpu_smoke must not import lingua)" in proc.stderr


def test_bad_arguments_are_one_line_and_exit_2():
    for args, start in ((["--parts", "gen,bogus"], "gpu_smoke: --parts: 'gen,bogus': each of gen, score, train, "),
                        (["--n", "many"], "gpu_smoke: argument --n: invalid int value: 'many'")):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", *args], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(start), proc.stderr
