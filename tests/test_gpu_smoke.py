"""bench/gpu_smoke.py stays runnable: its --dry-run-cpu mode (tiny shapes on the CPU) runs the
sampler and scorer parts end to end, without lingua (the GPU image has none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO


def test_gpu_smoke_dry_run_measures_the_issue_workload_without_lingua(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "lingua.py").write_text("raise ImportError('gpu_smoke must not import lingua')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_smoke.py"), "--dry-run-cpu", "--parts", "gen,score",
                           "--gen-shapes", "2x3x4", "--score-prompts", "3", "--score-responses", "2",
                           "--batch-tokens", "64,256"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    gen = [r for r in results if r["part"].startswith("gen_hf")]
    assert [(r["shape"], r["tokens"]) for r in gen] == [("2x3x4", 2 * 3 * 4)]  # random weights never stop early
    score = {r["method"]: r for r in results if r["part"].startswith("score_")}
    assert set(score) == {"authors_batch3_full_vocab", "icr_batch_tokens_64", "icr_batch_tokens_256",
                          "floor_packed_unique_tokens"}
    for name in ("icr_batch_tokens_64", "icr_batch_tokens_256"):
        # same rewards as the authors' way within bf16 noise of these tiny random models
        assert score[name]["max_abs_reward_diff_vs_authors"] < 0.05, score[name]
    assert all(r["prompts"] == 3 and r["responses_per_prompt"] == 2 for r in score.values())
