"""Sampling responses from a policy, behind one interface with two backends.

`hf`: transformers `generate` (CPU or GPU). `vllm`: vLLM (GPUs; optional extra, imported only when
chosen). Both take chat conversations, render them with the tokenizer's own chat template, and
return `Sample`s that record whether each ended by itself or hit the token limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import IcrError


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 0.9
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 42


@dataclass
class Sample:
    text: str
    finished: bool  # ended with the end-of-turn token (False: hit max_new_tokens)
    n_tokens: int


def sample_from_tokens(tokens: list[int], eos_ids, tokenizer) -> Sample:
    """A generated token list cut at the first end token (which counts in `n_tokens`, not in text)."""
    end = next((j for j, t in enumerate(tokens) if t in eos_ids), None)
    body = tokens if end is None else tokens[:end]
    text = tokenizer.decode(body, skip_special_tokens=True)
    return Sample(text=text, finished=end is not None, n_tokens=len(body) + (end is not None))


class GenerationBackend(Protocol):
    tokenizer: object

    def generate(self, conversations: list[list[dict]], params: SamplingParams,
                 desc: str | None = None) -> list[list[Sample]]: ...

    def close(self) -> None: ...


def load_backend(name: str, model_path: str, **options) -> GenerationBackend:
    """Backends by name; heavy imports happen only for the one chosen."""
    if name == "hf":
        from .hf import HFBackend

        return HFBackend(model_path, **options)
    if name == "vllm":
        from .vllm import VLLMBackend

        return VLLMBackend(model_path, **options)
    raise IcrError(f"generation.backend: unknown backend {name!r} (available: hf, vllm)")
