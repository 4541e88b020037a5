"""Record a finished run under docs/results/<name>/: its numbers, its premise, and what it cost.

    python bench/record_run.py runs/sandbox-gemma docs/results/sandbox-gemma \
        --prepared .cache/icr/prepared/bench_sandbox_gemma.py.prepare_gemma-<key> \
        --time time-1.txt --time time-2.txt --command "make demo-gemma"

Copies results.json, report.md, its plots, config.yaml, timings.json and diagnostics/*.json from
the run folder, and premise.json, recipe.json and the build's timings from the prepared folder;
writes run.json with the command, the machine, and the wall time (summed) and peak memory
(largest) of every attempt from `/usr/bin/time -v` outputs (a resumed run has several). Refuses
an unfinished run (no results.json or no report.md): the record is of a finished run or nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

RUN_FILES = ("results.json", "report.md", "config.yaml", "timings.json")
PREPARED_FILES = {"premise.json": "premise.json", "recipe.json": "recipe.json", "timings.json": "build_timings.json"}


def parse_time_v(text: str) -> dict:
    """Wall seconds, peak resident MiB and exit status from one `/usr/bin/time -v` output."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    if not wall or not rss:
        raise ValueError("not a /usr/bin/time -v output (no wall time or peak memory line)")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return {"wall_s": round(seconds, 1), "peak_rss_mib": round(int(rss.group(1)) / 1024, 1),
            "exit_status": int(status.group(1)) if status else None}


def record(run_dir: Path, out_dir: Path, *, prepared: Path | None, time_files: list[Path], command: str) -> dict:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    for name in ("results.json", "report.md"):
        if not (run_dir / name).is_file():
            raise SystemExit(f"record_run: {run_dir / name} is missing: the run has not finished")
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out_dir / name)
            copied.append(name)
    for png in sorted(run_dir.glob("*.png")):
        shutil.copy2(png, out_dir / png.name)
        copied.append(png.name)
    # the reward's agreement with the judge per iteration (report.md shows iteration 1's only)
    for diag in sorted((run_dir / "diagnostics").glob("*.json")):
        (out_dir / "diagnostics").mkdir(exist_ok=True)
        shutil.copy2(diag, out_dir / "diagnostics" / diag.name)
        copied.append(f"diagnostics/{diag.name}")
    if prepared is not None:
        for src, dst in PREPARED_FILES.items():
            if (Path(prepared) / src).is_file():
                shutil.copy2(Path(prepared) / src, out_dir / dst)
                copied.append(dst)
    attempts = [{"file": str(f), **parse_time_v(Path(f).read_text())} for f in time_files]
    info = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
            "attempts": attempts, "wall_s_total": round(sum(a["wall_s"] for a in attempts), 1),
            "peak_rss_mib": max((a["peak_rss_mib"] for a in attempts), default=None), "files": copied}
    (out_dir / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--prepared", default=None, help="the prepare step's folder (premise.json)")
    ap.add_argument("--time", action="append", default=[], help="a /usr/bin/time -v output (one per attempt)")
    ap.add_argument("--command", required=True, help="the command that ran")
    args = ap.parse_args(argv)
    info = record(Path(args.run_dir), Path(args.out_dir), prepared=Path(args.prepared) if args.prepared else None,
                  time_files=[Path(t) for t in args.time], command=args.command)
    json.dump(info, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
