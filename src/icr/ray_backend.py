"""The Ray backend (`cluster.backend: ray`): a job's processes run as Ray tasks on a Ray cluster.

One `icr run` on a node of a Ray cluster (`ray start --head` on one node, `ray start --address` on
the others, a file system shared by all) drives every stage; docs/distributed.md, "Across nodes on
Ray". `icr.launch` decides *what* runs (the job file, the `python -m icr.workers` command lines,
the join of the results); this module decides *where*, in two ways:

- `run_commands`: one Ray task per process of a job (a shard worker of generate or score, an
  isolated stage, evaluation's sampling), asking Ray for the GPUs it needs (vLLM's
  tensor-parallel size included) or, on the CPU, one CPU. Ray picks the node.
- `run_node_groups`: one task per node, pinned there through a placement group with one bundle per
  node (STRICT_SPREAD: distinct nodes, all reserved before any starts, so no group waits on a node
  that never comes); each runs the same command with its machine rank: `accelerate launch
  --num_machines N --machine_rank r --main_process_ip <rank 0's node> --main_process_port P`
  (icr.train_launch builds it). Rank 0's address and a free port on it are asked from a small task
  in bundle 0 first.

**Why a task starts a child process instead of running the stage itself** (rather than
`max_calls=1`): the child is exactly the local backend's (`python -m icr.workers JOB.json --shard
i/N`, started by `icr.launch.run_processes`, output to `launch.worker_log`), so a stage cannot
behave differently under Ray; it always starts on an empty GPU (a pooled Ray worker would not,
and `max_calls=1` still runs the stage inside Ray's worker, beside Ray's own threads and, for vLLM,
Ray-aware executor choices); `generation.finish_process` (vLLM's exit) applies unchanged; and a
child killed by the kernel (out of memory) is seen as an exit by signal that the task returns,
while the task, small and alive, tells where it ran. When the task's own Ray worker dies, Ray
(2.60, checked) kills that worker's child processes too, so a retried shard worker never runs
beside its orphaned predecessor. The task is started with the node's own
Python (`sys.executable` of Ray's worker: the environment `ray start` was run from), so nodes need
not install icr at the same path as the head. The child inherits the task's environment (Ray sets
`CUDA_VISIBLE_DEVICES` to the GPUs it granted) plus the head's `ICR_*`, `HF_*`, `TRANSFORMERS_*`,
`TOKENIZERS_*`, `VLLM_*`, `WANDB_*` variables; on the CPU it gets no GPU and a share of the node's
cores, as a local worker does.

**Retries.** A process that ended by a signal (killed, out of memory) or whose Ray worker or node
died is started again, up to `cluster.task_retries` times; it resumes at its first missing shard
(shards are written atomically: a half-written one is a temporary file that nothing reads, and the
finished ones are kept). Any other exit code is the process's answer and goes back to
`icr.launch.collect` unchanged (an IcrError found in the child stays that one line; retrying it
would fail the same way). When the retries are spent, one IcrError line names the process, the
node (IP and host name, from the `.node` file the task writes beside its log before it starts the
child) and the log. Training's node groups are not retried one by one (a process group cannot
take back one lost member): the first failure stops the other groups and is reported; a rerun
resumes from the last checkpoint.

**Connecting** (`connect`, once per process): `cluster.address` auto (the cluster `ray start` runs
on this node), host:port or ray://host:port, or local (a one-node cluster bound to 127.0.0.1, no
dashboard, stopped at exit). A process that already called `ray.init` (a test, a notebook) is
used as it is. Ray is imported here only, inside functions (`pip install 'icr[ray]'`).
A local cluster must be started by the first `import ray` of the process (`LOOPBACK_ONLY` is read
then): Ray, given `_node_ip_address="127.0.0.1"` alone, takes the machine's outward address
instead and listens on every interface (seen with ray 2.60).

Test hook: `ICR_TEST_RAY_KILL=PATH` makes the first task of process 0 of a job kill its child and
itself (SIGKILL, as the out-of-memory killer would) as soon as PATH exists, once: it leaves
`PATH.killed` so that no later task does it again (tests/test_ray.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .config import CLUSTER_ADDRESS
from .errors import IcrError
from .runs import read_json, write_json

log = logging.getLogger("icr")

FORWARDED_ENV = ("ICR_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "VLLM_", "WANDB_")
KILL_HOOK = "ICR_TEST_RAY_KILL"
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's one-machine mode (see connect)
RESERVE_SECONDS = 600  # how long training's node groups may wait for their nodes to be free
_started_here = False  # whether connect() started the cluster (address local): stopped at exit


def ray_module():
    """`import ray`, or the one-line error that says how to get it."""
    try:
        import ray
    except ImportError:
        raise IcrError("cluster.backend: ray needs the ray package (pip install 'icr[ray]')") from None
    return ray


def connect(cluster) -> None:
    """Join (or, for address local, start) the Ray cluster `cluster` names, once per process."""
    global _started_here
    address = str(cluster.address)
    if not CLUSTER_ADDRESS.fullmatch(address):  # also checked at validation (icr.config)
        raise IcrError(f"cluster.address: expected auto, local, host:port or ray://host:port, got {address!r}")
    if address == "local":
        # Read by Ray when it is imported: without it Ray swaps 127.0.0.1 for the machine's outward
        # address and its servers listen on every interface; with it they listen on 127.0.0.1 only.
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    ray = ray_module()
    if ray.is_initialized():
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address == "local":
            ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=os.cpu_count() or 1,
                     object_store_memory=100 * 2**20, **quiet)
            _started_here = True
            atexit.register(shutdown)
            if [n["NodeManagerAddress"] for n in _nodes()] != ["127.0.0.1"]:  # ray imported before connect
                log.warning("ray: the local cluster is not on 127.0.0.1 only (ray was imported before icr set %s=0)",
                            LOOPBACK_ONLY)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise IcrError(f"cluster.address: cannot join the Ray cluster at {address!r} "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                       "start it with `ray start --head`, or set cluster.address") from None
    log.info("ray: %s, %s", address, _describe(ray.cluster_resources()))


def shutdown() -> None:
    """Stop the cluster that `connect` started (address local); leave a joined one running."""
    global _started_here
    if _started_here:
        ray_module().shutdown()
        _started_here = False


def _describe(resources: dict) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def _nodes() -> list[dict]:
    return [n for n in ray_module().nodes() if n.get("Alive")]


def task_device(device: str) -> str:
    """cpu or cuda for the tasks: `device` auto means cuda when the cluster has GPUs (the head
    itself may have none)."""
    if device != "auto":
        return device
    return "cuda" if ray_module().cluster_resources().get("GPU", 0) > 0 else "cpu"


def _check_fits(what: str, field: str, gpus: int, device: str) -> None:
    """A request no node can grant would wait forever in Ray's queue: refuse it now."""
    if device != "cuda":
        return
    most = max((n["Resources"].get("GPU", 0) for n in _nodes()), default=0)
    if most < gpus:
        raise IcrError(f"{field}: a {what} process needs {gpus} GPU(s) on one node; the Ray cluster's "
                       f"largest node has {most:g}")


# ---------------------------------------------------------------------------------------------
# The task (runs on a node, in a Ray worker)
# ---------------------------------------------------------------------------------------------

def _run_on_node(python_args: list[str], env: dict, log_path: str, cpu_share: int | None, start, kill_after):
    """Run `python python_args` with this node's Python through `start` (icr.launch.run_processes)
    and return (exit code, node ip, host name). `cpu_share`: on the CPU, this process gets
    1/cpu_share of the node's cores and no GPU."""
    import ray

    where = {"ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid(),
             "node_id": ray.get_runtime_context().get_node_id()}
    write_json(node_file(log_path), where)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **env}
    if cpu_share:
        threads = str(max(1, (os.cpu_count() or 1) // cpu_share))
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    done = threading.Event()  # Ray reuses its worker processes: the hook ends with this task
    if kill_after:
        threading.Thread(target=_kill_when, args=(Path(kill_after), done), daemon=True).start()
    try:
        code = start([[sys.executable, *python_args]], [env], [Path(log_path)])[0]
    finally:
        done.set()
    return code, where["ip"], where["host"]


def _kill_when(path: Path, done: threading.Event) -> None:
    """The test hook (module docstring): once `path` exists, kill this task's children and itself."""
    while not path.exists():
        if done.wait(0.05):
            return
    Path(f"{path}.killed").touch()
    me = os.getpid()
    for child in Path(f"/proc/{me}/task").glob(f"*/children"):
        for pid in child.read_text().split():
            os.kill(int(pid), signal.SIGKILL)
    os.kill(me, signal.SIGKILL)


def _free_port() -> tuple[str, int]:
    import ray

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def node_file(log_path) -> Path:
    """Where a task records its node (beside its log: the run folder is shared)."""
    return Path(f"{log_path}.node")


def _where(log_path) -> str:
    try:
        n = read_json(node_file(log_path))
        return f"node {n['ip']} ({n['host']})"
    except (OSError, ValueError, KeyError):
        return "a node not known (the task never started)"


# ---------------------------------------------------------------------------------------------
# The head's side
# ---------------------------------------------------------------------------------------------

def _python_args(command: list[str]) -> list[str]:
    if not command or command[0] != sys.executable:
        raise ValueError(f"not a command of this Python: {command[:1]}")  # icr.launch builds them so
    return command[1:]


def _forwarded_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV) and k != KILL_HOOK}


def run_commands(commands: list[list[str]], logs: list[Path], *, cluster, device: str, gpus: int, start,
                 what: str) -> list[int]:
    """Run each command (`[sys.executable, *args]`, process i of a job) once, as a Ray task with
    `gpus` GPUs (device cuda) or one CPU; retry a process that died (module docstring). Returns the
    exit codes in order, for `icr.launch.collect`."""
    ray = ray_module()
    connect(cluster)
    device = task_device(device)
    _check_fits(what, "generation.tensor_parallel_size" if gpus > 1 else "device", gpus, device)
    remote = ray.remote(_run_on_node)
    n, env = len(commands), _forwarded_env()
    hook = os.environ.get(KILL_HOOK)
    options = {"num_cpus": 1, "num_gpus": gpus if device == "cuda" else 0, "max_retries": 0}

    def submit(i: int, attempt: int):
        kill = hook if hook and i == 0 and attempt == 0 and not Path(f"{hook}.killed").exists() else None
        return remote.options(**options, name=f"icr-{what}-{i}").remote(
            _python_args(commands[i]), env, str(logs[i]), n if device == "cpu" else None, start, kill)

    pending = {submit(i, 0): i for i in range(n)}
    attempts, codes = [0] * n, [None] * n
    log.info("ray: %d %s task%s submitted (logs: %s%s)", n, what, "" if n == 1 else "s", logs[0],
             ", ..." if n > 1 else "")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            died = _outcome(ray, ready[0], codes, i)
            if died is None:
                continue
            if attempts[i] >= cluster.task_retries:
                raise IcrError(f"{what}: process {i}/{n} on {_where(logs[i])} died ({died}) after "
                               f"{attempts[i] + 1} attempt(s) (cluster.task_retries: {cluster.task_retries}); "
                               f"log {logs[i]}; rerun to resume from the finished shards")
            attempts[i] += 1
            log.warning("ray: %s process %d/%d on %s died (%s); starting it again (attempt %d of %d)", what, i, n,
                        _where(logs[i]), died, attempts[i] + 1, cluster.task_retries + 1)
            pending[submit(i, attempts[i])] = i
    except BaseException:
        _cancel(ray, pending)
        raise
    return codes


def _outcome(ray, ref, codes: list, i: int) -> str | None:
    """Record a finished task's exit code in codes[i] and return None, or say how it died."""
    try:
        code, _, _ = ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # this module's own code failed in the task: not a death
        raise IcrError(f"ray: a task failed: {str(e).strip().splitlines()[-1]}") from None
    except ray.exceptions.RayError as e:  # the worker process or its node died, out of memory, ...
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    if code < 0:
        return f"killed by signal {-code} ({signal.Signals(-code).name if -code in signal.valid_signals() else '?'})"
    codes[i] = code
    return None


def _cancel(ray, pending: dict) -> None:
    """Stop the tasks still running: Ray raises KeyboardInterrupt in each, and icr.launch's
    run_processes then stops its child (terminate, kill after 30 s)."""
    for ref in pending:
        ray.cancel(ref, force=False)
    if pending:
        ray.wait(list(pending), num_returns=len(pending), timeout=40)


def run_node_groups(build_command, logs: list[Path], *, cluster, device: str, per_node: int, start) -> list[int]:
    """Training across `cluster.nodes` nodes: on each node r one task runs `build_command(r, ip, port)`
    (`accelerate launch` with machine rank r, rank 0's node ip and a free port there), with
    `per_node` GPUs (device cuda) or CPUs. Returns the exit codes; the first failure stops the others."""
    ray = ray_module()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    connect(cluster)
    device, nodes = task_device(device), cluster.nodes
    bundle = {"CPU": 1, "GPU": per_node} if device == "cuda" else {"CPU": per_node}
    fit = [n for n in _nodes() if all(n["Resources"].get(k, 0) >= v for k, v in bundle.items())]
    if len(fit) < nodes:
        raise IcrError(f"cluster.nodes: training on {nodes} node(s) needs {nodes} Ray node(s) with {_describe(bundle)} "
                       f"each (train.accelerate_config: {per_node * nodes} processes); the cluster has {len(fit)}")
    group = placement_group([bundle] * nodes, strategy="STRICT_SPREAD")
    try:
        if not group.wait(timeout_seconds=RESERVE_SECONDS):
            raise IcrError(f"cluster.nodes: {nodes} node(s) with {_describe(bundle)} each were not free within "
                           f"{RESERVE_SECONDS} s")
        on = [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r) for r in range(nodes)]
        ip, port = ray.get(ray.remote(_free_port).options(num_cpus=1, scheduling_strategy=on[0]).remote())
        remote = ray.remote(_run_on_node)
        env, options = _forwarded_env(), {"num_cpus": bundle["CPU"], "num_gpus": bundle.get("GPU", 0), "max_retries": 0}
        pending = {remote.options(**options, scheduling_strategy=on[r], name=f"icr-train-node{r}").remote(
            _python_args(build_command(r, ip, port)), env, str(logs[r]), 1 if device == "cpu" else None, start,
            None): r for r in range(nodes)}
        log.info("ray: training on %d node(s), rank 0 at %s:%d (logs: %s%s)", nodes, ip, port, logs[0],
                 ", ..." if nodes > 1 else "")
        return _wait_node_groups(ray, pending, logs)
    finally:
        remove_placement_group(group)


def _wait_node_groups(ray, pending: dict, logs: list[Path]) -> list[int]:
    """Wait for every group; a group that died is reported here, one that exited non-zero is
    returned (with the others stopped) so that icr.launch.collect reports it as a local launch."""
    codes = [None] * len(logs)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            r = pending.pop(ready[0])
            died = _outcome(ray, ready[0], codes, r)
            if died is not None:
                raise IcrError(f"train: node group {r}/{len(logs)} on {_where(logs[r])} died ({died}); log {logs[r]}; "
                               "the other groups were stopped; rerun to resume from the last checkpoint")
            if codes[r] != 0:
                _cancel(ray, pending)
                return codes
    except BaseException:
        _cancel(ray, pending)
        raise
    return codes
