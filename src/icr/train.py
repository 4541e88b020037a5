"""DPO + NLL training on ICR pairs, through TRL's `DPOTrainer`.

The paper's loss is DPO (beta 0.1) plus an NLL term on the chosen response (weight 1.0). Current
TRL expresses that as `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, w]` (`rpo_alpha` is
gone). The DPO reference is the policy the iteration starts from, loaded from its own folder and
passed explicitly. Pairs are conversational (`prompt` = the target-language instruction as a user
turn, `chosen`/`rejected` = assistant turns), so TRL applies the model's chat template.

Checkpoints are written every `save_steps` into `out_dir/checkpoints`; a rerun resumes from the
latest one. The final model (merged, if LoRA) and tokenizer go to `model_dir`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

from .compat import checkpointing_kwargs
from .config import TrainConfig
from .errors import IcrError
from .models import check_finite, load_causal_lm, load_tokenizer, resolve_device
from .progress import training_callback
from .runs import honour_umask

log = logging.getLogger("icr")

# A warning is logged when more than this share of the pairs is dropped or truncated for train.max_length.
TOO_LONG_WARN_SHARE = 0.10


def pairs_to_dataset(pairs: list[dict]):
    import datasets

    if not pairs:
        raise IcrError("train: no preference pairs to train on (see the pairs stage's stats.json)")
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": p["prompt"]}],
         "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        for p in pairs])


def length_counts(processed, n_pairs: int, max_length: int | None) -> dict:
    """What TRL's DPOTrainer does with `n_pairs` pairs under `max_length`, read from its processed
    training dataset (`trainer.train_dataset`: columns prompt_ids, chosen_ids, rejected_ids).

    TRL 1.16 with `truncation_mode="keep_start"` (icr's) drops every pair whose prompt alone has
    `max_length` tokens or more (`DPOTrainer._prepare_dataset`: "Dropping fully truncated
    examples"), silently; the collator (`DataCollatorForPreference`) then cuts each remaining
    prompt + answer sequence to its first `max_length` tokens, so a pair whose longer answer does
    not fit is trained on the start of its answers only. Returns `pairs`, `pairs_trained` (rows TRL
    kept), `pairs_dropped_too_long` and `pairs_truncated` (kept pairs with a chosen or rejected
    sequence cut).
    """
    import pyarrow.compute as pc

    kept, truncated = len(processed), 0
    if max_length is not None and kept:
        columns = processed.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).with_format("arrow")
        for batch in columns.iter(batch_size=4096):
            prompt = pc.list_value_length(batch["prompt_ids"])
            longest = pc.max_element_wise(pc.list_value_length(batch["chosen_ids"]),
                                          pc.list_value_length(batch["rejected_ids"]))
            truncated += pc.sum(pc.greater(pc.add(prompt, longest), max_length)).as_py() or 0
    return {"pairs": n_pairs, "pairs_trained": kept, "pairs_dropped_too_long": n_pairs - kept,
            "pairs_truncated": truncated}


def too_long_warning(counts: dict, max_length: int | None) -> str | None:
    """The warning for more than TOO_LONG_WARN_SHARE of the pairs dropped or truncated, else None."""
    n = counts.get("pairs") or 0
    dropped, cut = counts.get("pairs_dropped_too_long") or 0, counts.get("pairs_truncated") or 0
    if not n or (dropped + cut) / n <= TOO_LONG_WARN_SHARE:
        return None
    return (f"train: of {n} pairs, {dropped} were dropped (prompt of {max_length} tokens or more) and {cut} "
            f"truncated (answers cut at {max_length} tokens) by train.max_length = {max_length}: "
            f"{100 * (dropped + cut) / n:.0f}% of the pairs; raise train.max_length to train on them whole")


def optimizer_steps(n_pairs: int, args) -> int:
    """The optimizer steps the Trainer takes for `n_pairs` training rows under `args` (DPOConfig): the
    batches per process per epoch, ceil(n / (per-device batch x processes)), grouped by gradient
    accumulation (a last partial group is a step), times the epochs, rounded up
    (transformers' `Trainer.set_initial_training_values`)."""
    batches = math.ceil(n_pairs / (args.per_device_train_batch_size * max(1, args.world_size)))
    accumulation = args.gradient_accumulation_steps
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def check_learning_rate(n_pairs: int, args) -> int:
    """The number of optimizer steps for `n_pairs` rows; IcrError if the scheduler holds the learning
    rate at 0 at every one of them (one step with any warm-up, for instance: the warm-up starts at 0),
    since such a run cannot move the weights. Evaluated with the Trainer's own scheduler on a
    one-element stand-in optimizer."""
    import torch
    from transformers import get_scheduler

    steps = optimizer_steps(n_pairs, args)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    warmup = args.get_warmup_steps(steps)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup,
                              num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
    for _ in range(steps):  # the learning rate of step k is the scheduler's value after k steps
        if optimizer.param_groups[0]["lr"] > 0:
            return steps
        optimizer.step()  # no gradients: changes nothing
        scheduler.step()
    raise IcrError(
        f"train: all {steps} optimizer step(s) would run at learning rate 0 ({n_pairs} pairs, "
        f"{args.per_device_train_batch_size} per device x {max(1, args.world_size)} process(es) x "
        f"{args.gradient_accumulation_steps} accumulation, {args.num_train_epochs:g} epoch(s); warm-up {warmup} "
        f"step(s), scheduler {args.lr_scheduler_type}), so the policy would come out unchanged. Set "
        "train.warmup_ratio to 0 (or lower), or take more steps: a smaller train.per_device_batch_size or "
        "train.gradient_accumulation_steps, more train.epochs, or more pairs")


# Weights compared per trained tensor before and after training: all of a tensor up to this many
# elements, an evenly strided sample of this many beyond (a few MB in all for an 8B model).
WEIGHT_SAMPLE = 1 << 16


def _sample(p):
    import torch

    flat = p.detach().reshape(-1)
    stride = max(1, -(-flat.numel() // WEIGHT_SAMPLE))
    return flat[::stride].to("cpu", torch.float32, copy=True)


def weight_snapshot(model) -> dict:
    """{name: (numel, sample)} of every trained parameter of `model` that this process holds whole
    (not the empty placeholders of DeepSpeed ZeRO-3's partitioned parameters)."""
    return {name: (p.numel(), _sample(p)) for name, p in model.named_parameters()
            if p.requires_grad and p.numel() > 0 and not hasattr(p, "ds_id")}


def weight_change(model, before: dict) -> dict | None:
    """How far the trained parameters of `model` moved from `before` (weight_snapshot at the start):
    relative L2 norm of the change, largest absolute change, share of compared weights that changed;
    `sampled` when large tensors were compared on a strided sample. None where no parameter could be
    compared (sharded by ZeRO-3/FSDP during training)."""
    import torch

    params = dict(model.named_parameters())
    sq_change = sq_start = max_abs = 0.0
    changed = compared = total = tensors = 0
    for name, (numel, start) in before.items():
        p = params.get(name)
        if p is None or p.numel() != numel or type(p.data).__name__ == "DTensor":
            continue
        delta = _sample(p).double() - start.double()
        sq_change += float(delta.square().sum())
        sq_start += float(start.double().square().sum())
        max_abs = max(max_abs, float(delta.abs().max()) if delta.numel() else 0.0)
        changed += int(torch.count_nonzero(delta))
        compared, total, tensors = compared + delta.numel(), total + numel, tensors + 1
    if not tensors:
        return None
    return {"relative_l2": math.sqrt(sq_change / sq_start) if sq_start else None, "max_abs": max_abs,
            "changed_share": changed / compared if compared else 0.0, "tensors": tensors,
            "compared": compared, "sampled": compared < total}


def freeze_parameters(model, names: list[str]) -> int:
    """Stop gradients for every parameter whose name contains one of `names` (a tied output head
    shares its embedding's parameter, so freezing `embed_tokens` freezes both); returns the count
    of frozen weights. The optimizer then holds no state for them, and the saved model keeps them."""
    frozen = 0
    for name, p in model.named_parameters():
        if any(n in name for n in names):
            p.requires_grad_(False)
            frozen += p.numel()
    if names and not frozen:
        raise IcrError(f"train.freeze: no parameter name contains any of {list(names)}")
    return frozen


def shared_dataset(dataset, folder: Path):
    """`dataset` saved to `folder` by the main process and loaded back from there by every process.

    TRL's `precompute_ref_log_probs` writes the reference log-probs with `Dataset.map` into a cache
    file named after the dataset's own cache folder. A dataset built in memory has none, so each
    process used a random file in its own temporary folder and the other ranks could not find the
    main process's file (`FileNotFoundError .../cache-....arrow` with 2 processes). A dataset loaded
    from disk has a cache folder, the same on every rank: the main process tokenises and writes the
    caches first (TRL runs its preparation main-process-first) and the others read them. Several
    machines need `folder` on storage they share, as for the model folder.
    """
    import datasets
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dataset.save_to_disk(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    state.wait_for_everyone()
    return datasets.load_from_disk(str(folder))


def check_one_device_per_process(device: str, cuda_devices: int, world_size: int) -> None:
    """Refuse a single training process that sees several GPUs.

    The Trainer wraps the model in torch DataParallel then, which TRL's DPOTrainer does not support
    (it fails inside TRL). Several GPUs are used through `accelerate launch` (train.accelerate_config).
    """
    if device.startswith("cuda") and cuda_devices > 1 and world_size <= 1:
        raise IcrError(f"train: {cuda_devices} GPUs are visible to one training process; set "
                       "train.accelerate_config (ddp, deepspeed_zero2, deepspeed_zero3, fsdp or your own "
                       "accelerate config file) to train on all of them, or CUDA_VISIBLE_DEVICES=0 to train on one")


def dpo_config(cfg: TrainConfig, out_dir: Path, seed: int, device: str, n_pairs: int):
    from trl import DPOConfig

    from .tracking import training_report_to

    on_gpu = device.startswith("cuda")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    loss_type, loss_weights = (["sigmoid", "sft"], [1.0, cfg.nll_weight]) if cfg.nll_weight > 0 else (["sigmoid"], None)
    return DPOConfig(
        output_dir=str(out_dir / "checkpoints"),
        beta=cfg.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optimizer,
        max_length=cfg.max_length,
        truncation_mode="keep_start",
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        bf16=bf16,
        use_cpu=not on_gpu,
        seed=seed,
        data_seed=seed,
        report_to=training_report_to(cfg.report_to),  # + tensorboard into the run folder: icr.tracking
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_steps=cfg.logging_steps,
        dataset_num_proc=None,
        disable_tqdm=True,  # the stage's bar is icr.progress's (training_callback), in any process
        remove_unused_columns=False,
        **checkpointing_kwargs(cfg.gradient_checkpointing),
    )


def training_dtypes(device: str, *, deepspeed: bool = False, lora: bool = False) -> tuple[str, str]:
    """(policy dtype, reference dtype) for training on `device`.

    The trained policy is held in fp32 ("master weights") and, with `train.precision` bf16 (the
    default on GPUs), computed in bf16 under the Trainer's autocast. Held in bf16, AdamW's updates
    at the paper's learning rate (5e-7) are mostly smaller than half a bf16 step of the weight they
    change and round away: on an H100 a bf16-held run changed 0.22% of the weights (issue 10;
    tests/test_train_precision.py reproduces it on CPU). DeepSpeed keeps fp32 masters in its own
    optimizer and casts the module to bf16 itself, so there the policy is loaded as for inference;
    with LoRA the base weights are frozen and PEFT keeps the adapters in fp32, so likewise.
    The reference only runs forward passes: bf16 on GPUs, fp32 on CPU (models.dtype "auto").

    The saved model is written in train.save_dtype (default float32, on every path: `_save_final`;
    32 GB for an 8B model instead of 16). Rounding to bf16 at the end throws away most of an
    iteration's training at the paper's learning rate, since the accumulated change of most weights
    is still below half a bf16 step (bench/bf16_save.py: ~10% of the margin change kept); the next
    iteration trains from the exact fp32 weights (except under DeepSpeed, whose engine casts the
    loaded module to bf16 and builds its fp32 masters from that), while sampling and scoring load
    them in bf16 (models.dtype).
    """
    inference = "float32" if device == "cpu" else "auto"
    return (inference if deepspeed or lora else "float32"), inference


@contextlib.contextmanager
def weights_on_every_rank():
    """Load a model with its real weights in every process, also under FSDP's
    `cpu_ram_efficient_loading` (FSDP_CPU_RAM_EFFICIENT_LOADING=true, as in fsdp.yaml).

    With that setting transformers may load the weights on local rank 0 only (older versions put
    the other ranks' parameters on the meta device and fill them with empty or zero tensors), and
    accelerate copies rank 0's weights into the *policy* when it prepares it; TRL 1.16 shards the
    *reference* itself (`trl.models.prepare_fsdp`: `fully_shard`, no copy from rank 0), so a reference
    loaded that way would be garbage on every rank but the first. Inside this block the variable is
    unset, so every rank reads the reference's weights from its files (transformers 5.24 does so
    anyway: measured on CPU with LOCAL_RANK=1); the cost, where a version skips them, is one reference
    in each process's CPU memory while loading (16 GB in bf16 for 8B). The policy keeps the setting.
    """
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    saved = os.environ.pop(key, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[key] = saved


def _deepspeed_active(args) -> bool:
    """Whether this training runs under DeepSpeed (set by `accelerate launch` with a DeepSpeed config)."""
    return bool(getattr(args, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _latest_checkpoint(out_dir: Path) -> str | None:
    """The newest *complete* checkpoint. The Trainer writes trainer_state.json last, so a checkpoint
    without it was interrupted mid-save: it is deleted, and the one before it is used."""
    ckpts = sorted((out_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for ckpt in reversed(ckpts):
        if (ckpt / "trainer_state.json").is_file():
            return str(ckpt)
        shutil.rmtree(ckpt, ignore_errors=True)
    return None


SAVE_DTYPES = ("float32", "bfloat16")  # train.save_dtype


def _torch_dtype(name: str):
    import torch

    if name not in SAVE_DTYPES:
        raise IcrError(f"train.save_dtype: {name!r} is not one of {sorted(SAVE_DTYPES)}")
    return getattr(torch, name)


def _cast_state_dict(state: dict, dtype) -> dict:
    """`state` with every floating-point tensor in `dtype` (on the CPU); integer buffers as they are."""
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()) for k, v in state.items()}


def merge_lora_fp32(peft_model):
    """The LoRA adapters of `peft_model` merged into fp32 base weights (`merge_and_unload` after
    upcasting the whole model to fp32, in place).

    Under LoRA the base is loaded as for inference (bf16 on GPUs, `training_dtypes`), and PEFT's merge
    adds B @ A * scale to the base weight in the base's dtype: at the paper's learning rate most of
    that delta is below half a bf16 step and rounds away (bench/bf16_save.py: ~7% of the margin change
    kept). Merged in fp32, the update is kept whole; the save then rounds (or not) by train.save_dtype.
    The upcast costs 2 more bytes per base parameter on the device for the merge (16 GB for 8B).
    """
    import torch

    peft_model.to(torch.float32)
    return peft_model.merge_and_unload()


def deepspeed_fp32_state_dict(model, main: bool) -> dict:
    """The full fp32 state dict of a DeepSpeed-trained `model` (the engine's module), from the
    optimizer's fp32 master weights, on the main process ({} on the others). Every rank calls it:
    the gathers are collective.

    DeepSpeed casts the module to bf16 and keeps the fp32 copy in its optimizer, partitioned (ZeRO-2:
    `param._hp_mapping`, ZeRO-3: `param.ds_id`); `deepspeed.utils.safe_get_full_fp32_param` assembles
    one parameter's fp32 master from every rank's partition (an all-reduce under ZeRO-1/2, an
    all-gather under ZeRO-3). accelerate's own save of a ZeRO-3 model is the 16-bit consolidation
    (`zero3_save_16bit_model`), which rounds the update away. A frozen parameter (train.freeze) has no
    master: its module weight is saved (gathered under ZeRO-3). Buffers come from the module.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            if hasattr(p, "ds_id"):  # a ZeRO-3 partitioned parameter: gather it on every rank
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().clone() if main else None
            else:
                full = p.detach()
        if main:
            state[name] = full.detach().to("cpu", copy=True)
    if main:
        params = set(state)
        for name, buf in model.named_buffers():
            if name not in params and name.rsplit(".", 1)[-1] not in getattr(
                    _owner(model, name), "_non_persistent_buffers_set", set()):
                state[name] = buf.detach().to("cpu", copy=True)
    return state


def _owner(model, name: str):
    """The module that holds the parameter or buffer `name` of `model`."""
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _set_config_dtype(folder: Path, dtype_name: str) -> None:
    """config.json's dtype = what was saved (save_pretrained writes the module's dtype, which for a
    module held in fp32 and saved in bf16, or DeepSpeed's bf16 module saved from fp32 masters, is not
    the saved one)."""
    path = folder / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        config[k] = dtype_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _zero_stage(trainer) -> int:
    ds_plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return int(getattr(ds_plugin, "zero_stage", 0) or 0) if ds_plugin is not None else 0


def _save_final(trainer, tokenizer, cfg: TrainConfig, model_dir: Path) -> str:
    """Write the trained model to `model_dir` atomically (a temporary folder, then a rename), in
    train.save_dtype; returns the saved dtype's name.

    Every path saves explicitly (issue 19): one process and DDP save the fp32 masters; LoRA adapters
    are merged into an fp32 copy of the base weights (`merge_lora_fp32`); DeepSpeed ZeRO-2/3 saves its
    optimizer's fp32 master weights (`deepspeed_fp32_state_dict`) when save_dtype is float32, else
    accelerate's 16-bit state dict; FSDP gathers the full (fp32) state dict
    (`accelerator.get_state_dict`). Every rank takes part in the gathers; the main process writes.
    """
    dtype_name = cfg.save_dtype
    dtype = _torch_dtype(dtype_name)
    main = trainer.is_world_process_zero()
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    zero_stage = _zero_stage(trainer)
    if cfg.lora.enabled:
        if zero_stage == 3:
            raise IcrError("train.lora: merging LoRA adapters under DeepSpeed ZeRO-3 is not supported; "
                           "use ZeRO-2, DDP or FSDP")
        model = merge_lora_fp32(trainer.accelerator.unwrap_model(trainer.model))
        state = model.state_dict() if main else {}
    elif zero_stage and dtype_name == "float32":
        model = trainer.accelerator.unwrap_model(trainer.model)
        state = deepspeed_fp32_state_dict(model, main)
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
        state = trainer.accelerator.get_state_dict(trainer.model)  # FSDP / ZeRO-3: gathered on the main process
    if main:
        model.save_pretrained(tmp, state_dict=_cast_state_dict(state, dtype))
        _set_config_dtype(tmp, dtype_name)
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(tmp)
        honour_umask(tmp)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
    trainer.accelerator.wait_for_everyone()
    return dtype_name


def _dpo_trainer(policy, ref_model, args, dataset, tokenizer, cfg: TrainConfig, out_dir: Path):
    """TRL's DPOTrainer (with LoRA adapters when train.lora is on), reporting to icr.progress."""
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLora

        peft_config = PeftLora(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                               target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    try:
        trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config)
    except ValueError as e:
        if peft_config is None or "target module" not in str(e).lower():
            raise
        # A hub model's module names are not known at preflight (models.check_lora_targets checks local ones).
        raise IcrError(f"train.lora.target_modules: {' '.join(str(e).split())[:300]}") from None
    trainer.add_callback(training_callback(out_dir))  # steps and loss for the parent's bar and `icr status`
    # With tqdm off the Trainer prints every log dict to stdout instead (PrinterCallback): the bar
    # shows the loss; the manifest, trainer_state.json and the trackers keep every logged metric.
    trainer.remove_callback(PrinterCallback)
    return trainer


def train_dpo(pairs: list[dict], policy_path: str, reference_path: str, cfg: TrainConfig, out_dir: Path,
              model_dir: Path, *, seed: int = 42, device: str = "auto", chat_template: str | None = None) -> dict:
    """Train the policy on `pairs` against the reference; save to `model_dir`; return train metrics
    (loss, optimizer steps, the last log entry, `length_counts`: pairs dropped or truncated by
    train.max_length, with a warning past TOO_LONG_WARN_SHARE, and `weight_change`: how far the
    trained parameters moved).

    Refused with IcrError before training when the learning rate would be 0 at every optimizer step
    (`check_learning_rate`), and after it when no trained weight changed or one is NaN/inf."""
    import torch

    device = resolve_device(device)
    check_one_device_per_process(device, torch.cuda.device_count() if device.startswith("cuda") else 0,
                                 int(os.environ.get("WORLD_SIZE", "1")))
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    # The training arguments come first: under DeepSpeed ZeRO-3 they switch on sharded loading and
    # bind each rank to its device before any model is built.
    args = dpo_config(cfg, out_dir, seed, device, len(pairs))
    check_learning_rate(len(pairs), args)  # early: TRL keeping fewer pairs only means fewer steps
    tokenizer = load_tokenizer(policy_path, chat_template, what="policy")
    tokenizer.padding_side = "right"
    policy_dtype, reference_dtype = training_dtypes(device, deepspeed=_deepspeed_active(args), lora=cfg.lora.enabled)
    policy = load_causal_lm(policy_path, device, policy_dtype, what="policy")
    policy.train()
    freeze_parameters(policy, cfg.freeze)
    with weights_on_every_rank():  # TRL shards the reference under FSDP without rank 0's weights
        ref_model = load_causal_lm(reference_path, device, reference_dtype, what="reference")
    dataset = pairs_to_dataset(pairs)
    if cfg.precompute_ref_log_probs:
        out_dir.mkdir(parents=True, exist_ok=True)
        dataset = shared_dataset(dataset, out_dir / "pairs-dataset")
    trainer = _dpo_trainer(policy, ref_model, args, dataset, tokenizer, cfg, out_dir)
    lengths = length_counts(trainer.train_dataset, len(pairs), cfg.max_length)
    if not lengths["pairs_trained"]:
        raise IcrError(f"train: every one of the {len(pairs)} pairs has a prompt of train.max_length = "
                       f"{cfg.max_length} tokens or more, so TRL drops them all; raise train.max_length")
    warning = too_long_warning(lengths, cfg.max_length)
    if warning and trainer.is_world_process_zero():
        log.warning(warning)
    check_learning_rate(lengths["pairs_trained"], args)  # the steps TRL will take: exact
    start = weight_snapshot(trainer.model)
    resume = _latest_checkpoint(out_dir)
    if resume is not None:
        # Recorded so the kill-and-resume harness can show training resumed mid-epoch.
        with open(out_dir / "resumed.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"checkpoint": Path(resume).name}) + "\n")
    result = trainer.train(resume_from_checkpoint=resume)
    change = weight_change(trainer.accelerator.unwrap_model(trainer.model), start)
    last_loss = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
    # A diverged training is an error before anything is saved (else exit 0 and a NaN model).
    check_finite(trainer.accelerator.unwrap_model(trainer.model),
                 f"train: after {trainer.state.global_step} optimizer step(s) (last logged loss {last_loss}; nothing "
                 "was saved: lower train.learning_rate, or check train.beta and the pairs)")
    if change is not None and change["changed_share"] == 0:
        # An error, not a warning: the "trained" model would be the starting policy under a new name,
        # and the iteration would report training that did not happen.
        raise IcrError(
            f"train: {trainer.state.global_step} optimizer step(s) left every trained weight exactly as it "
            f"started ({change['compared']} weights of {change['tensors']} tensors compared), so nothing was "
            "trained; check train.learning_rate, train.warmup_ratio and train.lr_scheduler, train.freeze, and "
            "under DeepSpeed the bf16 weights (updates below half a bf16 step round away)")
    saved_dtype = _save_final(trainer, tokenizer, cfg, model_dir)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {"train_loss": result.training_loss, "steps": trainer.state.global_step,
            "last_log": history[-1] if history else {}, **lengths, "weight_change": change,
            "saved_dtype": saved_dtype}
