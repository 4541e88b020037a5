"""Pipeline benchmark: wall time and peak memory of each stage of `icr run configs/tiny.yaml`.

    .venv/bin/python bench/pipeline.py [--quick] [--config configs/tiny.yaml]

Runs the real CLI in this process on a fresh run root (`--set run_root=<temp>`) with ICR_CACHE in
a temp folder (so `prepare` builds the tiny pair anew and is timed too). Each stage function of
icr.workers / icr.stages that the loop calls is wrapped to record its wall time and the peak resident memory while it ran (a
thread samples /proc/self/status VmRSS every 20 ms; the sampler is reset at each stage start).
The run's own timings.json is read back and reported beside ours. --quick: 1 iteration, n=2, and
the existing ICR_CACHE (a prepared tiny pair is reused, so `prepare` is a cache hit); the full run
uses a fresh temp ICR_CACHE. The temp folders are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, finish, peak_rss_mb


class RssSampler(threading.Thread):
    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, 0.0, False

    @staticmethod
    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def reset(self) -> None:
        self.peak = self.rss_mb()

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.rss_mb())
            time.sleep(self.every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 iteration, 2 samples per prompt")
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="icr-bench-pipeline-")
    if not args.quick:
        os.environ["ICR_CACHE"] = str(Path(tmp) / "cache")
    sets = [f"run_root={Path(tmp) / 'runs'}"]
    if args.quick:
        sets += ["iterations=1", "generation.n=2"]
    import icr.loop
    import icr.stages
    import icr.workers
    from icr.cli import main as cli_main

    sampler = RssSampler()
    sampler.start()
    stages: list[dict] = []

    def wrap(module, name, label):
        fn = getattr(module, name)

        def wrapped(*a, **k):
            label_ = label(a) if callable(label) else label
            sampler.reset()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                stages.append({"stage": label_, "seconds": round(time.perf_counter() - t0, 2),
                               "peak_rss_mb": round(max(sampler.peak, sampler.rss_mb()), 1)})
        setattr(module, name, wrapped)

    # What the loop calls: generate/score/train through icr.workers (in this process unless
    # isolate_stages is on, then the figures are the parent's), pairs directly.
    wrap(icr.workers, "run_stage", lambda a: a[0])  # run_stage(kind, cfg, plan, ...)
    wrap(icr.stages, "run_pairs", "pairs")
    if hasattr(icr.loop, "run_prepare"):
        wrap(icr.loop, "run_prepare", "prepare")
    t0 = time.perf_counter()
    cmd = ["run", args.config] + [x for s in sets for x in ("--set", s)]
    code = cli_main(cmd)
    total = time.perf_counter() - t0
    sampler.stop = True
    if code not in (0, None):
        raise SystemExit(f"icr {' '.join(cmd)} exited {code}")
    run_dirs = [p.parent for p in (Path(tmp) / "runs").rglob("timings.json")]
    timings = json.loads((run_dirs[0] / "timings.json").read_text()) if run_dirs else {}
    per = {}
    for s in stages:
        agg = per.setdefault(s["stage"], {"seconds": 0.0, "peak_rss_mb": 0.0, "calls": 0})
        agg["seconds"] = round(agg["seconds"] + s["seconds"], 2)
        agg["peak_rss_mb"] = max(agg["peak_rss_mb"], s["peak_rss_mb"])
        agg["calls"] += 1
    figures = {"bench": "pipeline", "config": os.path.relpath(args.config, REPO), "total_s": round(total, 2),
               "peak_rss_mb": round(peak_rss_mb(), 1), "stages": per, "stage_calls": stages,
               "run_timings": timings, "sets": sets, "quick": args.quick}
    shutil.rmtree(tmp, ignore_errors=True)
    finish("pipeline: " + ", ".join(f"{k} {v['seconds']} s / {v['peak_rss_mb']} MiB" for k, v in per.items())
           + f"; total {figures['total_s']} s (icr {' '.join(cmd)})", figures)


if __name__ == "__main__":
    sys.exit(main())
