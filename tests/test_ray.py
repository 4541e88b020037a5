"""The Ray backend (icr.ray_backend, `cluster.backend: ray`) on a two-node Ray cluster on this
machine (ray.cluster_utils: two raylets of 1 CPU each, every server on 127.0.0.1; started once for
this module and stopped by it): the tiny loop with 2 shard workers writes the same bytes (shards,
pairs, weights, evaluation outputs) as the local backend, also when a worker is killed after its
first shard; a worker that keeps dying is one line naming it and its node; training launched as one
accelerate process group per node (2 nodes x 1 process) gives the weights of the local 2-process
launch. `cluster.address: local` (a one-node cluster started by icr) is checked in its own process:
its servers listen on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import subprocess
import sys

import pytest

from .conftest import REPO

if importlib.util.find_spec("ray") is None:  # not imported here: icr.ray_backend.connect imports it first
    pytest.skip("ray is not installed (pip install 'icr[ray]'; .ci/run installs it)", allow_module_level=True)

TINY = REPO / "configs" / "tiny.yaml"
LOOP = ["iterations=1", "workers=2", "generation.max_new_tokens=8", "evaluation.enabled=true",
        "evaluation.judge=fake", "evaluation.models=[M0]", "evaluation.max_new_tokens=8",
        "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl"]
RAY = ["cluster.backend=ray", "cluster.address=local"]
COMPARED = ("iter1/*/shard-*.jsonl", "iter1/pairs/pairs.jsonl", "iter1/model/model.safetensors",
            "eval/*/*/model_outputs.json")


@pytest.fixture(autouse=True)
def time_limit():
    """Nothing here may wait forever on Ray: a test over 5 minutes fails (its tasks are cancelled)."""
    def expire(*_):
        raise TimeoutError("test_ray: over 300 s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on 127.0.0.1 for the module; icr joins them by address (host:port)."""
    from icr.config import ClusterConfig
    from icr.ray_backend import LOOPBACK_ONLY, connect

    os.environ.setdefault(LOOPBACK_ONLY, "0")  # before ray is imported (icr.ray_backend.connect)
    import ray
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        connect(ClusterConfig(backend="ray", address=cluster.address))
        assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"] * 2
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _cfg(tiny_pair, run_root, *sets):
    from icr.config import load_config
    from icr.loop import resolve_placeholders

    return resolve_placeholders(load_config(TINY, [f"run_root={run_root}", *sets]), tiny_pair["root"])


def _digests(run) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pattern in COMPARED for p in sorted(run.glob(pattern))}


@pytest.fixture(scope="module")
def local_run(tiny_pair, tmp_path_factory):
    """The tiny loop on the local backend, 2 shard workers: the bytes every Ray run must match."""
    from icr.loop import run_experiment

    run = run_experiment(_cfg(tiny_pair, tmp_path_factory.mktemp("local"), *LOOP))
    digests = _digests(run)
    assert len(digests) >= 8, digests  # 3 generate + 3 score shards, pairs, weights, eval outputs
    return digests


@pytest.mark.slow
def test_the_tiny_loop_on_ray_writes_the_local_backends_bytes(tiny_pair, tmp_path, ray_cluster, local_run):
    from icr.loop import run_experiment

    run = run_experiment(_cfg(tiny_pair, tmp_path, *LOOP, *RAY))
    assert _digests(run) == local_run
    logs = sorted(p.name for p in run.rglob("worker-*.log"))
    assert logs.count("worker-0.log") >= 3 and "worker-1.log" in logs  # generate, score, train, eval ran as tasks
    node = sorted(run.rglob("worker-0.log.node"))[0].read_text()
    assert '"ip": "127.0.0.1"' in node


@pytest.mark.slow
def test_a_worker_killed_after_its_first_shard_is_started_again_and_the_run_is_identical(
        tiny_pair, tmp_path, ray_cluster, local_run, monkeypatch):
    from icr.loop import run_experiment
    from icr.runs import read_jsonl

    first = tmp_path / "tiny" / "iter1" / "generate" / "shard-00000.jsonl"  # worker 0 of 2: shards 0, 2
    monkeypatch.setenv("ICR_TEST_RAY_KILL", str(first))
    run = run_experiment(_cfg(tiny_pair, tmp_path, *LOOP, *RAY, "evaluation.enabled=false"))
    assert (tmp_path / "tiny/iter1/generate/shard-00000.jsonl.killed").is_file()  # it was killed
    ours = _digests(run)
    assert len(ours) == 8 and ours == {k: v for k, v in local_run.items() if not k.startswith("eval/")}
    journal = [r["shard"] for r in read_jsonl(run / "iter1" / "generate" / "journal.jsonl")]
    assert sorted(journal) == [0, 1, 2]  # the retry resumed at shard 2: shard 0 was kept, not redone


@pytest.mark.slow
def test_a_worker_that_dies_past_its_retries_is_one_line_naming_it_and_its_node(
        tiny_pair, tmp_path, ray_cluster, monkeypatch):
    from icr.data import load_prompt_set
    from icr.errors import IcrError
    from icr.plan import iteration_plan
    from icr.runs import read_jsonl
    from icr.workers import run_stage

    cfg = _cfg(tiny_pair, tmp_path, *LOOP, *RAY, "cluster.task_retries=0")
    plan = iteration_plan(cfg, tmp_path / "run", 1)
    monkeypatch.setenv("ICR_TEST_RAY_KILL", str(plan.generate_dir / "shard-00000.jsonl"))
    with pytest.raises(IcrError) as failed:
        run_stage("generate", cfg, plan, prompts=load_prompt_set(cfg.prompts, cfg.languages))
    line = str(failed.value)
    assert "\n" not in line and line.startswith("generate: process 0/2 on node 127.0.0.1 (")
    assert "killed by signal 9" in line or "WorkerCrashedError" in line, line
    assert "cluster.task_retries: 0" in line and "worker-0.log" in line
    # Nothing half-written. The kill lands when shard 0 exists, polled every 50 ms: on an idle machine
    # worker 0 may have written its other shard by then, and worker 1, finishing last, the manifest
    # of a stage that is then complete (seen in CI). Either way every shard there is whole.
    shards = sorted(plan.generate_dir.glob("shard-*.jsonl"))
    if (plan.generate_dir / "manifest.json").exists():
        from icr.runs import read_json

        assert len(shards) == read_json(plan.generate_dir / "manifest.json")["counts"]["shards"]
    for shard in shards:  # 2 prompts x 4 samples a line
        assert len(read_jsonl(shard)) % 4 == 0


@pytest.mark.slow
def test_training_launched_on_ray_nodes_equals_the_local_launch(tiny_pair, tmp_path, ray_cluster):
    """cpu_2proc (2 gloo processes): one process on each of the 2 Ray nodes (two accelerate launches,
    --num_machines 2) vs both launched here."""
    from icr.config import ClusterConfig, TrainConfig
    from icr.launch import placed_by
    from icr.runs import read_json
    from icr.train_launch import train_dpo_launched

    from .test_distributed import _COMMON, _pairs

    pairs = _pairs(tiny_pair["root"], 8)  # 2 optimizer steps of 2 processes x 2
    train = TrainConfig(per_device_batch_size=2, accelerate_config="cpu_2proc", **_COMMON)
    local = train_dpo_launched(pairs, tiny_pair["dpo"], tiny_pair["sft"], train, tmp_path / "local",
                               tmp_path / "local" / "model", seed=42, device="cpu")
    with placed_by(ClusterConfig(backend="ray", address="local", nodes=2)):
        on_ray = train_dpo_launched(pairs, tiny_pair["dpo"], tiny_pair["sft"], train, tmp_path / "ray",
                                    tmp_path / "ray" / "model", seed=42, device="cpu")
    assert on_ray["num_processes"] == local["num_processes"] == 2 and on_ray["steps"] == local["steps"] >= 2
    same = [(tmp_path / x / "model" / "model.safetensors").read_bytes() for x in ("local", "ray")]
    assert same[0] == same[1]
    nodes = [read_json(tmp_path / "ray" / log) for log in ("launch.log.node", "launch-machine1.log.node")]
    assert nodes[0]["node_id"] != nodes[1]["node_id"]  # one group on each Ray node


def test_requests_no_node_can_grant_are_refused_before_waiting(ray_cluster, tmp_path):
    from icr.config import ClusterConfig
    from icr.errors import IcrError
    from icr.launch import run_processes
    from icr.ray_backend import run_commands, run_node_groups

    cluster = ClusterConfig(backend="ray", address="local", nodes=3)
    with pytest.raises(IcrError, match=r"^generation.tensor_parallel_size: a generate process needs 2 GPU\(s\) "
                                       r"on one node; the Ray cluster's largest node has 0$"):
        run_commands([["python"]], [tmp_path / "w.log"], cluster=cluster, device="cuda", gpus=2,
                     start=run_processes, what="generate")
    with pytest.raises(IcrError, match=r"^cluster.nodes: training on 3 node\(s\) needs 3 Ray node\(s\) with "
                                       r"1 CPU, 0 GPU each .*; the cluster has 2$"):
        run_node_groups(lambda *a: ["python"], [tmp_path / "a.log"] * 3, cluster=cluster, device="cpu",
                        per_node=1, start=run_processes)


def test_a_bad_address_is_named_before_ray_is_asked():
    from icr.config import ClusterConfig
    from icr.errors import IcrError
    from icr.ray_backend import connect

    with pytest.raises(IcrError, match=r"^cluster.address: expected auto, local, host:port or ray://host:port, "
                                       r"got 'my cluster'$"):
        connect(ClusterConfig(backend="ray", address="my cluster"))


LOCAL_CLUSTER = """
import os, sys
from pathlib import Path
from icr.config import ClusterConfig
from icr.ray_backend import connect, shutdown

def listening():  # (address, socket inode) of every listening TCP socket
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":
                out.append((f[1].rsplit(":", 1)[0], f[9]))
    return out

def inodes_of_my_tree():
    me, pids, found = str(os.getpid()), set(), set()
    parents = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parents[p.name] = (p / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except OSError:
                pass
    tree, grew = {me}, True
    while grew:
        new = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= new
        grew = bool(new)
    for pid in tree:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(target[8:-1])
    return found

connect(ClusterConfig(backend="ray", address="local"))
import ray
print("nodes", [n["NodeManagerAddress"] for n in ray.nodes()])
mine = inodes_of_my_tree()
print("listening", sorted({address for address, inode in listening() if inode in mine}))
shutdown()
print("after", ray.is_initialized())
"""


def test_address_local_starts_a_one_node_cluster_listening_on_127_0_0_1_only_and_stops_it():
    """IPv4 127.0.0.1 in /proc/net/tcp is 0100007F; in tcp6, the v4-mapped ::ffff:127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", LOCAL_CLUSTER], capture_output=True, text=True, timeout=120,
                         env=env, cwd=REPO).stdout
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("nodes", "listening", "after")))
    assert lines["nodes"] == "['127.0.0.1']", out
    addresses = eval(lines["listening"])  # noqa: S307 - our own script's printed list
    assert addresses and set(addresses) <= {"0100007F", "0000000000000000FFFF00000100007F"}, addresses
    assert lines["after"] == "False"


def test_without_ray_the_backend_is_one_line_saying_how_to_get_it(monkeypatch):
    from icr.config import ClusterConfig
    from icr.errors import IcrError
    from icr.ray_backend import connect

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    with pytest.raises(IcrError, match=r"^cluster.backend: ray needs the ray package \(pip install 'icr\[ray\]'\)$"):
        connect(ClusterConfig(backend="ray", address="auto"))
