"""`icr report RUN`: a Markdown report with plots, from whatever a run folder holds so far.

Reads (each optional; a missing or unreadable part drops its section, never the report):
    results.json                          evaluation rows (docs/results-schema.md)
    eval/<model>/<lang>/judgements.<judge>.json  per-prompt preferences (also under controls/<label>/): the
                                          average over languages gets an interval clustered by prompt id, as
                                          the languages answer translations of the same prompts
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

What the numbers support, the report says (issue 21): win rates carry 95% intervals, the average over
languages one clustered by prompt (translations of one prompt are not independent samples); an LC the
length term pushed to 0 or 100 is shown as –, not as a number; a control's agreement rows identical to
the main run's (the same iteration-1 samples) are named once, not repeated as if they were evidence.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import IcrError
from .evaluation.results import read_results, row_kind
from .runs import atomic_write_text
from .stats import clustered_mean_of_means, t975

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


def run_folders(run_dir: Path) -> list[tuple[str, Path]]:
    """("", the run) and (label, folder) of each control (controls/<label>/), labels sorted."""
    return [("", run_dir)] + [(c.name, c) for c in sorted((run_dir / "controls").glob("*")) if c.is_dir()]


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


def _results_section(rows: list[dict], plt, flags: dict[str, str] | None = None,
                     judgements: dict[str, dict[tuple[str, str], dict[str, float]]] | None = None) -> list[dict]:
    """The win-rate tables; a language flagged by the run's prepare step (`flags`) is marked ⚠ in the
    headers and its reason written under the table. `judgements` ({judge: `read_judgements`}) gives the
    average over languages its prompt-clustered interval; without them it assumes independent languages."""
    flags = flags or {}
    out = []
    for judge in dict.fromkeys(r["judge"] for r in rows):
        jrows = [r for r in rows if r["judge"] == judge]
        prefs = (judgements or {}).get(judge, {})
        langs = _languages(jrows)
        cell = {(r["model"], r["lang"]): r for r in jrows}
        models = list(dict.fromkeys(r["model"] for r in sorted(jrows, key=_model_order)))
        with_lc = lc_meaningful(jrows)
        table, details, incomplete, unreferenced, lc_dashed, independent = [], [], False, set(), False, False
        for m in models:
            have = [cell[(m, lang)] for lang in langs if (m, lang) in cell]
            incomplete |= len(have) < len(langs)
            # A language judged without references (against an empty answer: its row has no LC) is
            # not comparable with the others: left out of the average while some language has them.
            averaged = [r for r in have if r["lc"] is not None] or have
            unreferenced |= {r["lang"] for r in have if r["lc"] is None}
            lc_dashed |= any(r["lc"] is not None and not _lc_inside(r["lc"]) for r in have)
            avg = average_wr(averaged, prefs)
            fell_back = avg["how"] == "independent" and len(averaged) > 1
            independent |= fell_back
            # Avg LC only when every language it averages has a meaningful LC: an average over fewer
            # languages would not compare with the other models' averages.
            avg_lc = (sum(r["lc"] for r in averaged) / len(averaged)
                      if all(_lc_inside(r["lc"]) for r in averaged) else None)
            mark = ("" if len(have) == len(langs) else " †") + ("" if len(averaged) == len(have) else " ‡")
            cells = []
            for lang in langs:
                r = cell.get((m, lang))
                cells += ([_lc_cell(r)] if with_lc else []) + [_wr_cell(r)]
            table.append([m] + cells + ([_fmt(avg_lc) + mark] if with_lc else [])
                         + [_with_half(avg["mean"], avg["half"]) + mark + (" §" if fell_back else "")])
            details.append([m] + [_detail(cell.get((m, lang))) for lang in langs])
        kinds = ("LC", "WR") if with_lc else ("WR",)
        header = (["Model"] + [f"{lang}{' ⚠' if lang in flags else ''} {k}" for lang in langs for k in kinds]
                  + (["Avg LC"] if with_lc else []) + ["Avg WR"])
        out += [heading(f"Win rates against the reference — judge `{judge}`"),
                text_block(("LC = length-controlled win rate, " if with_lc else "")
                           + "WR = win rate, in % (Table 2 layout); WR cells show WR ± the half-width of its "
                           "95% interval (t_{0.975, n−1} · SE; the SE itself is in the table below). Avg = the mean "
                           "over languages; the interval of Avg WR is clustered by prompt id, since the languages "
                           "answer translations of the same prompts and are not independent samples (per prompt, the "
                           "judge's preference averaged over its languages; the standard error over prompts; "
                           "t_{0.975, prompts − 1})." + (" " + _lc_note(jrows) if with_lc else "")),
                table_block(header, table)]
        out += _win_table_notes(jrows, langs, flags, with_lc, lc_dashed, incomplete, unreferenced, independent)
        out += [text_block("Per language: WR standard error / language fidelity (%) / mean length (chars) / n."),
                table_block(["Model"] + langs, details)]
        plot_fell_back: list = []
        png = _plot_wr(jrows, langs, judge, plt, prefs, plot_fell_back)
        if png:
            out += [figure_block(f"wr_by_iteration.{_safe(judge)}.png", "WR across iterations", png),
                    text_block(wr_plot_note(bool(plot_fell_back)))]
    return out


def _win_table_notes(jrows: list[dict], langs: list[str], flags: dict[str, str], with_lc: bool, lc_dashed: bool,
                     incomplete: bool, unreferenced: set, independent: bool) -> list[dict]:
    """The notes under a win-rate table: LC dashes or no LC, flagged languages, and the marks †, ‡, §."""
    notes: list[dict] = []
    if with_lc and lc_dashed:
        notes.append(text_block(f"LC – : within {LC_BOUND} points of 0 or 100, where the length term separates the "
                                "judge's verdicts and LC is not meaningful; Avg LC is – when any language it would "
                                "average has such an LC (not an average over fewer languages)."))
    if not with_lc:
        notes.append(text_block(
            f"No LC columns: fewer than half of this judge's LC values lie inside ({LC_BOUND}, {100 - LC_BOUND}) "
            "(the length term separated the verdicts), so LC is not meaningful here."
            if any(r["lc"] is not None for r in jrows) else
            "No LC columns: no language was judged against references, so there is no LC."))
    for lang in langs:
        if lang in flags:
            notes.append(text_block(f"⚠ {lang}: flagged by the run's prepare step (language_flags.json): "
                                    f"{flags[lang]}. Its numbers say what that build did, not what the method does."))
    if incomplete:
        notes.append(text_block("† averaged over the languages evaluated for that model only."))
    if unreferenced:
        notes.append(text_block(f"‡ {', '.join(sorted(unreferenced))} judged without references (against an empty "
                                "answer: WR = share of answers the judge rates above nothing, no LC); not in the "
                                "averages of the models that also have languages with references."))
    if independent:
        notes.append(text_block("§ interval assuming independent languages ((Σ SE²)^½ / languages): "
                                f"{INDEPENDENT_WHY}; likely too narrow, since the languages share prompts."))
    return notes


def _with_half(value, half) -> str:
    return _fmt(value) + ("" if half is None else f" ± {_fmt(half)}")


def _wr_cell(row: dict | None) -> str:
    """WR ± the half-width of its 95% interval, t_{0.975, n−1} · SE (just WR where the SE is unknown)."""
    return "–" if row is None else _with_half(row["wr"], _half_width(row))


def _lc_cell(row: dict | None) -> str:
    """LC, or – where it is missing or not meaningful (within LC_BOUND of 0 or 100)."""
    return _fmt(row["lc"]) if row is not None and _lc_inside(row["lc"]) else "–"


def _half_width(row: dict) -> float | None:
    se, n = row.get("wr_se"), row.get("n")
    return t975(n - 1) * se if se is not None and isinstance(n, int) and n >= 2 else None


INDEPENDENT_WHY = ("the judgements per prompt are not in the run folder (or do not match results.json), or the "
                   "languages share no prompt id")


def read_judgements(run_dir: Path, judge: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(model, lang): {prompt id: preference}} of `judge`, from eval/<model>/<lang>/judgements.<judge>.json
    of the run and of its controls (what icr.evaluation.evaluate writes); unreadable files are left out."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for _, base in run_folders(run_dir):
        for path in sorted((base / "eval").glob(f"*/*/judgements.{_safe(judge)}.json")):
            data = _read(path)
            if not isinstance(data, list):
                continue
            prefs = {str(r["id"]): float(r["preference"]) for r in data if isinstance(r, dict) and "id" in r
                     and isinstance(r.get("preference"), (int, float)) and not math.isnan(r["preference"])}
            if prefs:
                found[(path.parent.parent.name, path.parent.name)] = prefs
    return found


def _judged_as_reported(row: dict, prefs: dict[str, float] | None) -> bool:
    """The judgements on disk are the ones behind `row`: as many, and the same win rate."""
    return (prefs is not None and len(prefs) == row.get("n") and row.get("wr") is not None
            and abs(100 * sum(prefs.values()) / len(prefs) - row["wr"]) < 1e-6)


def average_wr(rows: list[dict], judgements: dict[tuple[str, str], dict[str, float]] | None = None) -> dict:
    """The mean WR over `rows` (one model, one row per language) with its SE and 95% half-width, in %.

    The languages answer the same prompts (translations), so the SE is clustered by prompt id
    (`icr.stats.clustered_mean_of_means`, "how": "clustered") when `judgements` holds every row's
    per-prompt preferences, matching the row, and the languages share prompt ids. Otherwise ("how":
    "independent") SE = (Σ SE_l²)^½ / k, which is too small when languages are correlated; its half-width
    uses t_{0.975, min n − 1}."""
    mean = sum(r["wr"] for r in rows) / len(rows)
    prefs = {r["lang"]: (judgements or {}).get((r["model"], r["lang"])) for r in rows}
    if all(_judged_as_reported(r, prefs[r["lang"]]) for r in rows):
        try:
            c = clustered_mean_of_means(prefs)
        except ValueError:
            c = None
        if c is not None and c["shared"]:
            return {"mean": mean, "se": 100 * c["se"], "half": 100 * (c["ci_95"][1] - c["mean"]),
                    "how": "clustered", "prompts": c["clusters"]}
    ses, ns = [r.get("wr_se") for r in rows], [r.get("n") for r in rows]
    se = None if any(v is None for v in ses) else math.sqrt(sum(v * v for v in ses)) / len(rows)
    known_n = all(isinstance(n, int) and n >= 2 for n in ns)
    return {"mean": mean, "se": se, "half": t975(min(ns) - 1) * se if se is not None and known_n else None,
            "how": "independent"}


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


def wr_plot_note(independent: bool = False) -> str:
    """The note under the WR plot; `independent`: some average's SE could not be clustered by prompt."""
    how = ("clustered by prompt id, as in the table" if not independent else
           f"clustered by prompt id where it can be; else assuming independent languages ({INDEPENDENT_WHY})")
    return (f"Plot: error bars ± 1 standard error (the table's 95% intervals are t · SE: about 2 SE from 30 answers "
            f"up); the average over languages (middle) of ICR and each control, its SE {how}. LC within {LC_BOUND} "
            f"points of 0 or 100 means the length fit separated the data (not meaningful): such points are left out, "
            f"and the LC panel is drawn only when at least half of the judge's LC values remain.")


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


def wr_series(rows: list[dict], key: str = "wr", judgements: dict[tuple[str, str], dict[str, float]] | None = None,
              independent: list | None = None) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """{(family, lang): [(iteration, value, se), ...]} of `key` ("wr" or "lc": LC has no SE (0), values at
    the bounds are left out); a control's line starts at the M0 point it was trained from. Also
    (family, "avg"): the mean over the languages present at every iteration of that family, its SE as
    `average_wr` gives it (clustered by prompt id with `judgements`; else assuming independent languages,
    and then (family, iteration) is appended to `independent` when given)."""
    series: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if r[key] is not None and (key == "wr" or _lc_inside(r[key])):
            series.setdefault((model_family(r["model"]), r["lang"]), {})[r["iteration"]] = r
    for (family, lang), pts in list(series.items()):
        start = series.get(("ICR", lang), {}).get(0)
        if family != "ICR" and start is not None:
            pts.setdefault(0, start)

    def point(r: dict) -> tuple[float, float]:
        return float(r[key]), float((r["wr_se"] or 0.0) if key == "wr" else 0.0)

    out = {k: {t: point(r) for t, r in pts.items()} for k, pts in series.items()}
    for family in dict.fromkeys(f for f, _ in list(series)):
        langs = [lang for f, lang in series if f == family]
        common = set.intersection(*(set(series[(family, lang)]) for lang in langs)) if langs else set()
        out[(family, "avg")] = {}
        for t in common:
            at_t = [series[(family, lang)][t] for lang in langs]
            if key == "wr":
                avg = average_wr(at_t, judgements)
                out[(family, "avg")][t] = (avg["mean"], avg["se"] or 0.0)
                if independent is not None and avg["how"] == "independent" and len(at_t) > 1:
                    independent.append((family, t))
            else:
                out[(family, "avg")][t] = (sum(float(r[key]) for r in at_t) / len(at_t), 0.0)
    return {k: [(t, v, se) for t, (v, se) in sorted(pts.items())] for k, pts in out.items() if pts}


def _plot_wr(rows: list[dict], langs: list[str], judge: str, plt,
             judgements: dict[tuple[str, str], dict[str, float]] | None = None,
             independent: list | None = None) -> bytes | None:
    """WR per language (ICR), average WR of ICR and the controls (SE clustered by prompt id with
    `judgements`), and LC per language when meaningful."""
    if plt is None or not rows:
        return None
    with_lc = lc_meaningful(rows)
    wr, lc = wr_series(rows, "wr", judgements, independent), wr_series(rows, "lc") if with_lc else {}
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
    for label, base in run_folders(run_dir):
        prefix = f"{label}/" if label else ""
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
    for label, base in run_folders(run_dir):
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
    """The reward's agreement with the judge per iteration (and control); a control's rows identical,
    number for number, to the main run's of the same iteration (a control starts from π0, so it scores
    the same iteration-1 samples) are not repeated: a note names them instead."""
    found = agreement_by_iteration(run_dir)
    main = {t: data for label, t, data in found if not label}
    same_as_main: dict[int, list[str]] = {}
    kept = []
    for label, t, data in found:
        if label and main.get(t) == data:
            same_as_main.setdefault(t, []).append(label)
        else:
            kept.append((label, t, data))
    kinds = list(dict.fromkeys(k for _, _, data in kept for v in data.values() if isinstance(v, dict) for k in v))
    rows = []
    for label, t, data in kept:
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
    iterations = ", ".join(str(t) for t in sorted({t for _, t, _ in kept}))
    out = [heading("Reward agreement with the judge"),
           text_block(f"% of pairs where the implicit reward orders the two answers as the judge does, one column per "
                      f"kind of pair. The rows of iteration t come from iteration t's samples (answers of π_{{t-1}}: "
                      f"π0's for iteration 1) scored by iteration t's reward; control/t: that control's own "
                      f"iteration-t samples. Iterations in this table: {iterations}."),
           table_block(["Iter", "Lang"] + kinds, rows)]
    for t, labels in sorted(same_as_main.items()):
        out.append(text_block(f"Iteration {t}'s rows are also those of {', '.join(f'{c}/{t}' for c in labels)}: "
                              f"identical numbers (the control{'s' if len(labels) > 1 else ''} scored the same "
                              f"iteration-{t} samples with the same reward), not repeated."))
    return out


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
    for label, base in run_folders(run_dir):
        prefix = f"{label}/" if label else ""
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
    judgements = {judge: read_judgements(run_dir, judge) for judge in dict.fromkeys(r["judge"] for r in judged)}
    body = _results_section(judged, plt, flags, judgements) + _harness_section(harness) + mt_bench_section(rows) \
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
