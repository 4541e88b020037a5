"""MT-Bench and the pairwise judge wired into a run, against the stand-in OpenAI-compatible server:
a tiny run produces MT-Bench rows and the Table-3 section; a server down at start is one line before
anything is sampled; alpaca_eval's annotator pointed at a base URL round-trips (logprobs parsed)."""

from __future__ import annotations

import json

import pytest

from icr.errors import IcrError

from .conftest import REPO
from .openai_standin import StandIn
from .test_loop import _one_line_error

TINY = REPO / "configs" / "tiny.yaml"
DATA = REPO / "tests" / "data" / "mt_bench"
KEY = "sk-icr-run-secret-9876543210"


def _mt_bench_args(base_url: str) -> list[str]:
    return ["--set", f"evaluation.mt_bench.questions={DATA}/question_{{lang}}.jsonl",
            "--set", f"evaluation.mt_bench.judge_prompts={DATA}/judge_prompts.jsonl",
            "--set", f"evaluation.mt_bench.judge.base_url={base_url}",
            "--set", "evaluation.mt_bench.judge.model=judge-model",
            "--set", "evaluation.mt_bench.judge.api_key_env=ICR_TEST_RUN_KEY",
            "--set", "evaluation.mt_bench.judge.backoff_s=0.01", "--set", "evaluation.mt_bench.judge.max_retries=1",
            "--set", "evaluation.mt_bench.max_new_tokens=8"]


def _eval_args(tmp_path) -> list[str]:
    return ["--set", f"run_root={tmp_path}", "--set", "iterations=1", "--set", "evaluation.enabled=true",
            "--set", "evaluation.judge=fake", "--set", "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl",
            "--set", "evaluation.max_new_tokens=8"]


@pytest.mark.slow
def test_tiny_run_writes_mt_bench_rows_and_table_3(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("ICR_TEST_RUN_KEY", KEY)
    server = StandIn()
    try:
        code, _, err = cli("run", TINY, *_eval_args(tmp_path), *_mt_bench_args(server.base_url))
        assert code == 0, err
        run = tmp_path / "tiny"
        rows = json.loads((run / "results.json").read_text())
        mt = [r for r in rows if r.get("kind") == "mt_bench"]
        alls = [r for r in mt if r["category"] == "all"]
        assert {(r["model"], r["lang"], r["turn"]) for r in alls} == {
            (m, lang, t) for m in ("sft", "M0", "M1") for lang in ("en", "es", "de") for t in (1, 2)}
        assert all(r["n"] + r["missing"] == 4 for r in alls)
        # each distinct judge prompt asked once (answers the same across models share a judgement)
        sent = [json.dumps(r["body"]["messages"]) for r in server.chats]
        assert len(set(sent)) == len(sent) and 3 * 4 * 2 <= len(sent) <= 3 * 3 * 4 * 2
        report = (run / "report.md").read_text()
        assert "Multilingual MT-Bench (the paper's Table 3)" in report and "| Model | en | es | de | Avg |" in report
        answers = json.loads((run / "eval/M1/mt_bench/de/answers.json").read_text())["answers"]
        assert len(answers) == 4 and all(len(a["turns"]) == 2 for a in answers)
        # A second run asks the judge nothing and samples nothing.
        before = len(server.requests)
        code, _, err = cli("run", TINY, *_eval_args(tmp_path), *_mt_bench_args(server.base_url))
        assert code == 0, err
        assert len([r for r in server.requests[before:] if r["body"] is not None]) == 0
    finally:
        server.stop()
    for path in (tmp_path / "tiny").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".yaml", ".log", ".txt"):
            assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path


def test_server_down_at_start_is_one_line_before_anything_is_sampled(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("ICR_TEST_RUN_KEY", KEY)
    dead = StandIn()
    url = dead.base_url
    dead.stop()
    line = _one_line_error(*cli("run", TINY, *_eval_args(tmp_path), *_mt_bench_args(url))[::2])
    assert f"no OpenAI-compatible server answers at {url}" in line and "evaluation.mt_bench.judge.base_url" in line
    assert not (tmp_path / "tiny").exists()
    line = _one_line_error(*cli("validate", TINY, *_eval_args(tmp_path), *_mt_bench_args(url))[::2])
    assert "no OpenAI-compatible server answers" in line


def test_alpaca_eval_judge_through_a_base_url(monkeypatch):
    pytest.importorskip("alpaca_eval")
    from icr.evaluation.judges import JudgeItem, get_judge

    monkeypatch.setenv("ICR_TEST_RUN_KEY", KEY)
    server = StandIn()
    try:
        judge = get_judge("alpaca_eval", base_url=server.base_url, model="judge-model", api_key_env="ICR_TEST_RUN_KEY",
                          max_concurrency=1)
        items = [JudgeItem(id=str(i), lang="es", instruction=f"Pregunta {i}", output=f"Respuesta {i}" * (i + 1),
                           reference="Referencia") for i in range(4)]
        prefs = judge.compare(items)
        assert len(prefs) == 4 and all(0 < p < 1 for p in prefs)  # weighted: fractions from the logprobs
        chats = [r for r in server.chats if "Pregunta" in json.dumps(r["body"], ensure_ascii=False)]
        assert len(chats) == 4
        assert all(r["body"]["model"] == "judge-model" and r["body"]["logprobs"] is True
                   and r["body"]["top_logprobs"] == 5 and r["body"]["max_tokens"] == 1 for r in chats)
        assert {r["headers"]["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
        assert judge.cache_id.endswith("@judge-model")
        server.logprobs = False
        with pytest.raises(IcrError, match=r"returns no logprobs .*top_logprobs: 5.*evaluation.judge_args.annotators_config"):
            get_judge("alpaca_eval", base_url=server.base_url, model="judge-model", api_key_env="ICR_TEST_RUN_KEY")
    finally:
        server.stop()
    with pytest.raises(IcrError, match="no OpenAI-compatible server answers"):
        get_judge("alpaca_eval", base_url=server.base_url, model="judge-model", api_key_env="ICR_TEST_RUN_KEY")
