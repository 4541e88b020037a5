"""`report.html`: one self-contained page to browse a run — overview, the pairs the reward chose, the
answers the judge compared, the MT-Bench answers and their grades.

Hand-written (Python builds the data, a small inline script renders it) rather than templated: no
templating dependency, and the result is one file that opens from disk and can be mailed (no network,
no CDN; CSS, script and figures are inline, the figures as the same PNG bytes report.md links).

Safety: every text from models and data travels as JSON inside `<script type="application/json">`
with `<`, `>`, `&` and the JavaScript line separators escaped (`embed_json`), and the page's script
puts it into the document with `textContent` only (never `innerHTML`), so an answer containing
`<script>` is shown as text, never run.

Size: the paper's 150k samples per iteration cannot all go into one page. The pair browser embeds at
most `max_pair_prompts` prompts per (run, iteration, language), the evaluation browser at most
`max_eval_prompts` per language, the MT-Bench browser at most `max_mt_bench_questions` questions per
language, and each text at most `MAX_TEXT_CHARS` characters; the prompts are a
deterministic sample (ordered by a hash of their id, so the same prompts appear in every language and
iteration) and the page says how many are shown of how many. The same run folder gives the same bytes
(no timestamps; sorted keys).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path

from .errors import IcrError
from .report import report_blocks, run_folders
from .runs import atomic_write_text, read_jsonl, read_shards, text_hash

log = logging.getLogger("icr")

DEFAULT_MAX_PAIR_PROMPTS = 50  # per (run, iteration, language)
DEFAULT_MAX_EVAL_PROMPTS = 100  # per language
DEFAULT_MAX_MT_BENCH_QUESTIONS = 80  # per language (MT-Bench has 80 questions)
MAX_TEXT_CHARS = 4000  # per embedded text; the rest is cut with a note
MAX_JUDGE_REPLY_CHARS = 1000  # per MT-Bench judge reply shown beside a grade


# ---------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------

def embed_json(data) -> str:
    """`data` as JSON that is safe inside a `<script>` element: no `</script>`, `<!--` or `]]>` can
    close or alter it (`<`, `>`, `&` become \\u escapes; U+2028/U+2029 too, for old parsers)."""
    text = json.dumps(data, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def clip_text(text, limit: int = MAX_TEXT_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    text = "" if text is None else str(text)
    if len(text) <= limit:
        return text
    return text[:limit] + f" … [{len(text) - limit} more characters not embedded]"


def sample_ids(ids, limit: int | None) -> list:
    """A deterministic sample of `limit` ids (all when limit is None or larger), in their given order.

    Chosen by a hash of the id alone, so the same prompt ids are picked in every language and
    iteration of a run (parallel prompts stay comparable)."""
    ids = list(dict.fromkeys(ids))
    if limit is None or len(ids) <= limit:
        return ids
    keep = set(sorted(ids, key=lambda i: (text_hash("icr-report-sample", str(i)), str(i)))[:limit])
    return [i for i in ids if i in keep]


def _number(value, digits: int = 4):
    """A JSON-safe rounded number (None for None, NaN, inf)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _iterations(base: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in base.glob("iter*") if (m := re.fullmatch(r"iter(\d+)", p.name))]
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# What the run's config says (each part optional: an unreadable config leaves defaults)
# ---------------------------------------------------------------------------------------------

class RunSettings:
    """The parts of the run's config.yaml the page needs, read leniently: the reward prompt G(x)
    (variant, prefix), the pairs' length rule, the judge, the run's languages and prompt sources."""

    def __init__(self, run_dir: Path):
        from .config import PairsConfig, RewardConfig, section_from_dict

        self.notes: list[str] = []
        self.data: dict = {}
        try:
            import yaml

            self.data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        except Exception as e:  # noqa: BLE001 - a missing or odd config only loses details
            self.notes.append(f"config.yaml not read ({type(e).__name__}): G(x) and length-adjusted scores "
                              "use the defaults")
        self.pairs = self._section(PairsConfig, "pairs", section_from_dict)
        self.reward = self._section(RewardConfig, "reward", section_from_dict)
        ev = self.data.get("evaluation") if isinstance(self.data.get("evaluation"), dict) else {}
        self.judge = str(ev.get("judge") or "")
        self.judge_args = ev.get("judge_args") if isinstance(ev.get("judge_args"), dict) else {}
        langs = self.data.get("languages")
        self.languages = [str(x) for x in langs] if isinstance(langs, list) else []

    def _section(self, cls, name: str, build):
        try:
            return build(cls, self.data.get(name) or {}, name)
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"config.yaml's {name} section not read ({e}); defaults used")
            return cls()

    def judge_cache_ids(self, result_judges: list[str]) -> list[str]:
        """Names a judge's cached scores may be keyed by (icr.evaluation.judges.CachedJudge)."""
        ids = list(result_judges)
        if self.judge == "reward_model" and self.judge_args.get("model"):
            ids.append(f"reward_model:{self.judge_args['model']}")
        ids += [self.judge, "oracle", "fake"]
        return [i for i in dict.fromkeys(ids) if i]


def _reward_prompt(settings: RunSettings, lang: str, prompt: str, english: str | None) -> str | None:
    """G(x): the user turn the reward scored a `lang` answer under (icr.reward.reward_conversation)."""
    from .reward import reward_conversation

    if english is None and settings.reward.variant != "multilingual":
        return None
    try:
        conv = reward_conversation(settings.reward.variant, lang, prompt, english or "", settings.reward.prefix)
    except IcrError:
        return None
    return conv[-1]["content"]


def _english_from_prompt_file(settings: RunSettings) -> dict[str, str]:
    """{id: English instruction} from the run's prompt file (used when the samples have no English)."""
    from .config import PromptSource, section_from_dict
    from .data import load_language

    try:
        source = section_from_dict(PromptSource, settings.data.get("prompts") or {}, "prompts")
        return {p.id: p.instruction for p in load_language(source, "en")}
    except Exception as e:  # noqa: BLE001 - a moved prompt file only loses G(x)
        settings.notes.append(f"English instructions not found for G(x) ({type(e).__name__}: {e})")
        return {}


# ---------------------------------------------------------------------------------------------
# Judge scores of single samples (the reward-agreement diagnostics' judgements, from the cache)
# ---------------------------------------------------------------------------------------------

def _cached_scores(run_dir: Path) -> dict[str, float]:
    """{cache key: value} of every `score` judgement in the run's judge caches."""
    scores: dict[str, float] = {}
    for label, base in run_folders(run_dir):
        path = base / "eval" / "judge_cache.jsonl"
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    if rec.get("kind") == "score":
                        scores[rec["key"]] = float(rec["value"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                    continue
    return scores


def judge_scorer(run_dir: Path, settings: RunSettings, result_judges: list[str], probe: list[dict]):
    """(judge name, function record -> judge score or None), or (None, None) when no cached score
    matches the probe records. The key is CachedJudge's: hash of (judge id, "score", lang, the
    target-language prompt, the answer, "")."""
    cached = _cached_scores(run_dir)
    if not cached or not probe:
        return None, None
    best, hits = None, 0
    for judge_id in settings.judge_cache_ids(result_judges):
        n = sum(text_hash(judge_id, "score", r["lang"], r["prompt"], r["response"], "") in cached for r in probe)
        if n > hits:
            best, hits = judge_id, n
    if best is None:
        return None, None
    return best, lambda r: cached.get(text_hash(best, "score", r["lang"], r["prompt"], r["response"], ""))


# ---------------------------------------------------------------------------------------------
# Pair browser: per (run, iteration, language), each sampled prompt's answers ranked by reward
# ---------------------------------------------------------------------------------------------

MAIN_RUN = "ICR"  # the run's own label in the page (controls carry theirs)


def _adjusted_scores(records: list[dict], alphas: dict[str, float], settings: RunSettings) -> list[float | None]:
    """Each record's length-adjusted score as the pairs stage ranks it: the (normalised) reward minus
    α_lang · len(y) (icr.pairs' own normalisation and length rule)."""
    from .pairs import adjusted_scores

    try:
        return [_number(v) for v in adjusted_scores(records, alphas, settings.pairs)]
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return [None] * len(records)


def _pair_agreement(chosen_judge, rejected_judge) -> str | None:
    """Whether the judge prefers the chosen answer: agrees / disagrees / tie, None without scores."""
    if chosen_judge is None or rejected_judge is None:
        return None
    return "agrees" if chosen_judge > rejected_judge else "disagrees" if chosen_judge < rejected_judge else "tie"


def _prompt_entry(key, members, records, adjusted, pair, context) -> dict:
    """One prompt of the pair browser: its samples ranked by reward, the pair, G(x), the judge's view."""
    label, t, settings, english, judge_of = context
    lang, pid = key
    first = records[members[0]]
    samples = []
    for i in sorted(members, key=lambda i: (-(records[i].get("reward") if _number(records[i].get("reward"))
                                               is not None else -math.inf), records[i].get("sample", 0))):
        r = records[i]
        samples.append({"sample": r.get("sample"), "text": clip_text(r.get("response")),
                        "reward": _number(r.get("reward")), "score": adjusted[i], "chars": len(r.get("response") or ""),
                        "tokens": r.get("n_tokens"), "finished": r.get("finished"),
                        "judge": _number(judge_of(r)) if judge_of else None, "detected": None})
    by_sample = {s["sample"]: s for s in samples}
    chosen = pair.get("chosen_sample") if pair else None
    rejected = pair.get("rejected_sample") if pair else None
    agree = _pair_agreement(by_sample.get(chosen, {}).get("judge"), by_sample.get(rejected, {}).get("judge"))
    return {"run": label, "iteration": t, "lang": lang, "id": str(pid), "prompt": clip_text(first.get("prompt")),
            "reward_prompt": clip_text(_reward_prompt(settings, lang, first.get("prompt") or "", english.get(pid))),
            "alpha": _number(pair.get("alpha")) if pair else None, "chosen": chosen, "rejected": rejected,
            "agreement": agree, "samples": samples}


def _iteration_entries(label: str, t: int, folder: Path, settings: RunSettings, judge_of, max_prompts,
                       english_file) -> tuple[list[dict], dict]:
    """The pair browser's prompts of one iteration folder, and {lang: {"shown", "total"}}."""
    records = [r for r in read_shards(folder / "score") if isinstance(r, dict) and "lang" in r and "id" in r]
    pairs_path = folder / "pairs" / "pairs.jsonl"
    pairs = {(p["lang"], p["id"]): p for p in (read_jsonl(pairs_path) if pairs_path.is_file() else [])}
    stats = _read_json(folder / "pairs" / "stats.json")
    per_lang = stats.get("per_language") if isinstance(stats, dict) else None
    alphas = {lang: float(s["alpha"]) for lang, s in (per_lang or {}).items()
              if isinstance(s, dict) and _number(s.get("alpha")) is not None}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[(r["lang"], r["id"])].append(i)
    english = {r["id"]: r.get("prompt") for r in records if r["lang"] == "en"}
    if settings.reward.variant != "multilingual" and any(pid not in english for _, pid in groups):
        english = {**english_file(), **english}
    adjusted = _adjusted_scores(records, alphas, settings)
    entries, counts = [], {}
    for lang in sorted({k[0] for k in groups}, key=lambda x: (x != "en", x)):
        ids = [pid for (lg, pid) in groups if lg == lang]
        shown = sample_ids(ids, max_prompts)
        counts[lang] = {"shown": len(shown), "total": len(ids)}
        context = (label, t, settings, english, judge_of)
        entries += [_prompt_entry((lang, pid), groups[(lang, pid)], records, adjusted, pairs.get((lang, pid)), context)
                    for pid in shown]
    return entries, counts


def _fill_detected_languages(entries: list[dict], languages: list[str]) -> str | None:
    """Each shown sample's detected language (icr.languages, offline); a note when it cannot run."""
    samples = [s for e in entries for s in e["samples"]]
    if not samples:
        return None
    try:
        from .languages import language_identifier

        codes = tuple(sorted(set(languages) | {e["lang"] for e in entries}))
        found = language_identifier(codes).identify_many([s["text"] for s in samples])
    except Exception as e:  # noqa: BLE001 - detection is a detail: the page still works without it
        return f"language detection unavailable ({type(e).__name__}: {e})"
    for s, code in zip(samples, found):
        s["detected"] = code if any(ch.isalpha() for ch in s["text"]) else "none"
    return None


def pair_browser_data(run_dir: Path, settings: RunSettings, result_judges: list[str],
                      max_prompts: int | None) -> dict:
    """{"prompts": [...], "counts": [{run, iteration, lang, shown, total}], "judge": name or None, "notes"}."""
    cached_english: dict = {}

    def english_file() -> dict:
        if "x" not in cached_english:
            cached_english["x"] = _english_from_prompt_file(settings)
        return cached_english["x"]

    folders = [(label or MAIN_RUN, t, d) for label, base in run_folders(run_dir) for t, d in _iterations(base)
               if (d / "score").is_dir()]
    probe = read_shards(folders[0][2] / "score")[:400] if folders else []
    judge_name, judge_of = judge_scorer(run_dir, settings, result_judges, probe)
    entries, counts = [], []
    for label, t, folder in folders:
        found, per_lang = _iteration_entries(label, t, folder, settings, judge_of, max_prompts, english_file)
        entries += found
        counts += [{"run": label, "iteration": t, "lang": lang, **c} for lang, c in per_lang.items()]
    notes = [n for n in [_fill_detected_languages(entries, settings.languages)] if n]
    return {"prompts": entries, "counts": counts, "judge": judge_name, "notes": notes}


# ---------------------------------------------------------------------------------------------
# Evaluation browser: per language, each sampled prompt with every model's answer and preference
# ---------------------------------------------------------------------------------------------

def _references(settings: RunSettings, languages: list[str]) -> tuple[dict[str, dict[str, str]], str | None]:
    """({lang: {prompt id: reference}}, a note when they cannot be read) through icr.data, as evaluated."""
    from .config import EvaluationConfig, section_from_dict
    from .data import load_prompt_set, load_references

    try:
        ev = section_from_dict(EvaluationConfig, settings.data.get("evaluation") or {}, "evaluation")
        if not ev.references.path:
            return {}, None
        prompts = load_prompt_set(ev.prompts, languages, field="evaluation.prompts")
        return load_references(ev.references, prompts, languages, judge_scores_alone=True), None
    except Exception as e:  # noqa: BLE001 - a moved reference file only loses the reference column
        return {}, f"references not shown: cannot read them ({type(e).__name__}: {e})"


def _model_answers(run_dir: Path) -> dict[str, dict[str, dict]]:
    """{lang: {model: {"outputs": [model_outputs rows], "prefs": {judge: {id: preference}}}}}."""
    found: dict[str, dict[str, dict]] = defaultdict(dict)
    for _, base in run_folders(run_dir):
        for lang_dir in sorted((base / "eval").glob("*/*")):
            outputs = _read_json(lang_dir / "model_outputs.json")
            if not isinstance(outputs, list):
                continue
            prefs = {}
            for path in sorted(lang_dir.glob("judgements.*.json")):
                rows = _read_json(path)
                if isinstance(rows, list):
                    prefs[path.name[len("judgements."):-len(".json")]] = {
                        str(r.get("id")): _number(r.get("preference")) for r in rows if isinstance(r, dict)}
            found[lang_dir.name][lang_dir.parent.name] = {"outputs": [r for r in outputs if isinstance(r, dict)],
                                                          "prefs": prefs}
    return found


def _model_order(model: str) -> tuple:
    m = re.fullmatch(r"M(\d+)(-.+)?", model)
    if model == "sft":
        return (-1, "", "")
    return (int(m.group(1)), m.group(2) or "", model) if m else (10 ** 6, "", model)


def evaluation_browser_data(run_dir: Path, settings: RunSettings, max_prompts: int | None) -> dict:
    """{"models", "judges", "prompts": [{lang, id, instruction, reference, answers: {model: {text,
    preference: {judge: p}}}}], "counts": [{lang, shown, total}], "notes"}."""
    answers = _model_answers(run_dir)
    langs = sorted(answers, key=lambda x: (x != "en", x))
    references, note = _references(settings, langs)
    models = sorted({m for per in answers.values() for m in per}, key=_model_order)
    judges = sorted({j for per in answers.values() for a in per.values() for j in a["prefs"]})
    prompts, counts = [], []
    for lang in langs:
        per_model = answers[lang]
        instruction, text = {}, defaultdict(dict)
        for model in sorted(per_model, key=_model_order):
            for row in per_model[model]["outputs"]:
                pid = str(row.get("id"))
                instruction.setdefault(pid, row.get("instruction"))
                text[pid][model] = row.get("output")
        shown = sample_ids(list(instruction), max_prompts)
        counts.append({"lang": lang, "shown": len(shown), "total": len(instruction)})
        for pid in shown:
            prompts.append({"lang": lang, "id": pid, "instruction": clip_text(instruction[pid]),
                            "reference": clip_text(references[lang][pid]) if pid in references.get(lang, {}) else None,
                            "answers": {m: {"text": clip_text(t), "preference": {
                                j: per_model[m]["prefs"][j].get(pid) for j in per_model[m]["prefs"]}}
                                for m, t in text[pid].items()}})
    return {"models": models, "judges": judges, "prompts": prompts, "counts": counts, "notes": [n for n in [note] if n]}


# ---------------------------------------------------------------------------------------------
# MT-Bench browser: per language, each sampled question's two turns, every model's answers and grades
# ---------------------------------------------------------------------------------------------

def _mt_bench_files(run_dir: Path) -> dict[str, dict[str, dict]]:
    """{lang: {model: {"answers": {question id: row}, "key": answers.json's key, "judged": {(id, turn):
    judgement}}}} from each `eval/<model>/mt_bench/<lang>/` (icr.evaluation.mt_bench's files)."""
    found: dict[str, dict[str, dict]] = defaultdict(dict)
    for _, base in run_folders(run_dir):
        for lang_dir in sorted((base / "eval").glob("*/mt_bench/*")):
            saved = _read_json(lang_dir / "answers.json")
            if not isinstance(saved, dict) or not isinstance(saved.get("answers"), list):
                continue
            judged = _read_json(lang_dir / "judgements.json")
            found[lang_dir.name][lang_dir.parent.parent.name] = {
                "answers": {str(a.get("question_id")): a for a in saved["answers"] if isinstance(a, dict)},
                "key": saved.get("key") if isinstance(saved.get("key"), dict) else {},
                "judged": {(str(j.get("question_id")), j.get("turn")): j
                           for j in (judged if isinstance(judged, list) else []) if isinstance(j, dict)}}
    return found


def _mt_bench_questions(settings: RunSettings, langs: list[str]) -> tuple[dict[str, list[dict]], list[str]]:
    """({lang: the question file's rows}, notes) through icr.evaluation.mt_bench's reader, as evaluated."""
    from .evaluation.mt_bench import load_questions

    ev = settings.data.get("evaluation") if isinstance(settings.data.get("evaluation"), dict) else {}
    mt = ev.get("mt_bench") if isinstance(ev.get("mt_bench"), dict) else {}
    template = str(mt.get("questions") or "")
    if not template:
        return {}, ["MT-Bench questions not shown: config.yaml names no evaluation.mt_bench.questions"]
    questions, notes = {}, []
    for lang in langs:
        try:
            questions[lang] = load_questions(template, lang)
        except (IcrError, OSError, UnicodeDecodeError) as e:
            notes.append(f"MT-Bench questions in {lang} not shown: {e}")
    return questions, notes


def _questions_hash(questions: list[dict]) -> str:
    """What icr.evaluation.mt_bench's answer key records of the questions the answers were made for."""
    return text_hash(*(json.dumps(q, sort_keys=True, ensure_ascii=False) for q in questions))


def _mt_bench_turn(answer: dict, judged: dict, qid: str, turn: int) -> dict:
    """One model's answer to one turn: text, grade (None unless the judge gave a verdict), and why not."""
    turns = answer.get("turns") if isinstance(answer.get("turns"), list) else []
    rec = judged.get((qid, turn))
    grade = _number(rec.get("verdict"), 2) if rec else None
    if rec is None:
        status, reason = "not graded", "no judgement of this turn (evaluation.mt_bench.turns, or not graded yet)"
    elif grade is not None:
        status, reason = "graded", None
    elif rec.get("error"):
        status, reason = "missing", f"the judge server refused the request ({rec['error']})"
    else:
        status, reason = "missing", "the judge's reply had no verdict [[1-10]] (after every retry)"
    return {"text": clip_text(turns[turn - 1]) if len(turns) >= turn else None, "grade": grade, "status": status,
            "reason": reason,
            "judge_reply": clip_text(rec["reply"], MAX_JUDGE_REPLY_CHARS) if rec and rec.get("reply") else None}


def _mt_bench_entry(lang: str, qid: str, question: dict | None, per_model: dict, models: list[str]) -> dict:
    """One question of the MT-Bench browser: its turns, reference, and each model's two turns."""
    from .evaluation.mt_bench import NEED_REF_CATS

    have = [m for m in models if qid in per_model.get(m, {}).get("answers", {})]
    category = (question or {}).get("category") or next(
        (str(per_model[m]["answers"][qid].get("category")) for m in have), "")
    reference = (question or {}).get("reference")
    return {"lang": lang, "id": qid, "category": category,
            "turns": [clip_text(t) for t in question["turns"]] if question else None,
            "reference": [clip_text(r) for r in reference] if reference else None,
            "reference_judged": category in NEED_REF_CATS,
            "answers": {m: [_mt_bench_turn(per_model[m]["answers"][qid], per_model[m]["judged"], qid, turn)
                            for turn in (1, 2)] for m in have}}


def mt_bench_browser_data(run_dir: Path, settings: RunSettings, rows: list[dict], max_questions: int | None) -> dict:
    """{"models", "langs", "categories", "judges", "questions": [{lang, id, category, turns, reference,
    reference_judged, answers: {model: [turn 1, turn 2]}}], "counts": [{lang, shown, total}], "notes"}."""
    files = _mt_bench_files(run_dir)
    langs = sorted(files, key=lambda x: (x != "en", x))
    models = sorted({m for per in files.values() for m in per}, key=_model_order)
    questions, notes = _mt_bench_questions(settings, langs) if langs else ({}, [])
    entries, counts = [], []
    for lang in langs:
        per_model, rows_of_file = files[lang], questions.get(lang, [])
        by_id = {q["question_id"]: q for q in rows_of_file}
        answered = [qid for m in models for qid in per_model.get(m, {}).get("answers", {})]
        have = set(answered)
        ids = [q for q in by_id if q in have] + [q for q in dict.fromkeys(answered) if q not in by_id]
        stale = [m for m in models if m in per_model and rows_of_file
                 and per_model[m]["key"].get("questions") not in (None, _questions_hash(rows_of_file))]
        if stale:
            notes.append(f"MT-Bench {lang}: the answers of {', '.join(stale)} were made for other questions than "
                         "the question file holds now (the questions shown may not be the ones answered)")
        shown = sample_ids(ids, max_questions)
        counts.append({"lang": lang, "shown": len(shown), "total": len(ids)})
        entries += [_mt_bench_entry(lang, qid, by_id.get(qid), per_model, models) for qid in shown]
    judges = sorted({str(r.get("judge")) for r in rows if r.get("kind") == "mt_bench" and r.get("judge")})
    return {"models": models, "langs": langs, "categories": sorted({e["category"] for e in entries}),
            "judges": judges, "questions": entries, "counts": counts, "notes": notes}


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

def _overview(blocks: list[dict]) -> list[dict]:
    """The report's blocks as JSON: figures as data: URLs of the same PNG bytes report.md links."""
    out = []
    for b in blocks:
        if b["kind"] == "figure":
            out.append({"kind": "figure", "name": b["name"], "alt": b["alt"],
                        "src": "data:image/png;base64," + base64.b64encode(b["png"]).decode("ascii")})
        else:
            out.append(dict(b))
    return out


def page_data(run_dir: Path, max_pair_prompts: int | None = DEFAULT_MAX_PAIR_PROMPTS,
              max_eval_prompts: int | None = DEFAULT_MAX_EVAL_PROMPTS,
              max_mt_bench_questions: int | None = DEFAULT_MAX_MT_BENCH_QUESTIONS) -> dict:
    """Everything the page shows, as one JSON-able dict."""
    from .evaluation.results import read_results, row_kind

    run_dir = Path(run_dir)
    blocks, notes = report_blocks(run_dir)
    rows = read_results(run_dir / "results.json")
    judges = list(dict.fromkeys(r["judge"] for r in rows if row_kind(r) == "judge"))
    settings = RunSettings(run_dir)
    pairs = pair_browser_data(run_dir, settings, judges, max_pair_prompts)
    evaluation = evaluation_browser_data(run_dir, settings, max_eval_prompts)
    mt_bench = mt_bench_browser_data(run_dir, settings, rows, max_mt_bench_questions)
    return {"run": run_dir.name, "overview": _overview(blocks), "notes": notes + settings.notes,
            "pairs": pairs, "evaluation": evaluation, "mt_bench": mt_bench,
            "limits": {"max_pair_prompts": max_pair_prompts, "max_eval_prompts": max_eval_prompts,
                       "max_mt_bench_questions": max_mt_bench_questions, "max_text_chars": MAX_TEXT_CHARS}}


def render_page(data: dict) -> str:
    """The whole HTML document for `data` (from `page_data`)."""
    return (PAGE_HEAD.replace("@TITLE@", html.escape(f"ICR run report: {data['run']}"))
            + '<script type="application/json" id="icr-data">' + embed_json(data) + "</script>\n"
            + "<script>\n" + PAGE_SCRIPT + "</script>\n</body>\n</html>\n")


def write_html_report(run_dir: Path, max_pair_prompts: int | None = DEFAULT_MAX_PAIR_PROMPTS,
                      max_eval_prompts: int | None = DEFAULT_MAX_EVAL_PROMPTS,
                      max_mt_bench_questions: int | None = DEFAULT_MAX_MT_BENCH_QUESTIONS) -> Path:
    """Write `<run_dir>/report.html`; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IcrError(f"{run_dir}: no such run folder")
    path = run_dir / "report.html"
    page = render_page(page_data(run_dir, max_pair_prompts, max_eval_prompts, max_mt_bench_questions))
    # Same page, same file: a rerun with nothing new touches nothing in the run folder.
    if not path.is_file() or path.read_text(encoding="utf-8") != page:
        atomic_write_text(path, page)
    return path


PAGE_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { background: #1d2a44; color: #fff; padding: 10px 20px; display: flex; gap: 24px; align-items: center;
         position: sticky; top: 0; z-index: 2; }
header h1 { font-size: 17px; margin: 0; font-weight: 600; }
nav button { background: none; border: 1px solid #6c7a99; color: #fff; padding: 5px 12px; border-radius: 4px;
             cursor: pointer; font-size: 14px; margin-right: 6px; }
nav button.active { background: #fff; color: #1d2a44; }
main { max-width: 1400px; margin: 0 auto; padding: 12px 20px 40px; }
h2 { font-size: 16px; margin: 22px 0 6px; }
table { border-collapse: collapse; background: #fff; margin: 6px 0; font-size: 13px; }
th, td { border: 1px solid #d6dae2; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #eceff4; font-weight: 600; }
img.figure { max-width: 100%; background: #fff; border: 1px solid #d6dae2; }
.filters { display: flex; flex-wrap: wrap; gap: 10px 16px; align-items: center; background: #fff; padding: 8px 12px;
           border: 1px solid #d6dae2; border-radius: 6px; position: sticky; top: 48px; z-index: 1; }
.filters label { font-size: 13px; color: #444; }
.filters input[type=search] { width: 220px; }
.count { color: #444; margin: 8px 0; }
.card { background: #fff; border: 1px solid #d6dae2; border-radius: 6px; padding: 10px 14px; margin: 10px 0; }
.meta { color: #555; font-size: 13px; margin-bottom: 6px; }
.two { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.box h4 { margin: 4px 0; font-size: 13px; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace;
      background: #f3f5f8; padding: 6px 8px; border-radius: 4px; }
.chosen { border-left: 4px solid #2e8b57; padding-left: 8px; }
.rejected { border-left: 4px solid #c0392b; padding-left: 8px; }
tr.chosen-row td { background: #eaf6ee; }
tr.rejected-row td { background: #fbecea; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; margin-left: 6px; }
.agrees, .won, .grade { background: #d5f0dd; color: #1b5e34; }
.disagrees, .lost { background: #f7d7d3; color: #8a1f12; }
.tie, .none { background: #e6e8ec; color: #444; }
.missing { background: #fbe3c4; color: #7a4100; }
.pager button { margin-right: 8px; }
.note { color: #6b4e00; background: #fff6db; border: 1px solid #f0dd9c; padding: 4px 8px; border-radius: 4px; }
</style>
</head>
<body>
<header><h1 id="title"></h1><nav>
<button data-tab="overview" class="active">Overview</button><button data-tab="pairs">Pair browser</button><button
 data-tab="evaluation">Evaluation browser</button><button data-tab="mtbench">MT-Bench</button></nav></header>
<main>
<section id="tab-overview"></section>
<section id="tab-pairs" hidden>
<div class="filters">
<label>Run <select id="pair-run"></select></label>
<label>Iteration <select id="pair-iteration"></select></label>
<label>Language <select id="pair-lang"></select></label>
<label>Judge on the pair <select id="pair-agreement"></select></label>
<label>Text <input type="search" id="pair-text" placeholder="prompt, G(x), answers, id"></label>
</div>
<p class="count" id="pair-count"></p>
<div id="pair-list"></div>
<div class="pager" id="pair-pager"></div>
</section>
<section id="tab-evaluation" hidden>
<div class="filters">
<label>Language <select id="eval-lang"></select></label>
<label>Judge <select id="eval-judge"></select></label>
<label>Model A <select id="eval-model-a"></select> <select id="eval-outcome-a"></select></label>
<label>and model B <select id="eval-model-b"></select> <select id="eval-outcome-b"></select></label>
<label>Text <input type="search" id="eval-text" placeholder="instruction, answers, id"></label>
</div>
<p class="count" id="eval-count"></p>
<div id="eval-list"></div>
<div class="pager" id="eval-pager"></div>
</section>
<section id="tab-mtbench" hidden>
<div class="filters">
<label>Model <select id="mt-model"></select></label>
<label>Language <select id="mt-lang"></select></label>
<label>Category <select id="mt-category"></select></label>
<label>Turn <select id="mt-turn"></select></label>
<label>Grade of <select id="mt-model-a"></select> below <select id="mt-model-b"></select></label>
<label>Text <input type="search" id="mt-text" placeholder="question, answers, id"></label>
</div>
<p class="count" id="mt-count"></p>
<div id="mt-list"></div>
<div class="pager" id="mt-pager"></div>
</section>
</main>
"""

# The page's script: renders DATA with createElement/textContent only (never innerHTML).
PAGE_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("icr-data").textContent);
const PAGE_SIZE = 20;
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return node;
}
function num(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
function options(select, values, allLabel) {
  select.textContent = "";
  if (allLabel) select.appendChild(el("option", {value: ""}, allLabel));
  for (const [value, label] of values) select.appendChild(el("option", {value: String(value)}, label));
}
function tableOf(header, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, ...header.map(h => el("th", {}, h)))),
            el("tbody", {}, ...rows.map(r => el("tr", {}, ...r.map(c => el("td", {}, c))))));
}
function pager(holder, total, page, go) {
  holder.textContent = "";
  const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
  const prev = el("button", {type: "button"}, "‹ previous"), next = el("button", {type: "button"}, "next ›");
  prev.disabled = page <= 0; next.disabled = page >= pages - 1;
  prev.onclick = () => go(page - 1); next.onclick = () => go(page + 1);
  holder.append(prev, next, el("span", {}, `page ${page + 1} of ${pages}`));
}

// ---- overview
function renderOverview() {
  const root = document.getElementById("tab-overview");
  const notes = DATA.notes.concat(DATA.pairs.notes, DATA.evaluation.notes, (DATA.mt_bench || {notes: []}).notes);
  for (const n of notes) root.appendChild(el("p", {class: "note"}, n));
  for (const b of DATA.overview) {
    if (b.kind === "heading") root.appendChild(el("h2", {}, b.text));
    else if (b.kind === "text") root.appendChild(el("p", {}, b.text));
    else if (b.kind === "table") root.appendChild(tableOf(b.header, b.rows));
    else if (b.kind === "figure") { const img = el("img", {class: "figure", alt: b.alt}); img.src = b.src; root.appendChild(img); }
  }
  if (!DATA.overview.length) root.appendChild(el("p", {}, "Nothing to report yet."));
}

// ---- pair browser
const pairState = {page: 0};
function pairFilters() {
  const P = DATA.pairs.prompts, uniq = f => [...new Set(P.map(f))];
  options(document.getElementById("pair-run"), uniq(p => p.run).map(v => [v, v]), "all");
  options(document.getElementById("pair-iteration"), uniq(p => p.iteration).map(v => [v, "iteration " + v]), "all");
  options(document.getElementById("pair-lang"), uniq(p => p.lang).map(v => [v, v]), "all");
  options(document.getElementById("pair-agreement"), [["agrees", "agrees with the reward"],
    ["disagrees", "disagrees with the reward"], ["tie", "ties the pair"], ["unknown", "no judge scores"]], "any");
  for (const id of ["pair-run", "pair-iteration", "pair-lang", "pair-agreement", "pair-text"]) {
    document.getElementById(id).addEventListener(id === "pair-text" ? "input" : "change", () => { pairState.page = 0; renderPairs(); });
  }
}
function pairMatches(p) {
  const v = id => document.getElementById(id).value;
  if (v("pair-run") && p.run !== v("pair-run")) return false;
  if (v("pair-iteration") && String(p.iteration) !== v("pair-iteration")) return false;
  if (v("pair-lang") && p.lang !== v("pair-lang")) return false;
  const agree = v("pair-agreement");
  if (agree && (p.agreement || "unknown") !== agree) return false;
  const q = v("pair-text").trim().toLowerCase();
  if (q) {
    const hay = [p.id, p.prompt, p.reward_prompt || ""].concat(p.samples.map(s => s.text)).join("\n").toLowerCase();
    if (!hay.includes(q)) return false;
  }
  return true;
}
function sampleBox(p, s, kind) {
  if (!s) return el("div", {class: "box " + kind}, el("h4", {}, kind + ": none (no pair for this prompt)"));
  return el("div", {class: "box " + kind},
    el("h4", {}, `${kind} — sample ${s.sample}`),
    el("div", {class: "meta"}, `reward ${num(s.reward, 3)} · length-adjusted ${num(s.score, 3)} · α ${num(p.alpha, 3)} · `
      + `${s.chars} chars · detected ${s.detected || "–"} · judge ${num(s.judge, 2)}`),
    el("pre", {}, s.text));
}
function pairCard(p) {
  const bySample = Object.fromEntries(p.samples.map(s => [s.sample, s]));
  const badge = el("span", {class: "badge " + (p.agreement || "none")},
    p.agreement ? `judge ${p.agreement}` : "no judge scores");
  const rows = p.samples.map((s, i) => {
    const tr = el("tr", {class: s.sample === p.chosen ? "chosen-row" : s.sample === p.rejected ? "rejected-row" : ""},
      ...[i + 1, s.sample + (s.sample === p.chosen ? " (chosen)" : s.sample === p.rejected ? " (rejected)" : ""),
          num(s.reward, 3), num(s.score, 3), s.chars, s.detected || "–", num(s.judge, 2), s.finished === false ? "no" : "yes"]
        .map(c => el("td", {}, c)), el("td", {}, el("pre", {}, s.text)));
    return tr;
  });
  return el("article", {class: "card pair"},
    el("div", {class: "meta card-head"}, `${p.run} · iteration ${p.iteration} · ${p.lang} · prompt ${p.id} · α ${num(p.alpha, 3)}`, badge),
    el("div", {class: "two"},
      el("div", {class: "box"}, el("h4", {}, `Prompt x (${p.lang})`), el("pre", {}, p.prompt)),
      el("div", {class: "box"}, el("h4", {}, "G(x): the English instruction the reward saw"),
         el("pre", {}, p.reward_prompt === null ? "(not available)" : p.reward_prompt))),
    el("div", {class: "two"}, sampleBox(p, bySample[p.chosen], "chosen"), sampleBox(p, bySample[p.rejected], "rejected")),
    el("details", {open: ""}, el("summary", {}, `all ${p.samples.length} samples, ranked by reward`),
      el("table", {}, el("thead", {}, el("tr", {}, ...["rank", "sample", "reward", "length-adjusted", "chars",
        "detected", "judge", "finished", "answer"].map(h => el("th", {}, h)))), el("tbody", {}, ...rows))));
}
function renderPairs() {
  const v = id => document.getElementById(id).value;
  const shown = DATA.pairs.prompts.filter(pairMatches);
  const counts = DATA.pairs.counts.filter(c => (!v("pair-run") || c.run === v("pair-run"))
    && (!v("pair-iteration") || String(c.iteration) === v("pair-iteration")) && (!v("pair-lang") || c.lang === v("pair-lang")));
  const embedded = counts.reduce((a, c) => a + c.shown, 0), total = counts.reduce((a, c) => a + c.total, 0);
  const cap = DATA.limits.max_pair_prompts;
  document.getElementById("pair-count").textContent = `${shown.length} prompts match. Embedded in this page: `
    + `${embedded} of ${total} prompts of the selected runs, iterations and languages`
    + (cap === null ? "." : ` (a fixed sample of at most ${cap} per run, iteration and language; icr report --max-pair-prompts).`)
    + (DATA.pairs.judge ? ` Judge scores: ${DATA.pairs.judge}.` : " No judge scored single samples in this run.");
  const list = document.getElementById("pair-list");
  list.textContent = "";
  for (const p of shown.slice(pairState.page * PAGE_SIZE, (pairState.page + 1) * PAGE_SIZE)) list.appendChild(pairCard(p));
  pager(document.getElementById("pair-pager"), shown.length, pairState.page, n => { pairState.page = n; renderPairs(); });
}

// ---- evaluation browser
const evalState = {page: 0};
const OUTCOMES = [["won", "won"], ["lost", "lost"], ["tie", "tied"]];
function outcome(pref) { return pref === null || pref === undefined ? null : pref > 0.5 ? "won" : pref < 0.5 ? "lost" : "tie"; }
function evalFilters() {
  const E = DATA.evaluation;
  options(document.getElementById("eval-lang"), [...new Set(E.prompts.map(p => p.lang))].map(v => [v, v]), "all");
  options(document.getElementById("eval-judge"), E.judges.map(v => [v, v]), null);
  for (const s of ["a", "b"]) {
    options(document.getElementById("eval-model-" + s), E.models.map(v => [v, v]), "—");
    options(document.getElementById("eval-outcome-" + s), OUTCOMES, "any");
  }
  for (const id of ["eval-lang", "eval-judge", "eval-model-a", "eval-outcome-a", "eval-model-b", "eval-outcome-b", "eval-text"]) {
    document.getElementById(id).addEventListener(id === "eval-text" ? "input" : "change", () => { evalState.page = 0; renderEval(); });
  }
}
function evalMatches(p) {
  const v = id => document.getElementById(id).value, judge = v("eval-judge");
  if (v("eval-lang") && p.lang !== v("eval-lang")) return false;
  for (const s of ["a", "b"]) {
    const m = v("eval-model-" + s), want = v("eval-outcome-" + s);
    if (m && want) {
      const a = p.answers[m];
      if (!a || outcome(a.preference[judge]) !== want) return false;
    }
  }
  const q = v("eval-text").trim().toLowerCase();
  if (q) {
    const hay = [p.id, p.instruction, p.reference || ""].concat(Object.values(p.answers).map(a => a.text)).join("\n").toLowerCase();
    if (!hay.includes(q)) return false;
  }
  return true;
}
function evalCard(p) {
  const judge = document.getElementById("eval-judge").value;
  const rows = DATA.evaluation.models.filter(m => p.answers[m]).map(m => {
    const pref = p.answers[m].preference[judge], o = outcome(pref);
    return el("tr", {}, el("td", {}, m),
      el("td", {}, el("span", {class: "badge " + (o || "none")}, o === null ? "not judged" : `${o} (${num(pref, 2)})`)),
      el("td", {}, el("pre", {}, p.answers[m].text)));
  });
  return el("article", {class: "card"},
    el("div", {class: "meta card-head"}, `${p.lang} · prompt ${p.id}`),
    el("div", {class: "two"},
      el("div", {class: "box"}, el("h4", {}, "Instruction"), el("pre", {}, p.instruction)),
      el("div", {class: "box"}, el("h4", {}, "Reference"),
         el("pre", {}, p.reference === null ? "(no reference: judged against an empty answer)" : p.reference))),
    el("table", {}, el("thead", {}, el("tr", {}, ...["model", `judge ${judge}: vs reference`, "answer"].map(h => el("th", {}, h)))),
      el("tbody", {}, ...rows)));
}
function renderEval() {
  const v = id => document.getElementById(id).value, E = DATA.evaluation;
  const shown = E.prompts.filter(evalMatches);
  const counts = E.counts.filter(c => !v("eval-lang") || c.lang === v("eval-lang"));
  const embedded = counts.reduce((a, c) => a + c.shown, 0), total = counts.reduce((a, c) => a + c.total, 0);
  const cap = DATA.limits.max_eval_prompts;
  document.getElementById("eval-count").textContent = `${shown.length} prompts match. Embedded in this page: `
    + `${embedded} of ${total} evaluation prompts`
    + (cap === null ? "." : ` (a fixed sample of at most ${cap} per language; icr report --max-eval-prompts).`);
  const list = document.getElementById("eval-list");
  list.textContent = "";
  for (const p of shown.slice(evalState.page * PAGE_SIZE, (evalState.page + 1) * PAGE_SIZE)) list.appendChild(evalCard(p));
  pager(document.getElementById("eval-pager"), shown.length, evalState.page, n => { evalState.page = n; renderEval(); });
}

// ---- MT-Bench browser
const MT = DATA.mt_bench || {models: [], langs: [], categories: [], judges: [], questions: [], counts: [], notes: []};
const mtState = {page: 0};
function mtFilters() {
  const ids = ["mt-model", "mt-lang", "mt-category", "mt-turn", "mt-model-a", "mt-model-b", "mt-text"];
  options(document.getElementById("mt-model"), MT.models.map(v => [v, v]), "all");
  options(document.getElementById("mt-lang"), MT.langs.map(v => [v, v]), "all");
  options(document.getElementById("mt-category"), MT.categories.map(v => [v, v]), "all");
  options(document.getElementById("mt-turn"), [["1", "turn 1"], ["2", "turn 2"]], "both");
  options(document.getElementById("mt-model-a"), MT.models.map(v => [v, v]), "—");
  options(document.getElementById("mt-model-b"), MT.models.map(v => [v, v]), "—");
  for (const id of ids) {
    document.getElementById(id).addEventListener(id === "mt-text" ? "input" : "change", () => { mtState.page = 0; renderMt(); });
  }
}
function mtTurns() { const t = document.getElementById("mt-turn").value; return t ? [Number(t)] : [1, 2]; }
function mtBelow(q, a, b, turns) {  // model a's grade below model b's on a shown turn
  const ga = q.answers[a], gb = q.answers[b];
  if (!ga || !gb) return false;
  return turns.some(t => ga[t - 1].grade !== null && gb[t - 1].grade !== null && ga[t - 1].grade < gb[t - 1].grade);
}
function mtMatches(q) {
  const v = id => document.getElementById(id).value, turns = mtTurns();
  if (v("mt-model") && !q.answers[v("mt-model")]) return false;
  if (v("mt-lang") && q.lang !== v("mt-lang")) return false;
  if (v("mt-category") && q.category !== v("mt-category")) return false;
  if (v("mt-model-a") && v("mt-model-b") && !mtBelow(q, v("mt-model-a"), v("mt-model-b"), turns)) return false;
  const text = v("mt-text").trim().toLowerCase();
  if (text) {
    const hay = [q.id, q.category].concat(q.turns || [], q.reference || [],
      Object.values(q.answers).flatMap(a => a.map(t => t.text || ""))).join("\n").toLowerCase();
    if (!hay.includes(text)) return false;
  }
  return true;
}
function mtGrade(t) {
  if (t.status === "graded") return el("span", {class: "badge grade"}, num(t.grade, 1));
  return el("span", {class: "badge " + (t.status === "missing" ? "missing" : "none")}, `${t.status}: ${t.reason}`);
}
function mtTurn(q, turn, models) {
  const i = turn - 1, ref = q.reference && q.reference[i] !== undefined ? q.reference[i] : null;
  const rows = models.map(m => {
    const t = q.answers[m][i];
    return el("tr", {class: "mt-row"}, el("td", {}, m), el("td", {class: "mt-grade"}, mtGrade(t)),
      el("td", {}, el("pre", {}, t.text === null ? "(no answer)" : t.text)),
      el("td", {}, t.judge_reply === null ? "–" : el("details", {}, el("summary", {}, "judge's reply"), el("pre", {}, t.judge_reply))));
  });
  return el("div", {class: "mt-turn"},
    el("div", {class: "two"},
      el("div", {class: "box"}, el("h4", {}, `Turn ${turn}: user`),
         el("pre", {}, q.turns ? q.turns[i] : "(question text not available: see the notes on the overview)")),
      ref === null ? el("div", {class: "box"}) : el("div", {class: "box"},
        el("h4", {}, q.reference_judged ? "Reference (shown to the judge)" : "Reference (not used by the judge for this category)"),
        el("pre", {}, ref))),
    el("table", {}, el("thead", {}, el("tr", {}, ...["model", `grade turn ${turn}`, "answer", "judge"].map(h => el("th", {}, h)))),
      el("tbody", {}, ...rows)));
}
function mtCard(q) {
  const m = document.getElementById("mt-model").value;
  const models = MT.models.filter(x => q.answers[x] && (!m || x === m));
  return el("article", {class: "card mt"},
    el("div", {class: "meta card-head"}, `${q.lang} · question ${q.id} · ${q.category}`),
    ...mtTurns().map(t => mtTurn(q, t, models)));
}
function renderMt() {
  const v = id => document.getElementById(id).value;
  const shown = MT.questions.filter(mtMatches);
  const counts = MT.counts.filter(c => !v("mt-lang") || c.lang === v("mt-lang"));
  const embedded = counts.reduce((a, c) => a + c.shown, 0), total = counts.reduce((a, c) => a + c.total, 0);
  const cap = DATA.limits.max_mt_bench_questions;
  document.getElementById("mt-count").textContent = !MT.questions.length && !total
    ? "No MT-Bench answers in this run (evaluation.mt_bench.questions not set, or not evaluated yet)."
    : `${shown.length} questions match. Embedded in this page: ${embedded} of ${total} MT-Bench questions`
      + (cap === null || cap === undefined ? "." : ` (a fixed sample of at most ${cap} per language).`)
      + ` Grades 1-10 by ${MT.judges.length ? MT.judges.join(", ") : "the MT-Bench judge"}; missing = the judge gave no verdict.`
      + (v("mt-model-a") && v("mt-model-b") ? ` Shown: ${v("mt-model-a")} graded below ${v("mt-model-b")} on `
         + (v("mt-turn") ? `turn ${v("mt-turn")}.` : "either turn.") : "");
  const list = document.getElementById("mt-list");
  list.textContent = "";
  for (const q of shown.slice(mtState.page * PAGE_SIZE, (mtState.page + 1) * PAGE_SIZE)) list.appendChild(mtCard(q));
  pager(document.getElementById("mt-pager"), shown.length, mtState.page, n => { mtState.page = n; renderMt(); });
}

function showTab(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const t of ["overview", "pairs", "evaluation", "mtbench"]) document.getElementById("tab-" + t).hidden = t !== name;
}
document.getElementById("title").textContent = "ICR run report: " + DATA.run;
for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => showTab(b.dataset.tab));
renderOverview(); pairFilters(); renderPairs(); evalFilters(); renderEval(); mtFilters(); renderMt();
if (["#pairs", "#evaluation", "#mtbench"].includes(location.hash)) showTab(location.hash.slice(1));
document.body.dataset.ready = "1";
"""
