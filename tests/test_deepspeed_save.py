"""DeepSpeed ZeRO-2/3 saves the optimizer's fp32 master weights (issue 19), run with real DeepSpeed:
two CPU processes (gloo; DeepSpeed's CPU accelerator), bf16, AdamW at the paper's lr 5e-7, five steps.

DeepSpeed holds the module in bf16: what accelerate saved before (the module, or ZeRO-3's 16-bit
consolidation) keeps a few percent of the changed weights; `icr.train.deepspeed_fp32_state_dict`
(the float32 save) keeps them all, and rounds exactly to the module. Skipped where deepspeed is not
importable (it is not a test dependency: `pip install deepspeed`, pure Python, builds no ops).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")]

HERE = Path(__file__).parent


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_float32_save_keeps_the_update(tmp_path, stage):
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + 37 * stage + os.getpid() % 500), str(HERE / "deepspeed_save_worker.py"), str(stage), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["dtypes"] == ["torch.float32"] and summary["keys_match"]
    assert summary["fp32_rounds_to_module"]  # the masters are what the bf16 module is rounded from
    assert summary["fp32_changed_share"] > 0.9, summary
    assert summary["bf16_module_changed_share"] < 0.1, summary  # the old save: the update mostly gone
