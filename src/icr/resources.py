"""GPU memory and disk that training needs, estimated from the model's shapes before anything is loaded.

Why this module exists: training is the last stage of an iteration. A full fine-tuning that cannot
fit the GPUs fails with CUDA out of memory at its first optimizer step, and a disk too small for
the saved model or a resume checkpoint fails while writing one: both hours into a run, after
sampling and scoring. Both are simple products of the parameter count, so preflight
(`icr.loop.check_training_resources`, also run by `icr validate`) computes them from the safetensors
headers or config.json (no tensor is read) and refuses a run that cannot fit, with the numbers and
what to set.

Counted, per training process on its GPU: the model states, in the dtypes `icr.train` uses
(`training_dtypes`):

- full fine-tuning without DeepSpeed (one process, DDP, FSDP): the policy held in fp32 (4 bytes per
  parameter), fp32 gradients (4) and AdamW's two fp32 moments (8): 16 bytes per parameter; bf16
  compute runs under autocast, without a second persistent copy;
- under DeepSpeed: the module in bf16 (2), DeepSpeed's fp32 master copy (4), fp32 gradient
  partitions (4) and AdamW (8): 18 bytes per parameter;
- LoRA: the frozen base in bf16 (2 per parameter); only the adapters (r x (in + out) per adapted
  matrix) have weights (fp32), gradients, AdamW state (and a master copy under DeepSpeed);
- parameters matched by `train.freeze` hold no gradients or optimizer state;
- `train.optimizer: adamw_bnb_8bit` (bitsandbytes' 8-bit AdamW, one process or DDP): the two moments
  in one byte each plus one fp32 absmax per 256 values of each, 2.03 bytes per trained parameter
  instead of 8 (`optimizer_state_bytes`); embedding weights and tensors of fewer than 4096 values keep
  fp32 moments (`fp32_state_count`). The fp32 weights and gradients stay as they are;
- the reference model, forward only, in bf16 (2).

Sharding divides by the processes: ZeRO-1 the optimizer state (master + AdamW), ZeRO-2 also the
gradients, ZeRO-3 also the weights, and TRL prepares the reference with ZeRO-3 too (else it is
replicated); FSDP (full shard) shards weights, gradients, optimizer state and the reference
(SHARD_GRAD_OP keeps whole weights). CPU offload moves what it names off the GPU
(`offload_optimizer_device: cpu`: master, gradients and AdamW; `offload_param_device: cpu`, ZeRO-3:
the weights, the reference's too; FSDP `fsdp_offload_params: true`: all of it).

Not counted: activations (they depend on batch size and sequence length), the CUDA context and
allocator fragmentation. The estimate is a floor: a run refused here cannot fit; one accepted may
still need a smaller `train.per_device_batch_size` or `train.gradient_checkpointing`.

Disk: the saved iteration model holds every parameter in train.save_dtype on every training path
(4 bytes in float32, the default; 2 in bfloat16); a resume checkpoint holds the trained weights as
training holds them (fp32; the bf16 module under DeepSpeed on GPUs) plus the optimizer state
(AdamW's 8 bytes per trained parameter, ~2 with the 8-bit optimizer, + the 4-byte master copy under
DeepSpeed): 3 x the fp32 model for fp32 full fine-tuning. A run writes one model per iteration (and
per control) and keeps at least one checkpoint while training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

GIB = 2 ** 30


def gib(n_bytes: float) -> str:
    """Bytes as GiB with one decimal (MiB below 1 GiB: a small model's numbers stay readable)."""
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / 2 ** 20:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Shapes and parameter counts
# ---------------------------------------------------------------------------------------------

def model_shapes(name_or_path: str) -> dict[str, list[int]] | None:
    """Tensor name -> shape of a model, without reading tensor data: from the safetensors headers of
    a local folder or of a hub model's files in the hub cache (exact), else from its config.json
    (`config_shapes`, for the architectures it knows); None when neither tells (a GGUF file, a
    .bin-only model of another architecture)."""
    from .models import is_gguf

    if is_gguf(name_or_path):
        return None
    folder = Path(name_or_path).expanduser()
    shapes = header_shapes(folder if folder.is_dir() else _hub_snapshot(name_or_path))
    if shapes:
        return shapes
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path)
    except Exception:  # noqa: BLE001 - check_model reports a config that does not load
        return None
    return config_shapes(config)


def _hub_snapshot(repo_id: str) -> Path | None:
    """The hub cache's folder of a model id, where its config.json is cached (None otherwise)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def header_shapes(folder: Path | None) -> dict[str, list[int]] | None:
    """Shapes from the safetensors headers of a model folder (model.safetensors, or the shards its
    index names); None when a file is missing or not well-formed (check_model says which)."""
    from .models import safetensors_header

    if folder is None:
        return None
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [folder / f for f in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    else:
        return None
    shapes: dict[str, list[int]] = {}
    for path in files:
        header, problem = safetensors_header(path)
        if problem:
            return None
        shapes.update({name: list(info["shape"]) for name, info in header.items()})
    return shapes or None


# Architectures whose config.json alone gives their tensors (`config_shapes`): Llama's layout of
# attention (q, k, v, o with grouped-query heads) and a gated MLP (gate, up, down), per expert for
# Mixtral. Others (GPT-2's fused attention, non-gated MLPs, shared experts, latent attention) are
# estimated from their safetensors headers only.
LLAMA_LIKE = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
                        "gemma3_text", "phi3", "olmo", "olmo2", "granite"})


def config_shapes(config) -> dict[str, list[int]] | None:
    """The tensor shapes of a decoder-only transformer of a LLAMA_LIKE architecture (Llama, Mistral,
    Qwen, Gemma, ...): embeddings (+ an untied output head), per layer q/k/v/o projections (grouped-query
    heads, optional biases), a gated MLP (gate, up, down; per expert for a mixture of experts) and
    two norms, a final norm. None for another architecture, or when the config lacks vocab_size,
    hidden_size, num_hidden_layers or intermediate_size."""
    outer = config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "model_type", None) not in LLAMA_LIKE:
        return None

    def get(name, default=None):
        value = getattr(config, name, None)
        value = getattr(outer, name, None) if value is None else value
        return default if value is None else value

    vocab, hidden, layers = get("vocab_size"), get("hidden_size"), get("num_hidden_layers")
    inter = get("intermediate_size")
    if not all(isinstance(v, int) and v > 0 for v in (vocab, hidden, layers, inter)):
        return None
    heads = get("num_attention_heads", 1) or 1
    kv_heads = get("num_key_value_heads", heads) or heads
    head_dim = get("head_dim") or hidden // heads
    experts = get("num_local_experts") or get("num_experts") or 1
    expert_inter = get("moe_intermediate_size") or inter
    bias = bool(get("attention_bias", False))
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    if not get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = [vocab, hidden]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = [heads * head_dim, hidden]
        shapes[p + "self_attn.k_proj.weight"] = [kv_heads * head_dim, hidden]
        shapes[p + "self_attn.v_proj.weight"] = [kv_heads * head_dim, hidden]
        shapes[p + "self_attn.o_proj.weight"] = [hidden, heads * head_dim]
        if bias:
            for name, size in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                shapes[p + f"self_attn.{name}_proj.bias"] = [size * head_dim]
        mlps = [(p + "mlp.", inter)] if experts == 1 else \
            [(p + f"mlp.experts.{e}.", expert_inter) for e in range(experts)]
        if experts > 1:
            shapes[p + "mlp.gate.weight"] = [experts, hidden]
        for m, size in mlps:
            shapes[m + "gate_proj.weight"] = [size, hidden]
            shapes[m + "up_proj.weight"] = [size, hidden]
            shapes[m + "down_proj.weight"] = [hidden, size]
        shapes[p + "input_layernorm.weight"] = [hidden]
        shapes[p + "post_attention_layernorm.weight"] = [hidden]
    return shapes


def parameter_count(shapes: dict[str, list[int]], skip: list[str] | None = None) -> int:
    """Parameters in `shapes`, leaving out tensors whose name contains one of `skip` (train.freeze)."""
    return sum(math.prod(shape) for name, shape in shapes.items() if not any(s in name for s in skip or ()))


def lora_parameter_count(shapes: dict[str, list[int]], targets: list[str], r: int) -> int:
    """LoRA's trained parameters: r x (in + out) for each 2-D weight of a module that a target names
    (the module's full name or its last dotted parts, as peft matches)."""
    total = 0
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[: -len(".weight")]
        if any(module == t or module.endswith("." + t) for t in targets):
            total += r * (shape[0] + shape[1])
    return total


# ---------------------------------------------------------------------------------------------
# How training is spread, and what each process holds
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """How training is spread over processes: kind single (one process, no accelerate config) |
    ddp | deepspeed | fsdp, with what is sharded and offloaded."""

    kind: str = "single"
    processes: int = 1
    zero_stage: int = 0  # deepspeed
    shard_weights: bool = True  # fsdp: weights sharded at rest (not SHARD_GRAD_OP / NO_SHARD)
    shard_states: bool = True  # fsdp: gradients and optimizer state sharded (not NO_SHARD)
    offload_optimizer: bool = False
    offload_params: bool = False

    def describe(self) -> str:
        n = f"{self.processes} process{'es' if self.processes != 1 else ''}"
        if self.kind == "deepspeed":
            what = f"DeepSpeed ZeRO-{self.zero_stage}"
        elif self.kind == "fsdp":
            what = "FSDP" if self.shard_weights else ("FSDP SHARD_GRAD_OP" if self.shard_states else "FSDP NO_SHARD")
        elif self.kind == "ddp":
            what = "DDP, nothing sharded"
        else:
            what = "no sharding"
        offload = [w for w, on in (("optimizer", self.offload_optimizer), ("weights", self.offload_params)) if on]
        return f"{what}, {n}" + (f", {' and '.join(offload)} offloaded to the CPU" if offload else "")


def layout_from_accelerate(data: dict | None, processes: int | None = None) -> Layout:
    """The Layout an accelerate config (its parsed YAML) asks for; `processes` overrides its
    num_processes (--num_processes). A DeepSpeed config that names a `deepspeed_config_file` is
    read for its zero_optimization stage and offload devices."""
    if not data:
        return Layout()
    n = processes or int(data.get("num_processes") or 1)
    kind = str(data.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        stage = ds.get("zero_stage", 2)  # accelerate's default (ACCELERATE_DEEPSPEED_ZERO_STAGE)
        opt_dev, param_dev = ds.get("offload_optimizer_device"), ds.get("offload_param_device")
        if ds.get("deepspeed_config_file"):
            try:
                zero = json.loads(Path(ds["deepspeed_config_file"]).expanduser().read_text(encoding="utf-8"))
                zero = zero.get("zero_optimization") or {}
                stage = zero.get("stage", stage)
                opt_dev = (zero.get("offload_optimizer") or {}).get("device", opt_dev)
                param_dev = (zero.get("offload_param") or {}).get("device", param_dev)
            except (OSError, ValueError, AttributeError):
                pass
        try:
            stage = int(stage)
        except (TypeError, ValueError):
            stage = 3  # "auto" or unreadable: the least memory, so nothing is refused on a guess
        cpu = ("cpu", "nvme")
        return Layout("deepspeed", n, zero_stage=stage, offload_optimizer=str(opt_dev).lower() in cpu,
                      offload_params=stage == 3 and str(param_dev).lower() in cpu)
    if kind == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        strategy = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP", "3": "NO_SHARD", "4": "HYBRID_SHARD",
                    "5": "HYBRID_SHARD_ZERO2"}.get(strategy, strategy)
        if int(fsdp.get("fsdp_version", 1) or 1) >= 2:
            shard_weights, shard_states = fsdp.get("fsdp_reshard_after_forward", True) not in (False, "false"), True
        else:
            shard_weights = strategy in ("FULL_SHARD", "HYBRID_SHARD")
            shard_states = strategy != "NO_SHARD"
        offload = str(fsdp.get("fsdp_offload_params", False)).lower() == "true"
        return Layout("fsdp", n, shard_weights=shard_weights, shard_states=shard_states, offload_params=offload,
                      offload_optimizer=offload)
    return Layout("ddp" if n > 1 else "single", n)


# train.optimizer values whose moments are 8-bit: bitsandbytes' AdamW with optim_bits 8 (transformers'
# optim adamw_bnb_8bit, the same name in transformers 5.17 and 5.24).
EIGHT_BIT_OPTIMIZERS = frozenset({"adamw_bnb_8bit"})
ADAMW_STATE_BYTES = 8.0  # AdamW's two fp32 moments (torch, fused or not)
# bitsandbytes' 8-bit AdamW (Optimizer2State, blockwise): m and v as one uint8 each, and per 256-value
# block of each an fp32 absmax: 2 + 2 x 4 / 256 = 2.03125 bytes per parameter.
ADAMW_8BIT_STATE_BYTES = 2.0 + 2 * 4 / 256
# Tensors smaller than this keep fp32 moments under bitsandbytes (its min_8bit_size default).
BNB_MIN_8BIT_SIZE = 4096
# Embedding layers by the last part of their module name (Llama-like embed_tokens, GPT-2's wte and
# wpe, BERT-like word_embeddings): transformers' Trainer registers every nn.Embedding weight with
# bitsandbytes for 32-bit state (Trainer.create_optimizer), so these keep fp32 moments. Names only:
# an embedding called otherwise is counted at 8-bit, which keeps the estimate a floor.
EMBEDDING_MODULES = ("embed_tokens", "wte", "wpe", "word_embeddings")


def fp32_state_count(shapes: dict[str, list[int]], skip: list[str] | None = None) -> int:
    """Of the trained parameters (those no `skip` substring matches: train.freeze), the ones whose
    moments bitsandbytes' 8-bit AdamW keeps in fp32: embedding weights (EMBEDDING_MODULES) and tensors
    of fewer than BNB_MIN_8BIT_SIZE values."""
    total = 0
    for name, shape in shapes.items():
        if any(s in name for s in skip or ()):
            continue
        module = name.rpartition(".")[0]
        size = math.prod(shape)
        if size < BNB_MIN_8BIT_SIZE or module.rpartition(".")[2] in EMBEDDING_MODULES:
            total += size
    return total


def optimizer_state_bytes(trained: int, optimizer: str = "adamw_torch_fused", fp32_state: int = 0) -> float:
    """Bytes of optimizer state for `trained` parameters under `optimizer` (train.optimizer): AdamW's
    8 per parameter; with an 8-bit optimizer ADAMW_8BIT_STATE_BYTES, except for the `fp32_state`
    parameters of them (`fp32_state_count`) that keep 8."""
    if optimizer not in EIGHT_BIT_OPTIMIZERS:
        return ADAMW_STATE_BYTES * trained
    full = min(max(0, fp32_state), trained)
    return ADAMW_STATE_BYTES * full + ADAMW_8BIT_STATE_BYTES * (trained - full)


@dataclass(frozen=True)
class Memory:
    """Bytes one training process holds on its GPU (see the module docstring)."""

    weights: float
    master: float
    gradients: float
    optimizer: float
    reference: float
    optimizer_name: str = "AdamW"  # how describe() names the optimizer state

    @property
    def total(self) -> float:
        return self.weights + self.master + self.gradients + self.optimizer + self.reference

    def describe(self) -> str:
        parts = [("weights", self.weights), ("fp32 master", self.master), ("gradients", self.gradients),
                 (self.optimizer_name, self.optimizer), ("reference", self.reference)]
        return " + ".join(f"{name} {gib(n)}" for name, n in parts if n)


def training_memory(params: int, layout: Layout, *, trained: int | None = None, lora: bool = False,
                    optimizer: str = "adamw_torch_fused", fp32_state: int = 0) -> Memory:
    """Bytes per process on the GPU for training a `params`-parameter model with `layout`.

    `trained`: the parameters that get gradients and optimizer state: the LoRA adapters' count with
    `lora` (extra parameters, beside the frozen base), else the unfrozen ones (default: all).
    `optimizer`: train.optimizer; with an 8-bit one, `fp32_state` of the trained parameters keep fp32
    moments (`optimizer_state_bytes`), estimated for one process and DDP only (preflight refuses an
    8-bit optimizer under DeepSpeed and FSDP: `icr.loop.check_optimizer`)."""
    trained = params if trained is None else trained
    ds = layout.kind == "deepspeed"
    eight_bit = optimizer in EIGHT_BIT_OPTIMIZERS
    if eight_bit and layout.kind not in ("single", "ddp"):
        raise ValueError(f"train.optimizer: {optimizer} is estimated for one process and DDP only, not {layout.kind}")
    if lora:
        weights = 2.0 * params + 4.0 * trained  # frozen bf16 base + fp32 adapters
    else:
        weights = (2.0 if ds else 4.0) * params
    master = 4.0 * trained if ds else 0.0
    gradients, optimizer = 4.0 * trained, optimizer_state_bytes(trained, optimizer, fp32_state)
    reference = 2.0 * params
    n = max(1, layout.processes)
    if ds:
        stage = layout.zero_stage
        if stage >= 1:
            master, optimizer = master / n, optimizer / n
        if stage >= 2:
            gradients /= n
        if stage >= 3:
            weights, reference = weights / n, reference / n
        if layout.offload_optimizer:
            master = gradients = optimizer = 0.0
        if layout.offload_params:
            weights = reference = 0.0
    elif layout.kind == "fsdp":
        if layout.shard_states:
            gradients, optimizer = gradients / n, optimizer / n
        if layout.shard_weights:
            weights, reference = weights / n, reference / n
        if layout.offload_params:
            weights = gradients = optimizer = reference = 0.0
    return Memory(weights, master, gradients, optimizer, reference, "8-bit AdamW" if eight_bit else "AdamW")


SAVE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # train.save_dtype


def saved_model_bytes(params: int, save_dtype: str = "float32") -> int:
    """A saved iteration model: every parameter in train.save_dtype, whatever the training path
    (icr.train._save_final: one process, DDP, LoRA merged in fp32, DeepSpeed from its fp32 masters,
    FSDP)."""
    if save_dtype not in SAVE_DTYPE_BYTES:
        raise ValueError(f"train.save_dtype: {save_dtype!r} is not one of {sorted(SAVE_DTYPE_BYTES)}")
    return SAVE_DTYPE_BYTES[save_dtype] * params


def checkpoint_bytes(params: int, layout: Layout, *, trained: int | None = None, lora: bool = False,
                     device: str = "cuda", optimizer: str = "adamw_torch_fused", fp32_state: int = 0) -> int:
    """A resume checkpoint: the trained weights as training holds them (fp32; the bf16 module under
    DeepSpeed on GPUs) and their optimizer state (AdamW's two fp32 moments, or 8-bit ones as
    `optimizer_state_bytes` counts them, + DeepSpeed's fp32 master copy); with LoRA the adapters
    alone. train.save_dtype does not change it."""
    trained = params if trained is None else trained
    master = 4 * trained if layout.kind == "deepspeed" else 0
    state = master + math.ceil(optimizer_state_bytes(trained, optimizer, fp32_state))
    if lora:
        return 4 * trained + state
    held = 2 if layout.kind == "deepspeed" and device != "cpu" else 4
    return held * params + state
