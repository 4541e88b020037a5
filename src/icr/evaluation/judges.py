"""Judges: who decides whether a model's answer beats the reference answer.

One interface for all of them: `compare(items)` returns, per item, the preference for
`item.output` over `item.reference` (1 = output wins, 0 = it loses, 0.5 = tie; weighted judges give
fractions; NaN = the judge failed on that item and it should be retried). Judges that can score a
single answer (the sandbox oracle, a reward model) also have `score(items)` (higher is better).

`get_judge(name, **kwargs)` builds one by name; heavy imports happen only for the judge chosen.
`CachedJudge` wraps any judge so that rerunning an evaluation never asks the judge twice.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..errors import IcrError
from ..runs import text_hash
from .openai_judge import Usage, cost_of

# alpaca_eval annotator configs shipped with icr (package data), usable by name as `annotators_config`.
# weighted_alpaca_eval_gpt4_turbo_multilingual: the authors' X-AlpacaEval judge, copied unchanged from
# their vendored alpaca_eval (github ZNLP/Implicit-Cross-Lingual-Rewarding, alpaca_eval/src/alpaca_eval/
# evaluators_configs/weighted_alpaca_eval_gpt4_turbo_multilingual/): alpaca_eval's weighted GPT-4-turbo
# judge with one sentence added to the template's task description, for every language.
SHIPPED_JUDGE_CONFIGS = Path(__file__).resolve().parent / "judge_configs"


@dataclass(frozen=True)
class JudgeItem:
    id: str
    lang: str
    instruction: str
    output: str
    reference: str = ""


class Judge(Protocol):
    """A judge compares an answer with the reference (`compare`: P(output preferred), NaN if it
    failed). One that also grades single answers (`score`: higher is better) says so with
    `scores_single_answers = True`; reward agreement, `pairs.selection: judge` and references
    without answers need that (`can_score`). A judge that can name the quality two answers differ
    in has `pair_kind(a, b, id)` (diagnostics split the reward's agreement by it). One that sends
    requests somewhere can count them: `usage` (cumulative `requests`, `prompt_tokens`,
    `completion_tokens`, optionally `unmetered`) and `cost(prompt_tokens, completion_tokens)`; the
    results rows then carry them (`CachedJudge.spent`)."""

    name: str

    def compare(self, items: list[JudgeItem]) -> list[float]: ...


def can_score(judge) -> bool:
    """Whether `judge` grades single answers: its `scores_single_answers` declaration, or, for a
    judge of your own that declares nothing, whether it has a `score` method."""
    if judge is None:
        return False
    declared = getattr(judge, "scores_single_answers", None)
    return callable(getattr(judge, "score", None)) if declared is None else bool(declared)


def loads_model(judge) -> bool:
    """Whether `judge` puts a model in the memory of the process that judges with it (its
    `loads_model` declaration: the reward-model judge), so that with stages isolated the evaluation
    judges in a child process (icr.evaluation.evaluate.Evaluator)."""
    return bool(getattr(judge, "loads_model", False)) if judge is not None else False


# ---------------------------------------------------------------------------------------------
# Fake judge (tests, smoke runs)
# ---------------------------------------------------------------------------------------------

class FakeJudge:
    """Deterministic judge without a model. `mode="longer"`: the longer answer wins (a judge with
    pure length bias, handy for testing length control); `mode="hash"`: a fixed pseudo-random
    preference per (output, reference). `calls` counts judged items (to test caching)."""

    scores_single_answers = True

    def __init__(self, mode: str = "longer"):
        if mode not in ("longer", "hash"):
            raise IcrError(f"fake judge: unknown mode {mode!r} (longer | hash)")
        self.mode = mode
        self.name = "fake" if mode == "longer" else f"fake-{mode}"
        self.calls = 0

    def score(self, items: list[JudgeItem]) -> list[float]:
        self.calls += len(items)
        if self.mode == "longer":
            return [float(len(it.output)) for it in items]
        return [int(text_hash(it.instruction, it.output), 16) / 16**16 for it in items]

    def compare(self, items: list[JudgeItem]) -> list[float]:
        self.calls += len(items)
        if self.mode == "hash":
            return [int(text_hash(it.instruction, it.output, it.reference), 16) / 16**16 for it in items]
        return [0.5 if len(it.output) == len(it.reference) else float(len(it.output) > len(it.reference))
                for it in items]


# ---------------------------------------------------------------------------------------------
# Reward-model judge
# ---------------------------------------------------------------------------------------------

class RewardModelJudge:
    """A Hugging Face sequence-classification reward model (one logit per conversation).

    `score` = the logit of [user: instruction, assistant: output], rendered with the tokenizer's
    chat template (plain "instruction\\n\\noutput" if it has none). `compare` = sigmoid(score(output)
    - score(reference)): the Bradley-Terry probability that the output is preferred.

    Built without its weights: the tokenizer, the config (one label) and, for a local folder, the
    weight files (icr.models.check_model, headers only) are checked; the model loads on the first
    judgement (`model`) and goes with `close()`. So preflight builds it in the `icr run` process at
    no device cost, and with stages isolated the evaluation judges in a child process that loads it
    (`loads_model`: icr.evaluation.evaluate.Evaluator).
    """

    scores_single_answers = True
    loads_model = True  # a model on the device: judged with in a child process when stages are isolated

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 max_length: int = 4096):
        import torch
        from transformers import AutoConfig, AutoTokenizer

        from ..models import check_model

        looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1  # a hub id is name or org/name
        if looks_local and not Path(model).expanduser().exists():  # else transformers says "Repo id must use ..."
            raise IcrError(f"evaluation.judge_args.model: no reward model at {model} (a local folder, or a hub id "
                           "such as org/name)")
        if device == "auto":  # asks the driver, creates no CUDA context
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = getattr(torch, dtype) if dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
        check_model(model, "evaluation.judge_args.model")  # config and weight files, no tensor read
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            num_labels = AutoConfig.from_pretrained(model).num_labels
        except OSError as e:
            raise IcrError(f"reward_model judge: cannot load {model!r}: {e}") from None
        if num_labels != 1:
            raise IcrError(f"reward_model judge: {model!r} has {num_labels} labels; a reward model has exactly one")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name = f"reward_model:{Path(model.rstrip('/')).name}"
        self.cache_id = f"reward_model:{model}"
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self._path, self._dtype, self._model = model, torch_dtype, None

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory now."""
        return self._model is not None

    @property
    def model(self):
        """The reward model, loaded on first use."""
        if self._model is None:
            from transformers import AutoModelForSequenceClassification

            try:
                model = AutoModelForSequenceClassification.from_pretrained(self._path, dtype=self._dtype)
            except OSError as e:
                raise IcrError(f"reward_model judge: cannot load {self._path!r}: {e}") from None
            model.config.pad_token_id = self.tokenizer.pad_token_id
            self._model = model.to(self.device).eval()
        return self._model

    def close(self) -> None:
        """Drop the model and give its memory back (it loads again if judged with later)."""
        if self._model is not None:
            from ..models import release_memory

            self._model = None
            release_memory()

    def _text(self, instruction: str, output: str) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}], tokenize=False)
        return f"{instruction}\n\n{output}"

    def _scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        texts = [self._text(i, o) for i, o in pairs]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=True, max_length=self.max_length, add_special_tokens=False)
                logits = self.model(**batch.to(self.device)).logits
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores

    def score(self, items: list[JudgeItem]) -> list[float]:
        return self._scores([(it.instruction, it.output) for it in items])

    def compare(self, items: list[JudgeItem]) -> list[float]:
        s = self._scores([(it.instruction, it.output) for it in items] +
                         [(it.instruction, it.reference) for it in items])
        n = len(items)
        return [1 / (1 + math.exp(-(s[i] - s[n + i]))) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# alpaca_eval judge
# ---------------------------------------------------------------------------------------------

def resolve_annotators_config(annotators_config: str) -> str:
    """A config shipped with icr (by folder name) becomes the path of its configs.yaml; anything
    else (one of alpaca_eval's own names, or a path) is passed to alpaca_eval as it is."""
    shipped = SHIPPED_JUDGE_CONFIGS / annotators_config / "configs.yaml"
    return str(shipped) if "/" not in annotators_config and shipped.is_file() else annotators_config


def _import_alpaca_eval_annotator():
    try:
        from alpaca_eval.annotators import PairwiseAnnotator
    except Exception as e:  # noqa: BLE001 - ImportError, or pkg_resources missing under new setuptools
        raise IcrError(
            "judge 'alpaca_eval' needs the alpaca-eval package: pip install 'alpaca-eval==0.6.6' "
            f"'setuptools>=77.0.3,<81' (or `pip install icr[eval]`); import failed: {type(e).__name__}: {e}") from None
    return PairwiseAnnotator


class AlpacaEvalJudge:
    """alpaca_eval's pairwise annotators (an LLM judge behind an OpenAI-compatible endpoint).

    `annotators_config` names a config shipped with icr (`SHIPPED_JUDGE_CONFIGS`; the default is the
    authors' `weighted_alpaca_eval_gpt4_turbo_multilingual`), one of alpaca_eval's own evaluator
    configs, or a path to your own config. The endpoint and key come from alpaca_eval's usual environment
    (`OPENAI_API_KEY`, `OPENAI_API_BASE` or `OPENAI_CLIENT_CONFIG_PATH`), or, with judge_args `base_url`
    (+ `model`, `api_key_env`, `max_concurrency`), from the config: any OpenAI-compatible server (a
    local vLLM server), the annotator and its template unchanged. The weighted judges need the server's
    logprobs (`top_logprobs: 5`): checked when the judge is built.

    The reference is alpaca_eval's `output_1` (the baseline) and the model's answer `output_2`,
    so alpaca_eval's preference (1 = baseline wins, 2 = model wins, fractions for weighted judges)
    minus one is ours. Failed annotations come back as NaN.

    Tokens and cost (`usage`, `cost`): what alpaca_eval itself gives is not enough. Its
    `openai_completions` keeps only the reply's `usage.total_tokens` (on each choice, divided over the
    prompt batch) and turns it into `price_per_example` = total tokens x a price per token guessed from
    the model name (NaN for a model it does not know); the prompt / completion split is dropped before
    the annotation, and an annotation from alpaca_eval's own cache carries its old price as if paid
    again. So icr counts at the HTTP client instead, through a configuration alpaca_eval accepts: its
    completion helper takes `client_kwargs` (passed to the `openai.OpenAI` client it builds), and icr
    hands it an `http_client` (the openai package's `DefaultHttpxClient`) with an httpx response event
    hook that reads each completion reply's `usage` (`_UsageMeter`). Nothing of alpaca_eval is
    patched; it only works for annotators whose `fn_completions` is `openai_completions` (others:
    `usage` None). Counted: every chat/completions request that reached the server (retries included),
    its prompt and completion tokens; a 200 reply without both counts is `unmetered`. Cost: judge_args
    `price_per_input_token` / `price_per_output_token` (none given: no cost). The logprobs check at
    build time goes through icr's own client and is not counted.
    """

    scores_single_answers = False  # pairwise only
    _decoding_kwargs: dict = {}  # judge_args base_url: where alpaca_eval sends requests (see _point_at); never mutated
    _metering_kwargs: dict = {}  # client_kwargs carrying the usage-counting http client (see _UsageMeter)
    usage = None  # a _UsageMeter's counters when alpaca_eval's requests are counted
    price_per_input_token: float | None = None
    price_per_output_token: float | None = None

    def __init__(self, annotators_config: str = "weighted_alpaca_eval_gpt4_turbo_multilingual",
                 caching_path: str | None = None, seed: int = 0, base_url: str | None = None,
                 model: str | None = None, api_key_env: str = "OPENAI_API_KEY", max_concurrency: int | None = None,
                 timeout_s: float = 120.0, price_per_input_token: float | None = None,
                 price_per_output_token: float | None = None, **annotator_kwargs):
        pairwise_annotator = _import_alpaca_eval_annotator()
        annotators_config = resolve_annotators_config(annotators_config)
        self.annotator = pairwise_annotator(annotators_config=annotators_config, caching_path=caching_path,
                                            seed=seed, **annotator_kwargs)
        config = Path(annotators_config)
        self.name = f"alpaca_eval:{config.parent.name if config.name == 'configs.yaml' else config.stem}"
        # "/2": the instruction is shown as it is; icr's judgements before that had a sentence appended
        # to non-English instructions and must not be reused from a cache
        self.cache_id = f"{self.name}/2" + (f"@{model}" if model else "")
        self._decoding_kwargs = {} if base_url is None else self._point_at(base_url, model, api_key_env,
                                                                            max_concurrency, timeout_s)
        self.price_per_input_token, self.price_per_output_token = price_per_input_token, price_per_output_token
        if all(getattr(a.fn_completions, "__name__", "") == "openai_completions"
               for a in self.annotator.annotators.values()):
            meter = _UsageMeter()
            self.usage, self._metering_kwargs = meter.usage, {"client_kwargs": {"http_client": meter.http_client()}}

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Those tokens at judge_args' prices per token (None when no price is given)."""
        return cost_of(prompt_tokens, completion_tokens, self)

    def check_credentials(self) -> None:
        """Preflight: an annotator that calls the OpenAI API through alpaca_eval's environment has a
        key there. alpaca_eval builds its `openai.OpenAI` clients from a client config file
        (OPENAI_CLIENT_CONFIG_PATH, default `<site-packages>/../client_configs/openai_configs.yaml`) if
        it exists, else from OPENAI_API_KEYS / OPENAI_API_KEY (+ OPENAI_API_BASE); without any of them
        the client refuses to be built at the first judgement, after every answer was sampled. With
        judge_args base_url the key (api_key_env) and the server were checked when the judge was built."""
        if self._decoding_kwargs:
            return
        from alpaca_eval import constants

        for name, annotator in self.annotator.annotators.items():
            if getattr(annotator.fn_completions, "__name__", "") != "openai_completions":
                continue
            kwargs = annotator.completions_kwargs
            client_config = Path(str(kwargs.get("client_config_path") or constants.OPENAI_CLIENT_CONFIG_PATH))
            keys = kwargs.get("openai_api_keys") or constants.OPENAI_API_KEYS or []
            if client_config.is_file() or any(keys if isinstance(keys, (list, tuple)) else [keys]) \
                    or os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEYS"):
                continue
            raise IcrError(f"evaluation.judge: alpaca_eval's annotator {Path(str(name)).stem!r} ({self.name}) calls "
                           "the OpenAI API, but no key is set: set OPENAI_API_KEY (or OPENAI_CLIENT_CONFIG_PATH to an "
                           "alpaca_eval client config file), or evaluation.judge_args base_url (+ model, api_key_env) "
                           "for another OpenAI-compatible server")

    def _point_at(self, base_url: str, model: str | None, api_key_env: str, max_concurrency: int | None,
                  timeout_s: float) -> dict:
        """judge_args base_url (+ model, api_key_env): alpaca_eval's annotators sent to that
        OpenAI-compatible server instead of what its environment names. Checked now, before anything
        is sampled: the server answers, and returns logprobs when the config asks for them."""
        from ..config import JudgeEndpointConfig
        from .openai_judge import OpenAIJudgeClient, resolve_api_key

        annotators = list(self.annotator.annotators.values())
        model = model or annotators[0].completions_kwargs.get("model_name", "")
        endpoint = JudgeEndpointConfig(base_url=base_url, model=model, api_key_env=api_key_env, timeout_s=timeout_s,
                                       max_retries=2)
        client = OpenAIJudgeClient(endpoint, "evaluation.judge_args")
        client.check_server()
        for a in annotators:
            a.completions_kwargs["model_name"] = model
            if a.completions_kwargs.get("logprobs"):
                client.check_logprobs(int(a.completions_kwargs.get("top_logprobs") or 1))
        # alpaca_eval's openai_completions -> _openai_completion_helper: a client config file that does not
        # exist makes it build the client from these (its "backward compatibility" path)
        kwargs = {"client_config_path": "/nonexistent/icr-uses-judge_args", "openai_api_base": base_url,
                  "openai_api_keys": [resolve_api_key(api_key_env, "evaluation.judge_args")], "timeout": timeout_s}
        if max_concurrency:
            kwargs["num_procs"] = max_concurrency
        return kwargs

    @staticmethod
    def head2head_inputs(items: list[JudgeItem]) -> tuple[list[dict], list[dict]]:
        """The baseline and model rows handed to `PairwiseAnnotator.annotate_head2head`."""
        baseline = [{"instruction": it.instruction, "output": it.reference, "generator": "reference"}
                    for it in items]
        model = [{"instruction": it.instruction, "output": it.output, "generator": "model"} for it in items]
        return baseline, model

    def compare(self, items: list[JudgeItem]) -> list[float]:
        if not items:
            return []
        baseline, model = self.head2head_inputs(items)
        annotated = self.annotator.annotate_head2head(outputs_1=baseline, outputs_2=model, is_ordered=True,
                                                      **self._decoding_kwargs, **self._metering_kwargs)
        by_key = {(a["instruction"], a["output_1"], a["output_2"]): a.get("preference") for a in annotated}
        prefs = []
        for b, m in zip(baseline, model):
            p = by_key.get((b["instruction"], b["output"], m["output"]))
            prefs.append(math.nan if p is None or p != p else (1.5 if p == 0 else float(p)) - 1)
        return prefs


@dataclass
class MeteredUsage(Usage):
    """`Usage` (requests, prompt / completion tokens) and the 200 replies that carried no token counts."""

    unmetered: int = 0


class _UsageMeter:
    """Counts what an OpenAI client sends, from the replies themselves: an httpx response event hook
    (httpx's documented way to see responses; it reads the body, which httpx would read next anyway)
    on the `http_client` handed to alpaca_eval's client. Thread-safe (alpaca_eval sends from a pool)."""

    def __init__(self):
        self.usage = MeteredUsage()

    def http_client(self):
        import openai

        return openai.DefaultHttpxClient(event_hooks={"response": [self.count]})

    def count(self, response) -> None:
        request = response.request
        if request.method != "POST" or not request.url.path.rstrip("/").endswith("completions"):
            return
        self.usage.add(requests=1)
        if response.status_code != 200:
            return
        response.read()
        try:
            usage = response.json()["usage"]
            pt, ct = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        except (ValueError, KeyError, TypeError):
            self.usage.add(unmetered=1)
            return
        self.usage.add(prompt_tokens=pt, completion_tokens=ct)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------

USAGE_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "unmetered")


class CachedJudge:
    """Caches a judge's answers in a JSONL file keyed by content.

    Key = hash of (judge id, kind, lang, instruction, output, reference); `score` keys leave the
    reference out. Judgements are appended to the file after every `chunk_size` items, so an
    interrupted evaluation keeps what was paid for; NaN (failed) judgements are not cached.
    A truncated last line (a crash mid-write) is ignored on load.
    """

    def __init__(self, judge: Judge, path: Path, chunk_size: int = 64):
        self.judge, self.path, self.chunk_size = judge, Path(path), chunk_size
        self.name = judge.name
        self._id = getattr(judge, "cache_id", judge.name)
        self._cache: dict[str, float] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                        self._cache[rec["key"]] = float(rec["value"])
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue
        self.hits = 0

    def _key(self, kind: str, it: JudgeItem) -> str:
        reference = it.reference if kind == "compare" else ""
        return text_hash(self._id, kind, it.lang, it.instruction, it.output, reference)

    def _run(self, kind: str, fn: Callable[[list[JudgeItem]], list[float]], items: list[JudgeItem]) -> list[float]:
        keys = [self._key(kind, it) for it in items]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self._cache}.values())
        self.hits += len(items) - len(todo)
        for start in range(0, len(todo), self.chunk_size):
            idx = todo[start:start + self.chunk_size]
            values = fn([items[i] for i in idx])
            if len(values) != len(idx):
                raise IcrError(f"judge {self.name}: returned {len(values)} judgements for {len(idx)} items")
            lines = []
            for i, v in zip(idx, values):
                v = float(v)
                self._cache[keys[i]] = v
                if not math.isnan(v):
                    lines.append(json.dumps({"key": keys[i], "kind": kind, "id": items[i].id,
                                             "lang": items[i].lang, "value": v}) + "\n")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.writelines(lines)
                fh.flush()
                os.fsync(fh.fileno())
        out = [self._cache[k] for k in keys]
        for k in keys:  # failed judgements are retried on the next call
            if math.isnan(self._cache[k]):
                del self._cache[k]
        return out

    def compare(self, items: list[JudgeItem]) -> list[float]:
        return self._run("compare", self.judge.compare, items)

    def mark(self) -> tuple:
        """Where the counters stand now; `spent(mark)` is what was used since."""
        usage = getattr(self.judge, "usage", None)
        counts = None if usage is None else tuple(getattr(usage, k, 0) for k in USAGE_COUNTS)
        return self.hits, counts

    def spent(self, mark: tuple) -> dict:
        """The results row's usage fields since `mark`, for a judge that counts what it sends (`usage`:
        the alpaca_eval judge): `cached` (judgements taken from this cache: nothing sent, nothing paid
        now), `requests`, `prompt_tokens`, `completion_tokens` and `cost` (None without a price); tokens
        and cost None when some reply carried no counts. All five None for a judge without such a notion
        (fake, reward_model, the sandbox oracle): its rows stay the same on a rerun."""
        hits, before = mark
        out = {"cached": None, "requests": None, "prompt_tokens": None, "completion_tokens": None, "cost": None}
        usage = getattr(self.judge, "usage", None)
        if usage is None or before is None:
            return out
        requests, pt, ct, unmetered = (getattr(usage, k, 0) - b for k, b in zip(USAGE_COUNTS, before))
        out.update(cached=self.hits - hits, requests=requests)
        if not unmetered:
            cost = getattr(self.judge, "cost", None)
            out.update(prompt_tokens=pt, completion_tokens=ct, cost=cost(pt, ct) if callable(cost) else None)
        return out

    @property
    def scores_single_answers(self) -> bool:
        return can_score(self.judge)

    @property
    def loads_model(self) -> bool:
        return loads_model(self.judge)

    def close(self) -> None:
        """The wrapped judge's `close()` (a reward model gives its memory back), if it has one."""
        close = getattr(self.judge, "close", None)
        if callable(close):
            close()

    @property
    def pair_kind(self):
        """The wrapped judge's `pair_kind(a, b, id)` (which quality two answers differ in: the
        sandbox oracle has one), or None."""
        return getattr(self.judge, "pair_kind", None)

    def score(self, items: list[JudgeItem]) -> list[float]:
        if not can_score(self.judge):
            raise IcrError(f"judge {self.name!r} cannot score single answers")
        return self._run("score", self.judge.score, items)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# The pipeline's own judges. Others (the sandbox's ground-truth oracle, your own) are named by a
# dotted path `module:factory`, so the registry knows nothing of any particular world.
JUDGES: dict[str, Callable[..., Judge]] = {
    "alpaca_eval": AlpacaEvalJudge,
    "reward_model": RewardModelJudge,
    "fake": FakeJudge,
}


def get_judge(name: str, **kwargs) -> Judge:
    """Build a judge by registry name, or from a dotted `module:factory` path."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise IcrError(f"judge {name!r}: cannot import {attr!r} from {module_name!r} ({e})") from None
    elif name in JUDGES:
        factory = JUDGES[name]
    else:
        close = difflib.get_close_matches(name, list(JUDGES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise IcrError(f"unknown judge {name!r}{hint}; available: {', '.join(JUDGES)}, "
                       "or a dotted path module:factory")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise IcrError(f"judge {name!r}: bad judge_args {sorted(kwargs)}: {e}") from None
    except ValueError:  # no signature to check (a builtin): let the call itself complain
        pass
    try:
        judge = factory(**kwargs)
    except IcrError:
        raise
    except Exception as e:  # noqa: BLE001 - a factory's own failure (bad path in judge_args, ...) is a config problem
        first = str(e).splitlines()[0] if str(e) else ""
        raise IcrError(f"judge {name!r}: cannot be built with judge_args {kwargs} ({type(e).__name__}: {first})") from None
    if not callable(getattr(judge, "compare", None)) or not isinstance(getattr(judge, "name", None), str):
        raise IcrError(f"judge {name!r}: the factory returned {type(judge).__name__}, "
                       "which lacks a `name` string or a `compare` method")
    if getattr(judge, "scores_single_answers", False) and not callable(getattr(judge, "score", None)):
        raise IcrError(f"judge {name!r}: declares scores_single_answers but has no `score` method")
    return judge
