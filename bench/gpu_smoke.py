"""GPU smoke test and figures (run by bench/gpu_smoke.sh; not part of the test suite).

On one NVIDIA GPU, with random weights built from configs (nothing is downloaded):
  1. gen:   icr's `hf` backend, bf16, on a Llama-3-8B-shaped model: sampled tokens/s, peak memory;
  2. score: icr's implicit reward (two 8B-shaped models, bf16): scored tokens/s, peak memory;
  3. train: a few DPO+NLL steps of a small Llama through icr.train.train_dpo (TRL) when trl is
            importable, else a plain-torch DPO+NLL loop (labelled as such): steps/s, peak memory;
  4. vllm:  icr's `vllm` backend on the same 8B shape (load_format=dummy) when vllm is importable.
Each part prints one `RESULT {json}` line; a part that fails prints its error and the rest go on.
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
    from icr.generation import SamplingParams
    from icr.generation.hf import HFBackend

    backend = HFBackend("unused", device=DEV, model=model, tokenizer=tok, batch_size=args.gen_batch)
    convs = prompts(args.gen_prompts)
    params = SamplingParams(n=args.n, temperature=0.9, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=1)
    backend.generate(convs[:2], SamplingParams(n=2, max_new_tokens=8))  # warm-up
    sync()
    reset_peak()
    t0 = time.time()
    out = backend.generate(convs, params)
    sync()
    dt = time.time() - t0
    tokens = sum(s.n_tokens for ss in out for s in ss)
    result("gen_hf_bf16_llama3_8b_shape", prompts=len(convs), n=args.n, batch_prompts=args.gen_batch,
           max_new_tokens=args.max_new_tokens, tokens=tokens, seconds=round(dt, 2),
           tokens_per_s=round(tokens / dt, 1), peak_gib=peak())


def part_score(args, tok, model) -> None:
    from icr.reward import RewardModels, implicit_rewards

    reference = random_llama(LLAMA3_8B, tok, seed=1)
    g = torch.Generator().manual_seed(0)
    convs, responses = [], []
    for i, conv in enumerate(prompts(args.score_samples)):
        n = int(torch.randint(args.score_len // 2, args.score_len * 3 // 2, (1,), generator=g))
        ids = torch.randint(400, len(tok), (n,), generator=g).tolist()
        convs.append(conv)
        responses.append(tok.decode(ids))
    rm = RewardModels(policy=model, reference=reference, tokenizer=tok)
    implicit_rewards(rm, convs[:2], responses[:2], batch_tokens=args.batch_tokens)  # warm-up
    sync()
    reset_peak()
    t0 = time.time()
    res = implicit_rewards(rm, convs, responses, batch_tokens=args.batch_tokens)
    sync()
    dt = time.time() - t0
    resp_tokens = int(res["n_tokens"].sum())
    total = sum(len(tok.apply_chat_template(c + [{"role": "assistant", "content": r}], tokenize=True,
                                            return_dict=True)["input_ids"]) for c, r in zip(convs, responses))
    result("score_hf_bf16_two_llama3_8b_shape", samples=len(convs), batch_tokens=args.batch_tokens,
           response_tokens=resp_tokens, sequence_tokens=total, seconds=round(dt, 2),
           sequence_tokens_per_s_both_models=round(total / dt, 1), samples_per_s=round(len(convs) / dt, 2),
           finite=bool(torch.isfinite(torch.tensor(res["reward"])).all()),
           peak_gib=peak())
    del reference


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
    p.add_argument("--gen-prompts", type=int, default=16)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--score-samples", type=int, default=64)
    p.add_argument("--score-len", type=int, default=400)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on the CPU: checks the script only")
    args = p.parse_args()
    global DEV, LLAMA3_8B, SMALL
    if args.dry_run_cpu:
        DEV = "cpu"
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
