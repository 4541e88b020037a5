"""How the score stage turns samples into rewards: one scorer interface, engines by name.

    scored_shards(cfg, plan, prompts, shards, all_samples) -> per shard, its records with rewards

The parts, each in its own place:

- **what the reward is** (`icr.reward`): the prompt G(x) a response is scored under, which tokens
  are summed (`reward.token_set`: every response token, or the authors' set, which needs to know
  which rows their batches padded: `authors_padding`), and r = lp_policy - lp_ref;
- **the log-prob engine** (`SCORERS`, chosen by `reward.backend`, like `generation.BACKENDS`):
  `hf` (`icr.logprobs`, both models resident, batch by batch: the stage resumes by shard) and `vllm`
  (`icr.generation.vllm.vllm_logprobs`, one model loaded at a time since an engine start is costly:
  all of a worker's shards per model; rows longer than the engine's context come back `too_long`);
- **the translate-to-English variant** (`reward.variant: translate_to_english`): the policy pi_{t-1}
  translates non-English answers first (greedy, one call per shard), and its backend is closed
  before the scorers load, so the two never hold a GPU together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from .config import ExperimentConfig
from .errors import IcrError

TRANSLATE_INSTRUCTION = ("Translate the following {language} text into English. Reply with the translation "
                         "only.\n\n{text}")

IdBatch = tuple[list[list[int]], list[list[int]]]  # (prompt ids, response ids) of a batch of rows


class LogprobEngine(Protocol):
    def logprobs(self, batches: list[IdBatch], desc: str | None) -> Iterator[dict[str, np.ndarray]]:
        """Per batch, in order: `logp_policy`, `logp_reference` (summed over the response ids), and
        optionally `too_long` (rows the engine could not take; their log-probs NaN)."""

    def close(self) -> None: ...


class HFEngine:
    """Both models resident (transformers), scored batch by batch as the caller asks for them."""

    def __init__(self, cfg: ExperimentConfig, policy_path: str, reference_path: str, tokenizer):
        from .models import load_causal_lm, resolve_device

        device = resolve_device(cfg.device)
        self.models = [load_causal_lm(policy_path, device, cfg.models.dtype, what="reward model"),
                       load_causal_lm(reference_path, device, cfg.models.dtype, what="reward reference")]
        self.pad_id, self.batch_tokens = tokenizer.pad_token_id, cfg.reward.batch_tokens

    def logprobs(self, batches: list[IdBatch], desc: str | None) -> Iterator[dict[str, np.ndarray]]:
        from .logprobs import sequence_logprobs

        for i, (prompt_ids, response_ids) in enumerate(batches):
            lp = sequence_logprobs(self.models, prompt_ids, response_ids, pad_id=self.pad_id,
                                   batch_tokens=self.batch_tokens,
                                   desc=None if desc is None else f"{desc} {i + 1}/{len(batches)}")
            yield {"logp_policy": lp[0], "logp_reference": lp[1]}

    def close(self) -> None:
        self.models = []


class VLLMEngine:
    """One vLLM engine per model, each over every batch at once (`icr.generation.vllm.vllm_logprobs`)."""

    def __init__(self, cfg: ExperimentConfig, policy_path: str, reference_path: str, tokenizer):
        self.cfg, self.paths = cfg, (policy_path, reference_path)

    def logprobs(self, batches: list[IdBatch], desc: str | None) -> Iterator[dict[str, np.ndarray]]:
        from .generation.vllm import vllm_logprobs

        g = self.cfg.generation
        res = vllm_logprobs(*self.paths, [p for b in batches for p in b[0]], [r for b in batches for r in b[1]],
                            device=self.cfg.device, dtype=self.cfg.models.dtype,
                            tensor_parallel_size=g.tensor_parallel_size,
                            gpu_memory_utilization=g.gpu_memory_utilization,
                            logprob_memory_gib=self.cfg.reward.vllm_logprob_memory_gib,
                            desc=None if desc is None else f"{desc} ({len(batches)} shards)")
        start = 0
        for prompt_ids, _ in batches:
            end = start + len(prompt_ids)
            yield {k: v[start:end] for k, v in res.items()}
            start = end

    def close(self) -> None:
        pass


# reward.backend -> engine factory(cfg, policy_path, reference_path, tokenizer). Tests may add stand-ins.
SCORERS = {"hf": HFEngine, "vllm": VLLMEngine}


def load_engine(cfg: ExperimentConfig, policy_path: str, reference_path: str, tokenizer) -> LogprobEngine:
    factory = SCORERS.get(cfg.reward.backend)
    if factory is None:
        raise IcrError(f"reward.backend: unknown backend {cfg.reward.backend!r} (available: {', '.join(SCORERS)})")
    return factory(cfg, policy_path, reference_path, tokenizer)


def reward_tokenizer(policy_path: str, reference_path: str, cfg: ExperimentConfig):
    """The reward pair's one tokenizer (checked shared), without loading the models."""
    from .models import check_same_tokenizer, load_tokenizer

    tok_policy = load_tokenizer(policy_path, cfg.models.chat_template, what="reward model (policy side)")
    tok_ref = load_tokenizer(reference_path, cfg.models.chat_template, what="reward model (reference side)")
    check_same_tokenizer(tok_policy, tok_ref, policy_path, reference_path)
    return tok_policy


def scored_shards(cfg: ExperimentConfig, plan, prompts, shards: list[list[dict]],
                 all_samples: list[dict]) -> Iterator[list[dict]]:
    """The records of each shard in `shards` (sample records of the generate stage) with their
    reward fields, shard by shard. `all_samples`: every sample of the stage (the authors' token set
    pads by batches that span shards). Rewards from pi_dpo = `plan.reward_policy` and pi_ref =
    `plan.reward_reference`; translations (if any) by `plan.policy`."""
    from .reward import implicit_reward, reward_conversation, reward_inputs

    r = cfg.reward
    tokenizer = reward_tokenizer(plan.reward_policy, plan.reward_reference, cfg)
    padded = authors_padding(all_samples, prompts, tokenizer, r) if r.token_set == "authors" else None
    responses = (translate(cfg, plan.policy, shards) if r.variant == "translate_to_english"
                 else [[rec["response"] for rec in records] for records in shards])
    ids = []
    for records, ys in zip(shards, responses):
        convs = [reward_conversation(r.variant, rec["lang"], rec["prompt"], prompts.english(rec["id"]).instruction,
                                     r.prefix) for rec in records]
        rows_padded = None if padded is None else [padded[(rec["lang"], rec["id"], rec["sample"])] for rec in records]
        ids.append(reward_inputs(tokenizer, convs, ys, token_set=r.token_set, padded=rows_padded))
    engine = load_engine(cfg, plan.reward_policy, plan.reward_reference, tokenizer)
    try:  # no inner bar (desc None): the stage's bar is icr.progress's
        for records, ys, (_, _, n_tokens), lp in zip(shards, responses, ids,
                                                     engine.logprobs([(p, q) for p, q, _ in ids], None)):
            reward = implicit_reward(lp["logp_policy"], lp["logp_reference"])
            yield [_scored(rec, reward[j], lp, n_tokens[j], j, ys[j] if r.variant == "translate_to_english" else None)
                   for j, rec in enumerate(records)]
    finally:
        engine.close()


def _scored(rec: dict, reward: float, lp: dict, n_tokens: int, j: int, translation: str | None) -> dict:
    too_long = "too_long" in lp and bool(lp["too_long"][j])
    return {**rec, "reward": float(reward) if reward == reward else None,
            "logp_policy": float(lp["logp_policy"][j]), "logp_reference": float(lp["logp_reference"][j]),
            "reward_tokens": int(n_tokens), **({"too_long": True} if too_long else {}),
            **({"translation": translation} if translation is not None else {})}


def translate(cfg: ExperimentConfig, translator_path: str, shards: list[list[dict]]) -> list[list[str]]:
    """Each non-English response translated into English by the translator (greedy, one call per
    shard); English responses as they are. The translator leaves memory before anything else loads."""
    from .generation import SamplingParams, policy_backend
    from .languages import language_name
    from .models import chat_messages, release_memory

    translator = policy_backend(cfg, translator_path, batch_size=cfg.generation.batch_size)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.reward.translate_max_new_tokens)
    out = []
    try:
        for i, records in enumerate(shards):
            convs = [chat_messages(TRANSLATE_INSTRUCTION.format(language=language_name(rec["lang"]),
                                                                text=rec["response"])) for rec in records]
            texts = translator.generate(convs, params, desc=f"translate {i + 1}/{len(shards)}")
            out.append([rec["response"] if rec["lang"] == "en" else t[0].text for rec, t in zip(records, texts)])
    finally:
        translator.close()
        del translator
        release_memory()
    return out


def authors_padding(samples: list[dict], prompts, tokenizer, r) -> dict[tuple, bool]:
    """For `reward.token_set: authors`: which samples the authors' scorer right-pads.

    Their batches (utils/compute_reward_score.py:40-53) are AUTHORS_BATCH_SIZE consecutive prompts of
    a language's file, one sample index at a time; a row is padded when it is shorter (prompt +
    response + end-of-turn, in tokens) than the longest row of its batch. Batches span icr's shards,
    so every sample is tokenised here first.
    """
    from .reward import AUTHORS_BATCH_SIZE, authors_padded_rows, reward_conversation, reward_token_ids

    position = {(lang, p.id): j for lang, ps in prompts.by_lang.items() for j, p in enumerate(ps)}
    convs = [reward_conversation(r.variant, rec["lang"], rec["prompt"], prompts.english(rec["id"]).instruction,
                                 r.prefix) for rec in samples]
    prompt_ids, response_ids = reward_token_ids(tokenizer, convs, [rec["response"] for rec in samples])
    groups = [(rec["lang"], position[(rec["lang"], rec["id"])] // AUTHORS_BATCH_SIZE, rec["sample"])
              for rec in samples]
    flags = authors_padded_rows([len(p) + len(q) for p, q in zip(prompt_ids, response_ids)], groups)
    return {(rec["lang"], rec["id"], rec["sample"]): f for rec, f in zip(samples, flags)}
