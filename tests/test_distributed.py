"""Beyond one process, on the CPU: 2-process (gloo) DPO+NLL training through `accelerate launch`
equals 1 process with the same effective batch; generate + score split across 2 concurrent local
workers equal the unsharded stages byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

ACCEL = REPO / "src" / "icr" / "accelerate_configs"
SHIPPED = {"ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "cpu_2proc"}


def _pairs(root: Path, n: int = 16) -> list[dict]:
    prompts = [json.loads(line)["instruction"] for line in (root / "prompts/train/en.jsonl").read_text().splitlines()]
    return [{"prompt": f"{prompts[i % len(prompts)]} ({i})",
             "chosen": f"The answer is {i} and it is good.", "rejected": f"no {i * 7} bad bad"} for i in range(n)]


def _log_losses(out_dir: Path) -> list[tuple[int, float]]:
    ckpt = sorted((out_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def test_shipped_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.stem for p in ACCEL.glob("*.yaml")}
    assert SHIPPED <= names
    for path in ACCEL.glob("*.yaml"):
        cfg = load_config_from_file(str(path))  # accelerate's own parser: unknown keys fail here
        raw = yaml.safe_load(path.read_text())
        assert cfg.num_processes == raw["num_processes"] >= 2, path
    from icr.train_launch import resolve_accelerate_config

    for name in ("paper-llama3-8b", "paper-llama3-8b-lowres", "icr-llama3-8b"):
        paper = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        assert resolve_accelerate_config(paper["train"]["accelerate_config"]) == ACCEL / "deepspeed_zero3.yaml"


def test_shipped_accelerate_config_is_found_by_name_from_any_directory(monkeypatch, tmp_path):
    from icr.errors import IcrError
    from icr.train_launch import resolve_accelerate_config

    monkeypatch.chdir(tmp_path)
    assert resolve_accelerate_config("deepspeed_zero3") == ACCEL / "deepspeed_zero3.yaml"
    assert resolve_accelerate_config("ddp.yaml") == ACCEL / "ddp.yaml"
    (tmp_path / "ddp.yaml").write_text("num_processes: 2\n")  # a file of that name wins over the shipped one
    assert resolve_accelerate_config("ddp.yaml") == Path("ddp.yaml")
    with pytest.raises(IcrError) as err:
        resolve_accelerate_config("zero4")
    assert str(err.value) == ("train.accelerate_config: 'zero4' is neither a file nor a shipped config "
                              "(cpu_2proc, ddp, deepspeed_zero2, deepspeed_zero3, fsdp)")


def test_a_built_wheel_ships_the_accelerate_configs_and_finds_them_by_name(tmp_path):
    """A non-editable install: the wheel carries the YAMLs, and a name resolves to a real file from
    another directory, both from the unpacked wheel and from the wheel imported as a zip."""
    src = tmp_path / "checkout"
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("icr-*.whl")
    entries = set(zipfile.ZipFile(wheel).namelist())
    assert {f"icr/accelerate_configs/{n}.yaml" for n in SHIPPED} <= entries
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # installing a pure-Python wheel = unpacking it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import icr.train_launch as t; "
            "p = t.resolve_accelerate_config('deepspeed_zero3'); print(t.__file__); print(p.read_text() if p.is_file() else '-')")
    expected = (ACCEL / "deepspeed_zero3.yaml").read_text()
    for where in (tmp_path / "site", wheel):
        out = subprocess.run([sys.executable, "-c", code, str(where)], cwd=elsewhere, check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}).stdout
        module, config = out.split("\n", 1)
        assert module.startswith(str(where)), module
        assert config == expected + "\n", config


def test_accelerate_command_line(monkeypatch):
    from icr.train_launch import accelerate_command, mixed_precision, resolve_accelerate_config

    assert resolve_accelerate_config("ddp") == ACCEL / "ddp.yaml"
    with pytest.raises(Exception, match="deepspeed_zero3"):
        resolve_accelerate_config("zero4")
    assert mixed_precision("auto", "cpu") == "no" and mixed_precision("auto", "cuda") == "bf16"
    monkeypatch.setenv("ICR_ACCELERATE_ARGS", "--num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1")
    cmd = accelerate_command(ACCEL / "ddp.yaml", "icr.workers", ["job.json"], num_processes=16, precision="bf16")
    assert cmd[-3:] == ["-m", "icr.workers", "job.json"]
    assert cmd[cmd.index("--num_processes") + 1] == "16" and cmd[cmd.index("--machine_rank") + 1] == "1"
    assert "--main_process_port" not in cmd  # several machines: the port comes with the node arguments


_COMMON = dict(learning_rate=1e-3, epochs=1, warmup_ratio=0.0, lr_scheduler="constant", logging_steps=1,
               save_steps=1000, max_length=128, nll_weight=1.0)


@pytest.fixture(scope="module")
def one_process_run(tiny_pair, tmp_path_factory):
    """1 process x batch 4, reference log-probs computed in the loop: what 2 processes must equal."""
    from icr.config import TrainConfig
    from icr.train import train_dpo

    one = tmp_path_factory.mktemp("one")
    metrics = train_dpo(_pairs(tiny_pair["root"]), tiny_pair["dpo"], tiny_pair["sft"],
                        TrainConfig(per_device_batch_size=4, **_COMMON), one, one / "model", seed=42, device="cpu")
    return one, metrics


@pytest.mark.slow
@pytest.mark.parametrize("precompute", [False, True], ids=["ref-in-loop", "ref-precomputed"])
def test_two_gloo_processes_train_like_one_with_the_same_effective_batch(tiny_pair, tmp_path, one_process_run,
                                                                          precompute):
    """2 processes x batch 2 (DDP on CPU, gloo) vs 1 process x batch 4, DPO + NLL, 4 optimizer steps.

    Same samples per optimizer step (the distributed sampler hands each rank half of the same
    global batch), DDP averages gradients, and the logged loss is averaged over ranks. The sigmoid
    (DPO) term is a per-pair mean, so it is the same function of the global batch; the NLL term is
    a token mean per rank, averaged over ranks, so it differs from the 4-pair token mean by the
    ranks' token-count imbalance (small here). Tolerance: losses within 1e-3 relative; final weights
    within 5% of the training update's size (seen: 8e-6 relative loss, 2% of the update).

    With `precompute_ref_log_probs` the reference log-probs are computed once before training (TRL
    caches them in a datasets file every rank must read: this crashed on rank 1 with a
    FileNotFoundError before icr gave the dataset a folder shared by the ranks) and must give the
    same losses as the reference run in the loop.
    """
    from safetensors.torch import load_file

    from icr.config import TrainConfig
    from icr.train_launch import train_dpo_launched

    pairs = _pairs(tiny_pair["root"])
    one, m1 = one_process_run
    two = tmp_path / "two"
    m2 = train_dpo_launched(pairs, tiny_pair["dpo"], tiny_pair["sft"],
                            TrainConfig(per_device_batch_size=2, accelerate_config="cpu_2proc",
                                        precompute_ref_log_probs=precompute, **_COMMON),
                            two, two / "model", seed=42, device="cpu")
    assert m2["num_processes"] == 2 and m2["backend"] == "gloo" and "MULTI_CPU" in m2["distributed_type"]
    assert m1["steps"] == m2["steps"] == 4
    l1, l2 = _log_losses(one), _log_losses(two)
    assert [s for s, _ in l1] == [s for s, _ in l2] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(l1, l2):
        assert abs(a - b) <= 1e-3 * abs(a), (l1, l2)
    assert abs(m1["train_loss"] - m2["train_loss"]) <= 1e-3 * abs(m1["train_loss"])
    w1, w2 = load_file(one / "model/model.safetensors"), load_file(two / "model/model.safetensors")
    w0 = load_file(Path(tiny_pair["dpo"]) / "model.safetensors")
    update = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert update > 1e-3 and diff <= 0.05 * update, (diff, update)
    assert (two / "model/tokenizer_config.json").is_file()
    assert not list(two.glob(".rank*-model"))  # only the main process wrote a model
    assert (two / "pairs-dataset").is_dir() == precompute


def test_one_process_seeing_several_gpus_is_refused_before_training():
    from icr.errors import IcrError
    from icr.train import check_one_device_per_process

    with pytest.raises(IcrError, match=r"train: 8 GPUs are visible to one training process; set train.accelerate_config"):
        check_one_device_per_process("cuda", cuda_devices=8, world_size=1)
    check_one_device_per_process("cuda", cuda_devices=8, world_size=8)  # launched: one GPU per process
    check_one_device_per_process("cuda", cuda_devices=1, world_size=1)
    check_one_device_per_process("cpu", cuda_devices=0, world_size=1)


def _digest(stage_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(stage_dir.glob("shard-*.jsonl"))}


@pytest.mark.slow
def test_two_concurrent_shard_workers_equal_the_unsharded_stages(tiny_pair, tmp_path):
    from icr.config import load_config
    from icr.data import load_prompt_set
    from icr.loop import resolve_placeholders
    from icr.plan import iteration_plan
    from icr.runs import read_json
    from icr.stages import run_generate, run_score
    from icr.workers import run_stage

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run_root={tmp_path}", "generation.shard_size=4",
                                                       "generation.max_new_tokens=12"])
    cfg = resolve_placeholders(cfg, tiny_pair["root"])
    prompts = load_prompt_set(cfg.prompts, cfg.languages)
    dpo, sft = tiny_pair["dpo"], tiny_pair["sft"]
    pa, pb = iteration_plan(cfg, tmp_path / "unsharded", 1), iteration_plan(cfg, tmp_path / "sharded", 1)
    assert (pa.policy, pa.reward_policy, pa.reward_reference) == (dpo, dpo, sft)
    a, b = pa.dir, pb.dir
    ga = run_generate(cfg, pa, prompts=prompts)
    sa = run_score(cfg, pa, prompts=prompts)
    gb = run_stage("generate", cfg, pb, prompts=prompts, workers=2)
    sb = run_stage("score", cfg, pb, prompts=prompts, workers=2)
    assert gb["workers"] == sb["workers"] == 2
    assert ga["shards"] >= 3  # both workers had work: shards 0, 2, .. and 1, 3, ..
    for stage in ("generate", "score"):
        assert _digest(a / stage) == _digest(b / stage) and _digest(a / stage)
        ma, mb = read_json(a / stage / "manifest.json"), read_json(b / stage / "manifest.json")
        assert ma["key"] == mb["key"]
    assert all(gb[k] == ga[k] for k in ("prompts", "shards", "samples", "skipped_long_prompts"))
    assert sb["scored"] == sa["scored"]
    assert not (b / "generate.workers").exists() and not (b / "score.workers").exists()
    # A finished stage is not redone: no worker is started.
    again = run_stage("generate", cfg, pb, prompts=prompts, workers=2)
    assert again == {"skipped": True}


def test_train_stage_checks_the_gpu_count_before_loading_anything(tiny_pair, tmp_path, monkeypatch):
    """The device count faked: 4 GPUs, no accelerate launch (no WORLD_SIZE) -> the clear refusal."""
    import torch

    import icr.train
    from icr.config import TrainConfig
    from icr.errors import IcrError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(icr.train, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(icr.train, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(IcrError, match="4 GPUs are visible to one training process"):
        icr.train.train_dpo(_pairs(tiny_pair["root"]), tiny_pair["dpo"], tiny_pair["sft"], TrainConfig(),
                            tmp_path, tmp_path / "model", device="cuda")
