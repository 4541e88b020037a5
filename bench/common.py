"""Shared helpers of the bench scripts: the random-weight model, sample-data lengths, output format.

Every script prints a one-line human summary and, as its LAST line, one JSON object of figures.
Ratios are measured within one run (baseline and ours interleaved or back to back), because the
machines these run on are shared and absolute times drift.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ICR_SHARED_DATA", REPO.parent / "shared" / "data"))
LANGS = ["en", "es", "de", "fr", "ru"]  # the languages with X-AlpacaEval reference answers in the sample
TEMPLATE_OVERHEAD = 30  # chat template + cross-lingual prefix naming the language, in tokens


def random_llama(hidden: int = 512, layers: int = 8, vocab: int = 32000, seed: int = 0):
    """A Llama-architecture causal LM with random weights (speed only), fp32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=True,
                      max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sample_lengths(scale: float, max_prompt: int, max_response: int) -> dict | None:
    """Per language: prompt and response lengths in tokens, estimated as ceil(characters / 4).

    Prompts: X-AlpacaEval instructions and UltraFeedback prompts of that language, plus
    TEMPLATE_OVERHEAD; responses: X-AlpacaEval reference answers, plus 1 (end of turn). Then
    multiplied by `scale` (keeps the shape of the distribution at CPU-sized cost) and capped.
    None when the sample data folder is absent.
    """
    xa, uf = SHARED_DATA / "x-alpacaeval-sample", SHARED_DATA / "ultrafeedback-multilingual-sample"
    if not xa.is_dir() or not uf.is_dir():
        return None

    def tok(chars: int, extra: int, cap: int) -> int:
        return max(1, min(cap, round((math.ceil(chars / 4) + extra) * scale)))

    out = {}
    for lang in LANGS:
        prompts = [r["instruction"] for r in json.loads((xa / f"{lang}.json").read_text())]
        prompts += [json.loads(line)["instruction"] for line in (uf / f"{lang}.jsonl").read_text().splitlines()
                    if line.strip()]
        answers = [r["output"] for r in json.loads((xa / f"{lang}.reference_outputs.json").read_text())]
        out[lang] = {"prompt": [tok(len(p), TEMPLATE_OVERHEAD, max_prompt) for p in prompts],
                     "response": [tok(len(a), 1, max_response) for a in answers]}
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finish(summary: str, figures: dict) -> None:
    print(summary)
    print(json.dumps(figures, sort_keys=False))
    sys.stdout.flush()


def skip(bench: str, why: str) -> None:
    finish(f"{bench}: skipped: {why}", {"bench": bench, "skipped": why})
