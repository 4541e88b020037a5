"""Multilingual MT-Bench (the paper's Table 3): two-turn answers per language, graded 1-10 by an LLM judge.

Why icr has its own instead of running FastChat's llm_judge: FastChat (fschat 0.2.36) carries the judge
code only, written for the pre-1.0 `openai` API, samples through its own model adapters (not the
model's chat template as icr's backends apply it, nor vLLM through icr), and keeps no per-judgement
cache. No package carries the questions or judge prompts: multilingual versions are on the hub. So
icr reads the user's files in MT-Bench's formats and follows FastChat's protocol:

- questions (`evaluation.mt_bench.questions`, one JSONL per `{lang}`): `question_id`, `category`,
  `turns` (two user turns), optional `reference` (one reference answer per turn);
- judge prompts (`judge_prompts`, FastChat's `judge_prompts.jsonl` format): `single-v1` and
  `single-v1-multi-turn` for most categories, `single-math-v1` and `single-math-v1-multi-turn` (with
  the reference answer) for the categories in `NEED_REF_CATS`; a turn-2 prompt shows the whole
  conversation and asks about the second answer;
- verdicts `[[n]]` (FastChat's backup pattern `[n]` accepted too), 1-10.
- answers: both turns sampled through the run's sampling backend with the model's chat template,
  the second turn conditioned on the model's own first answer; decoding is MT-Bench's per-category
  temperature table by default (`MT_BENCH_TEMPERATURES`).

A judgement is cached per (judge, prompt shown to the judge, which contains the answer) in
`eval/mt_bench_cache.jsonl`, the reply's text and tokens with it; a reply that never had a verdict
(after `verdict_retries` asks) is cached as missing and counted in its row's `missing`, never scored,
so a rerun asks nothing and gives the same rows (delete its line to ask again).

Files under the run's `eval/`: `<label>/mt_bench/<lang>/answers.json` (the answers and the key that
made them: reused when it matches), `<label>/mt_bench/<lang>/judgements.json` (per question and turn:
verdict, judge reply), `mt_bench_cache.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from pathlib import Path

from ..data import read_records
from ..errors import IcrError
from ..runs import read_json, text_hash, write_json

# FastChat llm_judge/common.py: categories graded against a reference answer
NEED_REF_CATS = ("math", "reasoning", "coding")
# FastChat llm_judge/gen_model_answer.py temperature_config; other categories: 0.7
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7
# judge prompt name -> the placeholders its template must use (FastChat's judge_prompts.jsonl)
PROMPT_FIELDS = {
    "single-v1": {"question", "answer"},
    "single-math-v1": {"question", "answer", "ref_answer_1"},
    "single-v1-multi-turn": {"question_1", "answer_1", "question_2", "answer_2"},
    "single-math-v1-multi-turn": {"question_1", "answer_1", "question_2", "answer_2", "ref_answer_1", "ref_answer_2"},
}
VERDICT = re.compile(r"\[\[(\d+\.?\d*)\]\]")
VERDICT_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def enabled(mt) -> bool:
    return bool(mt.questions)


def parse_verdict(text: str) -> float | None:
    """The rating in a judge reply: FastChat's `[[n]]` (or its backup `[n]`), within 1..10; else None."""
    m = VERDICT.search(text) or VERDICT_BACKUP.search(text)
    if not m:
        return None
    value = float(m.group(1))
    return value if 1.0 <= value <= 10.0 else None


# ---------------------------------------------------------------------------------------------
# The user's files
# ---------------------------------------------------------------------------------------------

def load_questions(path_template: str, lang: str) -> list[dict]:
    """One language's questions, checked line by line (errors name the file and line)."""
    path = Path(path_template.replace("{lang}", lang))
    if not path.is_file():
        raise IcrError(f"evaluation.mt_bench.questions: no file {path} for language {lang}")
    rows, seen = [], set()
    for where, row in read_records(path, "jsonl", "MT-Bench questions"):
        qid, cat, turns = row.get("question_id"), row.get("category"), row.get("turns")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool) or str(qid) == "":
            raise IcrError(f"{where}: question_id must be an integer or a non-empty string")
        if str(qid) in seen:
            raise IcrError(f"{where}: question_id {qid} appears twice")
        if not isinstance(cat, str) or not cat:
            raise IcrError(f"{where}: category must be a non-empty string")
        if not (isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) and t.strip() for t in turns)):
            raise IcrError(f"{where}: turns must be a list of 2 non-empty user turns")
        ref = row.get("reference")
        if ref is not None and not (isinstance(ref, list) and all(isinstance(t, str) for t in ref)):
            raise IcrError(f"{where}: reference must be a list of reference answers (one per turn)")
        if cat in NEED_REF_CATS and not (ref and len(ref) >= 2):
            raise IcrError(f"{where}: category {cat!r} is graded against a reference: reference needs 2 answers")
        seen.add(str(qid))
        rows.append({"question_id": str(qid), "category": cat, "turns": turns, "reference": ref})
    if not rows:
        raise IcrError(f"evaluation.mt_bench.questions: {path} has no questions")
    return rows


def load_judge_prompts(path: str) -> dict[str, dict]:
    """FastChat-format judge prompts by name (the four single-answer ones), templates checked."""
    p = Path(path)
    if not p.is_file():
        raise IcrError(f"evaluation.mt_bench.judge_prompts: no file {p}")
    prompts = {}
    for where, row in read_records(p, "jsonl", "MT-Bench judge prompts"):
        name = row.get("name")
        if name not in PROMPT_FIELDS:
            continue  # pairwise prompts and others: not used here
        for key in ("system_prompt", "prompt_template"):
            if not isinstance(row.get(key), str):
                raise IcrError(f"{where}: {name}: {key} must be a string")
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(row["prompt_template"]) if f is not None}
        except ValueError as e:
            raise IcrError(f"{where}: {name}: prompt_template is not a format string ({e})") from None
        if used != PROMPT_FIELDS[name]:
            raise IcrError(f"{where}: {name}: prompt_template uses {{{', '.join(sorted(used))}}}; expected exactly "
                           f"{{{', '.join(sorted(PROMPT_FIELDS[name]))}}}")
        prompts[name] = {"system_prompt": row["system_prompt"], "prompt_template": row["prompt_template"]}
    absent = [name for name in PROMPT_FIELDS if name not in prompts]
    if absent:
        raise IcrError(f"evaluation.mt_bench.judge_prompts: {p} has no {', '.join(absent)} prompt")
    return prompts


def load_all(cfg) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """(questions per language, judge prompts); `cfg` the ExperimentConfig."""
    mt = cfg.evaluation.mt_bench
    return {lang: load_questions(mt.questions, lang) for lang in cfg.languages}, load_judge_prompts(mt.judge_prompts)


def check_mt_bench(cfg) -> None:
    """`icr validate` / preflight: the files parse, and the judge server answers (one line if not)."""
    if not enabled(cfg.evaluation.mt_bench):
        return
    from .openai_judge import OpenAIJudgeClient

    load_all(cfg)
    OpenAIJudgeClient(cfg.evaluation.mt_bench.judge).check_server()


def judge_prompt(prompts: dict, q: dict, answers: list[str], turn: int) -> list[dict]:
    """The chat messages shown to the judge for `turn` of question `q` answered with `answers`."""
    ref = q["category"] in NEED_REF_CATS
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    if turn == 1:
        fields = {"question": q["turns"][0], "answer": answers[0]}
        if ref:
            fields["ref_answer_1"] = q["reference"][0]
    else:
        fields = {"question_1": q["turns"][0], "answer_1": answers[0], "question_2": q["turns"][1],
                  "answer_2": answers[1]}
        if ref:
            fields.update(ref_answer_1=q["reference"][0], ref_answer_2=q["reference"][1])
    messages = [{"role": "system", "content": p["system_prompt"]}] if p["system_prompt"] else []
    return messages + [{"role": "user", "content": p["prompt_template"].format(**fields)}]


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

def temperature_for(mt, category: str) -> float:
    return mt.temperature if mt.temperature is not None else MT_BENCH_TEMPERATURES.get(category, DEFAULT_TEMPERATURE)


def _answers_key(model_path: str, mt, seed: int, chat_template: str | None, questions: list[dict]) -> dict:
    return {"model_path": str(model_path), "temperature": mt.temperature, "max_new_tokens": mt.max_new_tokens,
            "seed": seed, "chat_template": text_hash(chat_template or ""),
            "questions": text_hash(*(json.dumps(q, sort_keys=True, ensure_ascii=False) for q in questions))}


def _saved_answers(path: Path, key: dict) -> list[dict] | None:
    try:
        data = read_json(path)
        return data["answers"] if data.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def missing_answers(cfg, model_path: str, label: str, out_dir: Path, questions: dict | None = None) -> list[str]:
    """Languages whose MT-Bench answers must be (re)generated for this model."""
    if not enabled(cfg.evaluation.mt_bench):
        return []
    mt = cfg.evaluation.mt_bench
    questions = questions or {lang: load_questions(mt.questions, lang) for lang in cfg.languages}
    return [lang for lang, qs in questions.items()
            if _saved_answers(Path(out_dir) / label / "mt_bench" / lang / "answers.json",
                              _answers_key(model_path, mt, cfg.seed, cfg.models.chat_template, qs)) is None]


def _two_turns(backend, mt, questions: list[dict], seed: int) -> list[list[str]]:
    """Both turns' answers per question: turn 2 sees the model's own turn-1 answer."""
    from ..generation import SamplingParams

    answers: list[list[str]] = [[] for _ in questions]
    groups: dict[float, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(temperature_for(mt, q["category"]), []).append(i)
    for temp, idx in sorted(groups.items()):
        params = SamplingParams(n=1, temperature=temp, top_p=1.0, max_new_tokens=mt.max_new_tokens, seed=seed)
        for turn in (0, 1):
            convs = []
            for i in idx:
                conv = []
                for k in range(turn + 1):
                    conv.append({"role": "user", "content": questions[i]["turns"][k]})
                    if k < turn:
                        conv.append({"role": "assistant", "content": answers[i][k]})
                convs.append(conv)
            for i, samples in zip(idx, backend.generate(convs, params)):
                answers[i].append(samples[0].text.strip())
    return answers


def generate_answers(cfg, model_path: str, label: str, out_dir: Path, backend) -> None:
    """Two-turn answers to every language's questions (those not saved for this model), through
    `backend` (the run's sampling backend, loaded by the caller; used as is)."""
    mt = cfg.evaluation.mt_bench
    if not enabled(mt):
        return
    for lang in cfg.languages:
        qs = load_questions(mt.questions, lang)
        key = _answers_key(model_path, mt, cfg.seed, cfg.models.chat_template, qs)
        path = Path(out_dir) / label / "mt_bench" / lang / "answers.json"
        if _saved_answers(path, key) is not None:
            continue
        answers = _two_turns(backend, mt, qs, cfg.seed)
        write_json(path, {"key": key, "answers": [
            {"question_id": q["question_id"], "category": q["category"], "turns": a} for q, a in zip(qs, answers)]})


# ---------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------

class JudgementCache:
    """`mt_bench_cache.jsonl`: one line per judgement paid for, keyed by (judge, messages shown); appended
    and fsynced as each reply arrives, so a run killed mid-evaluation resumes where it stopped. A
    truncated last line (a crash mid-write) is ignored."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(judge_id: str, messages: list[dict]) -> str:
        return text_hash(judge_id, "mt_bench", *(f"{m['role']}\t{m['content']}" for m in messages))

    def add(self, rec: dict) -> None:
        self.records[rec["key"]] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def judge_name(mt) -> str:
    return f"openai:{mt.judge.model}"


def _judge_id(mt) -> str:
    """What a cached judgement depends on besides the messages: the judge model and its decoding."""
    return f"{judge_name(mt)}/t={mt.judge.temperature}/max={mt.judge.max_tokens}"


def grade(cfg, label: str, out_dir: Path, questions: dict, prompts: dict, client_factory) -> dict[str, list[dict]]:
    """Per language, one record per (question, graded turn): verdict (None = missing), tokens.
    `client_factory()` builds the judge client, only when something is not cached."""
    mt = cfg.evaluation.mt_bench
    out_dir = Path(out_dir)
    cache = JudgementCache(out_dir / "mt_bench_cache.jsonl")
    jid = _judge_id(mt)
    todo, graded = [], {}
    for lang, qs in questions.items():
        saved = read_json(out_dir / label / "mt_bench" / lang / "answers.json")["answers"]
        by_id = {a["question_id"]: a for a in saved}
        graded[lang] = []
        for q in qs:
            for turn in mt.turns:
                messages = judge_prompt(prompts, q, by_id[q["question_id"]]["turns"], turn)
                item = {"question_id": q["question_id"], "category": q["category"], "turn": turn,
                        "key": cache.key(jid, messages)}
                graded[lang].append(item)
                if item["key"] not in cache.records:
                    todo.append((item, messages))
    todo = list({item["key"]: (item, m) for item, m in todo}.values())
    if todo:
        client = client_factory()

        def keep(i: int, reply) -> None:
            item = todo[i][0]
            cache.add({"key": item["key"], "judge": judge_name(mt), "question_id": item["question_id"],
                       "turn": item["turn"], "verdict": reply.verdict, "missing": reply.verdict is None,
                       "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                       "requests": reply.requests, "reply": reply.text, "error": reply.error})

        client.judge_many([m for _, m in todo], parse_verdict, on_reply=keep)
    for lang, items in graded.items():
        for item in items:
            rec = cache.records[item["key"]]
            item.update(verdict=rec["verdict"], prompt_tokens=rec["prompt_tokens"],
                        completion_tokens=rec["completion_tokens"], reply=rec.get("reply", ""),
                        error=rec.get("error", ""))
        write_json(out_dir / label / "mt_bench" / lang / "judgements.json",
                   [{k: v for k, v in it.items() if k != "key"} for it in items])
    return graded


def rows_of(graded: dict[str, list[dict]], label: str, iteration: int, mt) -> list[dict]:
    """results.json rows of kind "mt_bench": per (language, turn, category), and category "all"."""
    from .openai_judge import cost_of

    rows = []
    for lang, items in graded.items():
        for turn in mt.turns:
            in_turn = [it for it in items if it["turn"] == turn]
            for cat in ["all"] + sorted({it["category"] for it in in_turn}):
                sel = [it for it in in_turn if cat == "all" or it["category"] == cat]
                scores = [it["verdict"] for it in sel if it["verdict"] is not None]
                n = len(scores)
                mean = sum(scores) / n if n else None
                se = (math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) / math.sqrt(n)) if n > 1 else None
                pt, ct = sum(it["prompt_tokens"] for it in sel), sum(it["completion_tokens"] for it in sel)
                rows.append({"kind": "mt_bench", "model": label, "iteration": iteration, "lang": lang,
                             "judge": judge_name(mt), "turn": turn, "category": cat, "mean": mean, "se": se,
                             "n": n, "missing": len(sel) - n, "prompt_tokens": pt, "completion_tokens": ct,
                             "cost": cost_of(pt, ct, mt.judge)})
    return rows


def evaluate_mt_bench(cfg, label: str, iteration: int, out_dir: Path, client_factory=None) -> list[dict]:
    """Grade a model's saved MT-Bench answers (`generate_answers` first) and return its rows."""
    mt = cfg.evaluation.mt_bench
    if not enabled(mt):
        return []
    questions, prompts = load_all(cfg)
    if client_factory is None:
        from .openai_judge import OpenAIJudgeClient

        def client_factory():
            return OpenAIJudgeClient(mt.judge)
    return rows_of(grade(cfg, label, out_dir, questions, prompts, client_factory), label, iteration, mt)


# ---------------------------------------------------------------------------------------------
# report.md: the paper's Table 3
# ---------------------------------------------------------------------------------------------

def _cell(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _pooled(rows: list[dict]) -> float | None:
    """Mean over the judgements behind `rows` (category "all" rows: n-weighted)."""
    n = sum(r["n"] for r in rows if r["mean"] is not None)
    return sum(r["mean"] * r["n"] for r in rows if r["mean"] is not None) / n if n else None


def mt_bench_section(rows: list[dict]) -> list[dict]:
    """The report's MT-Bench section, as report.py's blocks (heading / text / table dicts):
    per model, the score per language and the average over languages (both turns), then turn 1,
    turn 2 and both per language."""
    rows = [r for r in rows if r.get("kind") == "mt_bench" and r["category"] == "all"]
    if not rows:
        return []
    order = sorted({(r["iteration"], r["model"]) for r in rows})
    models = list(dict.fromkeys(m for _, m in order))
    langs = list(dict.fromkeys(r["lang"] for r in rows))
    cell = {}
    for r in rows:
        cell.setdefault((r["model"], r["lang"]), []).append(r)
    main, turns = [], []
    for m in models:
        per_lang = [_pooled(cell.get((m, lang), [])) for lang in langs]
        have = [v for v in per_lang if v is not None]
        main.append([m] + [_cell(v) for v in per_lang] + [_cell(sum(have) / len(have) if have else None)])
        for lang in langs:
            rs = cell.get((m, lang), [])
            t1 = _pooled([r for r in rs if r["turn"] == 1])
            t2 = _pooled([r for r in rs if r["turn"] == 2])
            turns.append([m, lang, _cell(t1), _cell(t2), _cell(_pooled(rs)), str(sum(r["n"] for r in rs)),
                          str(sum(r["missing"] for r in rs))])
    judges = ", ".join(sorted({r["judge"] for r in rows}))
    return [{"kind": "heading", "text": "Multilingual MT-Bench (the paper's Table 3)"},
            {"kind": "text", "text": f"Single-answer grading 1-10 by {judges}, both turns pooled; Avg = mean over "
                                     "languages. Missing = judge replies without a verdict (not scored)."},
            {"kind": "table", "header": ["Model"] + langs + ["Avg"], "rows": main},
            {"kind": "table", "header": ["Model", "Lang", "Turn 1", "Turn 2", "Both", "n", "Missing"],
             "rows": turns}]
