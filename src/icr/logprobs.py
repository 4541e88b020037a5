"""Summed log-probs of responses given prompts, on transformers models: the hf scoring engine.

Written here rather than taken from TRL because TRL computes these sums only inside training
batches of chosen/rejected pairs; scoring N free samples per prompt under a *different* prompt
(the English instruction) is not something it offers. What the sums are used for (the implicit
reward, its token sets) is `icr.reward`'s; this module only computes

    sequence_logprobs(models, prompt_ids, response_ids) -> array (len(models), n)

Speed (see bench/score.py, BENCHMARKS.md). Two exact paths, both feeding every model the same
batches in one pass over the data, both applying the output head only at positions that predict a
response token (log-prob = logit - logsumexp, in chunks; never a log-softmax over the prompt):

- shared prompt (default where the model allows): each *distinct* prompt is run once (prompts
  sorted by length, right-padded batches under the token budget) and its keys/values kept; the
  responses of that batch of prompts are then sorted by length across prompts and run in
  sub-batches on top of the gathered prompt caches (explicit positions and a 4-D mask, so prompts
  of different lengths share a sub-batch with no padding in the response part). The first response
  token's log-prob comes from the prompt pass; a response's last token is never fed.
- plain (fallback): prompt + response per row, sorted by total length, packed under the budget.

The shared-prompt path needs a model whose decoder takes a key/value cache (`cache=` from
transformers 5.24, `past_key_values=` before; see icr.compat) and builds a plain
`DynamicCache` (full attention on every layer: Llama, Qwen2/3, Mistral without a sliding window,
...) with sdpa or eager attention; other models (sliding-window or hybrid caches, flash-attention
kernels that take no 4-D mask, no separable decoder) take the plain path, model by model.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .compat import cache_kwarg, output_cache, takes_cache


def _output_head(model):
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return head, softcap


def _decoder(model):
    # Llama/Mistral/Qwen/Gemma: model.model is the decoder stack returning hidden states.
    return model.get_decoder() if hasattr(model, "get_decoder") else None


def make_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first), packed so that rows x longest <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        width = max(longest, lengths[i])
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def split_sorted(lengths: list[int], batch_tokens: int, overhead: int) -> list[list[int]]:
    """Indices sorted by length (longest first), cut into contiguous sub-batches of least cost.

    Cost of a sub-batch = rows x its longest + `overhead` (the fixed cost of one forward, in
    token-equivalents); rows x longest <= batch_tokens unless a single row. Exact minimum by
    dynamic programming over the sorted lengths: it pays padding only where another forward
    would cost more (greedy packing to the budget pads every row to the longest of the lot).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not order:
        return []
    width = np.array([lengths[i] for i in order], dtype=np.int64)
    n = len(order)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        starts = np.arange(j)
        cost = best[:j] + (j - starts) * width[:j] + overhead
        cost[((j - starts) * width[:j] > batch_tokens) & (j - starts > 1)] = np.inf
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], k
    batches, j = [], n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = int(cut[j])
    return batches[::-1]


HEAD_CHUNK = 4096  # positions per output-head call: bounds the (positions x vocabulary) logits tensor
SUBBATCH_OVERHEAD_CPU = 1024  # see split_sorted; measured: 96 made CPU scoring 2x slower (small matmuls)


def _token_logprobs(head, softcap, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each row of `hidden` (positions x hidden size), in fp32, head applied in chunks."""
    out = []
    for s in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[s:s + HEAD_CHUNK]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        tgt = targets[s:s + HEAD_CHUNK].unsqueeze(-1)
        out.append(logits.gather(-1, tgt).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


@torch.inference_mode()
def _batch_logprobs(model, ids, mask, resp_mask, targets) -> torch.Tensor:
    """Summed log-probs of target tokens at positions where resp_mask is set; one value per row."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    decoder = _decoder(model)
    head, softcap = _output_head(model)
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        token_lp = _token_logprobs(head, softcap, hidden[resp_mask], targets[resp_mask])
    else:  # generic fallback: full logits
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[resp_mask].float()
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets[resp_mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.nonzero(resp_mask)[:, 0]
    out = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    out.index_add_(0, rows, token_lp.double())
    return out


def _plain_logprobs(models, prompt_ids, response_ids, pad_id, batch_tokens, padding_side, bar) -> np.ndarray:
    """Prompt + response per row, rows sorted by length and packed under the token budget."""
    n = len(prompt_ids)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    out = np.zeros((len(models), n), dtype=np.float64)
    device = next(models[0].parameters()).device
    for batch in make_batches(lengths, batch_tokens):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        targets = torch.zeros_like(ids)
        resp_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, i in enumerate(batch):
            seq = prompt_ids[i] + response_ids[i]
            off = width - len(seq) if padding_side == "left" else 0
            ids[row, off:off + len(seq)] = torch.tensor(seq)
            mask[row, off:off + len(seq)] = 1
            # position j predicts token j+1: positions from the last prompt token to the one before the end
            start = off + len(prompt_ids[i]) - 1
            stop = off + len(seq) - 1
            targets[row, start:stop] = torch.tensor(seq[len(prompt_ids[i]):])
            resp_mask[row, start:stop] = True
        ids, mask, targets, resp_mask = (t.to(device) for t in (ids, mask, targets, resp_mask))
        for m, model in enumerate(models):
            out[m, batch] = _batch_logprobs(model, ids, mask, resp_mask, targets).cpu().numpy()
        bar.update(len(batch))
    return out


def supports_shared_prompt(model) -> bool:
    """Whether `model`'s prompt keys/values can be computed once and reused under a 4-D mask."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    decoder, (head, _) = _decoder(model), _output_head(model)
    config = getattr(model, "config", None)
    if decoder is None or head is None or config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False  # flash-attention kernels take no 4-D mask
    try:
        if not takes_cache(decoder):
            return False
        layers = DynamicCache(config=config).layers
    except Exception:  # noqa: BLE001 - any surprise means: take the plain path
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _distinct_prompts(prompt_ids, response_ids) -> tuple[list, list[int], list[list[int]]]:
    """(distinct prompts, owner: row -> its prompt's index, rows with a non-empty response per prompt)."""
    distinct: dict[tuple, int] = {}
    prompts, owner = [], []
    for p in prompt_ids:
        k = distinct.setdefault(tuple(p), len(prompts))
        if k == len(prompts):
            prompts.append(p)
        owner.append(k)
    by_prompt: list[list[int]] = [[] for _ in prompts]
    for i, k in enumerate(owner):
        if response_ids[i]:  # an empty response has log-prob 0
            by_prompt[k].append(i)
    return prompts, owner, by_prompt


class _Model:
    """What the shared-prompt kernel needs of one model, looked up once."""

    def __init__(self, model):
        self.model, self.decoder, self.head = model, _decoder(model), _output_head(model)
        self.dtype = next(model.parameters()).dtype
        self.cache_name = cache_kwarg(self.decoder)


@torch.inference_mode()
def _shared_prompt_logprobs(models, prompt_ids, response_ids, pad_id, batch_tokens, padding_side,
                            bar) -> np.ndarray:
    """Each distinct prompt run once per model; its responses run on its cached keys/values.

    Distinct prompts are sorted by length and packed into batches under `batch_tokens` (padded
    on `padding_side`, `_prompt_pass`); the responses of one such prompt batch are sorted by length
    *across* its prompts and cut into right-padded sub-batches (`split_sorted`: least padding plus
    per-forward overhead, at most `batch_tokens` response positions each), run on a cache gathered
    from the prompt batch (`_response_pass`).
    """
    out = np.zeros((len(models), len(prompt_ids)), dtype=np.float64)
    device = next(models[0].parameters()).device
    prompts, owner, by_prompt = _distinct_prompts(prompt_ids, response_ids)
    ms = [_Model(model) for model in models]
    # fixed cost of one forward in token-equivalents: a forward of few tokens runs its matmuls
    # inefficiently on CPU and leaves an accelerator idle
    overhead = SUBBATCH_OVERHEAD_CPU if device.type == "cpu" else max(SUBBATCH_OVERHEAD_CPU, batch_tokens // 4)
    for group in make_batches([len(p) for p in prompts], batch_tokens):
        group = [k for k in group if by_prompt[k]]
        if not group:
            continue
        items = [i for k in group for i in by_prompt[k]]
        row_of = {k: row for row, k in enumerate(group)}
        rows_of_items = [row_of[owner[i]] for i in items]
        kvs, valid, lens, width = _prompt_pass(ms, [prompts[k] for k in group], items, rows_of_items,
                                               response_ids, pad_id, padding_side, device, out)
        rest = [i for i in items if len(response_ids[i]) > 1]
        for batch in split_sorted([len(response_ids[i]) - 1 for i in rest], batch_tokens, overhead):
            sel = [rest[j] for j in batch]
            _response_pass(ms, kvs, valid, lens, width, sel, [row_of[owner[i]] for i in sel], response_ids,
                           pad_id, padding_side, device, out)
        bar.update(len(items))
        del kvs
    return out


def _prompt_pass(ms, prompts, items, item_rows, response_ids, pad_id, padding_side, device, out):
    """Run one batch of distinct prompts through every model, keeping their keys/values; add each
    response's first-token log-prob (predicted by its prompt's last position) to `out`.
    Returns (per model: [(keys, values) per layer], the prompt batch's mask, prompt lengths, width)."""
    from transformers.cache_utils import DynamicCache

    lens = torch.tensor([len(p) for p in prompts])
    width = int(lens.max())
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        off = width - len(p) if padding_side == "left" else 0
        ids[row, off:off + len(p)] = torch.tensor(p)
        mask[row, off:off + len(p)] = 1
    last = torch.full_like(lens, width - 1) if padding_side == "left" else lens - 1
    item_rows = torch.tensor(item_rows)
    first = torch.tensor([response_ids[i][0] for i in items])
    ids, mask, pos = ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    kvs = []
    for m, spec in enumerate(ms):
        res = spec.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                           **{spec.cache_name: DynamicCache(config=spec.model.config)})
        kvs.append([(layer.keys, layer.values) for layer in output_cache(res).layers])
        hid = res.last_hidden_state[torch.arange(len(prompts), device=device), last.to(device)]
        lp = _token_logprobs(*spec.head, hid[item_rows.to(device)], first.to(device))
        out[m, items] = lp.double().cpu().numpy()
        del res, hid
    return kvs, mask.bool(), lens, width


def _response_pass(ms, kvs, valid, lens, width, sel, sel_rows, response_ids, pad_id, padding_side, device, out):
    """The rest of each response in `sel` (feed tokens [0, len-1), predict [1, len)) on top of its
    prompt's cached keys/values: explicit positions (prompt length + offset) and a 4-D mask (its
    prompt's valid columns of the shared window, then causal), so prompts of different lengths
    share the sub-batch with no padding in the response part. Adds the sums to `out`."""
    from transformers.cache_utils import DynamicCache

    rows = torch.tensor(sel_rows, device=device)
    plen = lens[sel_rows]
    win = int(plen.max())
    c0, c1 = (width - win, width) if padding_side == "left" else (0, win)
    r = max(len(response_ids[i]) - 1 for i in sel)
    inp = torch.full((len(sel), r), pad_id, dtype=torch.long)
    targets = torch.zeros_like(inp)
    tmask = torch.zeros_like(inp, dtype=torch.bool)
    for b, i in enumerate(sel):
        resp = response_ids[i]
        inp[b, :len(resp) - 1] = torch.tensor(resp[:-1])
        targets[b, :len(resp) - 1] = torch.tensor(resp[1:])
        tmask[b, :len(resp) - 1] = True
    inp, targets, tmask = inp.to(device), targets.to(device), tmask.to(device)
    positions = plen.to(device)[:, None] + torch.arange(r, device=device)[None, :]
    causal = torch.ones((r, r), dtype=torch.bool, device=device).tril()
    allowed = torch.cat([valid[rows, c0:c1][:, None, :].expand(-1, r, -1),
                         causal[None].expand(len(sel), -1, -1)], dim=-1)[:, None]
    masks: dict = {}
    for m, spec in enumerate(ms):
        if spec.dtype not in masks:
            masks[spec.dtype] = torch.zeros(allowed.shape, dtype=spec.dtype, device=device).masked_fill(
                ~allowed, torch.finfo(spec.dtype).min)
        cache = DynamicCache([(k.index_select(0, rows)[:, :, c0:c1], v.index_select(0, rows)[:, :, c0:c1])
                              for k, v in kvs[m]])
        hidden = spec.decoder(input_ids=inp, attention_mask=masks[spec.dtype], position_ids=positions,
                              use_cache=True, **{spec.cache_name: cache}).last_hidden_state
        lp = _token_logprobs(*spec.head, hidden[tmask], targets[tmask])
        sums = torch.zeros(len(sel), dtype=torch.float64, device=device)
        sums.index_add_(0, torch.nonzero(tmask)[:, 0], lp.double())
        out[m, sel] += sums.cpu().numpy()
        del cache, hidden


def sequence_logprobs(models: list, prompt_ids: list[list[int]], response_ids: list[list[int]], *,
                      pad_id: int, batch_tokens: int = 8192, padding_side: str = "right",
                      desc: str | None = None, shared_prompt: bool | None = None) -> np.ndarray:
    """Summed log-probs of each response given its prompt, for each model: array (len(models), n).

    `shared_prompt`: None (default) takes the shared-prompt path for every model that supports it
    (`supports_shared_prompt`) and the plain path for the others; True insists on it (ValueError
    where a model can't); False always takes the plain path. Both give the same sums (to float
    rounding; tested within 1e-4 in fp32). Models on the same path see the same batches, in one
    pass over the data. Every prompt must have at least one token.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (its last one predicts the first response token)")
    n = len(prompt_ids)
    out = np.zeros((len(models), n), dtype=np.float64)
    if n == 0 or not models:
        return out
    if shared_prompt is False:
        fast = [False] * len(models)
    else:
        fast = [supports_shared_prompt(model) for model in models]
        if shared_prompt and not all(fast):
            raise ValueError("shared_prompt=True, but a model's keys/values can't be reused "
                             "(see supports_shared_prompt)")
    for use_fast in (True, False):
        which = [m for m, f in enumerate(fast) if f == use_fast]
        if not which:
            continue
        bar = tqdm(total=n, desc=desc or "score", unit="resp", disable=desc is None, leave=False)
        fn = _shared_prompt_logprobs if use_fast else _plain_logprobs
        out[which] = fn([models[m] for m in which], prompt_ids, response_ids, pad_id, batch_tokens,
                        padding_side, bar)
        bar.close()
    return out
