"""Loading models and tokenizers (hub ids or local folders) the same way everywhere.

One loader serves the tiny test models and an 8B model: device and dtype are resolved here (fp32
on CPU, bf16 on GPU), the chat template is checked here, and the two reward models' tokenizers
are compared here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import IcrError


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise IcrError("device: cuda requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise IcrError(f"models.dtype: unknown dtype {dtype!r} (auto, float32, bfloat16, float16)") from None


def _check_exists(name_or_path: str, what: str) -> None:
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 2)[-1]
    if Path(name_or_path).expanduser().exists():
        return
    if looks_local or name_or_path.count("/") > 1 or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise IcrError(f"{what}: model path {name_or_path!r} does not exist")


def load_tokenizer(name_or_path: str, chat_template: str | None = None, what: str = "model"):
    """A tokenizer with a usable chat template and a pad token."""
    from transformers import AutoTokenizer

    _check_exists(name_or_path, what)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise IcrError(f"{what}: cannot load tokenizer from {name_or_path!r} ({str(e).splitlines()[0]})") from None
    if chat_template:
        path = Path(chat_template)
        tok.chat_template = path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.is_file() else chat_template
    if not getattr(tok, "chat_template", None):
        raise IcrError(f"{what}: tokenizer of {name_or_path!r} has no chat template; "
                       "set models.chat_template to a Jinja template or a .jinja file")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, device: str = "auto", dtype: str = "auto", what: str = "model"):
    from transformers import AutoModelForCausalLM

    _check_exists(name_or_path, what)
    device = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype, device))
    except OSError as e:
        raise IcrError(f"{what}: cannot load model from {name_or_path!r} ({str(e).splitlines()[0]})") from None
    model.to(device)
    model.eval()
    return model


def check_same_tokenizer(tok_a, tok_b, name_a: str, name_b: str) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise IcrError(f"reward models {name_a!r} and {name_b!r} have different tokenizers "
                       f"(vocab sizes {len(tok_a.get_vocab())} vs {len(tok_b.get_vocab())}); "
                       "the implicit reward needs both on the same token ids")
    if tok_a.chat_template != tok_b.chat_template or tok_a.eos_token_id != tok_b.eos_token_id:
        raise IcrError(f"reward models {name_a!r} and {name_b!r} differ in chat template or end token")


def chat_messages(instruction: str) -> list[dict]:
    return [{"role": "user", "content": instruction}]


def release_memory() -> None:
    """Return freed memory after a model is dropped: collect reference cycles (transformers models
    hold some), then give cached CUDA blocks back so the next stage or process can have them."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
