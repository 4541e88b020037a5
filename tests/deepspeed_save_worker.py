"""Run by tests/test_deepspeed_save.py under torchrun, 2 CPU processes (gloo): DeepSpeed ZeRO-{2,3} bf16
training of a tiny Llama at lr 5e-7, then icr.train.deepspeed_fp32_state_dict (what the train stage saves
under DeepSpeed with train.save_dtype float32); rank 0 writes a summary JSON to argv[2]."""
import json, os, sys
import torch
import deepspeed
from transformers import LlamaConfig, LlamaForCausalLM

stage, out = int(sys.argv[1]), sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
rank = int(os.environ["RANK"])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
             "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
if stage == 3:
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(config)
else:
    model = LlamaForCausalLM(config)
from icr.train import deepspeed_fp32_state_dict
start = {}
if stage == 3:
    for n, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            start[n] = p.detach().float().clone()
else:
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
opt = torch.optim.AdamW(model.parameters(), lr=5e-7, weight_decay=0.0)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
g = torch.Generator().manual_seed(rank)
for _ in range(5):
    ids = torch.randint(0, 64, (2, 16), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
state = deepspeed_fp32_state_dict(engine.module, rank == 0)
module16 = {}
for n, p in engine.module.named_parameters():
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p]):
            module16[n] = p.detach().float().clone()
    else:
        module16[n] = p.detach().float().clone()
if rank == 0:
    total = sum(v.numel() for v in start.values())
    summary = {
        "stage": stage,
        "dtypes": sorted({str(v.dtype) for v in state.values()}),
        "keys_match": sorted(state) == sorted(start),
        # DeepSpeed's fp32 masters start from the bf16 module: compared with the bf16-rounded start
        "fp32_changed_share": sum(int((state[n] != start[n].bfloat16().float()).sum()) for n in start) / total,
        "bf16_module_changed_share": sum(int((module16[n] != start[n].bfloat16().float()).sum()) for n in start) / total,
        "fp32_rounds_to_module": all(torch.equal(state[n].bfloat16().float(), module16[n]) for n in start),
    }
    json.dump(summary, open(out, "w"))
    print(summary)
