"""A tiny Gemma-3 model written as a GGUF file, the way llama.cpp's converter writes the real one.

Used by the GGUF loader tests and the Gemma-sandbox recipe test so that nothing is downloaded:
a random `Gemma3ForCausalLM` (hidden 32, 2 layers) and a sentencepiece-style vocabulary (special
and turn tokens, 256 byte tokens, characters and a few words) go through `gguf.GGUFWriter` with the
real file's architecture (`gemma3`), tokenizer model (`llama`) and tensor names. Gemma norm
weights are stored as 1 + w, as llama.cpp stores them (transformers subtracts the 1 on load).
"""

from __future__ import annotations

import pytest

from pathlib import Path

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
WORDS = ["▁the", "▁The", "▁is", "▁of", "▁and", "▁Answer", "▁answer", "Answer", "▁Compute", "▁number",
         "▁Respuesta", "▁Antwort", "▁Réponse", "▁Ответ", "▁Jibu", "user", "model", "▁larger", "▁last"]


def world_conversations(n_tasks: int = 60, seed: int = 0) -> list[list[dict]]:
    """Sandbox-world chats in every language with the SFT mix of good and flawed answers."""
    import random

    from icr.sandbox.build import DEFAULTS, sft_conversations
    from icr.sandbox.world import build_world

    world = build_world(seed + 100, 1, 1, 1, 1, n_tasks)
    return sft_conversations(world, random.Random(seed), DEFAULTS)


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and their GGUF token types (1 normal, 2 unknown, 3 control, 6 byte)."""
    tokens, types = [], []
    for t in SPECIALS:
        tokens.append(t)
        types.append(2 if t == "<unk>" else 3)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)
    chars = ["▁", "\n", ":", ".", ",", "?", "!", "+", "*", "-", "(", ")", "'"] + [str(d) for d in range(10)]
    chars += [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars += list("áéíóúñüöäßçèêàОтвеиьяпрсу")
    # every prefix of a word too: the GGUF carries no merges, and transformers rebuilds them from
    # pairs of tokens that are both in the vocabulary, so a word is one token only if its prefixes are
    prefixes = [w[:i] for w in WORDS for i in range(2, len(w) + 1)]
    for t in dict.fromkeys(chars + prefixes):
        tokens.append(t)
        types.append(1)
    return tokens, types


def write_tiny_gemma_gguf(path: str | Path, seed: int = 0, chat_template: str | None = None,
                          fit: list[list[dict]] | None = None, fit_epochs: int = 3) -> dict:
    """Write the tiny model to `path` (a .gguf file); returns its HF state dict and config for checks.

    `fit`: conversations the model is first fitted to (Gemma turn format, plain loop), so the
    stand-in already writes answers in the world's format as the real base does 3-shot; a random
    32-wide model needs far more SFT than a test can afford before any of its samples is well-formed."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokens, types = vocabulary()
    cfg = Gemma3TextConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                           sliding_window=64, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at 0 (= scale 1); make them non-trivial so the +1 matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    path = Path(path)
    if fit:
        _write(path, model, cfg, tokens, types, chat_template)
        from transformers import AutoTokenizer

        from bench.sandbox_gemma import GEMMA_CHAT_TEMPLATE  # the Gemma recipe's turn format
        from icr.tiny import fit_causal_lm

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.chat_template = GEMMA_CHAT_TEMPLATE
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny model: one thread is 10x faster than two contended ones
        try:
            fit_causal_lm(model, tok, fit, epochs=fit_epochs, lr=1e-2, batch_size=16, seed=seed)
        finally:
            torch.set_num_threads(threads)
    _write(path, model, cfg, tokens, types, chat_template)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "config": cfg, "tokens": tokens}


def _write(path: Path, model, cfg, tokens, types, chat_template) -> None:
    import gguf
    import numpy as np

    state = model.state_dict()
    w = gguf.GGUFWriter(str(path), arch="gemma3")
    w.add_name("tiny-gemma3-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_rope_freq_base(float(cfg.rope_parameters["full_attention"]["rope_theta"])
                         if isinstance(getattr(cfg, "rope_parameters", None), dict)
                         and "full_attention" in cfg.rope_parameters else 1_000_000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight":  # tied to the embedding; the file has token_embd only
            continue
        base, _, suffix = hf_name.rpartition(".")
        array = tensor.float().numpy()
        if "norm" in base:
            array = array + 1.0
        w.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_tokenizer_converts_right() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("5.24")


# transformers 5.17 and 5.20 convert a Gemma GGUF tokenizer without its bos token; icr refuses such a
# conversion (icr.models.check_gguf_tokenizer, tests/test_gguf_check.py), so the tests that convert one
# and then use it need 5.24 (the lowest version seen converting it right).
needs_gguf_tokenizer = pytest.mark.skipif(not _gguf_tokenizer_converts_right(),
                                          reason="GGUF tokenizer conversion is wrong before transformers 5.24 "
                                                 "(icr refuses it; see tests/test_gguf_check.py)")
