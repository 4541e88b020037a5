"""A judge client for any OpenAI-compatible server (OpenAI, vLLM's or SGLang's server, llama.cpp's).

Why icr has its own client loop instead of alpaca_eval's or FastChat's: FastChat's judge code is written
for the pre-1.0 `openai` API, and alpaca_eval's completion helper retries only on errors whose text
says "rate", gives up with an empty completion, and has no notion of a verdict. MT-Bench grading needs
what neither gives: a reply without a parsable verdict asked again and then *recorded as missing and
counted*, token counts and cost per judgement, and a server that is down found before anything is
sampled. The HTTP itself is the `openai` package's client (a dependency of alpaca_eval), with its own
retries switched off so that the retries here are the only ones and are counted.

The API key is read from the environment variable the config names, handed to the client and never
stored on this object's public fields, logged or written anywhere (`OpenAIJudgeClient.__repr__`
leaves it out; errors name the variable, not the value).

The pairwise judge (`judges.AlpacaEvalJudge`) keeps alpaca_eval's annotator; it uses this module only
to check the server at start (`check_server`) and, for the weighted judges, that it returns logprobs
(`check_logprobs`).
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

from ..errors import IcrError


# statuses that refuse one request (too long, malformed for this model), not the whole evaluation:
# that judgement is recorded as missing; 401/403/404 and others stop the run with one line
REFUSED = (400, 413, 422)


class Refused(Exception):
    """The server refused this request (REFUSED)."""


@dataclass
class Reply:
    """One judgement request's outcome: the last reply's text, its verdict (None = no parsable verdict
    after every try), the tokens all tries used, and how many requests were sent."""

    text: str = ""
    verdict: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    error: str = ""


@dataclass
class Usage:
    """What the client has sent so far (thread-safe counters)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


def resolve_api_key(api_key_env: str, where: str) -> str:
    """The key from the environment variable `api_key_env` names; "" (no variable named) means a
    server that needs none ("EMPTY" is sent, as vLLM's docs do)."""
    if not api_key_env:
        return "EMPTY"
    value = os.environ.get(api_key_env)
    if not value:
        raise IcrError(f"{where}.api_key_env: the environment variable {api_key_env} is not set (set it to the "
                       "server's API key, or api_key_env: '' for a server without one)")
    return value


def cost_of(prompt_tokens: int, completion_tokens: int, endpoint) -> float | None:
    """The price of those tokens at the endpoint's prices per token (None when no price is given)."""
    pin, pout = endpoint.price_per_input_token, endpoint.price_per_output_token
    if pin is None and pout is None:
        return None
    return prompt_tokens * (pin or 0.0) + completion_tokens * (pout if pout is not None else (pin or 0.0))


class OpenAIJudgeClient:
    """Chat completions against `endpoint` (a `config.JudgeEndpointConfig`): bounded concurrency,
    a timeout per request, retries with exponential backoff (and jitter) on 429, 5xx, timeouts and
    connection errors, verdict retries. `where` names the config block in error messages."""

    def __init__(self, endpoint, where: str = "evaluation.mt_bench.judge", *, sleep: Callable = time.sleep):
        if not endpoint.base_url or not endpoint.model:
            raise IcrError(f"{where}: base_url and model are required (e.g. base_url: http://127.0.0.1:8000/v1)")
        try:
            import openai
        except ImportError:
            raise IcrError(f"{where}: the openai package is not installed (pip install openai)") from None
        self.endpoint, self.where, self._sleep = endpoint, where, sleep
        self._openai = openai
        self._client = openai.OpenAI(base_url=endpoint.base_url, api_key=resolve_api_key(endpoint.api_key_env, where),
                                     timeout=endpoint.timeout_s, max_retries=0)
        self.usage = Usage()

    def __repr__(self) -> str:  # never the key
        return f"OpenAIJudgeClient({self.endpoint.base_url!r}, model={self.endpoint.model!r})"

    # -- the server ----------------------------------------------------------------------------
    def check_server(self) -> None:
        """One line if no OpenAI-compatible server answers at base_url (GET /models)."""
        try:
            models = [m.id for m in self._client.models.list(timeout=min(self.endpoint.timeout_s, 30.0))]
        except self._openai.AuthenticationError:
            raise IcrError(f"{self.where}: the server at {self.endpoint.base_url} refused the API key "
                           f"(from ${self.endpoint.api_key_env or '<none>'})") from None
        except self._openai.NotFoundError:
            return  # a server without /models (some proxies): the first request will tell
        except self._openai.OpenAIError as e:
            raise IcrError(f"{self.where}.base_url: no OpenAI-compatible server answers at {self.endpoint.base_url} "
                           f"({type(e).__name__}); start it, or fix the address") from None
        if models and self.endpoint.model not in models:
            raise IcrError(f"{self.where}.model: the server at {self.endpoint.base_url} serves "
                           f"{', '.join(models[:5])}, not {self.endpoint.model!r}")

    def check_logprobs(self, top_logprobs: int = 5, setting: str = "evaluation.judge_args.annotators_config") -> None:
        """One line if the server does not return `top_logprobs` alternatives (weighted judges need them)."""
        resp = self._create([{"role": "user", "content": "Answer with one letter: m or M?"}],
                            max_tokens=1, temperature=1.0, logprobs=True, top_logprobs=top_logprobs)
        content = getattr(getattr(resp.choices[0], "logprobs", None), "content", None) if resp.choices else None
        tops = getattr(content[0], "top_logprobs", None) if content else None
        if not tops:
            raise IcrError(f"{self.where}: the server at {self.endpoint.base_url} returns no logprobs (the weighted "
                           f"judge asks for logprobs with top_logprobs: {top_logprobs}); serve the judge with a server "
                           f"that gives them (vLLM's does) or change {setting} to a judge without logprobs")

    # -- requests ------------------------------------------------------------------------------
    def _create(self, messages: list[dict], **kwargs):
        """One completion, retried with backoff on 429 / 5xx / timeouts / connection errors."""
        ep, openai = self.endpoint, self._openai
        for attempt in range(ep.max_retries + 1):
            try:
                self.usage.add(requests=1)
                return self._client.chat.completions.create(model=ep.model, messages=messages, **kwargs)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
                last = e
            except openai.APIStatusError as e:
                if e.status_code in REFUSED:
                    raise Refused(f"{e.status_code}: {_first_line(e)}") from None
                if e.status_code < 500:
                    raise IcrError(f"{self.where}: the server at {ep.base_url} answered {e.status_code} "
                                   f"({_first_line(e)})") from None
                last = e
            if attempt < ep.max_retries:
                self.usage.add(retries=1)
                self._sleep(min(ep.backoff_s * 2 ** attempt, 60.0) * (1 + 0.25 * random.random()))
        raise IcrError(f"{self.where}: the server at {ep.base_url} failed {ep.max_retries + 1} times "
                       f"({type(last).__name__}: {_first_line(last)}); rerun to resume (judgements so far are cached)")

    def judge(self, messages: list[dict], parse: Callable[[str], float | None]) -> Reply:
        """Ask until `parse` finds a verdict, at most 1 + verdict_retries times; the reply's verdict
        is None when none of them had one."""
        reply = Reply()
        ep = self.endpoint
        for _ in range(ep.verdict_retries + 1):
            try:
                resp = self._create(messages, temperature=ep.temperature, max_tokens=ep.max_tokens)
            except Refused as e:  # this request cannot be judged (too long for the judge): missing, counted
                reply.requests += 1
                reply.error = str(e)
                return reply
            usage = getattr(resp, "usage", None)
            pt, ct = (getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)
            self.usage.add(prompt_tokens=pt, completion_tokens=ct)
            reply.prompt_tokens += pt
            reply.completion_tokens += ct
            reply.requests += 1
            reply.text = (resp.choices[0].message.content or "") if resp.choices else ""
            verdict = parse(reply.text)
            if verdict is not None and math.isfinite(verdict):
                reply.verdict = float(verdict)
                return reply
        return reply

    def judge_many(self, requests: list[list[dict]], parse: Callable[[str], float | None],
                   on_reply: Callable[[int, Reply], None] | None = None) -> list[Reply]:
        """`judge` for each message list, at most `max_concurrency` at once; `on_reply(i, reply)` is
        called (from this thread, in completion order) as each one finishes, so a caller can cache it."""
        out: list[Reply | None] = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=max(1, self.endpoint.max_concurrency)) as pool:
            futures = {pool.submit(self.judge, m, parse): i for i, m in enumerate(requests)}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    out[i] = fut.result()
                    if on_reply is not None:
                        on_reply(i, out[i])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out  # type: ignore[return-value]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
