"""`make demo` across build seeds: the figures a user on another machine can expect, with their spread.

    python bench/demo_seeds.py --seeds 0,1,2,3,4 --out docs/results/sandbox-demo-seeds

Why: the demo is deterministic on one machine (same CPU, same versions: the same bytes) but not
across machines: other CPU kernels round differently, and sampling plus tiny-model training amplify
the difference into other numbers (issue 25: Swahili at 0 on another EPYC). Build seeds stand in for
that: each seed S runs the demo's own config with another world, starting pair and loop seed,

    icr run configs/sandbox.yaml --set name=sandbox-seed<S> --set prepare.args.seed=<S> --set seed=<42+S>

(seed 0 is `make demo` itself: the same build and run seed), one after the other, each under
`/usr/bin/time -v`; a killed collection is resumed by running the same command (icr resumes each
run; a finished one costs seconds). Then it writes to --out: seed<S>/ (results.json, premise.json,
sft_check.json, language_flags.json, time.txt), spread.json (every figure per seed, mean, sd, min,
max, 95% prediction interval: `icr.stats.spread`) and spread.md (the tables README and
docs/sandbox.md show). `bench/check_demo.py` compares one run with spread.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

LANGS = ["en", "es", "de", "fr", "ru", "sw"]
NON_EN = [lang for lang in LANGS if lang != "en"]
MODELS = ["sft", "M0", "M1", "M2", "M1-oracle-pairs", "M2-oracle-pairs", "M1-random-pairs", "M2-random-pairs"]
MODEL_NAMES = {"sft": "π_SFT", "M0": "π0 (English DPO)", "M1": "π1 ICR", "M2": "π2 ICR",
               "M1-oracle-pairs": "π1 oracle-chosen pairs (upper bound)", "M2-oracle-pairs": "π2 oracle-chosen pairs",
               "M1-random-pairs": "π1 random pairs (lower bound)", "M2-random-pairs": "π2 random pairs"}
# the figures README's table states (and check_demo.py checks); the rest of spread.json is for reading
HEADLINE = ([f"wr.{m}.en" for m in MODELS] + [f"wr.{m}.non_en" for m in MODELS]
            + [f"fidelity.{m}.non_en" for m in MODELS] + ["premise.reward_accuracy.en", "premise.win_rate.min"])


def figures(run_dir: Path, prepared: Path) -> dict[str, float]:
    """Every figure of one finished demo run: win rate (%) and fidelity (share) per model and
    language and their non-English averages, the premise per language and its extremes."""
    rows = {(r["model"], r["lang"]): r for r in json.loads((run_dir / "results.json").read_text())}
    out = {}
    for m in MODELS:
        for lang in LANGS:
            r = rows.get((m, lang))
            if r is None:
                raise SystemExit(f"{run_dir / 'results.json'}: no row for {m} in {lang}: not a finished demo run")
            out[f"wr.{m}.{lang}"] = r["wr"]
            out[f"fidelity.{m}.{lang}"] = r["fidelity"]
        out[f"wr.{m}.non_en"] = sum(out[f"wr.{m}.{lang}"] for lang in NON_EN) / len(NON_EN)
        out[f"fidelity.{m}.non_en"] = sum(out[f"fidelity.{m}.{lang}"] for lang in NON_EN) / len(NON_EN)
    premise = json.loads((prepared / "premise.json").read_text())
    for lang in LANGS:
        out[f"premise.reward_accuracy.{lang}"] = premise["reward_accuracy"][lang]
        out[f"premise.win_rate.{lang}"] = premise["win_rate_pi0_vs_sft"][lang]
    out["premise.reward_accuracy.non_en_min"] = min(out[f"premise.reward_accuracy.{lang}"] for lang in NON_EN)
    out["premise.reward_accuracy.non_en_max"] = max(out[f"premise.reward_accuracy.{lang}"] for lang in NON_EN)
    out["premise.win_rate.min"] = min(out[f"premise.win_rate.{lang}"] for lang in LANGS)
    out["premise.win_rate.max"] = max(out[f"premise.win_rate.{lang}"] for lang in LANGS)
    flags = prepared / "language_flags.json"
    out["flagged_languages"] = len(json.loads(flags.read_text())) if flags.is_file() else 0
    return out


def bounds(name: str) -> tuple[float, float]:
    """The domain of a figure: win rates in %, shares in [0, 1], counts from 0."""
    if name.startswith("wr."):
        return 0.0, 100.0
    if name == "flagged_languages":
        return 0.0, float(len(LANGS))
    return 0.0, 1.0


def prepared_of(run_dir: Path) -> Path:
    """The run's prepare folder (its judge's world, as config.yaml recorded it)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    world = (cfg.get("evaluation") or {}).get("judge_args", {}).get("world_dir")
    if not world:
        raise SystemExit(f"{run_dir / 'config.yaml'}: evaluation.judge_args.world_dir is not set: not a sandbox run")
    return Path(world)


def run_seed(seed: int, run_root: Path, seed_dir: Path) -> Path:
    """Run (or resume) the demo for one build seed; returns its run folder."""
    seed_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(REPO / ".venv" / "bin" / "icr"), "run", str(REPO / "configs" / "sandbox.yaml"),
           "--set", f"name=sandbox-seed{seed}", "--set", f"prepare.args.seed={seed}", "--set", f"seed={42 + seed}",
           "--set", f"run_root={run_root}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    time_file = seed_dir / "time.txt"
    if not time_file.is_file() or "Exit status: 0" not in time_file.read_text():
        timed = ["/usr/bin/time", "-v", "-o", str(time_file)] if Path("/usr/bin/time").is_file() else []
        print(f"demo_seeds: seed {seed}: {' '.join(cmd)}", flush=True)
        with open(seed_dir / "run.log", "w") as log:
            code = subprocess.call(timed + cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        if code:
            raise SystemExit(f"demo_seeds: seed {seed} failed (exit {code}); see {seed_dir / 'run.log'}")
    return run_root / f"sandbox-seed{seed}"


def collect(seeds: list[int], run_root: Path, out: Path) -> dict:
    from icr.stats import spread
    from record_run import parse_time_v

    per_seed, values = {}, {}
    for seed in seeds:
        run_dir = run_seed(seed, run_root, out / f"seed{seed}")
        prepared = prepared_of(run_dir)
        for name in ("premise.json", "sft_check.json", "language_flags.json", "recipe.json"):
            if (prepared / name).is_file():
                shutil.copy2(prepared / name, out / f"seed{seed}" / name)
        shutil.copy2(run_dir / "results.json", out / f"seed{seed}" / "results.json")
        figs = figures(run_dir, prepared)
        for name, v in figs.items():
            values.setdefault(name, {})[seed] = v
        time_file = out / f"seed{seed}" / "time.txt"
        cost = parse_time_v(time_file.read_text()) if time_file.is_file() else {}
        sft_check = json.loads((prepared / "sft_check.json").read_text()) if (prepared / "sft_check.json").is_file() else {}
        per_seed[seed] = {**cost, "repair_epochs": sft_check.get("repair_epochs"),
                          "flags": json.loads((prepared / "language_flags.json").read_text())
                          if (prepared / "language_flags.json").is_file() else {}}
    import torch
    import transformers
    import trl

    summary = {"seeds": seeds, "command": "icr run configs/sandbox.yaml --set name=sandbox-seed<S> "
                                          "--set prepare.args.seed=<S> --set seed=<42+S>",
               "machine": f"{_cpu_name()}, {os.cpu_count()} CPU cores, {platform.system()}",
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
               "headline": HEADLINE, "per_seed": per_seed,
               "figures": {name: {"values": vals, **spread(list(vals.values()), *bounds(name))}
                           for name, vals in values.items()}}
    (out / "spread.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "spread.md").write_text(markdown(summary))
    return summary


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def cell(fig: dict, scale: float = 1.0, digits: int = 1) -> str:
    """`mean ± sd [min–max]` of one figure."""
    f = lambda v: f"{v * scale:.{digits}f}"  # noqa: E731
    return f"{f(fig['mean'])} ± {f(fig['sd'])} [{f(fig['min'])}–{f(fig['max'])}]"


def markdown(summary: dict) -> str:
    figs, n = summary["figures"], len(summary["seeds"])
    lines = [f"# `make demo` across {n} build seeds", "",
             f"Machine: {summary['machine']}; " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()) + ".",
             f"Each cell: mean ± sd [min–max] over build seeds {', '.join(map(str, summary['seeds']))} "
             "(`bench/demo_seeds.py`). WR in %, fidelity as a share.", "",
             "| model | en WR | non-English WR (avg es/de/fr/ru/sw) | non-English fidelity |", "|---|---|---|---|"]
    for m in MODELS:
        lines.append(f"| {MODEL_NAMES[m]} | {cell(figs[f'wr.{m}.en'])} | {cell(figs[f'wr.{m}.non_en'])} | "
                     f"{cell(figs[f'fidelity.{m}.non_en'], digits=2)} |")
    lines += ["", "Per language, WR in % (mean ± sd [min–max]):", "",
              "| model | " + " | ".join(LANGS) + " |", "|---|" + "---|" * len(LANGS)]
    for m in MODELS:
        lines.append(f"| {m} | " + " | ".join(cell(figs[f"wr.{m}.{lang}"]) for lang in LANGS) + " |")
    lines += ["", "Premise (60 dev prompts per language, before any ICR):", "",
              "| | " + " | ".join(LANGS) + " |", "|---|" + "---|" * len(LANGS),
              "| π0 implicit-reward accuracy (cross-lingual) | "
              + " | ".join(cell(figs[f"premise.reward_accuracy.{lang}"], digits=2) for lang in LANGS) + " |",
              "| π0 vs π_SFT oracle win rate | "
              + " | ".join(cell(figs[f"premise.win_rate.{lang}"], digits=2) for lang in LANGS) + " |", "",
              "95% prediction intervals for one more build (mean ± t·sd·√(1+1/n)), what `bench/check_demo.py` "
              "checks:", "", "| figure | interval |", "|---|---|"]
    for name in summary["headline"]:
        lo, hi = figs[name]["prediction_95"]
        digits = 1 if name.startswith("wr.") else 2
        lines.append(f"| `{name}` | {lo:.{digits}f} – {hi:.{digits}f} |")
    lines += ["", "Per seed: wall time, peak memory, SFT repair epochs, flagged languages:", "",
              "| seed | wall | peak RSS | repair epochs | flagged |", "|---|---|---|---|---|"]
    for seed, info in summary["per_seed"].items():
        wall = f"{info['wall_s'] / 60:.1f} min" if info.get("wall_s") else "–"
        rss = f"{info['peak_rss_mib'] / 1024:.2f} GiB" if info.get("peak_rss_mib") else "–"
        flags = "; ".join(f"{k}: {v}" for k, v in info["flags"].items()) or "none"
        lines.append(f"| {seed} | {wall} | {rss} | {info['repair_epochs']} | {flags} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4", help="build seeds, comma-separated (at least 2)")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "sandbox-demo-seeds"))
    ap.add_argument("--run-root", default=str(REPO / "runs"))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:
        raise SystemExit("--seeds: at least 2 seeds make a spread")
    summary = collect(seeds, Path(args.run_root), Path(args.out))
    print((Path(args.out) / "spread.md").read_text())
    print(json.dumps({name: summary["figures"][name]["prediction_95"] for name in HEADLINE}))


if __name__ == "__main__":
    main()
