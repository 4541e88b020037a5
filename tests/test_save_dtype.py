"""Every training path saves a model in which the iteration's update survives (issue 19).

At the paper's learning rate (5e-7) an iteration moves most weights by less than half a bf16 step,
so a model rounded to bf16 when saved keeps ~10% of the iteration's margin change
(bench/bf16_save.py). `train.save_dtype` (default float32) is what every path saves; bfloat16 is
the authors' save, half the disk. Each path's save (`icr.train._save_final`) is run here on a tiny
Llama with a stand-in for the Trainer, built so that the save before this fix loses the update:

- one process / DDP: the fp32 masters, saved in save_dtype (config.json says which);
- LoRA: adapters merged into an fp32 copy of the bf16 base (PEFT's merge into bf16 rounds them away);
- DeepSpeed ZeRO-2/3: the optimizer's fp32 masters (`deepspeed.utils.safe_get_full_fp32_param`),
  not the engine's bf16 module (DeepSpeed is stood in for here: it is not a dependency of the test
  environment);
- FSDP: accelerate's full state dict of the fp32-held policy, cast to save_dtype.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from icr.config import TrainConfig

DELTA = 1e-5  # an update per weight well below half a bf16 step of weights ~0.02 (6e-5)


def _tiny_llama(dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype)


class _Tokenizer:
    padding_side = "right"

    def save_pretrained(self, folder):
        Path(folder, "tokenizer_config.json").write_text("{}")


class _Accelerator:
    def __init__(self, model, deepspeed_stage=0):
        self.model = model
        self.state = types.SimpleNamespace(
            deepspeed_plugin=types.SimpleNamespace(zero_stage=deepspeed_stage) if deepspeed_stage else None)

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self):
        pass

    def get_state_dict(self, model):
        # accelerate: the module's state dict (one process, DDP), the gathered full state dict
        # (FSDP), or under ZeRO-3 the 16-bit consolidation of the engine's bf16 module
        return model.state_dict()


class _Trainer:
    """What `_save_final` uses of transformers' Trainer; `save_model` writes the module as it is held."""

    def __init__(self, model, deepspeed_stage=0):
        self.model = model
        self.accelerator = _Accelerator(model, deepspeed_stage)

    def is_world_process_zero(self):
        return True

    def save_model(self, folder):
        self.model.save_pretrained(folder)


def _saved(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors"), json.loads((folder / "config.json").read_text())


def _config_dtype(config: dict) -> str:
    return config.get("dtype") or config.get("torch_dtype")


def _nudge(model, delta=DELTA):
    """An update of `delta` on every weight of the fp32-held `model` (a small-lr iteration)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(delta)


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_one_process_and_ddp_save_the_fp32_masters_in_save_dtype(tmp_path, save_dtype):
    from icr.train import _save_final

    model = _tiny_llama()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _nudge(model)
    saved = _save_final(_Trainer(model), _Tokenizer(), TrainConfig(save_dtype=save_dtype), tmp_path / "model")
    weights, config = _saved(tmp_path / "model")
    assert saved == save_dtype and _config_dtype(config) == save_dtype
    assert {w.dtype for w in weights.values()} == {getattr(torch, save_dtype)}
    kept = sum(int((weights[k].float() != start[k].to(weights[k].dtype).float()).sum()) for k in weights)
    share = kept / sum(w.numel() for w in weights.values())
    if save_dtype == "float32":
        assert share == 1.0
        assert all(torch.allclose(weights[k] - start[k], torch.full_like(start[k], DELTA), atol=1e-6) for k in weights)
    else:  # what the explicit bf16 save costs: most of the update rounds away
        assert share < 0.5, share


def test_lora_is_merged_in_fp32_so_a_small_update_survives(tmp_path):
    """The LoRA base is bf16 (as loaded on a GPU); a delta of ~1e-5 merged into it by PEFT rounds
    away. Merged in fp32 it is saved whole (save_dtype float32)."""
    from peft import LoraConfig, get_peft_model

    from icr.train import _save_final

    base = _tiny_llama(torch.bfloat16)
    start = {k: v.float().clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():  # B @ A * scale = DELTA everywhere (adapters are fp32, as PEFT keeps them)
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.fill_(1.0)
            elif "lora_B" in name:
                p.fill_(DELTA / 4)  # rank 4, scale alpha / r = 1
    cfg = TrainConfig()
    cfg.lora.enabled = True
    _save_final(_Trainer(peft_model), _Tokenizer(), cfg, tmp_path / "model")
    weights, config = _saved(tmp_path / "model")
    q = "model.layers.0.self_attn.q_proj.weight"
    change = weights[q].float() - start[q]
    assert torch.allclose(change, torch.full_like(change, DELTA), rtol=0.01), change.abs().mean()
    assert weights[q].dtype == torch.float32 and _config_dtype(config) == "float32"
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(weights[untouched], start[untouched])


def test_merging_lora_into_the_bf16_base_loses_the_same_update():
    """Why the merge is in fp32: PEFT's merge into the bf16 base keeps almost none of that delta."""
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama(torch.bfloat16)
    start = base.model.layers[0].self_attn.q_proj.weight.detach().float().clone()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.fill_(1.0)
            elif "lora_B" in name:
                p.fill_(DELTA / 4)  # rank 4, scale alpha / r = 1
    merged = peft_model.merge_and_unload().model.layers[0].self_attn.q_proj.weight.float()
    assert (merged != start).float().mean() < 0.2


class _FakeDeepSpeed:
    """`deepspeed.utils.safe_get_full_fp32_param` and `deepspeed.zero.GatheredParameters` over a
    module DeepSpeed holds in bf16, with the fp32 masters kept apart (as its optimizer does)."""

    def __init__(self, masters: dict):
        self.masters, self.calls = masters, []

    def install(self, monkeypatch):
        ds = types.ModuleType("deepspeed")
        utils = types.ModuleType("deepspeed.utils")
        zero = types.ModuleType("deepspeed.zero")
        utils.safe_get_full_fp32_param = self.full_fp32
        zero.GatheredParameters = lambda params, modifier_rank=None: _Nothing()
        ds.utils, ds.zero = utils, zero
        for module in (ds, utils, zero):  # importlib.util.find_spec (transformers' checks) needs one
            module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
        monkeypatch.setitem(sys.modules, "deepspeed", ds)
        monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
        monkeypatch.setitem(sys.modules, "deepspeed.zero", zero)

    def full_fp32(self, param):
        self.calls.append(param)
        return self.masters.get(id(param))


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_saves_the_optimizers_fp32_masters(tmp_path, monkeypatch, stage):
    from icr.train import _save_final

    model = _tiny_llama()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _nudge(model)  # the fp32 masters after training
    masters = {id(p): p.detach().clone() for p in model.parameters()}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)  # the engine's module: bf16 (masters keyed by the same Parameter objects)
    fake = _FakeDeepSpeed(masters)
    fake.install(monkeypatch)
    _save_final(_Trainer(model, deepspeed_stage=stage), _Tokenizer(), TrainConfig(), tmp_path / "model")
    weights, config = _saved(tmp_path / "model")
    for k in weights:
        assert torch.equal(weights[k].float(), expected[k]), k
        assert not torch.equal(weights[k].float(), start[k])
    assert {w.dtype for w in weights.values()} == {torch.float32} and _config_dtype(config) == "float32"
    assert len(fake.calls) == len(list(model.parameters()))


def test_deepspeed_bf16_save_is_accelerates_16bit_state_dict(tmp_path, monkeypatch):
    from icr.train import _save_final

    model = _tiny_llama(torch.bfloat16)
    fake = _FakeDeepSpeed({})
    fake.install(monkeypatch)
    _save_final(_Trainer(model, deepspeed_stage=3), _Tokenizer(), TrainConfig(save_dtype="bfloat16"),
                tmp_path / "model")
    weights, config = _saved(tmp_path / "model")
    assert not fake.calls and _config_dtype(config) == "bfloat16"
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_deepspeed_frozen_parameters_are_saved_from_the_module(tmp_path, monkeypatch):
    from icr.train import deepspeed_fp32_state_dict

    model = _tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    masters = {id(p): p.detach().clone() + 1 for p in model.parameters() if p.requires_grad}
    _FakeDeepSpeed(masters).install(monkeypatch)
    state = deepspeed_fp32_state_dict(model, main=True)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight + 1)
    assert deepspeed_fp32_state_dict(model, main=False) == {}


def test_save_dtype_is_checked():
    from icr.config import section_from_dict
    from icr.errors import ConfigError

    with pytest.raises(ConfigError):
        section_from_dict(TrainConfig, {"save_dtype": "float16"}, "train", "config")
    assert TrainConfig().save_dtype == "float32"


def test_fsdp_reference_is_loaded_with_its_weights_on_every_rank(monkeypatch, tmp_path):
    """Under fsdp.yaml (cpu_ram_efficient_loading) the reference is loaded with the setting off, so no
    rank depends on transformers loading its weights (TRL shards the reference without rank 0's copy);
    the policy's loading keeps it. Checked on the loads `train_dpo` makes (FSDP itself does not run
    on the CPU: accelerate turns an FSDP config with use_cpu into MULTI_CPU)."""
    import os

    import icr.train

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    seen = {}

    class _Stop(Exception):
        pass

    def load(path, device, dtype, what):
        seen[what] = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
        if what == "reference":
            raise _Stop
        return _tiny_llama()

    monkeypatch.setattr(icr.train, "load_tokenizer", lambda *a, **k: _Tokenizer())
    monkeypatch.setattr(icr.train, "load_causal_lm", load)
    pairs = [{"prompt": "q?", "chosen": "a", "rejected": "b"}] * 4
    with pytest.raises(_Stop):
        icr.train.train_dpo(pairs, "policy", "reference", TrainConfig(warmup_ratio=0.0), tmp_path, tmp_path / "m",
                            device="cpu")
    assert seen == {"policy": "true", "reference": None}
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"  # restored
