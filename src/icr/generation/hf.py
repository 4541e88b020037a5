"""The `hf` backend: batched transformers `generate`.

Each prompt is encoded once and expanded to its N samples inside `generate`
(`num_return_sequences`); prompts are sorted by length so a batch pads little; a batch stops as
soon as all its sequences have emitted the end token. Sampling is seeded per batch, so the same
prompts, order and seed give the same samples.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..compat import cache_kwarg
from ..models import load_causal_lm, load_tokenizer, release_memory, resolve_device
from . import Sample, SamplingParams, sample_from_tokens


class HFBackend:
    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto",
                 chat_template: str | None = None, batch_size: int = 8, model=None, tokenizer=None,
                 prefill_once: bool = True):
        self.device = resolve_device(device)
        self.tokenizer = tokenizer or load_tokenizer(model_path, chat_template, what="policy")
        self.model = model or load_causal_lm(model_path, self.device, dtype, what="policy")
        self.batch_size = batch_size
        # Prefill each prompt once for its N samples (needs a model whose cache can be copied
        # along the batch; transformers' DynamicCache can). False: generate's own expansion.
        self.prefill_once = prefill_once
        gen_eos = self.model.generation_config.eos_token_id
        eos = set(gen_eos if isinstance(gen_eos, list) else [gen_eos]) if gen_eos is not None else set()
        eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(i for i in eos if i is not None)

    def encode(self, conversations: list[list[dict]]) -> list[list[int]]:
        return [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"] for c in conversations]

    @torch.inference_mode()
    def generate(self, conversations, params: SamplingParams, desc: str | None = None,
                 prompt_ids: list[list[int]] | None = None) -> list[list[Sample]]:
        prompt_ids = prompt_ids if prompt_ids is not None else self.encode(conversations)
        order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
        results: list[list[Sample] | None] = [None] * len(prompt_ids)
        pad = self.tokenizer.pad_token_id
        greedy = params.temperature == 0
        n_return = 1 if greedy else params.n  # greedy samples are all the same: decode once, repeat
        bar = tqdm(total=len(order) * params.n, desc=desc or "generate", unit="sample", disable=desc is None,
                   leave=False)
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start:start + self.batch_size]
            width = max(len(prompt_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: generation continues from the right edge
                p = prompt_ids[i]
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            extra = {"num_return_sequences": n_return}
            if n_return > 1 and self.prefill_once and width > 1:
                # Encode each prompt once: prefill the batch's prompts (all but the last token), copy
                # the cache to the N samples, and let generate continue from it. Same logits, same
                # random draws as generate's own expansion, without N prefills per prompt.
                cache = self._prefill(ids[:, :-1], mask[:, :-1])
                cache.batch_repeat_interleave(n_return)
                ids, mask = ids.repeat_interleave(n_return, 0), mask.repeat_interleave(n_return, 0)
                extra = {cache_kwarg(self.model): cache}
            torch.manual_seed(params.seed * 1_000_003 + b)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask,
                do_sample=not greedy, temperature=None if greedy else params.temperature,
                top_p=None if greedy else params.top_p, top_k=None if greedy else 0,
                max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_ids, pad_token_id=pad, **extra)
            new = out[:, width:].cpu()
            for row, i in enumerate(idx):
                results[i] = [self._to_sample(new[row * n_return + (k % n_return)].tolist())
                              for k in range(params.n)]
            bar.update(len(idx) * params.n)
        bar.close()
        return results

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        # generate's own position rule for left padding: cumulative mask, padding at 0
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                   **{cache_kwarg(self.model): cache})
        return cache

    def _to_sample(self, tokens: list[int]) -> Sample:
        return sample_from_tokens(tokens, self.eos_ids, self.tokenizer)

    def close(self) -> None:
        """Drop the model and give its memory back (the caller may still hold the model it passed in)."""
        self.model = None
        release_memory()
