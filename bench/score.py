"""Scorer benchmark: `icr.logprobs.sequence_logprobs` against the reference code's way, same inputs.

    .venv/bin/python bench/score.py [--quick]

Workload: two Llama-architecture models with random weights (default hidden 512, 8 layers, 32k
vocabulary, 41.6 M parameters each), 5 languages x 40 prompts x 10 responses of random token ids.
Lengths are drawn per language from the sample data in ../shared/data (prompts: X-AlpacaEval
instructions + UltraFeedback prompts + 30 tokens of template and language prefix; responses:
X-AlpacaEval reference answers), estimated as ceil(characters / 4) tokens (no tokenizer), then
scaled by --scale (default 1/8: median answer ~500 -> ~63 tokens) and capped, to fit 2 CPU cores.

- naive: what the reference scorer does: each sequence is its full prompt + response, batches of
  3 in data order (a prompt's 10 responses together), right padding, full logits and a full
  log-softmax over every position, one model after the other.
- ours: `sequence_logprobs` with its default path (shared prompt KV cache where the model allows).
- floor: one unpadded forward over exactly the unique tokens (each distinct prompt once, each
  response once, packed back to back in rows of the mean sequence length, no mask), the output
  head only at as many positions as there are response tokens. Not a scorer (its attention spans
  unrelated neighbours); the least work an exact scorer could do.

Timing runs language by language, naive / ours / floor in rotating order, so drift on a shared
machine hits all three alike. tok/s = sum over responses of (prompt + response) tokens, both
models, divided by seconds. Rewards are logp(model A) - logp(model B); max_abs_diff compares them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import finish, n_params, random_llama, sample_lengths, skip


def naive_logprobs(model, prompt_ids, response_ids, pad_id: int = 0, batch: int = 3) -> np.ndarray:
    import torch

    out = np.zeros(len(prompt_ids))
    with torch.inference_mode():
        for s in range(0, len(prompt_ids), batch):
            seqs = [p + r for p, r in zip(prompt_ids[s:s + batch], response_ids[s:s + batch])]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad_id)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(seqs):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for row in range(len(seqs)):
                p, r = prompt_ids[s + row], response_ids[s + row]
                pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
                out[s + row] = logp[row, pos, torch.tensor(r)].double().sum().item()
    return out


def floor_pass(model, prompt_ids, response_ids, batch_tokens: int) -> None:
    import torch

    distinct = {tuple(p): p for p in prompt_ids}
    flat = [t for p in distinct.values() for t in p] + [t for r in response_ids for t in r]
    n_head = sum(map(len, response_ids))
    width = max(1, round(np.mean([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)])))
    rows = [flat[s:s + width] for s in range(0, len(flat), width)]
    per_batch = max(1, batch_tokens // width)
    head = model.get_output_embeddings()
    with torch.inference_mode():
        done = 0
        for s in range(0, len(rows), per_batch):
            chunk = rows[s:s + per_batch]
            full = [r for r in chunk if len(r) == width]
            for part in ([full] if full else []) + [[r] for r in chunk if len(r) != width]:
                hidden = model.model(input_ids=torch.tensor(part)).last_hidden_state.reshape(-1, hidden_size(model))
                k = min(hidden.shape[0], n_head - done)
                if k > 0:
                    logits = head(hidden[:k]).float()
                    torch.logsumexp(logits, -1)
                    done += k


def hidden_size(model) -> int:
    return model.config.hidden_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 prompt per language, hidden 256 / 4 layers: a smoke run of about a minute")
    ap.add_argument("--prompts", type=int, default=40, help="prompts per language")
    ap.add_argument("--responses", type=int, default=10, help="responses per prompt (N)")
    ap.add_argument("--scale", type=float, default=1 / 8, help="length scale applied to the estimated tokens")
    ap.add_argument("--max-prompt", type=int, default=192)
    ap.add_argument("--max-response", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch-tokens", type=int, default=8192, help="our scorer's token budget (config default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.hidden, args.layers = 1, 256, 4
    lengths = sample_lengths(args.scale, args.max_prompt, args.max_response)
    if lengths is None:
        return skip("score", "sample data folder ../shared/data is absent")

    import torch

    from icr.logprobs import sequence_logprobs

    rng = np.random.default_rng(args.seed)
    work = {}
    for lang in lengths:
        prompts, responses = [], []
        for _ in range(args.prompts):
            p = rng.integers(2, args.vocab, size=int(rng.choice(lengths[lang]["prompt"]))).tolist()
            for _ in range(args.responses):
                prompts.append(p)
                responses.append(rng.integers(2, args.vocab, size=int(rng.choice(lengths[lang]["response"]))).tolist())
        work[lang] = (prompts, responses)
    models = [random_llama(args.hidden, args.layers, args.vocab, seed=s) for s in (1, 2)]
    # warm-up (allocator, kernels) outside the timings
    wp, wr = work[next(iter(work))][0][:3], work[next(iter(work))][1][:3]
    sequence_logprobs(models, wp, wr, pad_id=0)
    naive_logprobs(models[0], wp, wr)

    t = {"naive": 0.0, "ours": 0.0, "floor": 0.0}
    naive_r, ours_r, naive_lp, ours_lp = [], [], [], []
    for k, (lang, (prompts, responses)) in enumerate(work.items()):
        jobs = ["naive", "ours", "floor"]
        for job in jobs[k % 3:] + jobs[:k % 3]:
            start = time.perf_counter()
            if job == "naive":
                lp = np.stack([naive_logprobs(m, prompts, responses) for m in models])  # one model after the other
                naive_lp.append(lp)
                naive_r.append(lp[0] - lp[1])
            elif job == "ours":
                lp = sequence_logprobs(models, prompts, responses, pad_id=0, batch_tokens=args.batch_tokens)
                ours_lp.append(lp)
                ours_r.append(lp[0] - lp[1])
            else:
                for m in models:
                    floor_pass(m, prompts, responses, args.batch_tokens)
            t[job] += time.perf_counter() - start
    tokens = sum(len(p) + len(r) for ps, rs in work.values() for p, r in zip(ps, rs))
    unique = sum(len(p) for ps, _ in work.values() for p in {tuple(p): p for p in ps}.values()) + \
        sum(len(r) for _, rs in work.values() for r in rs)
    diff = float(np.max(np.abs(np.concatenate(naive_r) - np.concatenate(ours_r))))
    lp_diff = float(np.max(np.abs(np.concatenate(naive_lp, 1) - np.concatenate(ours_lp, 1))))
    n = sum(len(rs) for _, rs in work.values())
    figures = {
        "bench": "score", "ours_tok_s": round(tokens / t["ours"], 1), "naive_tok_s": round(tokens / t["naive"], 1),
        "speedup": round(t["naive"] / t["ours"], 3), "floor_ratio": round(t["ours"] / t["floor"], 3),
        "max_abs_diff": diff, "max_abs_diff_logp": lp_diff,
        "ours_s": round(t["ours"], 2), "naive_s": round(t["naive"], 2), "floor_s": round(t["floor"], 2),
        "responses": n, "tokens": tokens, "unique_tokens": unique,
        "mean_prompt": round(float(np.mean([len(p) for ps, _ in work.values() for p in ps])), 1),
        "mean_response": round(float(np.mean([len(r) for _, rs in work.values() for r in rs])), 1),
        "params_per_model": n_params(models[0]), "threads": torch.get_num_threads(), "quick": args.quick,
    }
    finish(f"score: ours {figures['ours_tok_s']} tok/s vs naive {figures['naive_tok_s']} tok/s = "
           f"{figures['speedup']}x; ours/floor {figures['floor_ratio']}x; max |reward diff| {diff:.2e} "
           f"({n} responses, {tokens} tokens, 2 models of {n_params(models[0]) / 1e6:.1f} M params)", figures)


if __name__ == "__main__":
    main()
