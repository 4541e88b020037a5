"""The implicit cross-lingual reward: r = log pi_dpo(y | G(x)) - log pi_ref(y | G(x)).

Written here rather than taken from TRL because TRL computes these sums only inside training
batches of chosen/rejected pairs; scoring N free samples per prompt under a *different* prompt
(the English instruction) is not something it offers. The tokenisation is TRL's, so the sums equal
the reference log-probs `DPOTrainer` computes for the same pairs (tested):

- prompt ids = chat template of the conversation with the generation prompt;
- response ids = template of conversation + assistant answer, minus the common prefix with the
  prompt ids. They therefore include the end-of-turn token (and whatever the model's own
  template puts after an assistant turn).

Speed (see bench/score.py): sequences are sorted by length and packed into batches under a token
budget with right padding; the output head and log-softmax are applied only at positions that
predict a response token; both models consume the same batches in one pass over the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

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


def _output_head(model):
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return head, softcap


def _decoder(model):
    # Llama/Mistral/Qwen/Gemma: model.model is the decoder stack returning hidden states.
    return model.get_decoder() if hasattr(model, "get_decoder") else None


def make_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first), packed so that rows x longest <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        width = max(longest, lengths[i])
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def _batch_logprobs(model, ids, mask, resp_mask, targets) -> torch.Tensor:
    """Summed log-probs of target tokens at positions where resp_mask is set; one value per row."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    decoder = _decoder(model)
    head, softcap = _output_head(model)
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        logits = head(hidden[resp_mask])  # only the positions that predict response tokens
    else:  # generic fallback: full logits
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[resp_mask]
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[resp_mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.nonzero(resp_mask)[:, 0]
    out = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    out.index_add_(0, rows, token_lp.double())
    return out


def sequence_logprobs(models: list, prompt_ids: list[list[int]], response_ids: list[list[int]], *,
                      pad_id: int, batch_tokens: int = 8192, padding_side: str = "right",
                      desc: str | None = None) -> np.ndarray:
    """Summed log-probs of each response given its prompt, for each model: array (len(models), n).

    Every model sees the same batches, in one pass over the data.
    """
    n = len(prompt_ids)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    out = np.zeros((len(models), n), dtype=np.float64)
    device = next(models[0].parameters()).device
    batches = make_batches(lengths, batch_tokens)
    bar = tqdm(total=n, desc=desc or "score", unit="resp", disable=desc is None, leave=False)
    for batch in batches:
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.zeros_like(ids)
        resp_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, i in enumerate(batch):
            seq = prompt_ids[i] + response_ids[i]
            off = width - len(seq) if padding_side == "left" else 0
            ids[row, off:off + len(seq)] = torch.tensor(seq)
            mask[row, off:off + len(seq)] = 1
            # position j predicts token j+1: positions from the last prompt token to the one before the end
            start = off + len(prompt_ids[i]) - 1
            stop = off + len(seq) - 1
            targets[row, start:stop] = torch.tensor(seq[len(prompt_ids[i]):])
            resp_mask[row, start:stop] = True
        ids, mask, targets, resp_mask = (t.to(device) for t in (ids, mask, targets, resp_mask))
        for m, model in enumerate(models):
            out[m, batch] = _batch_logprobs(model, ids, mask, resp_mask, targets).cpu().numpy()
        bar.update(len(batch))
    bar.close()
    return out


@dataclass
class RewardModels:
    """The two models whose log-ratio is the reward, sharing one tokenizer (checked by the loader)."""

    policy: object  # pi_dpo (pi0, or pi_{t-1})
    reference: object  # pi_ref (pi_SFT, or pi_{t-2})
    tokenizer: object


def implicit_rewards(rm: RewardModels, conversations: list[list[dict]], responses: list[str], *,
                     batch_tokens: int = 8192, desc: str | None = None) -> dict[str, np.ndarray]:
    """Implicit rewards of `responses[i]` under `conversations[i]`.

    Returns arrays `reward` (= logp_policy - logp_reference), `logp_policy`, `logp_reference`,
    `n_tokens` (response tokens incl. end-of-turn). Non-finite log-probs come back as NaN and are
    for the caller to exclude and report.
    """
    pairs = [tokenize_pair(rm.tokenizer, c, r) for c, r in zip(conversations, responses)]
    prompt_ids = [p for p, _ in pairs]
    response_ids = [r for _, r in pairs]
    lp = sequence_logprobs([rm.policy, rm.reference], prompt_ids, response_ids,
                           pad_id=rm.tokenizer.pad_token_id, batch_tokens=batch_tokens, desc=desc)
    reward = lp[0] - lp[1]
    reward[~np.isfinite(reward)] = math.nan
    return {"reward": reward, "logp_policy": lp[0], "logp_reference": lp[1],
            "n_tokens": np.array([len(r) for r in response_ids])}
