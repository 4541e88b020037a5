"""The shared-prompt (KV-cache) scorer equals the plain path and the obvious one-sequence path."""

import numpy as np
import pytest
import torch

from icr.logprobs import sequence_logprobs, supports_shared_prompt
from icr.reward import RewardModels, implicit_rewards

from .conftest import plain_logprob


def _workload(vocab: int, seed: int = 0):
    """Prompts of 1..120 tokens, each with several responses: length 1, short, and up to 200 tokens."""
    g = np.random.default_rng(seed)
    prompts = [g.integers(4, vocab, size=n).tolist() for n in (1, 7, 30, 120, 8)]
    prompt_ids, response_ids = [], []
    for k, p in enumerate(prompts):
        for n in ([1, 2, 3, 200, 17, 1] if k % 2 == 0 else [5, 64, 1]):
            prompt_ids.append(p)
            response_ids.append(g.integers(4, vocab, size=n).tolist())
    order = g.permutation(len(prompt_ids))  # a prompt's responses are not adjacent
    return [prompt_ids[i] for i in order], [response_ids[i] for i in order]


@pytest.mark.parametrize(("batch_tokens", "padding_side"), [(24, "left"), (200, "right"), (100000, "left")])
def test_shared_prompt_equals_plain(models, padding_side, batch_tokens):
    tok, dpo, sft = models
    assert supports_shared_prompt(dpo) and supports_shared_prompt(sft)
    prompt_ids, response_ids = _workload(len(tok))
    kw = dict(pad_id=tok.pad_token_id, batch_tokens=batch_tokens, padding_side=padding_side)
    fast = sequence_logprobs([dpo, sft], prompt_ids, response_ids, shared_prompt=True, **kw)
    plain = sequence_logprobs([dpo, sft], prompt_ids, response_ids, shared_prompt=False, **kw)
    np.testing.assert_allclose(fast, plain, atol=1e-4, rtol=0)
    # and the obvious path, on a few items (length 1, the 200-token one, a middle one)
    for i in {response_ids.index(r) for r in response_ids if len(r) in (1, 200, 17)}:
        for m, model in enumerate([dpo, sft]):
            assert abs(fast[m, i] - plain_logprob(model, prompt_ids[i], response_ids[i])) <= 1e-4


def test_empty_response_and_input_checks(models):
    tok, dpo, _ = models
    got = sequence_logprobs([dpo], [[5, 6], [5, 6]], [[], [7]], pad_id=tok.pad_token_id, shared_prompt=True)
    assert got[0, 0] == 0.0 and got[0, 1] == pytest.approx(plain_logprob(dpo, [5, 6], [7]), abs=1e-4)
    with pytest.raises(ValueError, match="at least one token"):
        sequence_logprobs([dpo], [[]], [[7]], pad_id=tok.pad_token_id)
    assert sequence_logprobs([dpo], [], [], pad_id=tok.pad_token_id).shape == (1, 0)


def test_fallback_for_model_without_reusable_cache(models):
    """A sliding-window model takes the plain path (alone, or beside a model on the fast path)."""
    from transformers import MistralConfig, MistralForCausalLM

    tok, dpo, _ = models
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                        pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "sdpa"
    sliding = MistralForCausalLM(cfg).eval()
    assert not supports_shared_prompt(sliding)
    prompt_ids, response_ids = _workload(len(tok), seed=1)
    prompt_ids, response_ids = prompt_ids[:8], [r[:12] for r in response_ids[:8]]
    got = sequence_logprobs([dpo, sliding], prompt_ids, response_ids, pad_id=tok.pad_token_id, batch_tokens=64)
    plain = sequence_logprobs([dpo, sliding], prompt_ids, response_ids, pad_id=tok.pad_token_id,
                              batch_tokens=64, shared_prompt=False)
    np.testing.assert_allclose(got, plain, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="can't be reused"):
        sequence_logprobs([sliding], prompt_ids, response_ids, pad_id=tok.pad_token_id, shared_prompt=True)


def test_eager_attention_shared_prompt(tiny_pair, models):
    tok, dpo, _ = models
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_pair["dpo"], attn_implementation="eager").eval()
    assert supports_shared_prompt(eager)
    prompt_ids, response_ids = _workload(len(tok), seed=2)
    fast = sequence_logprobs([eager], prompt_ids, response_ids, pad_id=tok.pad_token_id, batch_tokens=200)
    plain = sequence_logprobs([dpo], prompt_ids, response_ids, pad_id=tok.pad_token_id, shared_prompt=False)
    np.testing.assert_allclose(fast, plain, atol=1e-4, rtol=0)


def test_implicit_rewards_default_path_equals_plain(models):
    tok, dpo, sft = models
    rm = RewardModels(policy=dpo, reference=sft, tokenizer=tok)
    convs = [[{"role": "user", "content": f"Name a colour. (#{i % 3})"}] for i in range(9)]
    responses = ["", "x", "A colour: red.", "Ein Tier: Hund. " * 10, "red", "blue", "Sure! " * 3, "", "plum"]
    fast = implicit_rewards(rm, convs, responses, batch_tokens=64)
    plain = implicit_rewards(rm, convs, responses, batch_tokens=64, shared_prompt=False)
    for key in ("reward", "logp_policy", "logp_reference"):
        np.testing.assert_allclose(fast[key], plain[key], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(fast["n_tokens"], plain["n_tokens"])


def test_split_sorted_covers_all_within_budget_and_beats_greedy_padding():
    from icr.logprobs import make_batches, split_sorted

    g = np.random.default_rng(0)
    lengths = g.integers(1, 120, size=60).tolist()
    batches = split_sorted(lengths, 1024, overhead=16)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 or len(b) == 1 for b in batches)

    def cost(bs):
        return sum(len(b) * max(lengths[i] for i in b) + 16 for b in bs)

    assert cost(batches) <= cost(make_batches(lengths, 1024))
    assert split_sorted([], 10, 1) == [] and split_sorted([500], 10, 1) == [[0]]
