"""`icr report RUN`: a Markdown report with plots, from whatever a run folder holds so far.

Reads (each optional; a missing or unreadable part drops its section, never the report):
    results.json                          evaluation rows (docs/results-schema.md)
    language_flags.json                   {lang: why}: languages the prepare step flagged (marked ⚠)
    iter<t>/pairs/stats.json              pair statistics per language (alpha, counts, lengths, alpha curve)
    iter<t>/<stage>/manifest.json         stage timings ("seconds"); also <stage>/manifest.json at the top
                                          and controls/<label>/iter<t>/<stage>/manifest.json
    iter<t>/train/manifest.json           "counts": pairs given, trained, dropped/truncated for max_length,
                                          steps, loss; "weight_change" (also under controls/<label>/)
    diagnostics/reward_agreement_iter<t>.json  {"agreement": {lang: {pair_kind: {"agree": fraction, "n": count}}}}
                                          (also under controls/<label>/; older runs: reward_agreement.json)
Writes report.md and PNGs beside it. The sections are built once as blocks (`report_blocks`): this
module renders them to Markdown, `icr.report_html` to the HTML page, so both show the same tables
and the same figures (the PNG bytes written here are the ones embedded there).
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


# A section is a list of blocks, rendered to Markdown here and to HTML by icr.report_html (the same
# tables and figures in both): {"kind": "heading" | "text", "text"}, {"kind": "table", "header",
# "rows"} (cells already formatted), {"kind": "figure", "name", "alt", "png"} (the PNG's bytes).

def heading(text: str) -> dict:
    return {"kind": "heading", "text": text}


def text_block(text: str) -> dict:
    return {"kind": "text", "text": text}


def table_block(header: list[str], rows: list[list]) -> dict:
    return {"kind": "table", "header": list(header),
            "rows": [[_fmt(v) if not isinstance(v, str) else v for v in row] for row in rows]}


def figure_block(name: str, alt: str, png: bytes) -> dict:
    return {"kind": "figure", "name": name, "alt": alt, "png": png}


def blocks_markdown(blocks: list[dict]) -> list[str]:
    """Markdown lines of `blocks` (each followed by a blank line)."""
    out = []
    for b in blocks:
        if b["kind"] == "heading":
            out.append(f"## {b['text']}")
        elif b["kind"] == "text":
            out.append(b["text"])
        elif b["kind"] == "table":
            out.append(_table(b["header"], b["rows"]))
        elif b["kind"] == "figure":
            out.append(f"![{b['alt']}]({b['name']})")
        out.append("")
    return out


def _png(fig, plt) -> bytes:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


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


def _results_section(rows: list[dict], plt, flags: dict[str, str] | None = None) -> list[dict]:
    """The win-rate tables; a language flagged by the run's prepare step (`flags`) is marked ⚠ in the
    headers and its reason written under the table."""
    flags = flags or {}
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
        out += [heading(f"Win rates against the reference — judge `{judge}`"),
                text_block("LC = length-controlled win rate, WR = win rate, in % (Table 2 layout). " + _lc_note(jrows)),
                table_block(["Model"] + [f"{lang}{' ⚠' if lang in flags else ''} {k}" for lang in langs
                                         for k in ("LC", "WR")] + ["Avg LC", "Avg WR"], table)]
        for lang in langs:
            if lang in flags:
                out.append(text_block(f"⚠ {lang}: flagged by the run's prepare step (language_flags.json): "
                                      f"{flags[lang]}. Its numbers say what that build did, not what the method does."))
        if incomplete:
            out.append(text_block("† averaged over the languages evaluated for that model only."))
        if unreferenced:
            out.append(text_block(f"‡ {', '.join(sorted(unreferenced))} judged without references (against an empty "
                                  "answer: WR = share of answers the judge rates above nothing, no LC); not in the "
                                  "averages of the models that also have languages with references."))
        out += [text_block("Per language: WR standard error / language fidelity (%) / mean length (chars) / n."),
                table_block(["Model"] + langs, details)]
        png = _plot_wr(jrows, langs, judge, plt)
        if png:
            out += [figure_block(f"wr_by_iteration.{_safe(judge)}.png", "WR across iterations", png),
                    text_block(WR_PLOT_NOTE)]
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
    return [heading("Alignment tax — lm-evaluation-harness (the paper's Table 4)"),
            text_block("Each benchmark through lm-evaluation-harness on each checkpoint (accuracies in %, ± standard "
                       "error). ICR should leave these where pi_SFT / pi0 had them."),
            table_block(["Task", "Lang", "Metric", "n", "Shots"] + models, table)]


def _other_rows_section(rows: list[dict]) -> list[dict]:
    """Rows of a kind this report has no layout for (a newer results.json): one generic table per kind,
    every field as it is, so nothing is hidden and nothing crashes."""
    out = []
    for kind in dict.fromkeys(row_kind(r) for r in rows):
        krows = [r for r in rows if row_kind(r) == kind]
        fields = [f for f in dict.fromkeys(k for r in krows for k in r) if f != "kind"]
        out += [heading(f"Results of kind `{kind}`"),
                text_block("Rows this report has no layout for, shown field by field."),
                table_block(fields, [[_cell_text(r.get(f)) for f in fields] for r in krows])]
    return out


def _cell_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None or isinstance(value, (str, int)):
        return _fmt(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _detail(row: dict | None) -> str:
    if row is None:
        return "–"
    fid = None if row["fidelity"] is None else 100 * row["fidelity"]
    return f"{_fmt(row['wr_se'])} / {_fmt(fid)} / {row['mean_len']:.0f} / {row['n']}"


LC_BOUND = 0.5  # an LC within this many points of 0 or 100: the length term separated the data
WR_PLOT_NOTE = (f"Plot: error bars ± 1 standard error; the average over languages (middle) of ICR and each control "
                f"(SE of the mean assuming independent languages). LC within {LC_BOUND} points of 0 or 100 means "
                f"the length fit separated the data (not meaningful): such points are left out, and the LC panel is "
                f"drawn only when at least half of the judge's LC values remain.")


def _lc_inside(value) -> bool:
    return value is not None and LC_BOUND < value < 100 - LC_BOUND


def lc_meaningful(rows: list[dict]) -> bool:
    """The rule for plotting LC: at least half of the rows' LC values lie inside (LC_BOUND, 100 - LC_BOUND)."""
    values = [r["lc"] for r in rows if r["lc"] is not None]
    return bool(values) and 2 * sum(map(_lc_inside, values)) >= len(values)


def model_family(model: str) -> str:
    """"ICR" for sft, M0, M1, ...; a control's label for its models (M1-random-pairs -> random-pairs)."""
    m = re.match(r"^M\d+-(.+)$", model)
    return "ICR" if MAIN_MODEL.match(model) or not m else m.group(1)


def wr_series(rows: list[dict], key: str = "wr") -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """{(family, lang): [(iteration, value, se), ...]} of `key` ("wr" or "lc": LC has no SE (0), values at
    the bounds are left out); a control's
    line starts at the M0 point it was trained from. Also (family, "avg"): the mean over the languages
    present at every iteration of that family, SE = sqrt(sum se^2) / k."""
    series: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for r in rows:
        if r[key] is not None and (key == "wr" or _lc_inside(r[key])):
            se = (r["wr_se"] or 0.0) if key == "wr" else 0.0
            series.setdefault((model_family(r["model"]), r["lang"]), {})[r["iteration"]] = (float(r[key]), float(se))
    for (family, lang), pts in list(series.items()):
        start = series.get(("ICR", lang), {}).get(0)
        if family != "ICR" and start is not None:
            pts.setdefault(0, start)
    for family in dict.fromkeys(f for f, _ in list(series)):
        langs = [lang for f, lang in series if f == family and lang != "avg"]
        common = set.intersection(*(set(series[(family, lang)]) for lang in langs)) if langs else set()
        series[(family, "avg")] = {t: (sum(series[(family, lang)][t][0] for lang in langs) / len(langs),
                                       math.sqrt(sum(series[(family, lang)][t][1] ** 2 for lang in langs)) / len(langs))
                                   for t in common}
    return {k: [(t, v, se) for t, (v, se) in sorted(pts.items())] for k, pts in series.items() if pts}


def _plot_wr(rows: list[dict], langs: list[str], judge: str, plt) -> bytes | None:
    """WR per language (ICR), average WR of ICR and the controls, and LC per language when meaningful."""
    if plt is None or not rows:
        return None
    with_lc = lc_meaningful(rows)
    wr, lc = wr_series(rows, "wr"), wr_series(rows, "lc") if with_lc else {}
    fig, axes = plt.subplots(1, 3 if with_lc else 2, figsize=(15 if with_lc else 10, 4), sharey=True)
    panels = [(axes[0], wr, [("ICR", lang) for lang in langs], f"WR per language, ICR ({judge})"),
              (axes[1], wr, [k for k in wr if k[1] == "avg"], "average WR: ICR and controls")]
    if with_lc:
        panels.append((axes[2], lc, [("ICR", lang) for lang in langs], "LC per language, ICR"))
    for ax, series, keys, title in panels:
        for family, lang in keys:
            pts = series.get((family, lang))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, ls="-" if family == "ICR" else "--",
                            label=lang if lang != "avg" else family)
        ticks = sorted({r["iteration"] for r in rows})
        ax.set_xticks(ticks, ["SFT" if t == -1 else f"M{t}" for t in ticks])
        ax.axhline(50, color="grey", lw=0.5, ls="--")
        ax.set_title(title)
        ax.set_ylabel("%")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _png(fig, plt)


def _iterations(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in run_dir.glob("iter*") if p.is_dir() and (m := re.fullmatch(r"iter(\d+)", p.name))]
    return sorted(found)


def _pairs_section(run_dir: Path, plt) -> list[dict]:
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
        png = _plot_alpha(t, stats["per_language"], plt)
        if png:
            curves.append(figure_block(f"alpha_curve_iter{t}.png", f"alpha search, iteration {t}", png))
    if not rows:
        return []
    return [heading("Preference pairs"),
            table_block(["Iter", "Lang", "α", "Prompts", "Pairs", "Dropped (no pair)", "Dropped (filters)",
                         "Chosen len", "Rejected len", "Chosen fidelity %"], rows)] + curves


def _training_section(run_dir: Path) -> list[dict]:
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
    return [heading("Training"),
            text_block("Pairs TRL dropped (prompt as long as train.max_length) or truncated (answers cut at it); the "
                       "trained weights' change: relative L2 norm of (trained − start) and % of weights changed (large "
                       "tensors on a strided sample); – where the run predates these or could not measure them "
                       "(ZeRO-3/FSDP)."),
            table_block(["Iter", "Pairs", "Trained", "Dropped (too long)", "Truncated", "Steps", "Loss",
                         "Weight change (rel. L2)", "Weights changed %"], rows)]


def _plot_alpha(t: int, per_language: dict, plt) -> bytes | None:
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
    return _png(fig, plt)


def agreement_by_iteration(run_dir: Path) -> list[tuple[str, int, dict]]:
    """[(run label: "" or a control's, iteration, {lang: {pair_kind: {"agree", "n"}}})] from
    diagnostics/reward_agreement_iter<t>.json (runs without those: reward_agreement.json, iteration 1)."""
    found = []
    runs = [("", run_dir)] + [(c.name, c) for c in sorted((run_dir / "controls").glob("*")) if c.is_dir()]
    for label, base in runs:
        files = sorted((int(m.group(1)), p) for p in (base / "diagnostics").glob("reward_agreement_iter*.json")
                       if (m := re.fullmatch(r"reward_agreement_iter(\d+)\.json", p.name)))
        for t, path in files:
            data = _read(path)
            if isinstance(data, dict) and isinstance(data.get("agreement"), dict):
                found.append((label, t, data["agreement"]))
        if not files and not label:
            data = _read(base / "diagnostics" / "reward_agreement.json")
            if isinstance(data, dict):
                found.append((label, 1, data))
    return [f for f in found if f[2]]


def _agreement_section(run_dir: Path) -> list[dict]:
    found = agreement_by_iteration(run_dir)
    kinds = list(dict.fromkeys(k for _, _, data in found for v in data.values() if isinstance(v, dict) for k in v))
    rows = []
    for label, t, data in found:
        for lang, per_kind in data.items():
            if not isinstance(per_kind, dict):
                continue
            row = [f"{label}/{t}" if label else str(t), lang]
            for kind in kinds:
                c = per_kind.get(kind)
                ok = isinstance(c, dict) and isinstance(c.get("agree"), (int, float))
                row.append(f"{100 * c['agree']:.1f} (n={c.get('n', '?')})" if ok else "–")
            rows.append(row)
    if not rows:
        return []
    return [heading("Reward agreement with the judge"),
            text_block("% of pairs of an iteration's samples (from π_{t-1}, scored by that iteration's reward) where "
                       "the implicit reward orders the two answers as the judge does; Iter = the iteration "
                       "(control/iteration for a control's own samples), one column per kind of pair."),
            table_block(["Iter", "Lang"] + kinds, rows)]


def _timing_section(run_dir: Path) -> list[dict]:
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
    return [heading("Time per stage (seconds)"), table_block(["Stage"] + columns + ["Total"], rows)]


def report_blocks(run_dir: Path) -> tuple[list[dict], list[str]]:
    """(the report's sections as blocks, notes for its head) from whatever the run has produced: what
    report.md and report.html both show."""
    plt = _pyplot()
    rows = read_results(run_dir / "results.json")
    judged = [r for r in rows if row_kind(r) == "judge"]
    harness = [r for r in rows if row_kind(r) == "harness"]
    other = [r for r in rows if row_kind(r) not in ("judge", "harness", "mt_bench")]
    from .evaluation.mt_bench import mt_bench_section  # the paper's Table 3 (rows of kind mt_bench)

    flags = _read(run_dir / "language_flags.json") or {}  # languages the prepare step built badly (icr.loop)
    body = _results_section(judged, plt, flags) + _harness_section(harness) + mt_bench_section(rows) \
        + _other_rows_section(other) \
        + _agreement_section(run_dir) + _pairs_section(run_dir, plt) + _training_section(run_dir) \
        + _timing_section(run_dir)
    notes = []
    if not body:
        notes.append("Nothing to report yet: no results, pair statistics or stage manifests in this run.")
    if plt is None:
        notes.append("(Plots skipped: matplotlib is not installed; `pip install matplotlib`.)")
    return body, notes


def write_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report.md` (+ PNGs) from whatever the run has produced; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IcrError(f"{run_dir}: no such run folder")
    body, notes = report_blocks(run_dir)
    for block in body:
        if block["kind"] == "figure":
            (run_dir / block["name"]).write_bytes(block["png"])
    head = [f"# ICR run report: {run_dir.name}", ""] + [line for note in notes for line in (note, "")]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(head + blocks_markdown(body)))
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
        if keep and not line.startswith(("![", "Plot: ")):
            out.append(line)
    return "\n".join(out).strip()
