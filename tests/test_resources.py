"""icr.resources: the arithmetic of training's GPU memory and disk, against hand-computed cases."""

from __future__ import annotations

import pytest
import yaml

from icr.resources import (GIB, Layout, checkpoint_bytes, config_shapes, fp32_state_count, gib,
                           layout_from_accelerate, lora_parameter_count, model_shapes, parameter_count,
                           saved_model_bytes, training_memory)

from .conftest import REPO

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama3_8b_shapes():
    from transformers import LlamaConfig

    return config_shapes(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                     tie_word_embeddings=False))


# Llama-3-8B by hand: embeddings and output head 2 x 128256 x 4096 = 1,050,673,152; per layer
# q, o 4096 x 4096, k, v 4096 x 1024 (8 kv heads x 128) = 41,943,040, MLP 3 x 4096 x 14336 =
# 176,160,768, two norms 8,192: 218,112,000 x 32 = 6,979,584,000; final norm 4,096.
P8B = 1_050_673_152 + 32 * (41_943_040 + 176_160_768 + 8_192) + 4_096


def test_llama3_8b_parameter_count_from_its_config():
    assert P8B == 8_030_261_248
    assert parameter_count(llama3_8b_shapes()) == P8B


def test_full_fine_tuning_in_one_process_is_16_bytes_per_parameter_plus_the_bf16_reference():
    m = training_memory(P8B, Layout())
    # fp32 weights 4 + fp32 gradients 4 + AdamW's two fp32 moments 8 = 16 bytes per parameter
    assert (m.weights, m.gradients, m.optimizer, m.master) == (4 * P8B, 4 * P8B, 8 * P8B, 0)
    policy = m.weights + m.gradients + m.optimizer
    assert policy == 128_484_179_968 and round(policy / GIB, 1) == 119.7  # "about 120 GiB"
    assert m.reference == 2 * P8B and round(m.total / GIB, 1) == 134.6
    assert gib(m.total) == "134.6 GiB" and gib(3 * 2 ** 20) == "3.0 MiB"
    # DDP replicates everything: the same per process
    assert training_memory(P8B, Layout("ddp", 8)).total == m.total


def test_sharding_divides_what_each_stage_shards():
    n = 8
    z3 = training_memory(P8B, Layout("deepspeed", n, zero_stage=3))
    # DeepSpeed: bf16 module 2 + fp32 master 4 + gradients 4 + AdamW 8 = 18, all sharded; reference sharded too
    assert z3.total == pytest.approx((18 + 2) * P8B / n) and round(z3.total / GIB, 1) == 18.7
    z2 = training_memory(P8B, Layout("deepspeed", n, zero_stage=2))
    assert z2.weights == 2 * P8B and z2.reference == 2 * P8B  # replicated
    assert z2.total == pytest.approx(4 * P8B + 16 * P8B / n)
    z1 = training_memory(P8B, Layout("deepspeed", n, zero_stage=1))
    assert z1.gradients == 4 * P8B and z1.optimizer == pytest.approx(8 * P8B / n)
    fsdp = training_memory(P8B, Layout("fsdp", n))
    assert fsdp.total == pytest.approx((16 + 2) * P8B / n)
    grad_op = training_memory(P8B, Layout("fsdp", n, shard_weights=False))
    assert grad_op.weights == 4 * P8B and grad_op.optimizer == pytest.approx(8 * P8B / n)


def test_cpu_offload_moves_what_it_names_off_the_gpu():
    n = 8
    opt = training_memory(P8B, Layout("deepspeed", n, zero_stage=2, offload_optimizer=True))
    assert (opt.master, opt.gradients, opt.optimizer) == (0, 0, 0) and opt.total == 4 * P8B  # bf16 weights + ref
    both = training_memory(P8B, Layout("deepspeed", n, zero_stage=3, offload_optimizer=True, offload_params=True))
    assert both.total == 0
    fsdp = training_memory(P8B, Layout("fsdp", n, offload_params=True, offload_optimizer=True))
    assert fsdp.total == 0


def test_lora_trains_only_the_adapters():
    shapes = llama3_8b_shapes()
    # r x (in + out) per adapted matrix: q, o 16 x 8192; k, v 16 x 5120; gate, up, down 16 x 18432
    per_layer = 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)
    adapters = lora_parameter_count(shapes, LORA_TARGETS, 16)
    assert adapters == 32 * per_layer == 41_943_040
    m = training_memory(P8B, Layout(), trained=adapters, lora=True)
    assert m.weights == 2 * P8B + 4 * adapters  # frozen bf16 base + fp32 adapters
    assert (m.gradients, m.optimizer) == (4 * adapters, 8 * adapters) and m.reference == 2 * P8B
    assert lora_parameter_count(shapes, ["q_proj"], 8) == 32 * 8 * (4096 + 4096)


def test_frozen_parameters_hold_no_optimizer_state():
    shapes = llama3_8b_shapes()
    trained = parameter_count(shapes, skip=["embed_tokens"])
    assert trained == P8B - 128256 * 4096
    m = training_memory(P8B, Layout(), trained=trained)
    assert m.weights == 4 * P8B and m.optimizer == 8 * trained


def test_8bit_adamw_keeps_about_2_bytes_per_parameter_and_fp32_moments_for_the_embeddings():
    """train.optimizer adamw_bnb_8bit, Llama-3-8B in one process, by hand. bitsandbytes' 8-bit AdamW
    keeps m and v as one byte each plus an fp32 absmax per 256 values of each: 2 + 8/256 = 2.03125
    bytes per parameter. transformers' Trainer keeps nn.Embedding weights at 32 bits (8 bytes): the
    embedding 128256 x 4096 = 525,336,576; the untied output head is a Linear (8-bit), and no tensor
    is below bitsandbytes' 4096 values (the norms hold exactly 4096)."""
    shapes = llama3_8b_shapes()
    embedding = 128256 * 4096
    assert fp32_state_count(shapes) == embedding == 525_336_576
    assert fp32_state_count(shapes, skip=["embed_tokens"]) == 0  # frozen: no state at all
    m = training_memory(P8B, Layout(), optimizer="adamw_bnb_8bit", fp32_state=embedding)
    # (8,030,261,248 - 525,336,576) x 2.03125 = 15,244,378,240; + 525,336,576 x 8 = 4,202,692,608
    assert m.optimizer == 15_244_378_240 + 4_202_692_608 == 19_447_070_848
    assert (m.weights, m.gradients, m.master, m.reference) == (4 * P8B, 4 * P8B, 0, 2 * P8B)  # fp32 as before
    assert round(m.optimizer / GIB, 1) == 18.1 and round(m.total / GIB, 1) == 92.9  # AdamW: 59.8 and 134.6
    assert "8-bit AdamW 18.1 GiB" in m.describe() and "+ AdamW 59.8 GiB" in training_memory(P8B, Layout()).describe()
    assert training_memory(P8B, Layout(), fp32_state=embedding).optimizer == 8 * P8B  # fp32_state: 8-bit only
    assert training_memory(P8B, Layout("ddp", 8), optimizer="adamw_bnb_8bit", fp32_state=embedding).total == m.total
    # LoRA: the adapters' moments in 8 bits (41,943,040 x 2.03125)
    adapters = lora_parameter_count(shapes, LORA_TARGETS, 16)
    assert training_memory(P8B, Layout(), trained=adapters, lora=True, optimizer="adamw_bnb_8bit").optimizer \
        == 85_196_800
    # tensors of fewer than 4096 values keep fp32 moments too
    small = {"model.embed_tokens.weight": [100, 64], "model.norm.weight": [64], "model.layers.0.mlp.up_proj.weight":
             [128, 64], "transformer.wte.weight": [50, 128]}
    assert fp32_state_count(small) == 6400 + 64 + 6400
    for layout in (Layout("deepspeed", 8, zero_stage=2), Layout("fsdp", 8)):  # refused there by preflight
        with pytest.raises(ValueError, match="train.optimizer: adamw_bnb_8bit is estimated for one process and DDP"):
            training_memory(P8B, layout, optimizer="adamw_bnb_8bit")
    # a resume checkpoint holds the same optimizer state: fp32 weights 32,121,044,992 + 19,447,070,848
    assert checkpoint_bytes(P8B, Layout(), optimizer="adamw_bnb_8bit", fp32_state=embedding) == 51_568_115_840
    assert round(51_568_115_840 / GIB, 1) == 48.0 and checkpoint_bytes(P8B, Layout()) == 12 * P8B


def test_disk_of_a_saved_model_and_a_resume_checkpoint():
    # every training path saves in train.save_dtype (icr.train._save_final): fp32 by default, 32 GB
    assert saved_model_bytes(P8B) == saved_model_bytes(P8B, "float32") == 4 * P8B
    assert saved_model_bytes(P8B, "bfloat16") == 2 * P8B  # the authors' bf16 save: half the disk
    with pytest.raises(ValueError, match="train.save_dtype"):
        saved_model_bytes(P8B, "float16")
    assert checkpoint_bytes(P8B, Layout()) == 3 * 4 * P8B  # fp32 weights + AdamW's two moments: x 3
    ds = Layout("deepspeed", 8, zero_stage=3)
    assert checkpoint_bytes(P8B, ds) == (2 + 12) * P8B  # the bf16 module + fp32 master and AdamW
    assert checkpoint_bytes(10, ds, device="cpu") == (4 + 12) * 10  # fp32 on the CPU
    assert checkpoint_bytes(P8B, Layout(), trained=1000, lora=True) == 12 * 1000  # the adapters only


def test_the_disk_check_counts_the_models_in_train_save_dtype(tmp_path, monkeypatch):
    """Two iterations of Llama-3-8B on the CPU need 2 saved models + one fp32 checkpoint (12 bytes per
    parameter): 20 x P = 149.6 GiB with float32 saves, 16 x P = 119.7 GiB with bfloat16 saves.
    130 GiB free refuses the first and takes the second."""
    import collections
    import shutil

    import icr.resources
    from icr.config import config_from_dict
    from icr.errors import IcrError
    from icr.loop import check_training_resources

    monkeypatch.setattr(icr.resources, "model_shapes", lambda name: llama3_8b_shapes())
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(200 * GIB, 70 * GIB, 130 * GIB))

    def config(save_dtype: str):
        return config_from_dict({"name": "disk", "run_root": str(tmp_path), "languages": ["en"], "iterations": 2,
                                 "device": "cpu", "models": {"dpo": "a", "sft": "b"},
                                 "prompts": {"path": "p/{lang}.jsonl"}, "train": {"save_dtype": save_dtype}})

    with pytest.raises(IcrError, match=r"needs at least 149\.6 GiB of disk \(2 iteration model\(s\) of 29\.9 GiB "):
        check_training_resources(config("float32"))
    check_training_resources(config("bfloat16"))  # 119.7 GiB: fits
    assert round(16 * P8B / GIB, 1) == 119.7


def test_layout_of_each_shipped_accelerate_config():
    def load(name):
        return yaml.safe_load((REPO / "src" / "icr" / "accelerate_configs" / f"{name}.yaml").read_text())

    assert layout_from_accelerate(None) == Layout()
    assert layout_from_accelerate(load("deepspeed_zero3")) == Layout("deepspeed", 8, zero_stage=3)
    assert layout_from_accelerate(load("deepspeed_zero2")) == Layout("deepspeed", 8, zero_stage=2)
    assert layout_from_accelerate(load("fsdp")) == Layout("fsdp", 8)
    assert layout_from_accelerate(load("ddp")) == Layout("ddp", 8)
    assert layout_from_accelerate(load("ddp"), 1) == Layout("single", 1)  # --num_processes 1
    offload = load("deepspeed_zero3")
    offload["deepspeed_config"].update(offload_optimizer_device="cpu", offload_param_device="cpu")
    assert layout_from_accelerate(offload) == Layout("deepspeed", 8, zero_stage=3, offload_optimizer=True,
                                                     offload_params=True)
    v1 = {"distributed_type": "FSDP", "num_processes": 4, "fsdp_config": {"fsdp_sharding_strategy": "NO_SHARD"}}
    assert layout_from_accelerate(v1) == Layout("fsdp", 4, shard_weights=False, shard_states=False)


def test_shapes_of_a_local_model_are_its_safetensors_headers(tiny_pair):
    from icr.models import load_causal_lm

    shapes = model_shapes(tiny_pair["dpo"])
    model = load_causal_lm(tiny_pair["dpo"], "cpu")
    assert parameter_count(shapes) == sum(p.numel() for p in model.parameters())


def test_config_shapes_only_for_architectures_it_knows():
    """GPT-2's fused attention and plain MLP are not Llama's: no estimate from its config (its
    safetensors headers, when local, still give one), rather than a wrong one."""
    from transformers import GPT2Config, MistralConfig

    assert config_shapes(GPT2Config()) is None
    mistral = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    assert parameter_count(config_shapes(mistral)) == 7_241_732_096  # Mistral-7B's published count
