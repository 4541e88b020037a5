"""The implicit-reward scorer: exact log-probs, TRL agreement, direction, tokenizer checks."""

import numpy as np
import pytest

from icr.errors import IcrError
from icr.models import check_same_tokenizer, load_causal_lm, load_tokenizer
from icr.logprobs import make_batches, sequence_logprobs
from icr.reward import RewardModels, implicit_rewards, reward_conversation, tokenize_pair

from .conftest import plain_logprob

PREFIX = ("Please answer the following instruction using only {language}, unless explicitly instructed to "
          "respond in a different language.\n\n")




def _examples(tok):
    responses = ["A colour: red.", "Ein Tier: Hund. " * 12, "x", "", "Sure! Here is a fruit for you: plum."]
    convs = [[{"role": "user", "content": f"Name a colour. (#{i})" * (1 + 3 * (i % 2))}] for i in range(len(responses))]
    return convs, responses, [tokenize_pair(tok, c, r) for c, r in zip(convs, responses)]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_tokens", [16, 64, 100000])
def test_batched_logprobs_equal_plain_path(models, padding_side, batch_tokens):
    tok, dpo, sft = models
    _, _, pairs = _examples(tok)
    got = sequence_logprobs([dpo, sft], [p for p, _ in pairs], [r for _, r in pairs], pad_id=tok.pad_token_id,
                            batch_tokens=batch_tokens, padding_side=padding_side)
    for m, model in enumerate([dpo, sft]):
        want = [plain_logprob(model, p, r) for p, r in pairs]
        np.testing.assert_allclose(got[m], want, atol=1e-4, rtol=0)


def test_response_ids_include_end_of_turn_and_length_one(models):
    tok, _, _ = models
    _, resp = tokenize_pair(tok, [{"role": "user", "content": "Hi"}], "")
    assert resp == [tok.eos_token_id]  # empty answer: just the end-of-turn token
    _, resp = tokenize_pair(tok, [{"role": "user", "content": "Hi"}], "red")
    assert resp[-1] == tok.eos_token_id and len(resp) >= 2


def test_make_batches_respects_budget_and_covers_all():
    lengths = [5, 100, 7, 50, 3, 100, 1]
    batches = make_batches(lengths, 128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 128 or len(b) == 1 for b in batches)


def test_equal_to_trl_reference_logps(models, tiny_pair, tmp_path):
    """Our sums equal the reference log-probs TRL's DPOTrainer precomputes for the same pairs."""
    from icr.config import TrainConfig
    from icr.train import dpo_config, pairs_to_dataset
    from trl import DPOTrainer

    tok, dpo, sft = models
    pairs = [{"prompt": f"Nombra un color. (#{i})", "chosen": "Un color: rojo." * (1 + i % 3),
              "rejected": "¡Claro! Aquí tienes un color para ti."} for i in range(6)]
    args = dpo_config(TrainConfig(precompute_ref_log_probs=True, per_device_batch_size=2, max_length=None),
                      tmp_path, 0, "cpu", len(pairs))
    tok.padding_side = "right"
    trainer = DPOTrainer(model=load_causal_lm(tiny_pair["dpo"], "cpu"), ref_model=sft, args=args,
                         train_dataset=pairs_to_dataset(pairs), processing_class=tok)
    ds = trainer.train_dataset
    rm = RewardModels(policy=dpo, reference=sft, tokenizer=tok)
    convs = [[{"role": "user", "content": p["prompt"]}] for p in pairs]
    ours_chosen = implicit_rewards(rm, convs, [p["chosen"] for p in pairs])["logp_reference"]
    ours_rejected = implicit_rewards(rm, convs, [p["rejected"] for p in pairs])["logp_reference"]
    np.testing.assert_allclose(ours_chosen, ds["ref_chosen_logps"], atol=1e-4)
    np.testing.assert_allclose(ours_rejected, ds["ref_rejected_logps"], atol=1e-4)


def test_reward_direction(models):
    """A response the DPO side favours over the reference gets the higher reward."""
    tok, dpo, sft = models
    rm = RewardModels(policy=dpo, reference=sft, tokenizer=tok)
    conv = [{"role": "user", "content": "Name a colour. (#1)"}]
    # pi0 was fitted further on concise English answers, so it favours them relative to pi_SFT.
    res = implicit_rewards(rm, [conv, conv], ["A colour: red.", "Sure! Here is a colour for you, a lovely one: red. I hope this helps you."])
    assert res["reward"][0] > res["reward"][1]
    np.testing.assert_allclose(res["reward"], res["logp_policy"] - res["logp_reference"])
    same = implicit_rewards(RewardModels(dpo, dpo, tok), [conv], ["A colour: red."])
    assert same["reward"][0] == 0.0


def test_reward_conversation_variants():
    cross = reward_conversation("cross_lingual", "ru", "Назови цвет.", "Name a colour.", PREFIX)
    assert cross[0]["content"] == PREFIX.format(language="Russian") + "Name a colour."
    assert reward_conversation("cross_lingual", "en", "Name a colour.", "Name a colour.", PREFIX)[0]["content"] == "Name a colour."
    assert reward_conversation("multilingual", "ru", "Назови цвет.", "Name a colour.", PREFIX)[0]["content"] == "Назови цвет."


def test_tokenizer_mismatch_is_refused(tiny_pair, other_tokenizer_model):
    a = load_tokenizer(tiny_pair["dpo"])
    check_same_tokenizer(a, load_tokenizer(tiny_pair["sft"]), "dpo", "sft")
    with pytest.raises(IcrError, match="different tokenizers"):
        check_same_tokenizer(a, load_tokenizer(other_tokenizer_model), "dpo", "other")


def test_model_without_chat_template(tmp_path, tiny_pair):
    from icr.tiny import build_tokenizer

    tok = build_tokenizer(["some text here"], vocab_size=280, chat_template=None)
    tok.save_pretrained(tmp_path)
    with pytest.raises(IcrError, match="has no chat template; set models.chat_template"):
        load_tokenizer(str(tmp_path))
    from icr.tiny import CHAT_TEMPLATE

    assert load_tokenizer(str(tmp_path), CHAT_TEMPLATE).chat_template == CHAT_TEMPLATE
    with pytest.raises(IcrError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
