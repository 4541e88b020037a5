"""Past one machine without Ray, as docs/distributed.md writes it: stage commands on their shards
from a launcher's variables (`--shard auto`), `icr train` on every node of an accelerate launch,
one shared run folder, and model keys that do not depend on where the folder is mounted.

Nodes are simulated by processes on this host: what differs between real nodes (the host name in
the lock, the mount path) is covered by tests/test_reliability.py (leases) and the key tests here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from icr.train_launch import free_port

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"
ICR = str(Path(sys.executable).parent / "icr")


def _digests(folder: Path, pattern: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def _start(args: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen([ICR, *map(str, args)], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out
        outs.append(out)
    return outs


@pytest.fixture()
def built(tiny_pair):
    from icr.config import load_config
    from icr.loop import run_prepare

    run_prepare(load_config(TINY))


# --- --shard auto ---------------------------------------------------------------------------------

def test_shard_auto_reads_srun_then_torchrun_variables_and_names_what_is_missing(monkeypatch):
    from icr.cli import _parse_shard
    from icr.errors import IcrError

    for name in ("SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(IcrError, match="--shard auto: none of SLURM_PROCID/SLURM_NTASKS, RANK/WORLD_SIZE is set"):
        _parse_shard("auto")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _parse_shard("auto") == (3, 4)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert _parse_shard("auto") == (1, 8)  # srun's own variables win over a RANK set for something else
    monkeypatch.setenv("SLURM_PROCID", "8")
    with pytest.raises(IcrError, match=r"SLURM_PROCID/SLURM_NTASKS must satisfy 0 <= I < N, got '8/8'"):
        _parse_shard("auto")


# --- icr train on every node of a multi-node launch ------------------------------------------------

@pytest.mark.slow
def test_the_documented_two_node_train_runs_and_equals_two_processes_on_one_node(tmp_path, built, cli):
    """docs/distributed.md "Several machines": every node runs the same `icr train` with its
    machine rank in ICR_ACCELERATE_ARGS. Before, node 1 was refused ("in use by process N") by the
    run lock node 0 held. Two nodes x 1 process must train what one node x 2 processes trains:
    the same ranks, data split and gloo all-reduce."""
    sets = ["--set", "iterations=1", "--set", "evaluation.enabled=false", "--set", "train.accelerate_config=cpu_2proc",
            "--set", "train.warmup_ratio=0"]
    for root in ("nodes", "one"):
        for stage in ("generate", "score", "pairs"):
            assert cli(stage, TINY, *sets, "--set", f"run_root={tmp_path / root}", "--iteration", "1")[0] == 0
    assert cli("train", TINY, *sets, "--set", f"run_root={tmp_path / 'one'}", "--iteration", "1")[0] == 0
    port = free_port()
    nodes = [_start(["train", TINY, *sets, "--set", f"run_root={tmp_path / 'nodes'}", "--iteration", "1"],
                    {"ICR_ACCELERATE_ARGS": f"--num_machines 2 --num_processes 2 --machine_rank {r} "
                                            f"--main_process_ip 127.0.0.1 --main_process_port {port}"})
             for r in range(2)]
    outs = _finish(nodes)
    assert "'machine_rank': 1" in outs[1] and "in use" not in outs[1]
    one, two = tmp_path / "one" / "tiny" / "iter1", tmp_path / "nodes" / "tiny" / "iter1"
    assert _digests(two / "model", "*.safetensors") == _digests(one / "model", "*.safetensors")
    assert (two / "train" / "manifest.json").is_file() and (two / "train" / "launch-machine1.log").is_file()
    assert not (two / "train" / "launch-machine1").exists()  # node 1's job folder went when it succeeded


def test_machine_rank_is_read_from_the_launch_arguments(monkeypatch):
    from icr.errors import IcrError
    from icr.train_launch import machine_rank

    monkeypatch.delenv("ICR_ACCELERATE_ARGS", raising=False)
    assert machine_rank() == 0
    monkeypatch.setenv("ICR_ACCELERATE_ARGS", "--num_machines 4 --machine_rank 3 --main_process_ip 10.0.0.1")
    assert machine_rank() == 3
    monkeypatch.setenv("ICR_ACCELERATE_ARGS", "--machine_rank=2")
    assert machine_rank() == 2
    monkeypatch.setenv("ICR_ACCELERATE_ARGS", "--machine_rank $SLURM_NODEID")  # not expanded by a shell
    with pytest.raises(IcrError, match="--machine_rank must be an integer, got '\\$SLURM_NODEID'"):
        machine_rank()


# --- keys from content ------------------------------------------------------------------------------

def test_one_model_under_two_paths_has_one_key_and_a_changed_one_another(tiny_pair, tmp_path):
    """Nodes that mount the shared file system at different paths must compute the same stage keys
    (else one node's stage preparation discards the shards another wrote)."""
    from icr.runs import model_key

    model = Path(tiny_pair["dpo"])
    link = tmp_path / "mounted-elsewhere"
    link.symlink_to(model, target_is_directory=True)
    copy = tmp_path / "copied"
    shutil.copytree(model, copy)  # new paths, new modification times, same content
    assert model_key(str(model)) == model_key(str(link)) == model_key(str(copy))
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert model_key(str(copy)) != model_key(str(model))
    assert model_key("org/hub-model") == "org/hub-model"


@pytest.mark.slow
def test_nodes_seeing_the_models_under_other_paths_keep_each_others_shards(tmp_path, built, cli, monkeypatch):
    """One config with relative model paths, run from two working directories whose model folders
    are different paths to the same content (what two mount points of one file system are). Node
    A computes shard 0/2, node B shard 1/2: B must keep A's shards (same stage key) and the stage
    must equal one process's."""
    import yaml

    from icr.config import dump_config, load_config
    from icr.loop import resolve_placeholders, run_prepare

    cfg = resolve_placeholders(load_config(TINY), run_prepare(load_config(TINY)))
    data = yaml.safe_load(dump_config(cfg))
    data.update(prepare=None, iterations=1, run_root=str(tmp_path / "shared-runs"))
    data["models"].update(dpo="models/dpo", sft="models/sft")
    data["generation"]["shard_size"] = 2
    data["evaluation"]["enabled"] = False
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(data))
    for node in ("node-a", "node-b", "one"):
        for model in ("dpo", "sft"):
            shutil.copytree(Path(cfg.models.dpo if model == "dpo" else cfg.models.sft), tmp_path / node / "models" / model)
    stage = tmp_path / "shared-runs" / "tiny" / "iter1" / "generate"
    monkeypatch.chdir(tmp_path / "node-a")
    assert cli("generate", config, "--iteration", "1", "--shard", "0/2")[0] == 0
    from_a = _digests(stage, "shard-*.jsonl")
    monkeypatch.chdir(tmp_path / "node-b")
    code, _, err = cli("generate", config, "--iteration", "1", "--shard", "1/2")
    assert code == 0, err
    both = _digests(stage, "shard-*.jsonl")
    assert from_a and all(both[name] == digest for name, digest in from_a.items())  # A's shards kept
    assert (stage / "manifest.json").is_file()
    monkeypatch.chdir(tmp_path / "one")
    assert cli("generate", config, "--iteration", "1", "--set", f"run_root={tmp_path / 'one-runs'}")[0] == 0
    assert _digests(tmp_path / "one-runs" / "tiny" / "iter1" / "generate", "shard-*.jsonl") == both


# --- the sbatch recipe, as written ----------------------------------------------------------------

SRUN = r'''#!PYTHON
"""A stand-in for srun inside an allocation (SLURM_NNODES nodes x SLURM_NTASKS_PER_NODE tasks):
starts the tasks of one step on this host with srun's task variables, waits for all."""
import os, subprocess, sys
args, opts = sys.argv[1:], {}
while args and args[0].startswith("--"):
    name, _, value = args.pop(0)[2:].partition("=")
    opts[name] = value
nodes = int(opts.get("nodes", os.environ["SLURM_NNODES"]))
per_node = int(opts.get("ntasks-per-node", os.environ["SLURM_NTASKS_PER_NODE"]))
n = int(opts["ntasks"]) if "ntasks" in opts else nodes * per_node
per_node = max(1, n // nodes)
procs = [subprocess.Popen(args, env={**os.environ, "SLURM_PROCID": str(i), "SLURM_NTASKS": str(n),
                                     "SLURM_NODEID": str(i // per_node), "SLURM_STEP_NUM_TASKS": str(n)})
         for i in range(n)]
sys.exit(max(p.wait() for p in procs))
'''

SCONTROL = r'''#!/bin/sh
# A stand-in for `scontrol show hostnames LIST`: every node of the test's allocation is this host.
for i in $(seq 1 "$SLURM_NNODES"); do echo 127.0.0.1; done
'''


@pytest.mark.slow
def test_the_sbatch_recipe_runs_as_written_on_two_simulated_nodes(tmp_path, built):
    """docs/slurm/icr.sbatch, unchanged, in an allocation of 2 nodes x 1 task (srun and scontrol
    replaced by stand-ins that start the tasks on this host): the run finishes with the same shards,
    weights and results as `icr run` on one machine with the same 2 training processes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN.replace("PYTHON", sys.executable))
    (bin_dir / "scontrol").write_text(SCONTROL)
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    sets = ["--set", "iterations=1", "--set", "train.accelerate_config=cpu_2proc", "--set", "train.warmup_ratio=0",
            "--set", "generation.shard_size=2", "--set", "evaluation.enabled=true", "--set", "evaluation.judge=fake",
            "--set", "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl",
            "--set", "evaluation.max_new_tokens=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{Path(ICR).parent}:{os.environ['PATH']}",
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[1-2]",
           "CONFIG": str(TINY), "ITERATIONS": "1", "GPUS_PER_NODE": "1", "MAIN_PORT": str(free_port())}
    done = subprocess.run(["bash", str(REPO / "docs" / "slurm" / "icr.sbatch"), *sets, "--set",
                           f"run_root={tmp_path / 'slurm'}"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    one = subprocess.run([ICR, "run", TINY, *sets, "--set", f"run_root={tmp_path / 'one'}"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-5000:]
    a, b = tmp_path / "one" / "tiny", tmp_path / "slurm" / "tiny"
    for stage in ("generate", "score"):
        assert _digests(a / "iter1" / stage, "shard-*.jsonl") == _digests(b / "iter1" / stage, "shard-*.jsonl")
    assert (b / "iter1" / "pairs" / "pairs.jsonl").read_bytes() == (a / "iter1" / "pairs" / "pairs.jsonl").read_bytes()
    assert _digests(b / "iter1" / "model", "*.safetensors") == _digests(a / "iter1" / "model", "*.safetensors")
    import json

    fields = ("model", "lang", "judge", "n", "wr", "lc", "mean_len")
    rows = [{k: r[k] for k in fields} for r in json.loads((a / "results.json").read_text())]
    assert rows and rows == [{k: r[k] for k in fields} for r in json.loads((b / "results.json").read_text())]
