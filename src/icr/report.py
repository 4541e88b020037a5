"""`icr report RUN`: a Markdown report with plots, from whatever a run folder holds so far.

Reads (each optional; a missing or unreadable part drops its section, never the report):
    results.json                          evaluation rows (docs/results-schema.md)
    iter<t>/pairs/stats.json              pair statistics per language (alpha, counts, lengths, alpha curve)
    iter<t>/<stage>/manifest.json         stage timings ("seconds"); also <stage>/manifest.json at the top
                                          and controls/<label>/iter<t>/<stage>/manifest.json
    iter<t>/train/manifest.json           "counts": pairs given, trained, dropped/truncated for max_length,
                                          steps, loss; "weight_change" (also under controls/<label>/)
    diagnostics/reward_agreement.json     {lang: {pair_kind: {"agree": fraction, "n": count}}}
Writes report.md and PNGs beside it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import IcrError
from .evaluation.results import read_results, row_kind
from .runs import atomic_write_text

MAIN_MODEL = re.compile(r"^(sft|M\d+)$")


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _model_order(row: dict) -> tuple:
    return (row["iteration"], not MAIN_MODEL.match(row["model"]), row["model"])


def _languages(rows: list[dict]) -> list[str]:
    langs = list(dict.fromkeys(r["lang"] for r in rows))
    return sorted(langs, key=lambda lang: (lang != "en", langs.index(lang)))


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

LC_NOTES = {"alpaca_eval:length_controlled_v1": "LC computed by alpaca_eval (length_controlled_v1, as AlpacaEval 2 "
                                                "and the paper).",
            "icr:minimal": "LC from icr's minimal GLM (no instruction-difficulty term): not comparable with "
                           "AlpacaEval's or the paper's LC."}


def _lc_note(rows: list[dict]) -> str:
    """Which length-controlled win rate the rows carry (rows written before `lc_method` existed: icr's)."""
    methods = dict.fromkeys(r.get("lc_method") or "icr:minimal" for r in rows if r["lc"] is not None)
    return " ".join(LC_NOTES[m] for m in methods)


def _results_section(rows: list[dict], run_dir: Path, plt) -> list[str]:
    out = []
    for judge in dict.fromkeys(r["judge"] for r in rows):
        jrows = [r for r in rows if r["judge"] == judge]
        langs = _languages(jrows)
        cell = {(r["model"], r["lang"]): r for r in jrows}
        models = list(dict.fromkeys(r["model"] for r in sorted(jrows, key=_model_order)))
        table, details, incomplete, unreferenced = [], [], False, set()
        for m in models:
            have = [cell[(m, lang)] for lang in langs if (m, lang) in cell]
            incomplete |= len(have) < len(langs)
            # A language judged without references (against an empty answer: its row has no LC) is
            # not comparable with the others: left out of the average while some language has them.
            averaged = [r for r in have if r["lc"] is not None] or have
            unreferenced |= {r["lang"] for r in have if r["lc"] is None}
            avg = lambda k: sum(r[k] for r in averaged) / len(averaged) if all(r[k] is not None for r in averaged) else None  # noqa: E731
            mark = ("" if len(have) == len(langs) else " †") + ("" if len(averaged) == len(have) else " ‡")
            table.append([m] + [v for lang in langs for v in (
                (cell[(m, lang)]["lc"], cell[(m, lang)]["wr"]) if (m, lang) in cell else ("–", "–"))]
                + [_fmt(avg("lc")) + mark, _fmt(avg("wr")) + mark])
            details.append([m] + [_detail(cell.get((m, lang))) for lang in langs])
        out += [f"## Win rates against the reference — judge `{judge}`", "",
                "LC = length-controlled win rate, WR = win rate, in % (Table 2 layout). " + _lc_note(jrows), "",
                _table(["Model"] + [f"{lang} {k}" for lang in langs for k in ("LC", "WR")] + ["Avg LC", "Avg WR"], table),
                ""]
        if incomplete:
            out += ["† averaged over the languages evaluated for that model only.", ""]
        if unreferenced:
            out += [f"‡ {', '.join(sorted(unreferenced))} judged without references (against an empty answer: "
                    "WR = share of answers the judge rates above nothing, no LC); not in the averages of the "
                    "models that also have languages with references.", ""]
        out += ["Per language: WR standard error / language fidelity (%) / mean length (chars) / n.", "",
                _table(["Model"] + langs, details), ""]
        plot = _plot_wr(jrows, langs, run_dir, judge, plt)
        if plot:
            out += [f"![WR across iterations]({plot})", ""]
    return out


def _harness_section(rows: list[dict]) -> list[str]:
    """The paper's Table 4 layout: one line per (task, language, metric), one column per model."""
    if not rows:
        return []
    from .evaluation.harness import FRACTION_METRICS

    models = list(dict.fromkeys(r["model"] for r in sorted(rows, key=_model_order)))
    cell = {(r["task"], r["lang"], r["metric"], r["model"]): r for r in rows}
    lines = list(dict.fromkeys((r["task"], r["lang"], r["metric"]) for r in rows))
    table = []
    for task, lang, metric in lines:
        scale = 100.0 if metric.split("/")[0] in FRACTION_METRICS else 1.0
        values = []
        for m in models:
            r = cell.get((task, lang, metric, m))
            values.append("–" if r is None else _fmt(scale * r["value"]) + (
                "" if r["stderr"] is None else f" ± {_fmt(scale * r['stderr'])}"))
        first = next(r for m in models if (r := cell.get((task, lang, metric, m))) is not None)
        table.append([task, lang, metric, first["n"] if first["n"] is not None else "–",
                      first["num_fewshot"] if first["num_fewshot"] is not None else "–"] + values)
    return ["## Alignment tax — lm-evaluation-harness (the paper's Table 4)", "",
            "Each benchmark through lm-evaluation-harness on each checkpoint (accuracies in %, ± standard error). "
            "ICR should leave these where pi_SFT / pi0 had them.", "",
            _table(["Task", "Lang", "Metric", "n", "Shots"] + models, table), ""]


def _detail(row: dict | None) -> str:
    if row is None:
        return "–"
    fid = None if row["fidelity"] is None else 100 * row["fidelity"]
    return f"{_fmt(row['wr_se'])} / {_fmt(fid)} / {row['mean_len']:.0f} / {row['n']}"


def _plot_wr(rows: list[dict], langs: list[str], run_dir: Path, judge: str, plt) -> str | None:
    main = [r for r in rows if MAIN_MODEL.match(r["model"])]
    if plt is None or not main:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "wr", "WR"), (axes[1], "lc", "LC")):
        for lang in langs:
            pts = sorted((r["iteration"], r[key]) for r in main if r["lang"] == lang and r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lang)
        ticks = sorted({r["iteration"] for r in main})
        ax.set_xticks(ticks, ["SFT" if t == -1 else f"M{t}" for t in ticks])
        ax.axhline(50, color="grey", lw=0.5, ls="--")
        ax.set_title(f"{title} vs reference ({judge})")
        ax.set_ylabel("%")
    # The language legend goes on the LC panel, or on the WR panel when no language has an LC
    # (reference-free languages): an empty legend would only warn.
    labelled = [ax for ax in (axes[1], axes[0]) if ax.get_legend_handles_labels()[0]]
    if labelled:
        labelled[0].legend(fontsize="small")
    name = f"wr_by_iteration.{_safe(judge)}.png"
    fig.tight_layout()
    fig.savefig(run_dir / name, dpi=100)
    plt.close(fig)
    return name


def _iterations(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in run_dir.glob("iter*") if p.is_dir() and (m := re.fullmatch(r"iter(\d+)", p.name))]
    return sorted(found)


def _pairs_section(run_dir: Path, plt) -> list[str]:
    rows, curves = [], []
    for t, d in _iterations(run_dir):
        stats = _read(d / "pairs" / "stats.json")
        if not isinstance(stats, dict) or not isinstance(stats.get("per_language"), dict):
            continue
        for lang, s in stats["per_language"].items():
            if not isinstance(s, dict):
                continue
            fid = s.get("chosen_fidelity")
            alpha = s.get("alpha")
            rows.append([str(t), lang, f"{alpha:.3g}" if isinstance(alpha, (int, float)) else "–", s.get("n_prompts"), s.get("n_pairs"),
                         s.get("dropped_no_pair"), s.get("dropped_filters"), s.get("chosen_len_mean"),
                         s.get("rejected_len_mean"), None if fid is None else 100 * fid])
        plot = _plot_alpha(t, stats["per_language"], run_dir, plt)
        if plot:
            curves.append(f"![alpha search, iteration {t}]({plot})")
    if not rows:
        return []
    return ["## Preference pairs", "",
            _table(["Iter", "Lang", "α", "Prompts", "Pairs", "Dropped (no pair)", "Dropped (filters)",
                    "Chosen len", "Rejected len", "Chosen fidelity %"], rows), ""] + \
        [line for c in curves for line in (c, "")]


def _training_section(run_dir: Path) -> list[str]:
    """Per trained iteration (and control): the pairs given, what TRL trained on after train.max_length
    (pairs dropped for a prompt that fills it, pairs whose answers it cut), optimizer steps, loss, and
    how far the trained weights moved (the manifest's weight_change, icr.train.weight_change)."""
    rows = []
    runs = [("", run_dir)] + [(f"{c.name}/", c) for c in sorted((run_dir / "controls").glob("*")) if c.is_dir()]
    for prefix, base in runs:
        for t, d in _iterations(base):
            manifest = _read(d / "train" / "manifest.json")
            counts = manifest.get("counts") if isinstance(manifest, dict) else None
            if not isinstance(counts, dict):
                continue
            loss, change = counts.get("train_loss"), manifest.get("weight_change")
            change = change if isinstance(change, dict) else {}
            rel, share = change.get("relative_l2"), change.get("changed_share")
            rows.append([f"{prefix}{t}", counts.get("pairs"), counts.get("pairs_trained"),
                         counts.get("pairs_dropped_too_long"), counts.get("pairs_truncated"), counts.get("steps"),
                         f"{loss:.4g}" if isinstance(loss, (int, float)) else "–",
                         f"{rel:.3g}" if isinstance(rel, (int, float)) else "–",
                         f"{100 * share:.1f}" if isinstance(share, (int, float)) else "–"])
    if not rows:
        return []
    return ["## Training", "",
            "Pairs TRL dropped (prompt as long as train.max_length) or truncated (answers cut at it); the trained "
            "weights' change: relative L2 norm of (trained − start) and % of weights changed (large tensors on "
            "a strided sample); – where the run predates these or could not measure them (ZeRO-3/FSDP).", "",
            _table(["Iter", "Pairs", "Trained", "Dropped (too long)", "Truncated", "Steps", "Loss",
                    "Weight change (rel. L2)", "Weights changed %"], rows), ""]


def _plot_alpha(t: int, per_language: dict, run_dir: Path, plt) -> str | None:
    curves = {lang: s["alpha_curve"] for lang, s in per_language.items()
              if isinstance(s, dict) and isinstance(s.get("alpha_curve"), list) and s["alpha_curve"]}
    if plt is None or not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for lang, curve in curves.items():
        pts = sorted((float(a), float(v)) for a, v in curve)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=lang)
        alpha = per_language[lang].get("alpha")
        if isinstance(alpha, (int, float)):
            ax.axvline(alpha, color=line.get_color(), lw=0.8, ls=":")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("α (length penalty)")
    ax.set_ylabel("mean length difference, chosen vs rejected")
    ax.set_title(f"α search, iteration {t} (dotted: chosen α)")
    ax.legend(fontsize="small")
    name = f"alpha_curve_iter{t}.png"
    fig.tight_layout()
    fig.savefig(run_dir / name, dpi=100)
    plt.close(fig)
    return name


def _agreement_section(run_dir: Path) -> list[str]:
    data = _read(run_dir / "diagnostics" / "reward_agreement.json")
    if not isinstance(data, dict) or not data:
        return []
    kinds = list(dict.fromkeys(k for v in data.values() if isinstance(v, dict) for k in v))
    rows = []
    for lang, per_kind in data.items():
        if not isinstance(per_kind, dict):
            continue
        row = [lang]
        for kind in kinds:
            c = per_kind.get(kind)
            ok = isinstance(c, dict) and isinstance(c.get("agree"), (int, float))
            row.append(f"{100 * c['agree']:.1f} (n={c.get('n', '?')})" if ok else "–")
        rows.append(row)
    return ["## Reward agreement with the judge", "",
            "% of pairs where the implicit reward orders the two answers as the judge does.", "",
            _table(["Lang"] + kinds, rows), ""]


def _timing_section(run_dir: Path) -> list[str]:
    seconds: dict[str, dict[str, float]] = {}
    columns = []

    def add(column: str, stage: str, manifest: Path):
        data = _read(manifest)
        if isinstance(data, dict) and isinstance(data.get("seconds"), (int, float)):
            seconds.setdefault(stage, {})[column] = float(data["seconds"])
            if column not in columns:
                columns.append(column)

    for manifest in sorted(run_dir.glob("*/manifest.json")):
        if not re.fullmatch(r"iter\d+", manifest.parent.name):
            add("run", manifest.parent.name, manifest)
    runs = [("", run_dir)] + [(f"{c.name}/", c) for c in sorted((run_dir / "controls").glob("*")) if c.is_dir()]
    for prefix, base in runs:
        for t, d in _iterations(base):
            for manifest in sorted(d.rglob("manifest.json")):
                add(f"{prefix}iter{t}", manifest.parent.relative_to(d).as_posix(), manifest)
    if not seconds:
        return []
    rows = [[stage] + [seconds[stage].get(c) for c in columns] + [sum(seconds[stage].values())] for stage in seconds]
    rows.append(["**total**"] + [sum(s.get(c, 0) for s in seconds.values()) for c in columns]
                + [sum(sum(s.values()) for s in seconds.values())])
    return ["## Time per stage (seconds)", "", _table(["Stage"] + columns + ["Total"], rows), ""]


def write_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report.md` (+ PNGs) from whatever the run has produced; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IcrError(f"{run_dir}: no such run folder")
    plt = _pyplot()
    rows = read_results(run_dir / "results.json")
    judged = [r for r in rows if row_kind(r) == "judge"]
    harness = [r for r in rows if row_kind(r) == "harness"]
    body = _results_section(judged, run_dir, plt) + _harness_section(harness) + _agreement_section(run_dir) \
        + _pairs_section(run_dir, plt) + _training_section(run_dir) + _timing_section(run_dir)
    head = [f"# ICR run report: {run_dir.name}", ""]
    if not body:
        head += ["Nothing to report yet: no results, pair statistics or stage manifests in this run.", ""]
    if plt is None:
        head += ["(Plots skipped: matplotlib is not installed; `pip install matplotlib`.)", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(head + body))
    return path


def headline(run_dir: Path) -> str:
    """The win-rate section(s) of `report.md`: per-language LC/WR of every model and control, then
    SE / language fidelity / length (what `icr run` prints at the end); '' if there are none."""
    path = Path(run_dir) / "report.md"
    if not path.is_file():
        return ""
    out, keep = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            keep = line.startswith("## Win rates")
        if keep and not line.startswith("!["):
            out.append(line)
    return "\n".join(out).strip()
