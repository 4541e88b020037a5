"""Training launched through `accelerate`: `train_dpo_launched` runs `icr.train.train_dpo` under
`accelerate launch` with one of the shipped configs
(`icr/accelerate_configs/{ddp,deepspeed_zero2,deepspeed_zero3,fsdp,cpu_2proc}.yaml`, package data):
it writes a job (icr.launch's format, kind `train_rank`) and starts

    python -m accelerate.commands.launch --config_file CFG [--num_processes N] --mixed_precision P
        --main_process_port PORT [$ICR_ACCELERATE_ARGS] -m icr.workers JOB.json

and returns the main process's metrics (every rank runs `train_rank`). Several machines run the same command, each with its own
`--machine_rank` (docs/distributed.md); `ICR_ACCELERATE_ARGS` carries such per-node arguments.
Under `cluster.backend: ray` (icr.launch.placed_by) icr starts that command itself on
`cluster.nodes` Ray nodes, one process group per node with `--num_machines`, `--machine_rank`,
`--main_process_ip` and `--main_process_port` filled in (icr.ray_backend.run_node_groups).
Beside `train.py` (which it launches) and below `stages.py` (which calls it).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import shlex
import socket
import sys
import time
from importlib.resources import as_file, files
from pathlib import Path

from .errors import IcrError
from .launch import active_cluster, child_env, collect, run_job_command, run_processes, write_job

log = logging.getLogger("icr")

# The shipped configs are package data (pyproject.toml), found from any working directory and in a
# non-editable install; one extracted from a zip install is a temporary copy, removed at exit.
SHIPPED_CONFIGS = files("icr") / "accelerate_configs"
_EXTRACTED = contextlib.ExitStack()
atexit.register(_EXTRACTED.close)


# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_accelerate_config(path: str) -> Path:
    """A config path as given, or a shipped name: `ddp`, `deepspeed_zero3`, ... (SHIPPED_CONFIGS).
    Always a real file: `accelerate launch --config_file` reads it in another process."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    shipped = SHIPPED_CONFIGS / (path if path.endswith(".yaml") else f"{path}.yaml")
    if shipped.is_file():
        return _EXTRACTED.enter_context(as_file(shipped))
    names = sorted(q.name.removesuffix(".yaml") for q in SHIPPED_CONFIGS.iterdir() if q.name.endswith(".yaml"))
    raise IcrError(f"train.accelerate_config: {path!r} is neither a file nor a shipped config ({', '.join(names)})")


def mixed_precision(precision: str, device: str) -> str:
    """What `dpo_config` trains in, as accelerate's --mixed_precision (they must agree)."""
    on_gpu = device.startswith("cuda")
    return "bf16" if precision == "bf16" or (precision == "auto" and on_gpu) else "no"


def accelerate_command(config_file: str | Path, module: str, module_args: list[str], *,
                       num_processes: int | None = None, precision: str | None = None,
                       main_process_port: int | None = None, extra_args: list[str] | None = None,
                       cpu_threads: int | None = None) -> list[str]:
    """The `accelerate launch` command line (run with this interpreter, so the same environment)."""
    extra = list(extra_args or []) + shlex.split(os.environ.get("ICR_ACCELERATE_ARGS", ""))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if num_processes is not None and "--num_processes" not in extra:
        cmd += ["--num_processes", str(num_processes)]
    if precision is not None and "--mixed_precision" not in extra:
        cmd += ["--mixed_precision", precision]
    if "--main_process_port" not in extra and "--num_machines" not in extra:
        cmd += ["--main_process_port", str(main_process_port or free_port())]
    if cpu_threads is not None and "--num_cpu_threads_per_process" not in extra:
        cmd += ["--num_cpu_threads_per_process", str(cpu_threads)]
    return cmd + extra + ["-m", module, *module_args]


def machine_rank(extra_args: list[str] | None = None) -> int:
    """This node's `--machine_rank` in a multi-node launch written by the user (ICR_ACCELERATE_ARGS
    or `extra_args`; 0 when not given): node 0 holds the run folder and writes the model, the
    others only train."""
    args = list(extra_args or []) + shlex.split(os.environ.get("ICR_ACCELERATE_ARGS", ""))
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("--machine_rank", "--machine-rank"):
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            try:
                return int(value)
            except ValueError:
                raise IcrError(f"ICR_ACCELERATE_ARGS: --machine_rank must be an integer, got {value!r}") from None
    return 0


def _config_num_processes(config_file: Path) -> int:
    import yaml

    data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    return int(data.get("num_processes", 1))


def train_dpo_launched(pairs: list[dict], policy_path: str, reference_path: str, cfg, out_dir: Path,
                       model_dir: Path, *, seed: int = 42, device: str = "auto", chat_template: str | None = None,
                       accelerate_config: str | None = None, num_processes: int | None = None,
                       extra_launch_args: list[str] | None = None, log_file: Path | None = None) -> dict:
    """`train.train_dpo` with the same arguments, run by `accelerate launch` in `num_processes` processes.

    `cfg` is the `train` section (TrainConfig); `accelerate_config` defaults to
    `cfg.accelerate_config`. The launch is a job of `icr.launch` (kind `train_rank`: every rank runs
    `train_rank`). Returns train_dpo's metrics from the main process (plus `num_processes`,
    `distributed_type`, `backend`). Output goes to `log_file` (default out_dir/launch.log); a
    failure raises IcrError with its tail.
    """
    from .models import resolve_device
    from .runs import write_jsonl

    accelerate_config = accelerate_config or cfg.accelerate_config
    if not accelerate_config:
        raise IcrError("train.accelerate_config: not set (a shipped name such as ddp, or a file)")
    config_file = resolve_accelerate_config(accelerate_config)
    cluster = active_cluster()
    on_ray = cluster is not None and cluster.backend == "ray"
    if on_ray:  # the nodes' device, not this process's (the head may have no GPU)
        from .ray_backend import connect, task_device

        connect(cluster)
        device = task_device(device)
    else:
        device = resolve_device(device)
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    # Nodes launched by the user (ICR_ACCELERATE_ARGS) run this with the same shared out_dir: each
    # its own job folder and log; only node 0's main process returns metrics and writes the model.
    node = 0 if on_ray else machine_rank(extra_args=extra_launch_args)
    job_dir = out_dir / ("launch" if node == 0 else f"launch-machine{node}")
    job_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(job_dir / "pairs.jsonl", pairs)
    args = {"pairs": str(job_dir / "pairs.jsonl"), "policy_path": policy_path, "reference_path": reference_path,
            "train": dataclasses.asdict(cfg), "out_dir": str(out_dir), "model_dir": str(model_dir), "seed": seed,
            "device": device, "chat_template": chat_template}
    nproc = num_processes or _config_num_processes(config_file)
    threads = max(1, (os.cpu_count() or 1) // nproc) if device == "cpu" else None
    cmd = accelerate_command(config_file, "icr.workers", [str(job_dir / "job.json")],
                             num_processes=num_processes, precision=mixed_precision(cfg.precision, device),
                             extra_args=extra_launch_args, cpu_threads=threads)
    env = child_env({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None)
    log_file = Path(log_file or out_dir / ("launch.log" if node == 0 else f"launch-machine{node}.log"))
    t0 = time.time()
    if node:
        log.info("train: launching %s (machine %d: node 0 writes the model)", shlex.join(cmd), node)
        run_job_command(job_dir, "train_rank", None, args, cmd, env, log_file, results=False)
        return {"machine_rank": node, "launch_seconds": round(time.time() - t0, 2)}
    if on_ray:
        metrics = _launched_on_ray(cluster, job_dir, args, log_file, config_file, nproc, device, cfg.precision)
    else:
        log.info("train: launching %s", shlex.join(cmd))
        metrics = run_job_command(job_dir, "train_rank", None, args, cmd, env, log_file)
    metrics["launch_seconds"] = round(time.time() - t0, 2)
    return metrics


MACHINE_ARGS = ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port")


def _launched_on_ray(cluster, job_dir: Path, args: dict, log_file: Path, config_file: Path, nproc: int, device: str,
                     precision: str) -> dict:
    """The same launch as one `accelerate launch` per node of `cluster.nodes` Ray nodes, each with
    nproc / nodes processes; node r's output goes to `log_file` (r = 0) or launch-machine<r>.log."""
    from .ray_backend import run_node_groups

    nodes = cluster.nodes
    given = [a for a in shlex.split(os.environ.get("ICR_ACCELERATE_ARGS", "")) if a.split("=")[0] in MACHINE_ARGS]
    if given:
        raise IcrError(f"ICR_ACCELERATE_ARGS: {' '.join(given)} is set by icr under cluster.backend: ray; remove it")
    if nproc % nodes:
        raise IcrError(f"cluster.nodes: {nodes} nodes do not evenly share train.accelerate_config's "
                       f"{nproc} processes")
    per_node = nproc // nodes
    threads = max(1, (os.cpu_count() or 1) // per_node) if device == "cpu" else None
    job_file = write_job(job_dir, "train_rank", None, args)

    def node_command(rank: int, main_ip: str, main_port: int) -> list[str]:
        machine = ["--num_machines", str(nodes), "--machine_rank", str(rank), "--main_process_ip", main_ip,
                   "--main_process_port", str(main_port)]
        return accelerate_command(config_file, "icr.workers", [str(job_file)], num_processes=nproc,
                                  precision=mixed_precision(precision, device), extra_args=machine,
                                  cpu_threads=threads)

    logs = [log_file if r == 0 else log_file.with_name(f"launch-machine{r}.log") for r in range(nodes)]
    codes = run_node_groups(node_command, logs, cluster=cluster, device=device, per_node=per_node,
                            start=run_processes)
    failed = next((c for c in codes if c), 0)  # the main process's result-0.json, or why not
    return collect(job_dir, "train_rank", [failed], log_of=lambda i: logs[codes.index(failed)])[0]


def train_rank(cfg, args: dict) -> dict | None:
    """One rank of launched training (job kind `train_rank`, run by `python -m icr.workers` under
    `accelerate launch`): set up the distributed state first (so `cuda` means this rank's GPU),
    then `icr.train.train_dpo`; TRL's `DPOTrainer` does the rest (DDP, DeepSpeed, FSDP from the
    launch environment). The main process returns the metrics, the others None."""
    from accelerate import PartialState

    from .config import TrainConfig, section_from_dict
    from .runs import read_jsonl
    from .train import train_dpo

    # Before any model is loaded: binds this process to its GPU (LOCAL_RANK) and opens the process
    # group (nccl on GPUs, gloo on CPU), so "cuda" below is this rank's device.
    state = PartialState(cpu=args["device"] == "cpu")
    # train_dpo saves through trainer.save_model on every rank (gathering sharded weights);
    # only the main process writes model_dir.
    metrics = train_dpo(read_jsonl(args["pairs"]), args["policy_path"], args["reference_path"],
                        section_from_dict(TrainConfig, args["train"], "train", "job"), Path(args["out_dir"]),
                        Path(args["model_dir"]), seed=args["seed"], device=args["device"],
                        chat_template=args.get("chat_template"))
    state.wait_for_everyone()
    if state.is_main_process:
        metrics = {**metrics, "num_processes": state.num_processes,
                   "distributed_type": str(state.distributed_type), "backend": state.backend}
    state.wait_for_everyone()
    state.destroy_process_group() if hasattr(state, "destroy_process_group") else None
    return metrics if state.is_main_process else None
