"""`reward.token_set: authors` equals the authors' scorer, transcribed (their masking, batching and padding)."""

import numpy as np
import torch
import torch.nn.functional as F

from icr.reward import RewardModels, authors_padded_rows, implicit_rewards, reward_token_ids


def _authors_sums(model, tokenizer, prompt_texts, responses, eos_token, batch_size=3):
    """ZNLP/Implicit-Cross-Lingual-Rewarding utils/compute_reward_score.py: prepare_data (36-72) and the
    log_probs branch of compute_score (95-120), with its setup (182-185), transcribed line by line."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sums = []
    for i in range(0, len(prompt_texts), batch_size):
        batch = list(zip(prompt_texts[i:i + batch_size], responses[i:i + batch_size]))
        eot_id = tokenizer.encode(eos_token, add_special_tokens=False)
        inputs = tokenizer([p + r + eos_token for p, r in batch], return_tensors="pt", padding=True,
                           add_special_tokens=False)
        ppl_mask = torch.ones_like(inputs["input_ids"])
        for idx, (p, _) in enumerate(batch):
            length = tokenizer(p, return_tensors="pt", padding=False, add_special_tokens=False)["input_ids"].size(1)
            ppl_mask[idx, :length] = 0
            ppl_mask[idx, inputs["input_ids"][idx] == tokenizer.pad_token_id] = 0
            ppl_mask[idx, inputs["input_ids"][idx] == eot_id] = 0  # tensor == list: False, masks nothing
        with torch.no_grad():
            logits = model(**inputs, return_dict=True).logits.float()
        n = inputs["input_ids"].size(0)
        logits = logits.view(n, -1, logits.size(-1))[:, :-1, :]
        labels = inputs["input_ids"][:, 1:]
        log_probs = F.log_softmax(logits, dim=-1).gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
        log_probs = log_probs * ppl_mask[:, :-1]
        sums.extend(log_probs.sum(dim=1).tolist())
    return np.array(sums)


def test_authors_token_set_equals_their_scorer(models):
    tok, dpo, sft = models
    assert tok.pad_token_id != tok.eos_token_id  # the case where padded rows add log p(pad | end-of-turn)
    responses = ["A colour: red.", "Ein Tier: Hund. " * 6, "x", "Sure! Here is a fruit: plum.", "ok", "Rojo y azul."
                 " " * 0, "Un deux trois quatre cinq six."]
    convs = [[{"role": "user", "content": f"Name a colour. (#{i})"}] for i in range(len(responses))]
    prompt_texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
    rm = RewardModels(policy=dpo, reference=sft, tokenizer=tok)
    p_ids, r_ids = reward_token_ids(tok, convs, responses)
    padded = authors_padded_rows([len(p) + len(r) for p, r in zip(p_ids, r_ids)],
                                 [i // 3 for i in range(len(responses))])
    assert any(padded) and not all(padded)
    got = implicit_rewards(rm, convs, responses, token_set="authors", padded=padded)
    for key, model in (("logp_policy", dpo), ("logp_reference", sft)):
        want = _authors_sums(model, tok, prompt_texts, responses, tok.eos_token)
        np.testing.assert_allclose(got[key], want, atol=1e-4, rtol=0)
    paper = implicit_rewards(rm, convs, responses)  # the default differs: first token in, no pad term
    assert np.all(np.abs(paper["logp_policy"] - got["logp_policy"]) > 1e-3)
    np.testing.assert_array_equal(paper["n_tokens"], got["n_tokens"])  # n_tokens keep the paper's meaning


def test_score_stage_pads_rows_as_the_authors_batches(models, tmp_path):
    """Batches of 3 consecutive prompts of a language's file, per sample index, across icr's shards."""
    from icr.config import RewardConfig
    from icr.data import Prompt, PromptSet
    from icr.runs import read_jsonl, write_jsonl
    from icr.scoring import authors_padding

    tok, _, _ = models
    ids = ["p0", "p1", "p2", "p3", "p4"]
    prompts = PromptSet({"en": [Prompt(i, f"Question {i}?") for i in ids],
                         "es": [Prompt(i, f"¿Pregunta {i}?") for i in ids]})
    # sample 0: p1 is the longest of batch (p0, p1, p2); sample 1: all equal -> nothing padded; p3/p4 batch 2
    text = {("p0", 0): "a", ("p1", 0): "a b c d e f", ("p2", 0): "a b", ("p3", 0): "a", ("p4", 0): "a",
            ("p0", 1): "x", ("p1", 1): "x", ("p2", 1): "x", ("p3", 1): "x y z", ("p4", 1): "x"}
    recs = [{"id": i, "lang": "es", "prompt": f"¿Pregunta {i}?", "sample": k, "response": text[(i, k)]}
            for i in ids for k in (0, 1)]
    write_jsonl(tmp_path / "shard-00000.jsonl", recs[:4])  # p0, p1 | p2.. in the next shard
    write_jsonl(tmp_path / "shard-00001.jsonl", recs[4:])
    samples = [rec for p in sorted(tmp_path.glob("shard-*.jsonl")) for rec in read_jsonl(p)]
    got = authors_padding(samples, prompts, tok, RewardConfig())
    assert {k for k, v in got.items() if v} == {("es", "p0", 0), ("es", "p2", 0), ("es", "p4", 1)}
