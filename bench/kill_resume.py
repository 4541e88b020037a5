"""Kill-and-resume harness: SIGKILL `icr run configs/tiny.yaml` at random moments, resume, compare.

    python bench/kill_resume.py --kills 14          # the full harness (a few minutes on 2 CPU cores)
    python bench/kill_resume.py --kills 3 --quick   # what the test suite runs

1. An uninterrupted reference run.
2. The same config in another folder, killed with SIGKILL (process group) at moments spread over
   every stage: each kill waits for a progress file of a chosen stage (a generation shard, a scoring
   shard, a training checkpoint, a saved model, ...) and then a random 0-150 ms more, so kills land
   mid-generation, mid-scoring, mid-training and between stages. After each kill the same command is
   started again; at the end it runs to completion.
3. Checks: generation/score shards, pairs and stats byte-identical to the reference; final model
   weights equal within `--atol`; no shard computed twice (stage journals); training resumed from a
   checkpoint at least once when a kill landed in training.

Prints a one-line summary and, last, one JSON object of figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["generation.shard_size=1", "train.save_steps=1", "train.per_device_batch_size=2"]


def triggers() -> list[str]:
    """Progress files in the order a run creates them (36 prompts -> 36 shards per stage, 18
    optimizer steps per epoch); a kill waits for one of them, then a random delay."""
    out = []
    for t in (1, 2):
        out += [f"iter{t}/generate/shard-{i:05d}.jsonl" for i in (2, 12, 24)]
        out += [f"iter{t}/score/shard-{i:05d}.jsonl" for i in (3, 15, 30)]
        out += [f"iter{t}/pairs/pairs.jsonl"]
        out += [f"iter{t}/train/checkpoints/checkpoint-{k}/trainer_state.json" for k in (3, 9, 15)]
        out += [f"iter{t}/model/config.json"]
    return out


TRIGGERS = triggers()
DATA = ["iter*/generate/shard-*.jsonl", "iter*/score/shard-*.jsonl", "iter*/pairs/pairs.jsonl", "iter*/pairs/stats.json"]


def icr_cmd(run_root: Path) -> list[str]:
    cmd = [sys.executable, "-m", "icr.cli", "run", str(REPO / "configs" / "tiny.yaml"), "-q",
           "--set", f"run_root={run_root}"]
    for o in OVERRIDES:
        cmd += ["--set", o]
    return cmd


def env(cache: Path) -> dict:
    return {**os.environ, "ICR_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": str(REPO / "src")}


def run_to_end(cmd, environment) -> None:
    proc = subprocess.run(cmd, env=environment, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"icr run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def run_and_kill(cmd, environment, run_dir: Path, trigger: str, delay: float, timeout: float = 300) -> str:
    """Start the run; SIGKILL it `delay` s after `trigger` appears. Returns what happened."""
    proc = subprocess.Popen(cmd, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    start = time.time()
    while proc.poll() is None and time.time() - start < timeout:
        if (run_dir / trigger).exists():
            time.sleep(delay)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return "killed"
            break
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed (timeout)"
    if proc.returncode != 0:
        raise SystemExit(f"icr run failed ({proc.returncode}) before its kill:\n{proc.stderr.read().decode()[-3000:]}")
    return "finished before the kill"


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in DATA for p in sorted(root.glob(pattern))}


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def read_journal(stage_dir: Path) -> list[dict]:
    """The events of a stage's `journal.jsonl` (icr.runs.append_journal): which process finished which
    shard; a line cut by a kill is skipped."""
    path = Path(stage_dir) / "journal.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return out


def harness(kills: int, seed: int, workdir: Path, atol: float) -> dict:
    rng = random.Random(seed)
    cache = workdir / "cache"
    environment = env(cache)
    t0 = time.time()
    run_to_end(icr_cmd(workdir / "ref"), environment)
    ref_seconds = time.time() - t0
    ref, killed = workdir / "ref" / "tiny", workdir / "killed" / "tiny"
    cmd = icr_cmd(workdir / "killed")
    # Spread kills over the stages: a random subset of the triggers, in run order; a trigger the
    # resumed run has already passed is skipped, so every kill lands at a new moment.
    chosen = sorted(rng.sample(range(len(TRIGGERS)), min(kills, len(TRIGGERS))))
    events = []
    for k in chosen:
        trigger = TRIGGERS[k]
        if (killed / trigger).exists():
            continue
        outcome = run_and_kill(cmd, environment, killed, trigger, rng.uniform(0.0, 0.15))
        events.append({"trigger": trigger, "outcome": outcome})
    run_to_end(cmd, environment)

    ours, theirs = digests(killed), digests(ref)
    mismatched = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    weight_diff = max(max_weight_diff(ref / f"iter{t}" / "model", killed / f"iter{t}" / "model") for t in (1, 2))
    recomputed = {}
    for stage_dir in sorted(killed.glob("iter*/*")):
        counts = Counter(str(e["shard"]) for e in read_journal(stage_dir))
        dup = {s: n for s, n in counts.items() if n > 1}
        if dup:
            recomputed[str(stage_dir.relative_to(killed))] = dup
    resumes = sum(len((killed / f"iter{t}" / "train" / "resumed.jsonl").read_text().splitlines())
                  for t in (1, 2) if (killed / f"iter{t}" / "train" / "resumed.jsonl").is_file())
    n_killed = sum(e["outcome"].startswith("killed") for e in events)
    return {"bench": "kill_resume", "kills": n_killed, "attempts": len(events), "data_files": len(theirs),
            "mismatched_files": mismatched, "max_weight_diff": weight_diff, "weights_ok": weight_diff <= atol,
            "atol": atol, "recomputed_shards": recomputed, "train_resumes_from_checkpoint": resumes,
            "reference_seconds": round(ref_seconds, 1), "events": events,
            "killed_at": [e["trigger"] for e in events if e["outcome"].startswith("killed")],
            "ok": not mismatched and weight_diff <= atol and not recomputed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atol", type=float, default=1e-5, help="max abs weight difference allowed")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="3 kills")
    args = parser.parse_args()
    kills = 3 if args.quick else args.kills
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="icr-kill-"))
    result = harness(kills, args.seed, workdir, args.atol)
    print(f"kill/resume: {result['kills']} kills over {result['attempts']} attempts; "
          f"{len(result['mismatched_files'])} of {result['data_files']} data files differ; max weight diff "
          f"{result['max_weight_diff']:.2e}; shards computed twice: {result['recomputed_shards'] or 'none'}; "
          f"training resumed from a checkpoint {result['train_resumes_from_checkpoint']}x -> "
          f"{'OK' if result['ok'] else 'FAIL'}")
    print(json.dumps({k: v for k, v in result.items() if k != "events"}))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
