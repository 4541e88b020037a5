"""`icr sandbox ablate`: one config switch at a time, several seeds, mean and spread.

Each ablation is the sandbox config with a few overrides, run through the ordinary loop (`icr run`
machinery) as its own run folder `runs/<name>-ablate/<label>-s<seed>/`, without controls. The
table reports, per ablation, the final model's win rate averaged over the non-English languages
and per language, English (regression check), target-language fidelity, and the agreement of the
first iteration's reward with the oracle. Seeds vary sampling and training (`seed`); the world and
the starting pair stay fixed, except in the model-size sweep, which rebuilds the pair.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..config import ExperimentConfig, with_overrides
from ..evaluation.results import row_kind
from ..runs import atomic_write_text, read_json, write_json

# label -> overrides of configs/sandbox.yaml; the first is the baseline the others change one thing of.
ABLATIONS: dict[str, dict] = {
    "baseline": {},
    "multilingual-reward": {"reward": {"variant": "multilingual"}},
    "translate-reward": {"reward": {"variant": "translate_to_english"}},
    "no-length-control": {"pairs": {"length_control": False}},
    "reward-initial": {"reward": {"models": "initial"}},
    "reward-previous": {"reward": {"models": "previous"}},
    "no-language-filter": {"pairs": {"language_filter": False}},
    "margin-filter": {"pairs": {"min_margin": 1.0}},
    "per-token-reward": {"pairs": {"normalize": "per_token"}},
    "half-prompts": {"prompts": {"limit": 50}},
    "oracle-pairs": {"pairs": {"selection": "judge"}},
    "random-pairs": {"pairs": {"selection": "random"}},
}
# The capacity sweep rebuilds the starting pair (minutes each): opt in with --sizes.
SIZES: dict[str, dict] = {
    "size-h64": {"prepare": {"args": {"hidden_size": 64, "num_layers": 2}}},
    "size-h256": {"prepare": {"args": {"hidden_size": 256, "num_layers": 3}}},
}


def run_ablations(base: ExperimentConfig, labels: list[str], seeds: list[int], iterations: int,
                  out_root: Path, sizes: bool = False) -> dict:
    from ..loop import run_experiment

    table = {**ABLATIONS, **(SIZES if sizes else {})}
    # the baseline first: the others borrow its identical stages (same pi0, seed and sampling)
    labels = sorted(labels, key=lambda label: label != "baseline")
    unknown = [label for label in labels if label not in table]
    if unknown:
        from ..errors import IcrError

        raise IcrError(f"ablate: unknown ablation(s) {unknown}; known: {', '.join(table)}")
    runs = {}
    for label in labels:
        for seed in seeds:
            over = json.loads(json.dumps(table[label]))
            if "prepare" in over:  # keep the base recipe, change only the size
                over["prepare"]["args"] = {**base.prepare.args, **over["prepare"]["args"]}
                over["prepare"]["call"] = base.prepare.call
            over.update({"name": f"{label}-s{seed}", "run_root": str(out_root), "seed": seed,
                         "iterations": iterations, "controls": []})
            over.setdefault("evaluation", {})["models"] = ["M0"]
            cfg = with_overrides(base, over, f"ablation {label}")
            baseline = runs.get(("baseline", seed))
            runs[(label, seed)] = run_experiment(cfg, reuse_from=baseline)
    summary = summarise(runs, base.languages, iterations)
    write_json(out_root / "ablations.json", summary)
    atomic_write_text(out_root / "ablations.md", render(summary, seeds, iterations))
    return summary


def summarise(runs: dict, languages: list[str], iterations: int) -> dict:
    final = f"M{iterations}"
    per_label: dict[str, dict] = {}
    for (label, seed), run_dir in runs.items():
        rows = [r for r in read_json(Path(run_dir) / "results.json") if row_kind(r) == "judge"]
        res = {r["lang"]: r for r in rows if r["model"] == final}
        m0 = {r["lang"]: r for r in rows if r["model"] == "M0"}
        agreement_file = Path(run_dir) / "diagnostics" / "reward_agreement.json"
        agreement = read_json(agreement_file) if agreement_file.is_file() else {}
        foreign = [lang for lang in languages if lang != "en" and lang in res]
        entry = per_label.setdefault(label, {"seeds": {}})
        entry["seeds"][seed] = {
            "wr_nonen": statistics.fmean(res[lang]["wr"] for lang in foreign),
            "wr_nonen_m0": statistics.fmean(m0[lang]["wr"] for lang in foreign) if all(l in m0 for l in foreign) else None,
            "wr_en": res["en"]["wr"] if "en" in res else None,
            "fidelity_nonen": statistics.fmean(res[lang]["fidelity"] or 0 for lang in foreign),
            "wr": {lang: res[lang]["wr"] for lang in res},
            "agreement_nonen": statistics.fmean(agreement[lang]["all"]["agree"] for lang in foreign if lang in agreement)
            if any(lang in agreement for lang in foreign) else None,
        }
    for entry in per_label.values():
        for key in ("wr_nonen", "wr_nonen_m0", "wr_en", "fidelity_nonen", "agreement_nonen"):
            vals = [s[key] for s in entry["seeds"].values() if s[key] is not None]
            entry[key] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0} \
                if vals else None
    return per_label


def render(summary: dict, seeds: list[int], iterations: int) -> str:
    def cell(v, fmt="{:.1f}"):
        return "–" if v is None else f"{fmt.format(v['mean'])} ± {fmt.format(v['sd'])}"

    lines = [f"# Sandbox ablations ({len(seeds)} seeds: {', '.join(map(str, seeds))}; {iterations} iteration(s))", "",
             f"Final model M{iterations} against the fixed references, oracle judge; mean ± sd over seeds.", "",
             "| ablation | non-English WR | M0 non-English WR | English WR | non-English fidelity | reward agreement (non-en, iter 1) |",
             "|---|---|---|---|---|---|"]
    for label, e in summary.items():
        lines.append(f"| {label} | {cell(e['wr_nonen'])} | {cell(e['wr_nonen_m0'])} | {cell(e['wr_en'])} | "
                     f"{cell(e['fidelity_nonen'], '{:.3f}')} | {cell(e['agreement_nonen'], '{:.3f}')} |")
    return "\n".join(lines) + "\n"
