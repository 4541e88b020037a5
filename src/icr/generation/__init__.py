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
