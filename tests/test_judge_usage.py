"""The pairwise judge's tokens and cost in results.json (issue 20, item 2), against the stand-in
OpenAI-compatible server: alpaca_eval's annotator pointed at it, its requests counted at the HTTP
client (judges._UsageMeter), per (model, language, judge) row; a rerun answered from the cache sends
and counts nothing; judges without such a notion have nulls; the API key is written nowhere."""

from __future__ import annotations

import json

import pytest

from icr.config import EvaluationConfig
from icr.evaluation.evaluate import evaluate_model
from icr.evaluation.judges import AlpacaEvalJudge, FakeJudge, JudgeItem, get_judge
from icr.evaluation.results import FIELDS, append_results, clean_row, read_results, validate_results

from .openai_standin import StandIn
from .test_report import EchoBackend, Ident

KEY = "sk-icr-usage-secret-1357924680"
# instructions carrying a marker per language, so each request can be told apart by its language
PROMPTS = {"es": [{"id": "1", "instruction": "QQES hola uno"}, {"id": "2", "instruction": "QQES dos"}],
           "en": [{"id": "1", "instruction": "QQEN one"}, {"id": "2", "instruction": "QQEN two two two"},
                  {"id": "3", "instruction": "QQEN three"}]}
REFS = {"es": {"1": "x" * 12, "2": "x" * 3}, "en": {"1": "x" * 50, "2": "x" * 3, "3": "y"}}
PRICE_IN, PRICE_OUT = 2e-6, 8e-6


def _judge(server, **kw):
    pytest.importorskip("alpaca_eval")
    return get_judge("alpaca_eval", base_url=server.base_url, model="judge-model", api_key_env="ICR_TEST_USAGE_KEY",
                     **kw)


def _sent(server, marker: str, since: int = 0) -> tuple[int, int, int]:
    """(requests, prompt tokens, completion tokens) the stand-in answered for one language's prompts."""
    chats = [r for r in server.chats[since:] if marker in json.dumps(r["body"], ensure_ascii=False)]
    usage = [server.completion(r["body"], "ok")["usage"] for r in chats]  # what its replies carried
    return len(chats), sum(u["prompt_tokens"] for u in usage), sum(u["completion_tokens"] for u in usage)


def _usage(row) -> tuple:
    return row["requests"], row["prompt_tokens"], row["completion_tokens"]


def test_alpaca_eval_rows_count_tokens_sent_and_nothing_on_the_rerun(tmp_path, monkeypatch):
    monkeypatch.setenv("ICR_TEST_USAGE_KEY", KEY)
    server = StandIn()
    try:
        judge = _judge(server, max_concurrency=2, price_per_input_token=PRICE_IN, price_per_output_token=PRICE_OUT)
        start = len(server.chats)  # the logprobs check at build time: not a judgement, not counted
        out = tmp_path / "eval"
        rows = evaluate_model("m", "M1", 1, PROMPTS, REFS, judge, EvaluationConfig(), out, backend=EchoBackend(),
                              identifier=Ident())
        by_lang = {r["lang"]: r for r in rows}
        for lang, marker in (("es", "QQES"), ("en", "QQEN")):
            row, (requests, pt, ct) = by_lang[lang], _sent(server, marker, start)
            assert requests == len(PROMPTS[lang]) and pt > 0 and ct > 0
            assert _usage(row) == (requests, pt, ct) and row["cached"] == 0
            assert row["cost"] == pytest.approx(pt * PRICE_IN + ct * PRICE_OUT)
        assert len(server.chats) - start == 5
        append_results(tmp_path / "results.json", rows)

        # The rerun (a fresh cache object on the same file): every judgement from the cache, nothing sent.
        before = len(server.requests)
        again = evaluate_model("m", "M1", 1, PROMPTS, REFS, judge, EvaluationConfig(), out, backend=EchoBackend(),
                               identifier=Ident())
        assert len(server.requests) == before
        assert [(r["cached"], *_usage(r), r["cost"]) for r in again] == [(2, 0, 0, 0, 0.0), (3, 0, 0, 0, 0.0)]
        saved = append_results(tmp_path / "results.json", again)  # the row describes the evaluation that wrote it
        assert [r["cached"] for r in saved] == [2, 3] and list(saved[0]) == list(FIELDS)
    finally:
        server.stop()
    assert read_results(tmp_path / "results.json") == saved
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8", errors="replace"), path


def test_counts_match_alpaca_evals_total_and_include_retries_and_no_price_no_cost(monkeypatch):
    """What alpaca_eval itself keeps: the weighted judge's raw completion has `total_tokens` (the sum
    of what icr counts), no prompt / completion split, and `price_per_example` NaN for a model it has
    no price for. A 500 answered by the openai client's own retry is one more request, no tokens."""
    monkeypatch.setenv("ICR_TEST_USAGE_KEY", KEY)
    server = StandIn()
    try:
        judge = _judge(server, max_concurrency=1)
        items = [JudgeItem(id=str(i), lang="de", instruction=f"QQDE Frage {i}", output="Antwort " * (i + 1),
                           reference="Referenz") for i in range(3)]
        baseline, model = AlpacaEvalJudge.head2head_inputs(items)
        start = len(server.chats)
        server.script = ["500"]
        annotated = judge.annotator.annotate_head2head(outputs_1=baseline, outputs_2=model, is_ordered=True,
                                                       **judge._decoding_kwargs, **judge._metering_kwargs)
        usage = judge.usage
        assert (usage.requests, usage.unmetered) == (4, 0)  # 3 judgements, one of them sent twice
        _, pt, ct = _sent(server, "QQDE", start + 1)
        assert (usage.prompt_tokens, usage.completion_tokens) == (pt, ct)
        assert sum(a["preference_raw_completion"]["total_tokens"] for a in annotated) == pt + ct
        assert not any("prompt_tokens" in json.dumps(a, default=str) for a in annotated)
        assert all(a["preference_price_per_example"] != a["preference_price_per_example"] for a in annotated)  # NaN
        assert judge.cost(pt, ct) is None
    finally:
        server.stop()


class _TotalOnly(StandIn):
    """A server whose `usage` has only `total_tokens`: all alpaca_eval 0.6.6 needs (a reply with no `usage`
    at all makes its openai decoder fail: `completion_batch.usage.total_tokens` on None)."""

    def completion(self, body, action):
        reply = super().completion(body, action)
        reply["usage"] = {"total_tokens": reply["usage"]["total_tokens"]}
        return reply


def test_replies_without_the_split_leave_tokens_null_not_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("ICR_TEST_USAGE_KEY", KEY)
    server = _TotalOnly()
    try:
        judge = _judge(server, price_per_input_token=PRICE_IN)
        rows = evaluate_model("m", "M1", 1, {"es": PROMPTS["es"]}, {"es": REFS["es"]}, judge, EvaluationConfig(),
                              tmp_path, backend=EchoBackend(), identifier=Ident())
    finally:
        server.stop()
    assert [(r["cached"], *_usage(r), r["cost"]) for r in rows] == [(0, 2, None, None, None)]
    assert judge.usage.unmetered == 2


def test_judges_without_usage_have_nulls_and_old_rows_stay_valid(tmp_path):
    judge = FakeJudge("hash")
    rows = evaluate_model("m", "M0", 0, PROMPTS, REFS, judge, EvaluationConfig(), tmp_path, backend=EchoBackend(),
                          identifier=Ident())
    assert [(r["cached"], *_usage(r), r["cost"]) for r in rows] == [(None, None, None, None, None)] * 2
    again = evaluate_model("m", "M0", 0, PROMPTS, REFS, judge, EvaluationConfig(), tmp_path, backend=EchoBackend(),
                           identifier=Ident())
    assert again == rows and judge.calls == 5  # from the cache, and the rows the same
    new = ("cached", "requests", "prompt_tokens", "completion_tokens", "cost")
    old = [{k: v for k, v in r.items() if k not in new + ("lc_method",)} for r in rows]  # a file from before
    validate_results(old)
    assert all(clean_row(r)[k] is None for r in old for k in new)
    bad = {**rows[0], "prompt_tokens": -1}
    with pytest.raises(Exception, match="'prompt_tokens' is -1"):
        validate_results([bad])
