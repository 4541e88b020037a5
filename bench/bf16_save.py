"""How much of a DPO+NLL iteration survives saving the trained weights in bf16 (issue 19).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bf16_save.py [--seeds 0 1 2] [--quick]

Why: icr trains fp32 master weights with bf16 compute, but some GPU paths save the iteration's model
rounded to bf16 (DeepSpeed ZeRO with `stage3_gather_16bit_weights_on_model_save`, LoRA merged into a
bf16 base). At the paper's learning rate most weights move by less than half a bf16 step in one
iteration; this measures what that rounding costs in the quantity DPO trains, the implicit reward
margin on held-out pairs, and what it costs a two-iteration run, whose second iteration trains from
the saved weights.

What runs (plain torch, not TRL, to keep it fast and every number traceable; the loss, optimizer and
schedule are the ones icr's train stage uses through TRL):

* World: a first-order Markov chain over 256 synthetic tokens (rows: softmax of 3 x N(0,1) logits).
  Pairs: a 16-token prompt from the chain, chosen = 16 more tokens from the chain, rejected = 16
  tokens where each token is, with probability 0.25, a uniform random token instead.
* Model: a Llama (transformers LlamaForCausalLM, sdpa), hidden 128, 4 layers, 4 heads (2 KV),
  MLP 384, untied embeddings (as Llama-3-8B), 0.85M parameters, initialised as transformers does
  (normal, std 0.02: Llama's initializer_range), then pretrained 300 AdamW steps (lr 2e-3, batch 16 x
  32 tokens, fp32) on chain text: a non-random start (loss 5.5 -> ~3.0 nats, the chain's floor ~2.6)
  whose matrices have an RMS of ~0.03 (reported as param_rms). The weights' scale is what matters: a
  bf16 step is 2^-7 of the weight's binade, so the question is |update| against |weight| / 256, and
  AdamW moves a weight by at most about the learning rate per step whatever the model's size.
* The start of iteration 1 is the pretrained model rounded to bf16, like a hub checkpoint released in
  bf16 and like any iteration that follows a bf16 save.
* One iteration: 470 optimizer steps (the paper's ~470: ~15k pairs / batch 32) of DPO (sigmoid,
  beta 0.1) + NLL (weight 1, mean over chosen tokens, TRL's "sft" loss) on fresh pairs, batch 8 pairs,
  AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0, the Trainer's defaults), lr 5e-7 with icr's
  default schedule (10% linear warm-up, cosine; transformers' get_cosine_schedule_with_warmup),
  gradient clipping at 1.0 (Trainer default); fp32 master weights, forward under
  torch.autocast(cpu, bfloat16), as the Trainer's bf16 mode; the reference is the start model held
  in bf16 (icr loads the reference in bf16 on GPUs).
* Measured on 256 held-out pairs: Delta = mean over pairs of [(log pi(c) - log pi(r)) -
  (log pi_start(c) - log pi_start(r))] (sequence log-probs summed over the response tokens), for
  the fp32-saved weights theta and the bf16-saved weights round(theta) = theta.to(bfloat16), each
  evaluated in two computes: fp32, and bf16 (model cast to bf16, as vLLM/HF bf16 sampling and scoring
  run it; the start model likewise). delta_se: the standard error of the mean over the pairs.
  Snapshots at 50, 100, 200 and 470 steps of the same run (so the early ones are under warm-up or
  near-peak learning rates of a 470-step schedule, not separate shorter iterations).
  - share_bf16_save = Delta(round(theta), fp32 compute) / Delta(theta, fp32 compute): how much of the
    update survives the rounding of the save;
  - share_seen_in_bf16 = Delta(theta, bf16 compute) / Delta(theta, fp32 compute): how much a bf16
    forward pass sees at all. In bf16 compute the fp32 and bf16 saves are the *same* model (a bf16
    forward rounds the weights exactly as the save does; checked bit for bit, `bf16_compute_identical`);
  - kept_after_rounding: weights that differ from the start after rounding both to bf16, over weights
    that differ in fp32; update_over_half_step: median |update| / half the bf16 spacing at the weight;
    consistency: mean |update| / sum of the step learning rates (1 = every step moved every weight by
    the full learning rate in one direction; Adam's normalised steps are at most about that);
    relative_l2: |update| / |start| over all weights, as icr's train stage reports it
    (weight_change.relative_l2 in its metrics), to set a real run beside these figures.
* Two iterations (the pipeline question): iteration 2 trains 470 more steps on fresh pairs from the
  saved iteration-1 model, once from theta_1 (fp32 save; reference theta_1 in bf16) and once from
  round(theta_1) (bf16 save; reference the same), and saves theta_2 resp. round(theta_2'). Reported:
  the total margin change from the iteration-1 start, in fp32 and in bf16 compute, and the bf16
  pipeline's share of the fp32 pipeline's. Iteration 2 of the fp32 pipeline is also reported as one
  iteration from a start that is *not* on the bf16 grid.
* LoRA (icr's `train.lora` defaults: r 16, alpha 32, dropout 0.05, all seven Llama projections; peft,
  adapters fp32 over the bf16 base, as icr's GPU path loads it; same lr, schedule and data): the
  adapter kept separate, merged into the bf16 base (peft merge_and_unload on the bf16 model: what
  icr's train stage saves), and merged into the base upcast to fp32.

Prints progress to stderr, a one-line summary, then one JSON object (the figures per seed and their
spread over seeds, icr.stats.spread). `--quick` runs 1 seed, 120 steps, no LoRA.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import finish  # noqa: E402

VOCAB, PROMPT, RESPONSE = 256, 16, 16
SNAPSHOTS = (50, 100, 200, 470)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The synthetic world and the model
# ---------------------------------------------------------------------------------------------

class World:
    """A Markov chain over VOCAB tokens; clean text from it, rejected answers with corrupted tokens."""

    def __init__(self, seed: int, vocab: int = VOCAB, sharpness: float = 3.0, corrupt: float = 0.25):
        import torch

        self.g = torch.Generator().manual_seed(10_000 + seed)
        self.vocab, self.corrupt = vocab, corrupt
        self.probs = torch.softmax(torch.randn(vocab, vocab, generator=self.g) * sharpness, dim=-1)

    def text(self, n: int, length: int, first=None):
        import torch

        out = torch.empty(n, length, dtype=torch.long)
        prev = torch.randint(0, self.vocab, (n,), generator=self.g) if first is None else first
        for t in range(length):
            prev = torch.multinomial(self.probs[prev], 1, generator=self.g).squeeze(1)
            out[:, t] = prev
        return out

    def pairs(self, n: int):
        """(prompt, chosen, rejected): LongTensors (n, PROMPT) and (n, RESPONSE) x 2."""
        import torch

        prompt = self.text(n, PROMPT)
        chosen = self.text(n, RESPONSE, prompt[:, -1])
        clean = self.text(n, RESPONSE, prompt[:, -1])
        noise = torch.randint(0, self.vocab, clean.shape, generator=self.g)
        rejected = torch.where(torch.rand(clean.shape, generator=self.g) < self.corrupt, noise, clean)
        return prompt, chosen, rejected

    def entropy(self) -> float:
        """Per-token entropy of the chain under its stationary distribution (the best possible loss)."""
        import torch

        pi = torch.full((self.vocab,), 1.0 / self.vocab)
        for _ in range(200):
            pi = pi @ self.probs
        h = -(self.probs * self.probs.clamp_min(1e-30).log()).sum(-1)
        return float((pi * h).sum())


def build_model(hidden: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=PROMPT + RESPONSE, tie_word_embeddings=False,
                      pad_token_id=None, bos_token_id=None, eos_token_id=None)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def pretrain(model, world: World, steps: int, lr: float = 2e-3, batch: int = 16) -> dict:
    """Next-token training on chain text (fp32), so that DPO starts from a model that knows the chain."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 10), steps)
    model.train()
    losses = []
    for _ in range(steps):
        ids = world.text(batch, PROMPT + RESPONSE)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    k = max(1, min(20, steps // 5))
    return {"steps": steps, "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
            "loss_floor": world.entropy(), "loss_uniform": math.log(VOCAB)}


# ---------------------------------------------------------------------------------------------
# Log-probs, DPO+NLL
# ---------------------------------------------------------------------------------------------

def response_logps(model, prompt, response, exact: bool = False):
    """Sum of log pi(response | prompt) per row; the log-softmax in fp32 (fp64 when `exact`: evaluation)
    whatever dtype the logits were computed in."""
    import torch

    ids = torch.cat([prompt, response], dim=1)
    logits = model(input_ids=ids).logits[:, prompt.shape[1] - 1:-1]
    logits = logits.double() if exact else logits.float()
    return torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1).sum(-1)


def pair_logps(model, prompt, chosen, rejected, exact: bool = False):
    """(log pi(chosen), log pi(rejected)) in one forward pass of 2n rows."""
    import torch

    lp = response_logps(model, torch.cat([prompt, prompt]), torch.cat([chosen, rejected]), exact)
    return lp[:len(prompt)], lp[len(prompt):]


def dpo_nll_iteration(policy, reference, world: World, *, steps: int, lr: float, batch: int, beta: float = 0.1,
                      nll_weight: float = 1.0, warmup_ratio: float = 0.1, snapshots=(), seed: int = 0,
                      label: str = "") -> tuple[dict, dict]:
    """Train `policy` in place (its trainable parameters are the fp32 masters) for `steps` AdamW steps of
    DPO(sigmoid)+NLL against `reference`, forward under bf16 autocast. Returns ({step: state_dict copy}
    at `snapshots` and at the end, {step: sum of the learning rates of the steps taken up to it})."""
    import torch
    import torch.nn.functional as F
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(warmup_ratio * steps), steps)
    policy.train()
    reference.eval()
    kept, lr_sums, lr_sum, t0 = {}, {}, 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        prompt, chosen, rejected = world.pairs(batch)
        with torch.no_grad():
            ref_c, ref_r = pair_logps(reference, prompt, chosen, rejected)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pol_c, pol_r = pair_logps(policy, prompt, chosen, rejected)
        logits = beta * ((pol_c - ref_c) - (pol_r - ref_r))
        loss = -F.logsigmoid(logits).mean() + nll_weight * (-pol_c.sum() / chosen.numel())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr_sum += opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step in snapshots or step == steps:
            kept[step] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
            lr_sums[step] = lr_sum
        if step % 50 == 0 or step == steps:
            log(f"  {label} step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    policy.eval()
    return kept, lr_sums


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def rounded(state: dict) -> dict:
    """The weights a bf16 save writes: round to nearest even, kept in fp32 containers."""
    import torch

    return {k: (v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v) for k, v in state.items()}


def margins(model, held, compute: str, batch: int = 128):
    """Per-pair log pi(c) - log pi(r) on the held-out pairs (fp64 tensor), with the model in fp32
    (compute 'fp32') or cast to bf16 (compute 'bf16', as bf16 sampling and scoring run it).
    `model` is cast in place: pass a model of its own."""
    import torch

    model = model.to(torch.bfloat16) if compute == "bf16" else model.float()
    model.eval()
    prompt, chosen, rejected = held
    out = []
    with torch.no_grad():
        for i in range(0, len(prompt), batch):
            c, r = pair_logps(model, prompt[i:i + batch], chosen[i:i + batch], rejected[i:i + batch], exact=True)
            out.append(c - r)
    return torch.cat(out)


def with_state(model, state: dict):
    """A fresh fp32 copy of `model` holding `state`."""
    m = copy.deepcopy(model).float()
    m.load_state_dict(state)
    return m


def weight_figures(start: dict, end: dict, lr_sum: float | None = None) -> dict:
    """How the update end - start compares with bf16's spacing, over all floating-point weights."""
    import torch

    changed = kept = total = 0
    ratios, abs_sum, sq_change, sq_start = [], 0.0, 0.0, 0.0
    for k, w0 in start.items():
        if not w0.is_floating_point():
            continue
        w0, w1 = w0.float(), end[k].float()
        d = (w1 - w0).abs()
        changed += int((w1 != w0).sum())
        kept += int((w1.to(torch.bfloat16) != w0.to(torch.bfloat16)).sum())
        total += w0.numel()
        abs_sum += float(d.double().sum())
        sq_change, sq_start = sq_change + float(d.double().square().sum()), sq_start + float(w0.double().square().sum())
        _, exp = torch.frexp(w0)  # |w0| in [2^(exp-1), 2^exp): bf16 spacing 2^(exp-8), half of it 2^(exp-9)
        half = torch.pow(2.0, (exp - 9).double())
        nz = d > 0
        if nz.any():
            ratios.append((d[nz].double() / half[nz]).flatten())
    r = torch.cat(ratios) if ratios else torch.zeros(1, dtype=torch.float64)
    return {"changed_share": changed / total, "kept_after_rounding": (kept / changed) if changed else None,
            "update_over_half_step_median": float(r.median()),
            "update_over_half_step_above_1": float((r >= 1).double().mean()),
            "mean_abs_update": abs_sum / total,
            "relative_l2": math.sqrt(sq_change / sq_start) if sq_start else None,  # as icr's train metrics
            "consistency": (abs_sum / total) / lr_sum if lr_sum else None}


def param_rms(state: dict) -> dict:
    import torch

    groups = {"all": [], "matrices": [], "embed": [], "attention": [], "mlp": [], "lm_head": [], "norms": []}
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        v = v.double().flatten()
        groups["all"].append(v)
        if "norm" in k:
            groups["norms"].append(v)
            continue
        groups["matrices"].append(v)
        for name, key in (("embed", "embed_tokens"), ("attention", "self_attn"), ("mlp", "mlp"),
                          ("lm_head", "lm_head")):
            if key in k:
                groups[name].append(v)
    return {g: float(torch.cat(vs).pow(2).mean().sqrt()) for g, vs in groups.items() if vs}


def _share(a, b):
    return float(a / b) if b != 0 else None


def _mean_se(per_pair) -> tuple[float, float]:
    n = len(per_pair)
    return float(per_pair.mean()), float(per_pair.std() / math.sqrt(n)) if n > 1 else 0.0


def save_comparison(model, held, base_state: dict, state: dict, base_margins: dict | None = None) -> dict:
    """Delta of the fp32-saved `state` and of its bf16 rounding against `base_state`, in fp32 and bf16
    compute; the shares; the identity check of the two saves in bf16 compute; the weight figures."""
    import torch

    base = base_margins or {c: margins(with_state(model, base_state), held, c) for c in ("fp32", "bf16")}
    delta, se, per = {}, {}, {}
    for c in ("fp32", "bf16"):
        delta[c], se[c] = {}, {}
        for name, st in (("fp32_save", state), ("bf16_save", rounded(state))):
            per[c, name] = margins(with_state(model, st), held, c) - base[c]
            delta[c][name], se[c][name] = _mean_se(per[c, name])
    return {"delta": delta, "delta_se": se,
            "share_bf16_save": _share(delta["fp32"]["bf16_save"], delta["fp32"]["fp32_save"]),
            "share_seen_in_bf16": _share(delta["bf16"]["fp32_save"], delta["fp32"]["fp32_save"]),
            "bf16_compute_identical": bool(torch.equal(per["bf16", "fp32_save"], per["bf16", "bf16_save"]))}


# ---------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------

def run_seed(seed: int, *, hidden: int = 128, layers: int = 4, pretrain_steps: int = 300, steps: int = 470,
             lr: float = 5e-7, batch: int = 8, held_out: int = 256, snapshots=SNAPSHOTS, iteration2: bool = True,
             lora: bool = True, start_on_grid: bool = True) -> dict:
    """All figures of one seed (see the module docstring). Small settings make a test of the arithmetic."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    world = World(seed)
    model = build_model(hidden, layers, seed)
    log(f"seed {seed}: pretraining {pretrain_steps} steps")
    pre = pretrain(model, world, pretrain_steps) if pretrain_steps else {}
    pre_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = rounded(pre_state) if start_on_grid else pre_state
    held = world.pairs(held_out)
    out = {"seed": seed, "pretrain": pre, "param_rms": param_rms(start),
           "params": sum(v.numel() for v in start.values()), "start_on_bf16_grid": start_on_grid}
    base = {c: margins(with_state(model, start), held, c) for c in ("fp32", "bf16")}

    # iteration 1
    policy = with_state(model, start)
    reference = with_state(model, start).to(torch.bfloat16)
    snaps, lr_sums = dpo_nll_iteration(policy, reference, world, steps=steps, lr=lr, batch=batch,
                                       snapshots=tuple(s for s in snapshots if s < steps), seed=seed,
                                       label="iteration 1")
    out["iteration1"] = {str(step): {**save_comparison(model, held, start, st, base),
                                     **weight_figures(start, st, lr_sums[step])} for step, st in snaps.items()}
    theta1 = snaps[steps]
    log(f"seed {seed}: iteration 1 done ({time.perf_counter() - t0:.0f}s); share_bf16_save "
        f"{out['iteration1'][str(steps)]['share_bf16_save']}")

    if iteration2:
        finals = {}
        for pipeline, st1 in (("fp32_pipeline", theta1), ("bf16_pipeline", rounded(theta1))):
            pol = with_state(model, st1)
            ref = with_state(model, st1).to(torch.bfloat16)
            snap2, lr2 = dpo_nll_iteration(pol, ref, world, steps=steps, lr=lr, batch=batch, seed=seed + 1000,
                                           label=f"iteration 2 ({pipeline})")
            finals[pipeline] = (st1, snap2[steps], lr2[steps])
        # each pipeline's saved model after two iterations, against the iteration-1 start
        delta, se = {}, {}
        for c in ("fp32", "bf16"):
            delta[c], se[c] = {}, {}
            for p, saved in (("fp32_pipeline", finals["fp32_pipeline"][1]),
                             ("bf16_pipeline", rounded(finals["bf16_pipeline"][1]))):
                delta[c][p], se[c][p] = _mean_se(margins(with_state(model, saved), held, c) - base[c])
        st1, st2, lr2 = finals["fp32_pipeline"]
        out["iteration2"] = {
            "total_delta": delta, "total_delta_se": se,
            "share_bf16_pipeline_fp32_compute": _share(delta["fp32"]["bf16_pipeline"], delta["fp32"]["fp32_pipeline"]),
            "share_bf16_pipeline_bf16_compute": _share(delta["bf16"]["bf16_pipeline"], delta["bf16"]["fp32_pipeline"]),
            "fp32_pipeline_seen_in_bf16": _share(delta["bf16"]["fp32_pipeline"], delta["fp32"]["fp32_pipeline"]),
            # iteration 2 of the fp32 pipeline: one iteration from a start that is not on the bf16 grid
            "off_grid_start": {**save_comparison(model, held, st1, st2), **weight_figures(st1, st2, lr2)},
        }
        log(f"seed {seed}: iteration 2 done ({time.perf_counter() - t0:.0f}s)")

    if lora:
        out["lora"] = lora_case(model, start, world, held, base, steps=steps, lr=lr, batch=batch, seed=seed)
        log(f"seed {seed}: LoRA done ({time.perf_counter() - t0:.0f}s)")
    out["seconds"] = time.perf_counter() - t0
    return out


def lora_case(model, start: dict, world: World, held, base: dict, *, steps: int, lr: float, batch: int,
              seed: int) -> dict:
    """LoRA adapters (fp32) on the bf16 start: kept, merged into the bf16 base, merged in fp32."""
    import torch
    from peft import LoraConfig, get_peft_model

    bf16_base = with_state(model, start).to(torch.bfloat16)
    reference = copy.deepcopy(bf16_base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(bf16_base, LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    adapter_dtypes = {p.dtype for p in peft_model.parameters() if p.requires_grad}
    dpo_nll_iteration(peft_model, reference, world, steps=steps, lr=lr, batch=batch, seed=seed, label="LoRA")
    peft_model.eval()

    merged_bf16 = copy.deepcopy(peft_model).merge_and_unload()  # on the bf16 base: what icr's train stage saves
    merged_fp32 = copy.deepcopy(peft_model).float().merge_and_unload()
    state_bf16 = {k: v.float() for k, v in merged_bf16.state_dict().items()}
    state_fp32 = {k: v.float() for k, v in merged_fp32.state_dict().items()}
    delta, se = {}, {}
    for c in ("fp32", "bf16"):
        delta[c], se[c] = {}, {}
        for name, m in (("adapter", copy.deepcopy(peft_model)), ("merged_fp32", with_state(model, state_fp32)),
                        ("merged_bf16", with_state(model, state_bf16))):
            delta[c][name], se[c][name] = _mean_se(margins(m, held, c) - base[c])
    same = all(torch.equal(state_bf16[k].to(torch.bfloat16), state_fp32[k].to(torch.bfloat16)) for k in state_bf16)
    w = weight_figures(start, state_fp32)
    return {"adapter_dtypes": sorted(str(d) for d in adapter_dtypes), "delta": delta, "delta_se": se,
            "share_merged_bf16": _share(delta["fp32"]["merged_bf16"], delta["fp32"]["merged_fp32"]),
            "adapter_seen_in_bf16": _share(delta["bf16"]["adapter"], delta["fp32"]["adapter"]),
            "merged_seen_in_bf16": _share(delta["bf16"]["merged_fp32"], delta["fp32"]["merged_fp32"]),
            "merged_bf16_equals_merged_fp32_rounded": same,
            **{f"merged_{k}": w[k] for k in ("changed_share", "kept_after_rounding", "update_over_half_step_median")}}


# ---------------------------------------------------------------------------------------------

def summarize(per_seed: list[dict], steps: int) -> dict:
    from icr.stats import spread

    def pick(path):
        vals = []
        for s in per_seed:
            v = s
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals.append(float(v))
        if len(vals) >= 2:
            return spread(vals)
        return {"n": len(vals), "mean": vals[0]} if vals else None

    out = {}
    for step in per_seed[0]["iteration1"]:
        for key in ("share_bf16_save", "share_seen_in_bf16", "changed_share",
                    "kept_after_rounding", "update_over_half_step_median", "update_over_half_step_above_1",
                    "consistency", "relative_l2"):
            out[f"iteration1.{step}.{key}"] = pick(["iteration1", step, key])
        out[f"iteration1.{step}.delta_fp32_fp32_save"] = pick(["iteration1", step, "delta", "fp32", "fp32_save"])
        out[f"iteration1.{step}.delta_fp32_bf16_save"] = pick(["iteration1", step, "delta", "fp32", "bf16_save"])
        out[f"iteration1.{step}.delta_bf16"] = pick(["iteration1", step, "delta", "bf16", "fp32_save"])
    if "iteration2" in per_seed[0]:
        for key in ("share_bf16_pipeline_fp32_compute", "share_bf16_pipeline_bf16_compute",
                    "fp32_pipeline_seen_in_bf16"):
            out[f"iteration2.{key}"] = pick(["iteration2", key])
        for c in ("fp32", "bf16"):
            for p in ("fp32_pipeline", "bf16_pipeline"):
                out[f"iteration2.total_delta.{c}.{p}"] = pick(["iteration2", "total_delta", c, p])
        for key in ("share_bf16_save", "share_seen_in_bf16", "kept_after_rounding", "changed_share",
                    "update_over_half_step_median"):
            out[f"iteration2.off_grid_start.{key}"] = pick(["iteration2", "off_grid_start", key])
    if "lora" in per_seed[0]:
        for key in ("share_merged_bf16", "adapter_seen_in_bf16", "merged_seen_in_bf16",
                    "merged_kept_after_rounding", "merged_update_over_half_step_median"):
            out[f"lora.{key}"] = pick(["lora", key])
        for c in ("fp32", "bf16"):
            for v in ("adapter", "merged_fp32", "merged_bf16"):
                out[f"lora.delta.{c}.{v}"] = pick(["lora", "delta", c, v])
    out["param_rms.matrices"] = pick(["param_rms", "matrices"])
    out["param_rms.all"] = pick(["param_rms", "all"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=470)
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-lora", action="store_true")
    ap.add_argument("--no-iteration2", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 seed, 120 steps, no LoRA")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.no_lora = args.seeds[:1], 120, True
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    snapshots = tuple(s for s in SNAPSHOTS if s < args.steps) + (args.steps,)
    per_seed = [run_seed(s, steps=args.steps, lr=args.lr, batch=args.batch, snapshots=snapshots,
                         iteration2=not args.no_iteration2, lora=not args.no_lora) for s in args.seeds]
    summary = summarize(per_seed, args.steps)
    last = str(args.steps)

    def m(key):
        v = summary.get(key)
        return f"{v['mean']:.3f}" if v else "n/a"

    line = (f"bf16_save: lr {args.lr:g}, {args.steps} steps, seeds {args.seeds}: margin change surviving a bf16 save "
            f"{m(f'iteration1.{last}.share_bf16_save')} (fp32 compute), seen by bf16 compute "
            f"{m(f'iteration1.{last}.share_seen_in_bf16')}; 2 iterations, bf16-save pipeline / fp32-save pipeline "
            f"{m('iteration2.share_bf16_pipeline_bf16_compute')} (bf16 compute); LoRA merged into bf16 "
            f"{m('lora.share_merged_bf16')}")
    finish(line, {"bench": "bf16_save", "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "seeds": args.seeds,
                  "steps": args.steps, "lr": args.lr, "batch": args.batch, "seconds": time.perf_counter() - t0,
                  "summary": summary, "per_seed": per_seed})


if __name__ == "__main__":
    main()
