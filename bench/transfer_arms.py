"""Issue 21's experiment: does the English implicit reward carry a quality pi0 knows into other languages?

    python bench/transfer_arms.py run     --seeds 0,1,2 --out docs/results/sandbox-transfer
    python bench/transfer_arms.py analyze --seeds 0,1,2 --out docs/results/sandbox-transfer

The protocol is fixed in docs/sandbox.md ("Does the reward transfer a quality pi0 knows?"); this
script only carries it out. `run`, per build seed S, one after the other (resumable: a killed
collection is continued by the same command; icr resumes each run by stage, a finished one costs
seconds):
  1. `icr run configs/sandbox-transfer.yaml --set name=transfer-s<S> --set prepare.args.seed=<S>
     --set seed=<42+S>` under `/usr/bin/time -v` (one time file per attempt: cost per seed);
  2. the on-policy premise of the build (`bench/sandbox_premise.py`, dev prompts, 16 pi0 samples per
     prompt at T 0.9) -> s<S>/premise_on_policy.json;
  3. the record (`bench/record_run.py`) -> s<S>/, plus s<S>/eval_verdicts.json: the oracle's verdict
     on every evaluated answer of every arm (what `analyze` reads: the intervals can be recomputed
     from the record alone), and s<S>/trained_pairs.json: the oracle's ordering of the pairs each
     arm actually trained on.
`analyze` pools the seeds' records: per arm and language (and non-English pooled), the win rate
against the references and the share of each oracle quality, and the paired differences the
protocol names, each with a 95% interval from a bootstrap over evaluation prompts, stratified by
seed (`icr.stats.cluster_bootstrap`: the languages of a prompt are translations of one task, so a
prompt is drawn with all its languages). Writes arms.json and arms.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

CONFIG = REPO / "configs" / "sandbox-transfer.yaml"
LANGS = ["en", "es", "de", "fr", "ru", "sw"]
NON_EN = LANGS[1:]
# arm label -> the evaluated model folder (run-relative); M1 of each control, M0 and pi_SFT of the main run
ARMS = {"sft": "eval/sft", "M0": "eval/M0", "icr": "eval/M1", "icr-filter": "controls/icr-filter/eval/M1-icr-filter",
        "oracle-pairs": "controls/oracle-pairs/eval/M1-oracle-pairs",
        "random-pairs": "controls/random-pairs/eval/M1-random-pairs"}
PAIRS = {"icr": "iter1/pairs/pairs.jsonl", "icr-filter": "controls/icr-filter/iter1/pairs/pairs.jsonl",
         "oracle-pairs": "controls/oracle-pairs/iter1/pairs/pairs.jsonl",
         "random-pairs": "controls/random-pairs/iter1/pairs/pairs.jsonl"}
METRICS = ["win", "correct", "language", "concise", "well_formed"]
# the paired differences the protocol names (a, b): a - b on the same prompts
CONTRASTS = [("oracle-pairs", "M0"), ("random-pairs", "M0"), ("icr", "M0"), ("icr-filter", "M0"),
             ("icr", "random-pairs"), ("icr-filter", "random-pairs"), ("oracle-pairs", "random-pairs"),
             ("icr-filter", "icr")]


def run_dir(runs: Path, seed: int) -> Path:
    return runs / f"transfer-s{seed}"


def prepared_of(run: Path) -> Path:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return Path(cfg["evaluation"]["judge_args"]["world_dir"])


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

def run_seed(seed: int, runs: Path, out: Path, premise_samples: int) -> None:
    rec = out / f"s{seed}"
    rec.mkdir(parents=True, exist_ok=True)
    run = run_dir(runs, seed)
    if not (run / "results.json").exists():
        attempt = len(list(rec.glob("time-*.txt"))) + 1
        cmd = ["/usr/bin/time", "-v", "-o", str(rec / f"time-{attempt}.txt"), sys.executable, "-m", "icr.cli", "run",
               str(CONFIG), "--set", f"name=transfer-s{seed}", "--set", f"run_root={runs}",
               "--set", f"prepare.args.seed={seed}", "--set", f"seed={42 + seed}"]
        print("+", " ".join(cmd), flush=True)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        code = subprocess.call(cmd, cwd=REPO, env=env)
        if code != 0:
            raise SystemExit(f"seed {seed}: icr run exited {code} (rerun the same command to resume)")
    prepared = prepared_of(run)
    if not (rec / "premise_on_policy.json").exists():
        from sandbox_premise import on_policy_premise

        res = on_policy_premise(prepared, premise_samples, 0.9, "dev", 11 + seed)
        (rec / "premise_on_policy.json").write_text(json.dumps(res, indent=1) + "\n")
    times = sorted(rec.glob("time-*.txt"))
    cmd = [sys.executable, str(REPO / "bench" / "record_run.py"), str(run), str(rec), "--prepared", str(prepared),
           "--command", f"icr run configs/sandbox-transfer.yaml --set name=transfer-s{seed} "
                        f"--set prepare.args.seed={seed} --set seed={42 + seed}"]
    for t in times:
        cmd += ["--time", str(t)]
    subprocess.check_call(cmd, cwd=REPO)
    for name in ("sft_check.json", "language_flags.json"):
        if (prepared / name).exists():
            shutil.copy(prepared / name, rec / name)
    (rec / "eval_verdicts.json").write_text(json.dumps(eval_verdicts(run, prepared)) + "\n")
    (rec / "trained_pairs.json").write_text(json.dumps(trained_pairs(run, prepared), indent=1) + "\n")


def eval_verdicts(run: Path, prepared: Path) -> dict:
    """{arm: {lang: {"ids": [...], metric: "0101..." or [win, ...]}}}: the oracle on every evaluated
    answer (win: 1 / 0.5 / 0 against the fixed reference answer of that prompt)."""
    from icr.sandbox.oracle import OracleJudge

    oracle = OracleJudge(prepared)
    # the oracle's score of each prompt's fixed reference answer, per language (the same for every arm)
    ref_score = {lang: {r["id"]: oracle.score_text(r["output"], r["id"], lang)
                        for r in json.loads((prepared / "references" / f"{lang}.json").read_text())}
                 for lang in LANGS}
    out: dict = {}
    for arm, folder in ARMS.items():
        for lang in LANGS:
            path = run / folder / lang / "model_outputs.json"
            if not path.exists():
                raise SystemExit(f"{path}: missing: the run is not finished (every arm is evaluated in every language)")
            rows = sorted(json.loads(path.read_text()), key=lambda r: r["id"])
            ver = [oracle.verdict(r["output"], r["id"], lang) for r in rows]
            win = []
            for r, v in zip(rows, ver):
                ref = ref_score[lang][r["id"]]
                win.append(1.0 if v.score > ref else 0.0 if v.score < ref else 0.5)
            out.setdefault(arm, {})[lang] = {"ids": [r["id"] for r in rows], "win": win,
                                             **{m: "".join("1" if getattr(v, m) else "0" for v in ver)
                                                for m in METRICS[1:]}}
    return out


def trained_pairs(run: Path, prepared: Path) -> dict:
    """Per arm and language: the pairs trained on, and how the oracle orders them (chosen better /
    tied / worse), overall and for the pairs whose most important difference is correctness."""
    from icr.sandbox.oracle import OracleJudge

    oracle = OracleJudge(prepared)
    out: dict = {}
    for arm, rel in PAIRS.items():
        per: dict = {}
        for line in (run / rel).read_text().splitlines():
            p = json.loads(line)
            a, b = oracle.score_text(p["chosen"], p["id"], p["lang"]), oracle.score_text(p["rejected"], p["id"], p["lang"])
            kind = oracle.pair_kind(p["chosen"], p["rejected"], p["id"], p["lang"])
            order = "better" if a > b else "worse" if a < b else "tied"
            for key in ("all", kind):
                c = per.setdefault(p["lang"], {}).setdefault(key, {"better": 0, "tied": 0, "worse": 0})
                c[order] += 1
        out[arm] = per
    return out


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------

def rows(records: dict[int, dict], arm: str, metric: str, langs: list[str]):
    """(values, clusters, strata) of one arm's metric over `langs`: one value per (seed, lang, prompt)."""
    vals, clus, strata = [], [], []
    for seed, rec in records.items():
        for lang in langs:
            r = rec[arm][lang]
            col = r[metric] if metric == "win" else [float(c) for c in r[metric]]
            vals += [float(x) for x in col]
            clus += [(seed, i) for i in r["ids"]]
            strata += [seed] * len(col)
    return vals, clus, strata


def interval(vals, clus, strata, seed: int = 0) -> dict:
    from icr.stats import cluster_bootstrap

    r = cluster_bootstrap(vals, clus, seed=seed, strata=strata)
    return {"mean": round(r["estimate"], 4), "ci_95": [round(r["ci_95"][0], 4), round(r["ci_95"][1], 4)], "n": len(vals)}


def recovered(records: dict[int, dict], arm: str, groups: dict[str, list[str]]) -> dict:
    """Share of the oracle arm's correctness gain over random pairs that `arm` recovers,
    (arm − random) / (oracle − random), with its interval from the same prompt bootstrap (the three
    arms' answers to a prompt are drawn together)."""
    from icr.stats import cluster_bootstrap

    out = {}
    for g, langs in groups.items():
        va, ca, sa = rows(records, arm, "correct", langs)
        vr, _, _ = rows(records, "random-pairs", "correct", langs)
        vo, _, _ = rows(records, "oracle-pairs", "correct", langs)

        def ratio(xs):
            gain = sum(o - r for _, r, o in xs)
            return sum(a - r for a, r, _ in xs) / gain if gain else float("nan")

        r = cluster_bootstrap(list(zip(va, vr, vo)), ca, statistic=ratio, strata=sa)
        out[g] = {"mean": round(r["estimate"], 4), "ci_95": [round(r["ci_95"][0], 4), round(r["ci_95"][1], 4)],
                  "n": len(va)}
    return out


def analyze(records: dict[int, dict]) -> dict:
    groups = {**{lang: [lang] for lang in LANGS}, "non_en": NON_EN}
    res: dict = {"seeds": sorted(records), "arms": {}, "contrasts": {},
                 "oracle_gain_recovered": {arm: recovered(records, arm, {"en": ["en"], "non_en": NON_EN})
                                           for arm in ("icr", "icr-filter")}}
    for arm in ARMS:
        for metric in METRICS:
            for g, langs in groups.items():
                res["arms"].setdefault(arm, {}).setdefault(metric, {})[g] = interval(*rows(records, arm, metric, langs))
    for a, b in CONTRASTS:
        key = f"{a} - {b}"
        for metric in METRICS:
            for g, langs in groups.items():
                va, ca, sa = rows(records, a, metric, langs)
                vb, cb, _ = rows(records, b, metric, langs)
                if ca != cb:
                    raise SystemExit(f"{a} and {b}: different evaluation prompts; the record is inconsistent")
                res["contrasts"].setdefault(key, {}).setdefault(metric, {})[g] = interval(
                    [x - y for x, y in zip(va, vb)], ca, sa)
    return res


def fmt(r: dict, pct: bool) -> str:
    k = 100 if pct else 1
    d = 1 if pct else 2
    return f"{r['mean'] * k:.{d}f} [{r['ci_95'][0] * k:.{d}f}, {r['ci_95'][1] * k:.{d}f}]"


def markdown(res: dict) -> str:
    seeds = ", ".join(map(str, res["seeds"]))
    lines = [f"# Issue 21: four arms, iteration 1, build seeds {seeds}", "",
             "Each cell: mean [95% interval], bootstrap over evaluation prompts stratified by seed (a prompt is drawn "
             "with all its languages). Win rate in % against the fixed references; shares of the oracle's qualities.", ""]
    for metric, pct, title in (("correct", False, "share correct"), ("win", True, "win rate (%)"),
                               ("language", False, "share in the prompt's language")):
        lines += [f"## {title}", "", "| arm | " + " | ".join(LANGS) + " | non-English |", "|---|" + "---|" * 7]
        for arm, per in res["arms"].items():
            lines.append(f"| {arm} | " + " | ".join(fmt(per[metric][g], pct) for g in LANGS + ["non_en"]) + " |")
        lines.append("")
    lines += ["## Paired differences (same prompts)", "", "| contrast | correct, en | correct, non-English | "
              "win rate, non-English | language, non-English |", "|---|---|---|---|---|"]
    for key, per in res["contrasts"].items():
        lines.append(f"| {key} | {fmt(per['correct']['en'], False)} | {fmt(per['correct']['non_en'], False)} | "
                     f"{fmt(per['win']['non_en'], True)} | {fmt(per['language']['non_en'], False)} |")
    lines += ["", "Share of the oracle arm's correctness gain over random pairs recovered, (arm − random) / (oracle − "
              "random), same bootstrap:", "", "| arm | en | non-English |", "|---|---|---|"]
    for arm, per in res["oracle_gain_recovered"].items():
        lines.append(f"| {arm} | {fmt(per['en'], False)} | {fmt(per['non_en'], False)} |")
    if res.get("per_seed"):
        lines += ["", "## Per build seed: premise, trained pairs, cost", "",
                  "| seed | premise: en correctness agreement on pi0's own samples (pairs) | pi0 correct en / non-en (T 0.9, dev) | "
                  "trained correctness pairs ordered right, non-en: icr / icr-filter / random | wall, peak | "
                  "seconds: build; shared samples + rewards; per arm (pairs + train + evaluation) icr / filter / oracle / random |",
                  "|---|---|---|---|---|---|"]
        for seed, p in res["per_seed"].items():
            pr, tp = p["premise"], p["trained_correctness_right"]
            lines.append(f"| {seed} | {pr['en_agree']:.2f} [{pr['en_ci'][0]:.2f}, {pr['en_ci'][1]:.2f}] ({pr['en_n']}) | "
                         f"{pr['pi0_correct_en']:.2f} / {pr['pi0_correct_non_en']:.2f} | "
                         + " / ".join("–" if tp[a] is None else f"{tp[a]:.2f}" for a in ("icr", "icr-filter", "random-pairs"))
                         + f" | {p['wall_s'] / 60:.1f} min, {p['peak_rss_mib'] / 1024:.2f} GiB | {p['build_s']:.0f}; "
                         f"{p['shared_samples_and_rewards_s']:.0f}; "
                         + " / ".join(f"{p['arm_s'][a]:.0f}" for a in ("icr", "icr-filter", "oracle-pairs", "random-pairs"))
                         + " |")
    return "\n".join(lines) + "\n"


def per_seed(rec: Path) -> dict:
    """What one seed's record says besides the evaluated answers: its premise, how right the
    correctness pairs each arm trained on were (non-English), and its cost."""
    prem = json.loads((rec / "premise_on_policy.json").read_text())["languages"]
    en = prem["en"]["agreement"]["correctness"]
    pairs = json.loads((rec / "trained_pairs.json").read_text())
    right = {}
    for arm, per in pairs.items():
        c = [per[lang]["correctness"] for lang in NON_EN if "correctness" in per.get(lang, {})]
        n = sum(x["better"] + x["tied"] + x["worse"] for x in c)
        right[arm] = round(sum(x["better"] for x in c) / n, 4) if n else None
    run = json.loads((rec / "run.json").read_text())
    timings = json.loads((rec / "timings.json").read_text())
    # seconds per arm: its own pairs, training and evaluation; iteration 1's samples and rewards are shared
    arm_s = {arm: round(sum(v for k, v in timings.items() if k.startswith(prefix + "iter1/")
                            and k.split("/")[-1] in ("pairs", "train", "evaluate")), 1)
             for arm, prefix in (("icr", ""), ("icr-filter", "icr-filter/"), ("oracle-pairs", "oracle-pairs/"),
                                 ("random-pairs", "random-pairs/"))}
    shared = round(timings.get("iter1/generate", 0) + timings.get("iter1/score", 0), 1)
    return {"arm_s": arm_s, "shared_samples_and_rewards_s": shared,
            "build_s": round(sum(json.loads((rec / "build_timings.json").read_text()).values()), 1),
            "premise": {"en_agree": en["agree"], "en_ci": en["ci_95"], "en_n": en["n"],
                        "pi0_correct_en": prem["en"]["pi0_quality"]["correct"],
                        "pi0_correct_non_en": sum(prem[lang]["pi0_quality"]["correct"] for lang in NON_EN) / len(NON_EN)},
            "trained_correctness_right": right, "wall_s": run["wall_s_total"], "peak_rss_mib": run["peak_rss_mib"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["run", "analyze"])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", type=Path, default=REPO / "runs")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "sandbox-transfer")
    ap.add_argument("--premise-samples", type=int, default=16)
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.what == "run":
        for s in seeds:
            run_seed(s, a.runs.resolve(), a.out.resolve(), a.premise_samples)
    missing = [s for s in seeds if not (a.out / f"s{s}" / "eval_verdicts.json").exists()]
    if missing:
        print(f"{a.out}: no record of seed(s) {missing}: run `bench/transfer_arms.py run --seeds ...` first",
              file=sys.stderr)
        return 2
    res = analyze({s: json.loads((a.out / f"s{s}" / "eval_verdicts.json").read_text()) for s in seeds})
    res["per_seed"] = {s: per_seed(a.out / f"s{s}") for s in seeds}
    (a.out / "arms.json").write_text(json.dumps(res, indent=1) + "\n")
    (a.out / "arms.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
