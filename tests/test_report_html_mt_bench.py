"""report.html's MT-Bench browser: the page data built from MT-Bench files written by
icr.evaluation.mt_bench itself (its answer writer fed by a stand-in sampling backend, its grader by a
stand-in judge client: no model, no server), escaping, caps, missing grades, and a run without MT-Bench.
The page in headless Chromium: tests/test_report_html.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import yaml

from icr.evaluation.results import append_results
from icr.report_html import page_data, render_page, write_html_report

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"
MT_DATA = REPO / "tests" / "data" / "mt_bench"
HOSTILE = '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><b>bold</b> & <!--'
# what the stand-in judge grades each model's answers (a grade per model, found by name in the answer)
GRADES = {"sft": 2.0, "M0": 4.0, "M1": 7.0, "M2": 9.0}
REFUSED = "413: prompt too long for the judge"


class StandInBackend:
    """The sampling backend's interface (generate(conversations, params) -> [[sample]]): answers that
    name the model and the turn; `hostile` replaces the turn-1 answer to question 102 (math)."""

    def __init__(self, model: str, hostile: str | None):
        self.model, self.hostile = model, hostile

    def generate(self, conversations, params):
        out = []
        for conv in conversations:
            turn = (len(conv) + 1) // 2
            first = conv[0]["content"]
            text = f"{self.model} answers turn {turn} of: {first[:24]}"
            if self.hostile and turn == 1 and "12" in first:
                text = f"{self.model} says {self.hostile}"
            out.append([SimpleNamespace(text=text)])
        return out


class StandInJudge:
    """The judge client's interface (judge_many): a verdict [[n]] by the model named in the judged answer;
    no verdict for M1's answers to question 104 in Spanish, a refused request for M0's to question 103."""

    def judge_many(self, requests, parse, on_reply=None):
        from icr.evaluation.openai_judge import Reply

        replies = []
        for i, messages in enumerate(requests):
            prompt = messages[-1]["content"]
            model = next(m for m in sorted(GRADES, key=len, reverse=True) if f"{m} " in prompt)
            if model == "M1" and "era industrial" in prompt:
                reply = Reply(text="The answer is fine, I think.", requests=3)
            elif model == "M0" and "Carla" in prompt:
                reply = Reply(requests=1, error=REFUSED)
            else:
                text = f"Rating of {model}'s answer: [[{GRADES[model]:g}]]"
                reply = Reply(text=text, verdict=parse(text), prompt_tokens=10, completion_tokens=5, requests=1)
            replies.append(reply)
            if on_reply is not None:
                on_reply(i, reply)
        return replies


def mt_bench_overrides(langs) -> list[str]:
    return [f"languages=[{', '.join(langs)}]", f"evaluation.mt_bench.questions={MT_DATA}/question_{{lang}}.jsonl",
            f"evaluation.mt_bench.judge_prompts={MT_DATA}/judge_prompts.jsonl",
            "evaluation.mt_bench.judge.base_url=http://127.0.0.1:9/v1", "evaluation.mt_bench.judge.model=judge-model"]


def add_mt_bench(run: Path, models=("M0", "M1"), langs=("en", "es"), hostile: str | None = HOSTILE) -> list[dict]:
    """MT-Bench answers, judgements and results rows of `models` in `run`, written by
    icr.evaluation.mt_bench; config.yaml's evaluation.mt_bench set as the run would have it."""
    from icr.config import load_config
    from icr.evaluation import mt_bench

    cfg = load_config(TINY, mt_bench_overrides(langs))
    questions, prompts = mt_bench.load_all(cfg)
    rows = []
    for t, model in enumerate(models):
        mt_bench.generate_answers(cfg, f"/models/{model}", model, run / "eval",
                                  StandInBackend(model, hostile if model == "M1" else None))
        graded = mt_bench.grade(cfg, model, run / "eval", questions, prompts, StandInJudge)
        rows += mt_bench.rows_of(graded, model, t, cfg.evaluation.mt_bench)
    append_results(run / "results.json", rows)
    config_path = run / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    config.setdefault("evaluation", {})["mt_bench"] = {"questions": cfg.evaluation.mt_bench.questions,
                                                       "judge_prompts": cfg.evaluation.mt_bench.judge_prompts}
    config["languages"] = config.get("languages") or list(langs)
    config_path.write_text(yaml.safe_dump(config, sort_keys=True))
    return rows


def _question(data: dict, lang: str, qid: str) -> dict:
    return next(q for q in data["questions"] if (q["lang"], q["id"]) == (lang, qid))


def test_mt_bench_page_data_from_the_modules_files(tmp_path):
    run = tmp_path / "mt"
    add_mt_bench(run)
    data = page_data(run)["mt_bench"]
    assert data["models"] == ["M0", "M1"] and data["langs"] == ["en", "es"]
    assert data["categories"] == ["humanities", "math", "reasoning", "writing"]
    assert data["judges"] == ["openai:judge-model"] and data["notes"] == []
    assert data["counts"] == [{"lang": "en", "shown": 4, "total": 4}, {"lang": "es", "shown": 4, "total": 4}]
    assert [q["id"] for q in data["questions"]] == ["101", "102", "103", "104"] * 2  # the question file's order
    source = [json.loads(line) for line in (MT_DATA / "question_es.jsonl").read_text().splitlines() if line.strip()]
    math_q = _question(data, "es", "102")
    assert math_q["turns"] == source[1]["turns"] and math_q["reference"] == source[1]["reference"]
    assert math_q["category"] == "math" and math_q["reference_judged"] is True
    writing = _question(data, "es", "101")
    assert writing["reference"] is None and writing["reference_judged"] is False
    # each turn: the model's answer and its grade; an answer with HTML kept as it is (text)
    m1 = math_q["answers"]["M1"]
    assert m1[0]["text"] == f"M1 says {HOSTILE}" and m1[1]["text"].startswith("M1 answers turn 2 of: ")
    assert [t["grade"] for t in m1] == [7.0, 7.0] and {t["status"] for t in m1} == {"graded"}
    assert m1[0]["judge_reply"] == "Rating of M1's answer: [[7]]" and m1[0]["reason"] is None
    assert [t["grade"] for t in math_q["answers"]["M0"]] == [4.0, 4.0]
    # no verdict, and a request the judge server refused: missing, with the reason
    no_verdict = _question(data, "es", "104")["answers"]["M1"]
    assert [(t["grade"], t["status"]) for t in no_verdict] == [(None, "missing")] * 2
    assert "no verdict" in no_verdict[0]["reason"] and no_verdict[0]["judge_reply"] == "The answer is fine, I think."
    assert _question(data, "en", "104")["answers"]["M1"][0]["grade"] == 7.0
    refused = _question(data, "es", "103")["answers"]["M0"][1]
    assert refused["status"] == "missing" and refused["reason"] == f"the judge server refused the request ({REFUSED})"
    assert refused["judge_reply"] is None  # nothing came back
    # what results.json says agrees with the grades shown (the same judgements)
    rows = json.loads((run / "results.json").read_text())
    es_m1 = next(r for r in rows if (r.get("kind"), r["model"], r["lang"], r["turn"], r["category"])
                 == ("mt_bench", "M1", "es", 1, "all"))
    shown = [q["answers"]["M1"][0]["grade"] for q in data["questions"] if q["lang"] == "es"]
    assert es_m1["missing"] == shown.count(None) == 1 and es_m1["mean"] == 7.0


def test_mt_bench_page_is_escaped_capped_and_deterministic(tmp_path):
    run = tmp_path / "mt"
    add_mt_bench(run, models=("sft", "M0", "M1"), langs=("en", "es", "de"))
    page = write_html_report(run, max_mt_bench_questions=2).read_text(encoding="utf-8")
    assert write_html_report(run, max_mt_bench_questions=2).read_text(encoding="utf-8") == page
    assert page.count("<script") == 2 and "window.__pwned" in page and "<script>window" not in page
    start = page.index('<script type="application/json" id="icr-data">')
    data = json.loads(page[page.index(">", start) + 1:page.index("</script>", start)])
    mt = data["mt_bench"]
    assert [c["shown"] for c in mt["counts"]] == [2, 2, 2] and [c["total"] for c in mt["counts"]] == [4, 4, 4]
    ids = {lang: [q["id"] for q in mt["questions"] if q["lang"] == lang] for lang in mt["langs"]}
    assert ids["en"] == ids["es"] == ids["de"] and len(ids["en"]) == 2  # the same questions in every language
    assert mt["models"] == ["sft", "M0", "M1"] and data["limits"]["max_mt_bench_questions"] == 2
    hostile = [t["text"] for q in mt["questions"] for a in q["answers"].values() for t in a
               if HOSTILE in (t["text"] or "")]
    assert all(t == f"M1 says {HOSTILE}" for t in hostile)
    assert len(page_data(run, max_mt_bench_questions=None)["mt_bench"]["questions"]) == 12


def test_a_run_without_mt_bench_or_without_its_question_file(tmp_path):
    run = tmp_path / "plain"
    run.mkdir()
    (run / "config.yaml").write_text("languages: [en]\n")
    data = page_data(run)
    assert data["mt_bench"] == {"models": [], "langs": [], "categories": [], "judges": [], "questions": [],
                                "counts": [], "notes": []}
    render_page(data)  # the page builds; its script says there is nothing (tests/test_report_html.py, in Chromium)
    # answers whose question file is gone: still shown (ids and categories from the answers), with a note
    run = tmp_path / "moved"
    add_mt_bench(run, models=("M1",), langs=("en",))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["evaluation"]["mt_bench"]["questions"] = str(tmp_path / "gone" / "q_{lang}.jsonl")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    mt = page_data(run)["mt_bench"]
    assert [q["id"] for q in mt["questions"]] == ["101", "102", "103", "104"]
    assert all(q["turns"] is None and q["reference"] is None for q in mt["questions"])
    assert mt["questions"][1]["category"] == "math" and mt["questions"][1]["answers"]["M1"][0]["grade"] == 7.0
    assert len(mt["notes"]) == 1 and mt["notes"][0].startswith("MT-Bench questions in en not shown: ")
