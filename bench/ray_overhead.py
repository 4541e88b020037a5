"""Ray backend overhead: `icr run configs/tiny.yaml` with `workers: 2` on the local backend and on
a Ray cluster (`cluster.backend: ray`), in the same run, as a ratio of wall times.

    .venv/bin/python bench/ray_overhead.py [--quick] [--config configs/tiny.yaml]

Needs ray (`pip install 'icr[ray]'`). Starts a one-node Ray cluster in this process the way
`cluster.address: local` does (every server on 127.0.0.1, no dashboard, num_cpus = the machine's
cores) and times that start on its own: it is paid once per `icr run`, not per stage. Then three
runs of the same config on fresh run roots, one after the other:

- local: the local backend as a user gets it (`workers: 2`; on the CPU training and evaluation
  sampling stay in the `icr run` process, `isolate_stages: auto`);
- local, isolated: the local backend with `isolate_stages: true`, i.e. the same processes as
  under Ray (every model stage its own child process);
- ray: `cluster.backend: ray` (every model stage a Ray task starting that child).

Ratios: ray / local-isolated (what Ray adds per stage: task submission, a Ray worker, the node
file; the same child processes either way) and ray / local (what a CPU user pays in all). The
prepared tiny pair is built before the clock starts. Every run's shards, pairs and weights are
compared byte for byte (`identical`). --quick: 1 iteration. The temp folders are removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, finish, skip

PATTERNS = ("iter*/*/shard-*.jsonl", "iter*/pairs/pairs.jsonl", "iter*/model/model.safetensors")


def digests(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in PATTERNS for p in sorted(run.glob(pattern))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 iteration")
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    args = ap.parse_args()
    if importlib.util.find_spec("ray") is None:  # not imported here: icr.ray_backend.connect imports it first
        skip("ray_overhead", "ray is not installed (pip install 'icr[ray]')")
        return
    from icr.config import ClusterConfig, load_config
    from icr.loop import resolve_placeholders, run_experiment, run_prepare
    from icr.ray_backend import connect, shutdown

    tmp = Path(tempfile.mkdtemp(prefix="icr-bench-ray-"))
    common = ["workers=2"] + (["iterations=1"] if args.quick else [])
    runs = {"local": [], "local_isolated": ["isolate_stages=true"],
            "ray": ["cluster.backend=ray", "cluster.address=local"]}
    try:
        base = load_config(args.config, common)
        run_prepare(base)  # the tiny pair, built or found in the cache, before any clock starts
        t0 = time.perf_counter()
        connect(ClusterConfig(backend="ray", address="local"))
        ray_start = time.perf_counter() - t0
        seconds, files = {}, {}
        for name, sets in runs.items():
            cfg = load_config(args.config, [f"run_root={tmp / name}", *common, *sets])
            cfg = resolve_placeholders(cfg, run_prepare(cfg))
            t0 = time.perf_counter()
            run = run_experiment(cfg)
            seconds[name] = round(time.perf_counter() - t0, 2)
            files[name] = digests(run)
            print(f"{name}: {seconds[name]} s", file=sys.stderr)
        shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    identical = len(files["local"]) > 0 and files["local"] == files["local_isolated"] == files["ray"]
    figures = {"bench": "ray_overhead", "config": Path(args.config).name, "iterations": base.iterations,
               "workers": 2, "cpus": os.cpu_count(), "ray_start_s": round(ray_start, 2), "seconds": seconds,
               "ray_vs_local_isolated": round(seconds["ray"] / seconds["local_isolated"], 2),
               "ray_vs_local": round(seconds["ray"] / seconds["local"], 2), "files_compared": len(files["local"]),
               "identical": identical}
    finish(f"ray_overhead: ray {seconds['ray']} s vs local isolated {seconds['local_isolated']} s = "
           f"{figures['ray_vs_local_isolated']}x, vs local {seconds['local']} s = {figures['ray_vs_local']}x; "
           f"ray start {figures['ray_start_s']} s (not counted); {len(files['local'])} files identical: {identical}",
           figures)


if __name__ == "__main__":
    main()
