"""The device check of issue 19: GPU smoke test and figures (run by bench/gpu_smoke.sh; not part of the test suite).

On one NVIDIA GPU, with random or locally built weights (nothing is downloaded), each part in turn:
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
  4. loop:  the tiny loop, `icr run configs/tiny.yaml` (icr.tiny's locally built pair; 2 iterations of
            generate, score, pairs, train; hf sampler; no evaluation) on the GPU, every GPU stage in
            its own process as `icr run` places them there (isolate_stages), with the memory in use
            on the device (every process's: bench/stage_memory.DeviceMemory, NVML or nvidia-smi)
            before the run and after each stage;
  5. saved_update: one iteration of DPO+NLL at lr 5e-7 (bf16 compute over fp32 master weights)
            through icr's train stage, from the tiny pi0 saved in bf16 (on the bf16 grid, as a hub
            checkpoint released in bf16), trained and saved twice: train.save_dtype float32 (the
            default) and bfloat16. Each saved model is read back from its files; reported per save:
            the share of weights that differ from the start as saved (changed / total), the saved
            tensors' dtypes and the train manifest's saved_dtype; for the float32 save also
            bench/bf16_save.weight_figures (how many of its changes survive rounding to bf16);
  6. vllm:  icr's `vllm` backend on the same 8B shape (load_format=dummy), where vllm is importable.
Default: every part (vllm only where it imports). Each measurement prints `RESULT {json}` lines, and
every part ends with ONE line `SUMMARY <part>: ...` (`SUMMARY <part>: FAILED <reason>` when it
failed, its traceback on stderr; the other parts go on; exit 1 if one failed). Bad arguments: one
line on stderr, exit 2.

lingua is never imported: its wheel (170 MB) cannot travel to the GPU machine. gen and score need
torch + transformers only; train, loop and saved_update need trl and datasets (the wheels are
listed in bench/gpu_smoke.sh); loop and saved_update run without evaluation (whose fidelity needs
lingua) and with the tiny config's language filter off (icr.stages.pairs_language_test then goes
without lingua). tests/test_gpu_smoke.py runs the dry run with a lingua that cannot be imported.

--dry-run-cpu runs every part with tiny shapes on the CPU, to check the script where there is no GPU:
the loop's stages then run in this process (a child process per stage costs ~10 s on the CPU, and
isolation is tested in tests/test_workers.py), and device memory is reported as null with the reason.
No figure of a dry run is a GPU figure.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))  # stage_memory, bf16_save, common
# icr's stage processes (`python -m icr.workers`) find icr in the source tree too, and keep the rest
# of PYTHONPATH (the wheels carried to the GPU machine; the test's lingua blocker).
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [x for x in os.environ.get("PYTHONPATH", "").split(
    os.pathsep) if x and x != str(REPO / "src")])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
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


def peak_text(peak_gib: float | None) -> str:
    return "peak n/a on the CPU" if peak_gib is None else f"peak {peak_gib} GiB"


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


def part_gen(args, tok, model) -> str:
    """icr's hf sampler at each --gen-shapes shape (prompts x samples x new tokens), bf16."""
    from icr.generation import SamplingParams
    from icr.generation.hf import HFBackend

    done = []
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
        done.append(f"{shape} {tokens / dt:.1f} tokens/s ({peak_text(peak())})")
    return "hf sampler, bf16, Llama-3-8B shape (prompts x samples x new tokens): " + "; ".join(done)


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


def part_score(args, tok, model) -> str:
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
    icr_runs = {name: run for name, run in runs.items() if name.startswith("icr_")}
    best = min(icr_runs, key=lambda name: icr_runs[name][0])
    largest = max(float(np.abs((lp[0] - lp[1]) - reward_authors).max()) for _, _, lp in icr_runs.values())
    timings = "; ".join(f"{name.replace('icr_batch_tokens_', 'icr batch_tokens ')} {t:.2f} s"
                        for name, (t, _, _) in icr_runs.items())
    return (f"two Llama-3-8B-shaped models, {len(prompt_ids)} sequences ({unique_tokens} unique tokens): authors' way "
            f"{t_authors:.2f} s; {timings}; unique-token floor {t_floor:.2f} s; best icr "
            f"({best.removeprefix('icr_batch_tokens_')}) = {icr_runs[best][0] / t_floor:.2f} x the floor, "
            f"{t_authors / icr_runs[best][0]:.2f} x faster than the authors' way; largest reward difference from "
            f"the authors' way {largest:.4f}")


def _pairs(k: int) -> list[dict]:
    return [{"prompt": p[0]["content"], "chosen": f"A good answer number {i}. " * 20,
             "rejected": f"A worse answer {i}. " * 15} for i, p in enumerate(prompts(k))]


def part_train(args, tmp: Path) -> str:
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
    return (f"TRL DPO+NLL through icr.train.train_dpo, {n_params / 1e6:.1f} M-parameter Llama: {metrics['steps']} "
            f"steps of batch {args.train_batch} in {dt:.1f} s with set-up ({peak_text(peak())}), trl {trl.__version__}")


def _train_plain_torch(args, tok, model, n_params) -> str:
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
    return (f"plain-torch DPO+NLL loop (trl not importable: icr's TRL path NOT measured), {n_params / 1e6:.1f} "
            f"M-parameter Llama: {args.train_steps / dt:.2f} steps/s of batch {args.train_batch} ({peak_text(peak())})")


def part_vllm(args, tok, tmp: Path) -> str:
    try:
        import vllm
    except ImportError:
        return "skipped: vllm is not importable (its wheel is too large to carry)"
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
    return (f"vllm {vllm.__version__}, Llama-3-8B shape (dummy weights): {tokens / dt:.1f} tokens/s at "
            f"{len(convs)} prompts x {args.n} samples x {args.max_new_tokens} new tokens; engine start {start:.1f} s")


TINY_CONFIG = REPO / "configs" / "tiny.yaml"
UPDATE_LR = "5.0e-7"  # the paper's learning rate (YAML needs the dot to read it as a number)
SAVE_DTYPES = ("float32", "bfloat16")  # train.save_dtype: the default first


def tiny_loop_config(root: Path, isolated: bool, overrides: list[str] = ()):
    """configs/tiny.yaml on DEV under `root`: hf sampler, no evaluation (its fidelity needs lingua),
    language filter off (as the tiny config has it), every GPU stage in its own process if `isolated`."""
    from icr.config import load_config

    return load_config(TINY_CONFIG, [f"run_root={root}", f"device={DEV}", f"isolate_stages={str(isolated).lower()}",
                                     "generation.backend=hf", "evaluation.enabled=false", "pairs.language_filter=false",
                                     *overrides])


def part_loop(args, tmp: Path) -> str:
    """The tiny loop on DEV with the memory in use on the device after each stage (module docstring, 4)."""
    from stage_memory import DeviceMemory, alive_models, held_after_stages, parent_reserved_mib

    from icr.loop import run_experiment

    isolated = DEV == "cuda"
    cfg = tiny_loop_config(tmp / "loop", isolated)
    if DEV == "cuda":
        memory = DeviceMemory()
        not_measured = memory.why_not
    else:
        memory, not_measured = None, "--dry-run-cpu: the loop runs on the CPU, there is no device memory to measure"

    def used() -> list[float | None] | None:
        return memory.used_mib() if memory is not None else None

    stages, t0 = [], time.time()

    def on_stage(stage: str, outcome: dict) -> None:
        stages.append({"stage": stage, "seconds_since_start": round(time.time() - t0, 1),
                       "skipped": bool(isinstance(outcome, dict) and outcome.get("skipped")),
                       "device_used_mib": used(), "parent_reserved_mib": parent_reserved_mib(),
                       "models_alive_in_parent": alive_models()})

    before = used()
    run_experiment(cfg, on_stage=on_stage)
    expected = 4 * cfg.iterations  # generate, score, pairs, train
    ran = [r["stage"] for r in stages if not r["skipped"]]
    if len(ran) != expected:
        raise RuntimeError(f"the loop ran {len(ran)} stages ({', '.join(ran)}), expected {expected}")
    run = {"before_mib": before, "stages": stages}
    held = held_after_stages(run)
    totals = [(sum(r["device_used_mib"]), r["stage"]) for r in stages
              if r["device_used_mib"] is not None and None not in r["device_used_mib"]]
    most_mib, most_after = max(totals) if totals and len(totals) == len(stages) else (None, None)
    alive = max(r["models_alive_in_parent"] for r in stages)
    result("loop_tiny_icr_run", device=DEV, isolated=isolated, iterations=cfg.iterations,
           measured_by=memory.how if memory is not None else None, gpus=memory.names if memory is not None else [],
           not_measured=not_measured, before_mib=before, stages=stages, most_used_mib=most_mib,
           most_used_after=most_after, held_after_stages_mib=held, seconds=round(time.time() - t0, 1))
    placed = "each GPU stage in its own process" if isolated else "in this process"
    if most_mib is None or held is None:
        reason = not_measured or "a GPU reported no figure ([N/A]: MIG or vGPU)"
        memory_text = f"device memory not measured ({reason})"
    else:
        memory_text = (f"device memory in use after a stage at most {gib(most_mib * 2**20)} GiB, after {most_after} "
                       f"({held:+.0f} MiB over the {sum(before):.0f} MiB in use before the run; {memory.how})")
    return f"{len(ran)} stages ok ({placed}), {memory_text}; models alive in this process after a stage: {alive}"


def bf16_start_model(prepared_policy: Path, folder: Path) -> Path:
    """The tiny pi0 saved in bf16 (tokenizer and chat template copied): a start on the bf16 grid, as a
    hub checkpoint released in bf16 and as every iteration after a bf16 save."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(prepared_policy, folder)
    model = AutoModelForCausalLM.from_pretrained(prepared_policy, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def saved_state(folder: Path) -> dict:
    """Every tensor of the model saved in `folder`, as its safetensors files hold it (on the CPU)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{folder}: no safetensors file")
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def saved_update_figures(start: dict, saved: dict, rounding: bool) -> dict:
    """How many weights differ from the start as saved (changed / total), and the saved dtypes; with
    `rounding` (a float32 save) also bench/bf16_save.weight_figures' kept_after_rounding (the share of
    the changed weights that still differ after rounding both to bf16), the median update over half a
    bf16 step, the mean absolute update and relative_l2 (as icr's train metrics report it)."""
    prev = os.environ.get("OMP_NUM_THREADS")
    from bf16_save import weight_figures  # sets OMP_NUM_THREADS if unset: keep the environment as it was

    if prev is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    # A tied output head may be written by one save and left out by the other: a tensor on one side
    # only must be a copy of another tensor of its side, and is counted once.
    for side, other in ((start, saved), (saved, start)):
        for k in set(side) - set(other):
            if not any(j != k and v.shape == side[k].shape and torch.equal(v, side[k]) for j, v in side.items()):
                raise RuntimeError(f"the saved model and its start differ in tensor {k!r}")
    floating = [k for k in start if k in saved and start[k].is_floating_point()]
    figures = weight_figures({k: start[k].float() for k in floating}, {k: saved[k].float() for k in floating})
    total = sum(start[k].numel() for k in floating)
    extra = ("kept_after_rounding", "update_over_half_step_median", "mean_abs_update", "relative_l2") \
        if rounding else ()
    return {"changed": round(figures["changed_share"] * total), "total": total,
            "changed_share": figures["changed_share"], **{k: figures[k] for k in extra},
            "saved_tensor_dtypes": sorted({str(saved[k].dtype).removeprefix("torch.") for k in floating})}


def part_saved_update(args, tmp: Path) -> str:
    """One iteration at lr 5e-7 saved in float32 and in bfloat16; the weights it changed, as saved
    (module docstring, 5)."""
    from icr.loop import run_experiment, run_prepare
    from icr.runs import read_json

    isolated = DEV == "cuda"
    root = tmp / "saved_update"
    prepared = run_prepare(tiny_loop_config(root, isolated))
    start_folder = bf16_start_model(prepared / "dpo", root / "pi0-bf16")
    start = saved_state(start_folder)
    compute = "bf16" if DEV == "cuda" else "fp32"
    saves, states, first_run = {}, {}, None
    for save_dtype in SAVE_DTYPES:
        cfg = tiny_loop_config(root, isolated, [
            f"name=saved-update-{save_dtype}", "iterations=1", f"models.dpo={start_folder}",
            f"train.learning_rate={UPDATE_LR}", f"train.save_dtype={save_dtype}", f"train.precision={compute}"])
        # the second run reuses the first's samples and scores (same keys): only pairs and training run again
        run_dir = run_experiment(cfg, reuse_from=first_run)
        first_run = first_run or run_dir
        manifest = read_json(run_dir / "iter1" / "train" / "manifest.json")
        states[save_dtype] = saved_state(run_dir / "iter1" / "model")
        figures = saved_update_figures(start, states[save_dtype], rounding=save_dtype == "float32")
        if manifest.get("saved_dtype") != save_dtype or figures["saved_tensor_dtypes"] != [save_dtype]:
            raise RuntimeError(f"train.save_dtype {save_dtype}: the manifest says saved_dtype "
                               f"{manifest.get('saved_dtype')!r}, the files hold {figures['saved_tensor_dtypes']}")
        saves[save_dtype] = {"manifest_saved_dtype": manifest["saved_dtype"], "steps": manifest["counts"]["steps"],
                             "pairs": manifest["counts"]["pairs"], "figures": figures}
    fp32, bf16 = saves["float32"], saves["bfloat16"]
    # Whether the two trainings came out the same, so that the saves alone differ (bit for bit on the
    # CPU; a GPU's bf16 kernels need not be deterministic). A tied output head is written by one save
    # only (a copy of the embeddings, checked in saved_update_figures): the tensors both hold are compared.
    bf16_save_is_float32_save_rounded = all(
        torch.equal(states["bfloat16"][k], states["float32"][k].to(torch.bfloat16))
        for k in set(states["float32"]) & set(states["bfloat16"]))
    result("saved_update_lr5e-7", device=DEV, compute=compute, learning_rate=float(UPDATE_LR),
           start="tiny pi0 saved in bf16", saves=saves,
           bf16_save_is_float32_save_rounded=bf16_save_is_float32_save_rounded)
    kept = bf16["figures"]["changed"] / fp32["figures"]["changed"] if fp32["figures"]["changed"] else float("nan")
    return (f"one iteration at lr {float(UPDATE_LR):g} ({fp32['steps']} steps, {compute} compute) from a bf16 start: "
            f"weights changed as saved, float32 save {fp32['figures']['changed_share']:.2%} "
            f"({fp32['figures']['changed']}/{fp32['figures']['total']}), bfloat16 save "
            f"{bf16['figures']['changed_share']:.2%} ({bf16['figures']['changed']}/{bf16['figures']['total']}): "
            f"the bf16 save keeps {kept:.1%} of the changed weights (= the float32 save rounded: "
            f"{'yes' if bf16_save_is_float32_save_rounded else 'no'}); manifests say saved_dtype "
            f"{fp32['manifest_saved_dtype']} / {bf16['manifest_saved_dtype']}")


PARTS = ("gen", "score", "train", "loop", "saved_update", "vllm")


def default_parts() -> str:
    """Every part; vllm only where it can be imported."""
    return ",".join(p for p in PARTS if p != "vllm" or importlib.util.find_spec("vllm") is not None)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # bad arguments: one line, exit 2 (argparse prints the usage too)
        print(f"gpu_smoke: {message}", file=sys.stderr)
        raise SystemExit(2)


def check_arguments(args) -> str | None:
    """What is wrong with the arguments, in one line, or None."""
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or len(set(parts)) != len(parts):
        return f"--parts: {args.parts!r}: each of {', '.join(PARTS)} at most once, comma-separated"
    for shape in args.gen_shapes.split(","):
        numbers = shape.split("x")
        if len(numbers) != 3 or not all(x.isdigit() and int(x) > 0 for x in numbers):
            return f"--gen-shapes: {shape!r} is not prompts x samples x new tokens (e.g. 32x10x256)"
    if not all(x.isdigit() and int(x) > 0 for x in args.batch_tokens.split(",")):
        return f"--batch-tokens: {args.batch_tokens!r} is not positive integers, comma-separated"
    for name in ("n", "gen_prompts", "max_new_tokens", "score_prompts", "score_responses", "train_batch",
                 "train_steps"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}"
    return None


def run_part(part: str, args, tok, model, tmp: Path) -> str:
    """Run one part; return the text of its SUMMARY line."""
    if part == "gen":
        return part_gen(args, tok, model)
    if part == "score":
        return part_score(args, tok, model)
    if part == "train":
        return part_train(args, tmp)
    if part == "loop":
        return part_loop(args, tmp)
    if part == "saved_update":
        return part_saved_update(args, tmp)
    return part_vllm(args, tok, tmp)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=None, help=f"comma-separated, of {', '.join(PARTS)}; default: "
                   "every part (vllm where it imports)")
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
    args = p.parse_args(argv)
    if args.parts is None:
        args.parts = default_parts()
    problem = check_arguments(args)
    if problem:
        print(f"gpu_smoke: {problem}", file=sys.stderr)
        return 2
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
        print("gpu_smoke: no CUDA device visible (--dry-run-cpu checks the script on the CPU)", file=sys.stderr)
        return 2
    parts = args.parts.split(",")
    if DEV == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, {gib(torch.cuda.get_device_properties(0).total_memory)} GiB; "
              f"torch {torch.__version__}", flush=True)
    else:
        print("device: cpu (--dry-run-cpu: tiny shapes, checks the script; no figure here is a GPU figure)", flush=True)
    failed = []
    tmp = Path(tempfile.mkdtemp(prefix="icr-gpu-smoke-"))
    os.environ.setdefault("ICR_CACHE", str(tmp / "icr-cache"))  # the tiny pair is built there, not in the checkout
    tok = tokenizer_for(LLAMA3_8B["vocab_size"]) if {"gen", "score", "vllm"} & set(parts) else None
    model = None
    for part in parts:
        t0 = time.time()
        try:
            if part in ("gen", "score") and model is None:
                model = random_llama(LLAMA3_8B, tok)
                print(f"built Llama-3-8B-shaped model ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
                      f"params, bf16) in {time.time() - t0:.1f} s", flush=True)
            elif part not in ("gen", "score"):  # the other parts build their own models
                model = None
                gc.collect()
                empty_cache()
            summary = run_part(part, args, tok, model, tmp)
        except Exception as e:  # noqa: BLE001 - report and go on with the other parts
            failed.append(part)
            traceback.print_exc()
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            summary = "FAILED " + (reason if len(reason) <= 300 else reason[:297] + "...")
        empty_cache()
        print(f"SUMMARY {part}: {summary} [{time.time() - t0:.1f} s]", flush=True)
    if failed:
        print(f"gpu_smoke: {len(failed)} part(s) failed ({', '.join(failed)}); their files are kept in {tmp}",
              flush=True)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
