"""Sampler benchmark: the `hf` backend against a naive loop (one `generate` call per sample).

    .venv/bin/python bench/generate.py [--quick]

Same model, prompts and sampling settings for both: a byte-level BPE tokenizer (icr.tiny) trained
on the sample prompts, a Llama-architecture model with random weights (hidden 256, 4 layers),
5 languages x 4 prompts (X-AlpacaEval / UltraFeedback sample text, chat template applied), N=10
samples each, temperature 0.9, max_new_tokens 32. A random model does not stop early, so every
sample runs to max_new_tokens in both: the figure isolates batching and prompt sharing (early
stopping of a finished batch helps the `hf` backend further on real models).

- naive: for each prompt, for each of its N samples, `model.generate` on that one prompt.
- ours: `HFBackend.generate` (prompts sorted by length, left-padded batches, each prompt prefilled
  once and its cache copied to its N samples).
- expanded: the same backend with `prefill_once=False` (generate's own num_return_sequences
  expansion, N prefills per prompt), to show what prefill-once saves.
samples/s = samples / seconds. The two run back to back, naive first, after a shared warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

from common import LANGS, SHARED_DATA, finish, n_params, skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 languages x 1 prompt, 8 new tokens")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per language")
    ap.add_argument("--n", type=int, default=10, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (hf backend)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    langs = LANGS[:2] if args.quick else LANGS
    if args.quick:
        args.prompts, args.max_new_tokens = 1, 8
    uf = SHARED_DATA / "ultrafeedback-multilingual-sample"
    if not uf.is_dir():
        return skip("generate", "sample data folder ../shared/data is absent")

    import torch

    from icr.generation import SamplingParams
    from icr.generation.hf import HFBackend
    from icr.tiny import build_model, build_tokenizer

    texts = {lang: [json.loads(x)["instruction"][:300] for x in (uf / f"{lang}.jsonl").read_text().splitlines()]
             for lang in LANGS}
    tok = build_tokenizer([t for ts in texts.values() for t in ts], vocab_size=4000)
    model = build_model(tok, hidden_size=args.hidden, num_layers=args.layers, max_position_embeddings=2048).eval()
    convs = [[{"role": "user", "content": t}] for lang in langs for t in texts[lang][:args.prompts]]
    params = SamplingParams(n=args.n, temperature=0.9, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    backend = HFBackend("unused", device="cpu", model=model, tokenizer=tok, batch_size=args.batch_size)
    prompt_ids = backend.encode(convs)
    eos = backend.eos_ids

    def naive():
        out = []
        with torch.inference_mode():
            for p in prompt_ids:
                ids = torch.tensor([p])
                for _ in range(args.n):
                    g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                       temperature=0.9, top_p=None, top_k=0, max_new_tokens=args.max_new_tokens,
                                       eos_token_id=eos, pad_token_id=tok.pad_token_id)
                    out.append(g.shape[1] - ids.shape[1])
        return out

    backend.generate(convs[:1], SamplingParams(n=2, max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    naive_new = naive()
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = backend.generate(convs, params, prompt_ids=prompt_ids)
    t_ours = time.perf_counter() - t0
    # The same backend without prefill-once (generate's own num_return_sequences expansion): shows
    # what encoding each prompt once saves, and that it changes no sample.
    backend.prefill_once = False
    t0 = time.perf_counter()
    expanded = backend.generate(convs, params, prompt_ids=prompt_ids)
    t_expanded = time.perf_counter() - t0
    n = len(convs) * args.n
    figures = {"bench": "generate", "ours_samples_s": round(n / t_ours, 2), "naive_samples_s": round(n / t_naive, 2),
               "speedup": round(t_naive / t_ours, 3), "ours_s": round(t_ours, 2), "naive_s": round(t_naive, 2),
               "expanded_s": round(t_expanded, 2), "prefill_once_gain": round(t_expanded / t_ours, 3),
               "prefill_once_same_samples": ours == expanded,
               "samples": n, "prompts": len(convs), "n": args.n, "max_new_tokens": args.max_new_tokens,
               "mean_new_tokens_ours": round(sum(s.n_tokens for ss in ours for s in ss) / n, 1),
               "mean_new_tokens_naive": round(sum(naive_new) / n, 1),
               "mean_prompt_tokens": round(sum(map(len, prompt_ids)) / len(prompt_ids), 1),
               "params": n_params(model), "threads": torch.get_num_threads(), "quick": args.quick}
    finish(f"generate: hf backend {figures['ours_samples_s']} samples/s vs naive loop {figures['naive_samples_s']} "
           f"samples/s = {figures['speedup']}x ({n} samples, N={args.n}, {args.max_new_tokens} new tokens, "
           f"{n_params(model) / 1e6:.1f} M params)", figures)


if __name__ == "__main__":
    main()
