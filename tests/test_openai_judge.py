"""The judge client over an OpenAI-compatible server and MT-Bench grading, against a stand-in server
(tests/openai_standin.py: http.server on 127.0.0.1, port 0, stopped by each test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icr.errors import IcrError

from .conftest import REPO
from .openai_standin import StandIn

DATA = REPO / "tests" / "data" / "mt_bench"
KEY = "sk-icr-test-secret-0123456789"


@pytest.fixture()
def server():
    s = StandIn()
    yield s
    s.stop()


@pytest.fixture()
def api_key(monkeypatch):
    monkeypatch.setenv("ICR_TEST_JUDGE_KEY", KEY)
    return "ICR_TEST_JUDGE_KEY"


def endpoint(base_url: str, api_key_env: str = "", **kw):
    from icr.config import JudgeEndpointConfig

    return JudgeEndpointConfig(**{"base_url": base_url, "model": "judge-model", "api_key_env": api_key_env,
                                  "timeout_s": 5.0, "backoff_s": 0.01, **kw})


def client(base_url, api_key_env="", sleeps=None, **kw):
    from icr.evaluation.openai_judge import OpenAIJudgeClient

    return OpenAIJudgeClient(endpoint(base_url, api_key_env, **kw),
                             sleep=(sleeps.append if sleeps is not None else (lambda s: None)))


def make_cfg(tmp_path: Path, base_url: str, api_key_env: str = "", **judge):
    from icr.config import config_from_dict

    return config_from_dict({
        "name": "t", "run_root": str(tmp_path), "languages": ["en", "es", "de"],
        "models": {"dpo": "x", "sft": "y"}, "prompts": {"path": "p/{lang}"},
        "evaluation": {"mt_bench": {
            "questions": str(DATA / "question_{lang}.jsonl"), "judge_prompts": str(DATA / "judge_prompts.jsonl"),
            "judge": {"base_url": base_url, "model": "judge-model", "api_key_env": api_key_env, "timeout_s": 5.0,
                      "backoff_s": 0.01, "max_retries": 2, **judge}}}})


class EchoBackend:
    """A sampling backend without a model: answers name the last user turn; records what it was asked."""

    def __init__(self):
        self.calls = []

    def generate(self, conversations, params, desc=None):
        from icr.generation import Sample

        self.calls.append((conversations, params))
        return [[Sample(text=f" answer to: {c[-1]['content'][:30]} ", finished=True, n_tokens=5)]
                for c in conversations]

    def close(self):
        pass


def answered(tmp_path, base_url, label="M1", api_key_env="", **judge):
    from icr.evaluation.mt_bench import generate_answers

    cfg = make_cfg(tmp_path, base_url, api_key_env, **judge)
    backend = EchoBackend()
    generate_answers(cfg, "model/path", label, tmp_path / "eval", backend)
    return cfg, backend


# -- the client ------------------------------------------------------------------------------

def test_requests_carry_model_messages_decoding_and_the_key(server, api_key):
    from icr.evaluation.mt_bench import parse_verdict

    c = client(server.base_url, api_key, max_tokens=64)
    c.check_server()
    replies = c.judge_many([[{"role": "user", "content": f"q{i}"}] for i in range(5)], parse_verdict)
    assert all(r.verdict is not None and 1 <= r.verdict <= 10 and r.requests == 1 for r in replies)
    chats = server.chats
    assert len(chats) == 5 and {r["path"] for r in chats} == {"/v1/chat/completions"}
    assert {r["body"]["model"] for r in chats} == {"judge-model"}
    assert {r["body"]["temperature"] for r in chats} == {0.0} and {r["body"]["max_tokens"] for r in chats} == {64}
    assert sorted(r["body"]["messages"][0]["content"] for r in chats) == [f"q{i}" for i in range(5)]
    assert {r["headers"]["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    assert c.usage.requests == 5 and c.usage.completion_tokens == 35 and c.usage.prompt_tokens > 0
    assert KEY not in repr(c)


def test_verdict_parsing():
    from icr.evaluation.mt_bench import parse_verdict

    assert parse_verdict("fine. Rating: [[7]]") == 7.0
    assert parse_verdict("Rating: [[8.5]] then [[2]]") == 8.5
    assert parse_verdict("backup form [6]") == 6.0  # FastChat's backup pattern
    assert parse_verdict("no grade") is None
    assert parse_verdict("[[0]]") is None and parse_verdict("[[11]]") is None  # outside 1..10


def test_reply_without_verdict_is_retried_then_missing(server):
    from icr.evaluation.mt_bench import parse_verdict

    server.script = ["noverdict", "noverdict"]
    r = client(server.base_url, verdict_retries=2).judge([{"role": "user", "content": "a"}], parse_verdict)
    assert r.verdict is not None and r.requests == 3 and len(server.chats) == 3
    server.script = ["noverdict"] * 3
    r = client(server.base_url, verdict_retries=2).judge([{"role": "user", "content": "b"}], parse_verdict)
    assert r.verdict is None and r.requests == 3 and "no grade" in r.text
    assert r.completion_tokens == 21  # every try's tokens counted


def test_a_refused_request_is_recorded_missing_not_fatal(server):
    from icr.evaluation.mt_bench import parse_verdict

    server.script = ["400"]
    r = client(server.base_url).judge([{"role": "user", "content": "too long"}], parse_verdict)
    assert r.verdict is None and r.error.startswith("400: ") and len(server.chats) == 1


def test_429_and_5xx_are_retried_with_backoff(server):
    from icr.evaluation.mt_bench import parse_verdict

    sleeps = []
    server.script = ["429", "500", "drop"]
    c = client(server.base_url, sleeps=sleeps, max_retries=3, backoff_s=0.5)
    r = c.judge([{"role": "user", "content": "a"}], parse_verdict)
    assert r.verdict is not None and c.usage.retries == 3 and len(server.chats) == 4
    assert len(sleeps) == 3 and 0.5 <= sleeps[0] <= 0.625 and 1.0 <= sleeps[1] <= 1.25 and 2.0 <= sleeps[2] <= 2.5
    server.script = ["429"] * 5
    with pytest.raises(IcrError, match=r"failed 3 times \(RateLimitError") as e:
        client(server.base_url, max_retries=2).judge([{"role": "user", "content": "b"}], parse_verdict)
    assert "\n" not in str(e.value)


def test_server_down_or_wrong_model_or_no_logprobs_is_one_line(server):
    dead = StandIn()
    url = dead.base_url
    dead.stop()
    with pytest.raises(IcrError, match=r"evaluation.mt_bench.judge.base_url: no OpenAI-compatible server answers at "
                                       + url.replace(".", r"\.")) as e:
        client(url).check_server()
    assert "\n" not in str(e.value)
    from icr.evaluation.openai_judge import OpenAIJudgeClient

    with pytest.raises(IcrError, match="serves judge-model, not 'other'"):
        OpenAIJudgeClient(endpoint(server.base_url, model="other")).check_server()
    client(server.base_url).check_logprobs()  # the stand-in gives them
    server.logprobs = False
    with pytest.raises(IcrError, match=r"returns no logprobs .*top_logprobs: 5.*annotators_config"):
        client(server.base_url).check_logprobs()


def test_key_variable_unset_names_the_variable(monkeypatch):
    monkeypatch.delenv("ICR_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(IcrError, match=r"api_key_env: the environment variable ICR_TEST_NO_SUCH_KEY is not set"):
        client("http://127.0.0.1:9/v1", "ICR_TEST_NO_SUCH_KEY")


# -- MT-Bench ----------------------------------------------------------------------------------

def test_two_turn_answers_use_own_first_answer_and_category_temperatures(tmp_path, server):
    cfg, backend = answered(tmp_path, server.base_url)
    temps = sorted({p.temperature for _, p in backend.calls})
    assert temps == [0.0, 0.1, 0.7]  # math/reasoning 0, humanities 0.1, writing 0.7 (MT-Bench's table)
    second = [c for convs, _ in backend.calls for c in convs if len(c) == 3]
    assert len(second) == 12 and all(c[1]["role"] == "assistant" and c[1]["content"].startswith("answer to:")
                                     for c in second)
    saved = json.loads((tmp_path / "eval/M1/mt_bench/es/answers.json").read_text())["answers"]
    assert len(saved) == 4 and all(len(a["turns"]) == 2 and a["turns"][0] == a["turns"][0].strip() for a in saved)
    from icr.evaluation.mt_bench import generate_answers, missing_answers

    assert missing_answers(cfg, "model/path", "M1", tmp_path / "eval") == []
    assert missing_answers(cfg, "other/path", "M1", tmp_path / "eval") == ["en", "es", "de"]
    again = EchoBackend()
    generate_answers(cfg, "model/path", "M1", tmp_path / "eval", again)
    assert again.calls == []  # saved answers reused


def test_grading_rows_references_cache_and_rerun_sends_nothing(tmp_path, server, api_key):
    from icr.evaluation.mt_bench import evaluate_mt_bench
    from icr.evaluation.results import validate_results

    cfg, _ = answered(tmp_path, server.base_url, api_key_env=api_key, price_per_input_token=1e-6, max_concurrency=1)
    server.script = ["noverdict"] * 3  # the first judgement never gets a verdict (1 + verdict_retries tries)
    rows = evaluate_mt_bench(cfg, "M1", 1, tmp_path / "eval")
    validate_results(rows)
    assert len(server.chats) == 3 * 4 * 2 + 2
    ref_prompts = [r for r in server.chats if "<reference>" in r["body"]["messages"][-1]["content"]]
    assert len(ref_prompts) == 3 * 2 * 2  # math and reasoning, both turns, every language
    assert all("Grade only the second answer" in r["body"]["messages"][0]["content"] for r in server.chats
               if "<user>" in r["body"]["messages"][-1]["content"])
    alls = [r for r in rows if r["category"] == "all"]
    assert {(r["lang"], r["turn"]) for r in alls} == {(lang, t) for lang in ("en", "es", "de") for t in (1, 2)}
    assert sum(r["missing"] for r in alls) == 1 and sum(r["n"] for r in alls) == 23
    assert all(r["judge"] == "openai:judge-model" and r["cost"] > 0 and r["prompt_tokens"] > 0 for r in rows)
    assert {r["category"] for r in rows} == {"all", "writing", "math", "reasoning", "humanities"}
    before = len(server.requests)
    assert evaluate_mt_bench(cfg, "M1", 1, tmp_path / "eval") == rows  # from the cache: same rows
    assert len(server.requests) == before
    judgements = json.loads((tmp_path / "eval/M1/mt_bench/en/judgements.json").read_text())
    assert len(judgements) == 8 and all("reply" in j and "verdict" in j for j in judgements)


def test_server_killed_mid_evaluation_resumes_from_the_cache(tmp_path, api_key):
    from icr.evaluation.mt_bench import evaluate_mt_bench

    first = StandIn(stop_after=9)
    try:
        cfg, _ = answered(tmp_path, first.base_url, api_key_env=api_key, max_concurrency=1)
        with pytest.raises(IcrError, match="failed 3 times") as e:
            evaluate_mt_bench(cfg, "M1", 1, tmp_path / "eval")
        assert "\n" not in str(e.value)
    finally:
        first.stop()
    cached = (tmp_path / "eval/mt_bench_cache.jsonl").read_text().splitlines()
    assert len(cached) == 9
    second = StandIn()
    try:
        cfg2 = make_cfg(tmp_path, second.base_url, api_key, max_concurrency=1)
        rows = evaluate_mt_bench(cfg2, "M1", 1, tmp_path / "eval")
        assert len(second.chats) == 24 - 9
        assert sum(r["n"] + r["missing"] for r in rows if r["category"] == "all") == 24
    finally:
        second.stop()
    # The key never reaches a file.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path


def test_bad_question_and_prompt_files_name_file_and_line(tmp_path):
    from icr.evaluation.mt_bench import load_judge_prompts, load_questions

    bad = tmp_path / "q_en.jsonl"
    good = (DATA / "question_en.jsonl").read_text().splitlines()
    bad.write_text(good[0] + "\n" + json.dumps({"question_id": 9, "category": "writing", "turns": ["only one"]}) + "\n")
    with pytest.raises(IcrError, match=r"q_en.jsonl:2: turns must be a list of 2"):
        load_questions(str(tmp_path / "q_{lang}.jsonl"), "en")
    bad.write_text(json.dumps({"question_id": 9, "category": "math", "turns": ["a", "b"]}) + "\n")
    with pytest.raises(IcrError, match=r"q_en.jsonl:1: category 'math' is graded against a reference"):
        load_questions(str(tmp_path / "q_{lang}.jsonl"), "en")
    with pytest.raises(IcrError, match=r"no file .*q_fr.jsonl for language fr"):
        load_questions(str(tmp_path / "q_{lang}.jsonl"), "fr")
    bad.write_bytes(good[0].encode() + b"\n{\"question_id\": \"\xff\"}\n")  # read as data.py reads prompts
    with pytest.raises(IcrError, match=r"q_en.jsonl:2: not valid UTF-8"):
        load_questions(str(tmp_path / "q_{lang}.jsonl"), "en")
    lines = (DATA / "judge_prompts.jsonl").read_text().splitlines()
    p = tmp_path / "jp.jsonl"
    p.write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(IcrError, match="has no single-v1-multi-turn, single-math-v1-multi-turn prompt"):
        load_judge_prompts(str(p))
    row = json.loads(lines[1])
    row["prompt_template"] = "{question} {answer} {oops}"
    p.write_text("\n".join([lines[0], json.dumps(row)] + lines[2:]) + "\n")
    with pytest.raises(IcrError, match=r"jp.jsonl:2: single-v1: prompt_template uses \{answer, oops, question\}"):
        load_judge_prompts(str(p))


def test_mt_bench_rows_validated_and_reported():
    from icr.evaluation.mt_bench import mt_bench_section
    from icr.evaluation.results import validate_results

    def row(model, it, lang, turn, mean, n, cat="all"):
        return {"kind": "mt_bench", "model": model, "iteration": it, "lang": lang, "judge": "openai:j", "turn": turn,
                "category": cat, "mean": mean, "se": 0.1, "n": n, "missing": 0, "prompt_tokens": 1,
                "completion_tokens": 1, "cost": None}

    rows = [row("sft", -1, "en", 1, 6.0, 2), row("sft", -1, "en", 2, 4.0, 2), row("sft", -1, "es", 1, 5.0, 2),
            row("sft", -1, "es", 2, 5.0, 2), row("M1", 1, "en", 1, 8.0, 2), row("M1", 1, "en", 2, 7.0, 2),
            row("M1", 1, "es", 1, 6.0, 2), row("M1", 1, "es", 2, None, 0)]
    validate_results(rows)
    with pytest.raises(IcrError, match=r"field 'mean' is 11.0; expected number in \[1, 10\]"):
        validate_results([row("M1", 1, "en", 1, 11.0, 2)])
    with pytest.raises(IcrError, match="same"):
        validate_results([row("M1", 1, "en", 1, 5.0, 2)] * 2)
    blocks = mt_bench_section(rows)
    assert blocks[0]["text"] == "Multilingual MT-Bench (the paper's Table 3)"
    main = blocks[2]
    assert main["header"] == ["Model", "en", "es", "Avg"]
    assert main["rows"] == [["sft", "5.00", "5.00", "5.00"], ["M1", "7.50", "6.00", "6.75"]]
    assert ["M1", "es", "6.00", "–", "6.00", "2", "0"] in blocks[3]["rows"]
