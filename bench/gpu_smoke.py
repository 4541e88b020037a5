"""GPU smoke test and figures (run by bench/gpu_smoke.sh; not part of the test suite).

On one NVIDIA GPU, with random weights built from configs (nothing is downloaded):
  1. gen:   icr's `hf` sampler, bf16, Llama-3-8B shape, at each --gen-shapes shape (default
            32 prompts x 10 samples x 256 new tokens, and 16 x 4 x 256): tokens/s, peak memory;
  2. score: two Llama-3-8B-shaped models (bf16), 16 prompts x 10 responses with the sample data's
            length distribution (../shared/data), token ids fed directly: the authors' way (batch 3,
            full prompt per response, full-vocabulary log-softmax) vs icr's scorer at batch_tokens
            8192 and 32768 vs a packed floor (unique tokens once, no padding, head only where a
            response token is predicted): seconds, ratios, rewards' largest difference from the
            authors' way, TFLOP/s on unique tokens;
  3. train: a few DPO+NLL steps of a small Llama through icr.train.train_dpo (TRL) when trl is
            importable, else a plain-torch DPO+NLL loop (labelled as such): steps/s, peak memory;
  4. vllm:  icr's `vllm` backend on the same 8B shape (load_format=dummy) when vllm is importable.
Each measurement prints one `RESULT {json}` line; a part that fails prints its error and the rest
go on. gen and score need torch + transformers only (tokenizers comes with transformers); nothing
here imports lingua. --dry-run-cpu runs every part with tiny shapes on the CPU (checks the script).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True)


DEV = "cuda"  # --dry-run-cpu: "cpu" and tiny shapes, to check the script itself where there is no GPU


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak() -> float | None:
    return gib(torch.cuda.max_memory_allocated()) if DEV == "cuda" else None


def empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def result(part: str, **data) -> None:
    print("RESULT " + json.dumps({"part": part, **data}), flush=True)


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def tokenizer_for(vocab_size: int):
    """icr's tiny BPE tokenizer (chat template, end token), padded with filler tokens to `vocab_size`
    so every id a random model samples decodes."""
    from icr.tiny import build_tokenizer

    tok = build_tokenizer(["Name a colour. The answer is red. Réponds en français. Antworte auf Deutsch."] * 50,
                          vocab_size=400)
    missing = vocab_size - len(tok)
    if missing > 0:
        tok.add_tokens([f"<f{i}>" for i in range(missing)])
    return tok


def random_llama(shape: dict, tok, dtype=torch.bfloat16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**shape, "vocab_size": shape.get("vocab_size", len(tok))},
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(DEV):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def prompts(k: int) -> list[list[dict]]:
    base = ["Name a colour and explain why people like it.", "Écris un court poème sur la mer.",
            "Erkläre in zwei Sätzen, was ein Regenbogen ist.", "Describe your favourite animal."]
    return [[{"role": "user", "content": f"{base[i % len(base)]} (#{i})"}] for i in range(k)]


def part_gen(args, tok, model) -> None:
    """icr's hf sampler at each --gen-shapes shape (prompts x samples x new tokens), bf16."""
    from icr.generation import SamplingParams
    from icr.generation.hf import HFBackend

    for shape in args.gen_shapes.split(","):
        k, n, new_tokens = (int(x) for x in shape.split("x"))
        backend = HFBackend("unused", device=DEV, model=model, tokenizer=tok, batch_size=k)
        convs = prompts(k)
        params = SamplingParams(n=n, temperature=0.9, top_p=1.0, max_new_tokens=new_tokens, seed=1)
        backend.generate(convs[:2], SamplingParams(n=2, max_new_tokens=8))  # warm-up
        sync()
        reset_peak()
        t0 = time.time()
        out = backend.generate(convs, params)
        sync()
        dt = time.time() - t0
        tokens = sum(s.n_tokens for ss in out for s in ss)
        result("gen_hf_bf16_llama3_8b_shape", shape=shape, prompts=k, n=n, max_new_tokens=new_tokens,
               tokens=tokens, seconds=round(dt, 2), tokens_per_s=round(tokens / dt, 1), peak_gib=peak())


def score_workload(n_prompts: int, n_responses: int, vocab: int, seed: int = 0) -> tuple[list, list, str]:
    """Token ids with the sample data's length distribution: `n_prompts` prompts, `n_responses` each.

    Lengths are drawn from ../shared/data (bench/common.sample_lengths at full scale: prompt =
    instruction + 30 template tokens, response = reference answer, characters / 4; all languages
    pooled). Without the data folder: the means measured from it (prompt 267, response 473 tokens)
    with a geometric spread, and the RESULT line says so."""
    import numpy as np

    sys.path.insert(0, str(REPO / "bench"))
    from common import sample_lengths

    g = np.random.default_rng(seed)
    lengths = sample_lengths(1.0, max_prompt=2048, max_response=2048)
    if lengths:
        pool_p = [x for v in lengths.values() for x in v["prompt"]]
        pool_r = [x for v in lengths.values() for x in v["response"]]
        p_len = g.choice(pool_p, n_prompts)
        r_len = g.choice(pool_r, (n_prompts, n_responses))
        source = "../shared/data"
    else:
        p_len = np.clip(g.geometric(1 / 267, n_prompts), 8, 2048)
        r_len = np.clip(g.geometric(1 / 473, (n_prompts, n_responses)), 1, 2048)
        source = "geometric, means 267/473 (../shared/data absent)"
    if DEV == "cpu":  # --dry-run-cpu: same shape of workload, 1/16 of the lengths
        p_len, r_len = np.maximum(p_len // 16, 2), np.maximum(r_len // 16, 1)
    prompt_ids, response_ids = [], []
    for i in range(n_prompts):
        p = g.integers(400, vocab, int(p_len[i])).tolist()
        for j in range(n_responses):
            prompt_ids.append(p)
            response_ids.append(g.integers(400, vocab, int(r_len[i, j])).tolist())
    return prompt_ids, response_ids, source


@torch.inference_mode()
def authors_logprobs(model, prompt_ids, response_ids, pad_id: int, batch: int = 3) -> list[float]:
    """The reference implementation's way: batches of 3 in data order, each row the full prompt +
    response, right padding, full logits and a full-vocabulary log-softmax at every position."""
    out = []
    for s in range(0, len(prompt_ids), batch):
        seqs = [p + r for p, r in zip(prompt_ids[s:s + batch], response_ids[s:s + batch])]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, device=DEV)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq, device=DEV)
            mask[row, :len(seq)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row in range(len(seqs)):
            p, r = prompt_ids[s + row], response_ids[s + row]
            pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=DEV)
            out.append(logp[row, pos, torch.tensor(r, device=DEV)].double().sum().item())
        del logp
    return out


@torch.inference_mode()
def floor_pass(model, prompt_ids, response_ids, batch_tokens: int) -> None:
    """Not a scorer: the least work an exact one could do. Each distinct prompt and each response
    once, packed back to back without padding in rows of the mean sequence length, the output head
    and log-sum-exp only at as many positions as there are response tokens."""
    import numpy as np

    distinct = {tuple(p): p for p in prompt_ids}
    flat = [t for p in distinct.values() for t in p] + [t for r in response_ids for t in r]
    n_head = sum(map(len, response_ids))
    width = max(1, round(float(np.mean([len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]))))
    rows = [flat[s:s + width] for s in range(0, len(flat), width)]
    per_batch = max(1, batch_tokens // width)
    head, hidden_size, done = model.get_output_embeddings(), model.config.hidden_size, 0
    for s in range(0, len(rows), per_batch):
        chunk = rows[s:s + per_batch]
        full = [r for r in chunk if len(r) == width]
        for part in ([full] if full else []) + [[r] for r in chunk if len(r) != width]:
            hidden = model.model(input_ids=torch.tensor(part, device=DEV)).last_hidden_state.reshape(-1, hidden_size)
            k = min(hidden.shape[0], n_head - done)
            if k > 0:
                torch.logsumexp(head(hidden[:k]).float(), -1)
                done += k


def part_score(args, tok, model) -> None:
    """Two 8B-shaped models: the authors' way vs icr's scorer (each --batch-tokens) vs the floor."""
    import numpy as np

    from icr.logprobs import sequence_logprobs

    reference = random_llama(LLAMA3_8B, tok, seed=1)
    models = [model, reference]
    prompt_ids, response_ids, source = score_workload(args.score_prompts, args.score_responses,
                                                      LLAMA3_8B["vocab_size"])
    pad = tok.pad_token_id
    seq_tokens = sum(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    unique_tokens = sum(len(p) for p in {tuple(p): p for p in prompt_ids}.values()) + sum(map(len, response_ids))
    warm = slice(0, min(6, len(prompt_ids)))
    sequence_logprobs(models, prompt_ids[warm], response_ids[warm], pad_id=pad, batch_tokens=2048)
    authors_logprobs(model, prompt_ids[warm], response_ids[warm], pad)

    def timed(fn):
        empty_cache()
        sync()
        reset_peak()
        t0 = time.time()
        value = fn()
        sync()
        return value, time.time() - t0, peak()

    runs = {}
    authors, t, mem = timed(lambda: np.array([authors_logprobs(m, prompt_ids, response_ids, pad) for m in models]))
    runs["authors_batch3_full_vocab"] = (t, mem, authors)
    for bt in (int(x) for x in args.batch_tokens.split(",")):
        lp, t, mem = timed(lambda bt=bt: sequence_logprobs(models, prompt_ids, response_ids, pad_id=pad,
                                                           batch_tokens=bt))
        runs[f"icr_batch_tokens_{bt}"] = (t, mem, lp)
    _, t, mem = timed(lambda: [floor_pass(m, prompt_ids, response_ids, max(int(x) for x in args.batch_tokens.split(",")))
                               for m in models])
    runs["floor_packed_unique_tokens"] = (t, mem, None)
    reward_authors = authors[0] - authors[1]
    t_authors, t_floor = runs["authors_batch3_full_vocab"][0], runs["floor_packed_unique_tokens"][0]
    n_params = sum(p.numel() for p in model.parameters())
    for name, (t, mem, lp) in runs.items():
        extra = {}
        if lp is not None:
            extra["max_abs_reward_diff_vs_authors"] = round(float(np.abs((lp[0] - lp[1]) - reward_authors).max()), 4)
        result("score_two_llama3_8b_shape", method=name, prompts=args.score_prompts,
               responses_per_prompt=args.score_responses, lengths=source, sequence_tokens=seq_tokens,
               unique_tokens=unique_tokens, seconds=round(t, 2), speedup_vs_authors=round(t_authors / t, 2),
               times_floor=round(t / t_floor, 2),
               tflops_on_unique_tokens=round(2 * 2 * n_params * unique_tokens / t / 1e12, 1),
               peak_gib=mem, **extra)
    del reference, models


def _pairs(k: int) -> list[dict]:
    return [{"prompt": p[0]["content"], "chosen": f"A good answer number {i}. " * 20,
             "rejected": f"A worse answer {i}. " * 15} for i, p in enumerate(prompts(k))]


def part_train(args, tmp: Path) -> None:
    tok = tokenizer_for(0)
    small = random_llama(SMALL, tok, dtype=torch.float32)
    n_params = sum(p.numel() for p in small.parameters())
    try:
        import trl  # noqa: F401
    except ImportError:
        print("train: trl is not importable: measuring a plain-torch DPO+NLL loop instead. To run the real "
              "path (icr.train.train_dpo via TRL), bring wheels: see bench/gpu_smoke.sh --fetch-wheels",
              flush=True)
        return _train_plain_torch(args, tok, small, n_params)
    from icr.config import TrainConfig
    from icr.train import train_dpo

    for name, m in (("policy", small), ("ref", small)):
        m.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    del small
    empty_cache()
    cfg = TrainConfig(per_device_batch_size=args.train_batch, learning_rate=1e-6, epochs=1, warmup_ratio=0.0,
                      max_length=512, precision="bf16" if DEV == "cuda" else "fp32", save_steps=10_000, logging_steps=1, nll_weight=1.0)
    pairs = _pairs(args.train_batch * args.train_steps)
    reset_peak()
    t0 = time.time()
    metrics = train_dpo(pairs, str(tmp / "policy"), str(tmp / "ref"), cfg, tmp / "train", tmp / "model",
                        seed=0, device=DEV)
    dt = time.time() - t0
    result("train_dpo_nll_trl_small_llama", params_m=round(n_params / 1e6, 1), steps=metrics["steps"],
           batch=args.train_batch, seconds_incl_setup=round(dt, 2), train_loss=metrics["train_loss"],
           peak_gib=peak(), trl=trl.__version__)


def _train_plain_torch(args, tok, model, n_params) -> None:
    """DPO (beta 0.1, sigmoid) + NLL on chosen (token mean), bf16 autocast, AdamW: what TRL computes."""
    import copy

    import torch.nn.functional as F

    ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def encode(p, a):
        conv = [{"role": "user", "content": p}]
        pre = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(conv + [{"role": "assistant", "content": a}], tokenize=True,
                                       return_dict=True)["input_ids"][:512]
        return full, len(pre)

    def batch_logps(m, seqs):
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, device=DEV)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, (s, cut) in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, cut:len(s)] = True
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
            logits = m(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        tmask = mask[:, 1:]
        return (lp * tmask).sum(-1), lp, tmask

    pairs = _pairs(args.train_batch * args.train_steps)
    sync()
    reset_peak()
    t0, losses, tokens = time.time(), [], 0
    for step in range(args.train_steps):
        chunk = pairs[step * args.train_batch:(step + 1) * args.train_batch]
        seqs = [encode(p["prompt"], p["chosen"]) for p in chunk] + [encode(p["prompt"], p["rejected"]) for p in chunk]
        tokens += sum(len(s) for s, _ in seqs)
        k = len(chunk)
        logp, lp, tmask = batch_logps(model, seqs)
        with torch.no_grad():
            ref_logp, _, _ = batch_logps(ref, seqs)
        margin = 0.1 * ((logp[:k] - ref_logp[:k]) - (logp[k:] - ref_logp[k:]))
        nll = -(lp[:k] * tmask[:k]).sum() / tmask[:k].sum()
        loss = -F.logsigmoid(margin).mean() + 1.0 * nll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
    sync()
    dt = time.time() - t0
    result("train_dpo_nll_plain_torch_small_llama", params_m=round(n_params / 1e6, 1), steps=args.train_steps,
           batch=args.train_batch, seconds=round(dt, 2), steps_per_s=round(args.train_steps / dt, 2),
           tokens_per_s=round(tokens / dt, 1), losses=losses, peak_gib=peak(),
           note="trl not installed; the TRL path was not measured")


def part_vllm(args, tok, tmp: Path) -> None:
    try:
        import vllm
    except ImportError:
        print("vllm: not importable; skipped", flush=True)
        return
    from transformers import LlamaConfig

    from icr.generation import SamplingParams
    from icr.generation.vllm import VLLMBackend

    folder = tmp / "llama3-8b-shape"
    LlamaConfig(**LLAMA3_8B, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                torch_dtype="bfloat16").save_pretrained(folder)
    tok.save_pretrained(folder)
    t0 = time.time()
    backend = VLLMBackend(str(folder), device=DEV, dtype="bfloat16", max_model_len=4096,
                          gpu_memory_utilization=0.85, engine_args={"load_format": "dummy"})
    start = time.time() - t0
    convs = prompts(args.gen_prompts * 4)
    params = SamplingParams(n=args.n, temperature=0.9, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=1)
    t0 = time.time()
    out = backend.generate(convs, params)
    dt = time.time() - t0
    tokens = sum(s.n_tokens for ss in out for s in ss)
    result("gen_vllm_bf16_llama3_8b_shape", vllm=vllm.__version__, prompts=len(convs), n=args.n,
           max_new_tokens=args.max_new_tokens, tokens=tokens, seconds=round(dt, 2),
           tokens_per_s=round(tokens / dt, 1), engine_start_s=round(start, 1),
           note="vLLM reserves gpu_memory_utilization of the GPU; peak torch memory is not comparable")
    backend.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="gen,score,train,vllm")
    p.add_argument("--gen-shapes", default="32x10x256,16x4x256",
                   help="hf sampler shapes: prompts x samples per prompt x new tokens, comma-separated")
    p.add_argument("--n", type=int, default=4, help="samples per prompt in the vllm part")
    p.add_argument("--gen-prompts", type=int, default=16, help="prompts (x4) in the vllm part")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens in the vllm part")
    p.add_argument("--score-prompts", type=int, default=16)
    p.add_argument("--score-responses", type=int, default=10)
    p.add_argument("--batch-tokens", default="8192,32768", help="icr scorer budgets to compare")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on the CPU: checks the script only")
    args = p.parse_args()
    global DEV, LLAMA3_8B, SMALL
    if args.dry_run_cpu:
        DEV = "cpu"
        if args.gen_shapes == p.get_default("gen_shapes"):
            args.gen_shapes = "4x3x8,2x2x4"
        LLAMA3_8B = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
        SMALL = {**SMALL, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2}
    elif not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible", file=sys.stderr)
        return 2
    parts = args.parts.split(",")
    if DEV == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, {gib(torch.cuda.get_device_properties(0).total_memory)} GiB; "
              f"torch {torch.__version__}", flush=True)
    failed = []
    tmp = Path(tempfile.mkdtemp(prefix="icr-gpu-smoke-"))
    tok = tokenizer_for(LLAMA3_8B["vocab_size"]) if {"gen", "score", "vllm"} & set(parts) else None
    model = None
    for part in parts:
        t0 = time.time()
        try:
            if part in ("gen", "score") and model is None:
                model = random_llama(LLAMA3_8B, tok)
                print(f"built Llama-3-8B-shaped model ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
                      f"params, bf16) in {time.time() - t0:.1f} s", flush=True)
            if part == "gen":
                part_gen(args, tok, model)
            elif part == "score":
                part_score(args, tok, model)
            elif part == "train":
                model = None
                empty_cache()
                part_train(args, tmp)
            elif part == "vllm":
                model = None
                empty_cache()
                part_vllm(args, tok, tmp)
            else:
                raise ValueError(f"unknown part {part!r}")
        except Exception:  # noqa: BLE001 - report and go on with the other parts
            failed.append(part)
            traceback.print_exc()
            print(f"FAILED {part}", flush=True)
        empty_cache()
        print(f"[{part}: {time.time() - t0:.1f} s]", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
