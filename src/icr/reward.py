"""The implicit cross-lingual reward: r = log pi_dpo(y | G(x)) - log pi_ref(y | G(x)).

What is defined here: the prompt G(x) a response is scored under (`reward_conversation`), which
tokens are summed (`reward_inputs`: every response token, or the authors' set), and the reward
from the two sums (`implicit_reward`). The sums themselves come from a scoring engine
(`icr.logprobs` on transformers, `icr.generation.vllm` on vLLM; chosen in `icr.scoring`). The
tokenisation is TRL's, so the sums equal
the reference log-probs `DPOTrainer` computes for the same pairs (tested):

- prompt ids = chat template of the conversation with the generation prompt;
- response ids = template of conversation + assistant answer, minus the common prefix with the
  prompt ids. They therefore include the end-of-turn token (and whatever the model's own
  template puts after an assistant turn).

"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .languages import language_name


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def tokenize_pair(tokenizer, conversation: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) exactly as TRL's DPOTrainer tokenises a conversational example."""
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(conversation + [{"role": "assistant", "content": response}],
                                         tokenize=True, return_dict=True)["input_ids"]
    cut = common_prefix_length(prompt, full)
    return prompt[:cut], full[cut:]


def reward_conversation(variant: str, lang: str, instruction: str, english_instruction: str, prefix: str):
    """The prompt G(x) under which a response in `lang` is scored.

    cross_lingual: the English instruction, behind a prefix naming the response language (none for
    English); multilingual: the instruction in the response's language. translate_to_english
    scores the English translation under the plain English instruction.
    """
    if variant == "multilingual":
        content = instruction
    elif variant == "cross_lingual" and lang != "en":
        content = prefix.format(language=language_name(lang)) + english_instruction
    else:
        content = english_instruction
    return [{"role": "user", "content": content}]


AUTHORS_BATCH_SIZE = 3  # their scoring batch (scripts/compute_score.sh:125): decides which rows are padded


def authors_token_ids(prompt_ids: list[int], response_ids: list[int], *, padded: bool,
                      pad_id: int) -> tuple[list[int], list[int]]:
    """(prompt, target) ids whose summed log-probs equal the authors' scorer for one row.

    Their scorer (utils/compute_reward_score.py) masks *input* positions from the prompt's length on
    (lines 56-66) and multiplies that mask into the log-prob of the *next* token (lines 106-116), so
    the first response token is never counted and the end-of-turn token is. The line meant to mask
    end-of-turn (68) compares a tensor with a Python list, which is False, so it masks nothing: in a
    right-padded row (shorter than the longest of its batch) the end-of-turn position then adds
    log p(first pad | ... end-of-turn), unless pad is end-of-turn itself (pads are masked, line 66).
    Rows without padding stop at end-of-turn (their last position is cut, line 116).
    """
    if not response_ids:
        return prompt_ids, []
    targets = response_ids[1:]
    if padded and pad_id != response_ids[-1]:
        targets = targets + [pad_id]
    return prompt_ids + response_ids[:1], targets


def authors_padded_rows(lengths: list[int], groups: list) -> list[bool]:
    """Whether each row is shorter than the longest row of its batch (`groups[i]` names the batch)."""
    longest: dict = {}
    for n, g in zip(lengths, groups):
        longest[g] = max(longest.get(g, 0), n)
    return [n < longest[g] for n, g in zip(lengths, groups)]


def reward_token_ids(tokenizer, conversations: list[list[dict]],
                     responses: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) per row, tokenised as `tokenize_pair` (prompt templates cached)."""
    prompt_cache: dict[str, list[int]] = {}  # the N responses of a prompt share its template
    prompt_ids, response_ids = [], []
    for conv, response in zip(conversations, responses):
        key = repr(conv)
        if key not in prompt_cache:
            prompt_cache[key] = tokenizer.apply_chat_template(
                conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        prompt = prompt_cache[key]
        full = tokenizer.apply_chat_template(conv + [{"role": "assistant", "content": response}],
                                             tokenize=True, return_dict=True)["input_ids"]
        cut = common_prefix_length(prompt, full)  # as tokenize_pair
        prompt_ids.append(prompt[:cut])
        response_ids.append(full[cut:])
    return prompt_ids, response_ids


def pad_token_id(tokenizer) -> int:
    """The authors' pad: the tokenizer's pad token, else its end-of-sequence token (their line 184-185)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def reward_inputs(tokenizer, conversations: list[list[dict]], responses: list[str], *, token_set: str = "paper",
                  padded: list[bool] | None = None) -> tuple[list[list[int]], list[list[int]], np.ndarray]:
    """The token ids whose log-probs the reward sums, for any scoring backend (hf or vllm).

    Returns (prompt_ids, response_ids, n_tokens): the ids of `token_set` ("paper": every response
    token plus end-of-turn; "authors": `authors_token_ids`, `padded[i]` saying whether row i was
    padded in the authors' batch) and `n_tokens`, the response's own token count (end-of-turn
    included) whatever the token set.
    """
    prompt_ids, response_ids = reward_token_ids(tokenizer, conversations, responses)
    n_tokens = np.array([len(r) for r in response_ids])
    if token_set == "authors":
        pad = pad_token_id(tokenizer)
        rows = [authors_token_ids(p, r, padded=bool(padded and padded[i]), pad_id=pad)
                for i, (p, r) in enumerate(zip(prompt_ids, response_ids))]
        prompt_ids, response_ids = [p for p, _ in rows], [r for _, r in rows]
    elif token_set != "paper":
        raise ValueError(f"token_set must be 'paper' or 'authors', not {token_set!r}")
    return prompt_ids, response_ids, n_tokens


def implicit_reward(logp_policy: np.ndarray, logp_reference: np.ndarray) -> np.ndarray:
    """r = log pi_dpo(y | G(x)) - log pi_ref(y | G(x)), per row; non-finite rewards come back as NaN,
    for the caller to exclude and report."""
    reward = np.asarray(logp_policy, dtype=np.float64) - np.asarray(logp_reference, dtype=np.float64)
    reward[~np.isfinite(reward)] = math.nan
    return reward


@dataclass
class RewardModels:
    """The two models whose log-ratio is the reward, sharing one tokenizer (checked by the loader)."""

    policy: object  # pi_dpo (pi0, or pi_{t-1})
    reference: object  # pi_ref (pi_SFT, or pi_{t-2})
    tokenizer: object


def implicit_rewards(rm: RewardModels, conversations: list[list[dict]], responses: list[str], *,
                     batch_tokens: int = 8192, desc: str | None = None,
                     shared_prompt: bool | None = None, token_set: str = "paper",
                     padded: list[bool] | None = None) -> dict[str, np.ndarray]:
    """Implicit rewards of `responses[i]` under `conversations[i]`, on transformers models.

    Returns arrays `reward` (= logp_policy - logp_reference, `implicit_reward`), `logp_policy`,
    `logp_reference`, `n_tokens` (response tokens incl. end-of-turn). `shared_prompt`: see
    `icr.logprobs.sequence_logprobs` (default: the fastest exact path each model allows).
    `token_set`: "paper" sums every response token; "authors" reproduces the authors' sums
    (`authors_token_ids`), `padded[i]` saying whether row i was padded in their batch (see
    `authors_padded_rows`; None: no row padded).
    """
    from .logprobs import sequence_logprobs

    prompt_ids, response_ids, n_tokens = reward_inputs(rm.tokenizer, conversations, responses,
                                                       token_set=token_set, padded=padded)
    lp = sequence_logprobs([rm.policy, rm.reference], prompt_ids, response_ids,
                           pad_id=rm.tokenizer.pad_token_id, batch_tokens=batch_tokens, desc=desc,
                           shared_prompt=shared_prompt)
    return {"reward": implicit_reward(lp[0], lp[1]), "logp_policy": lp[0], "logp_reference": lp[1],
            "n_tokens": n_tokens}
