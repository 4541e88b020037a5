"""Every child process icr starts, in one place: one job format, one way to start, wait and stop.

Why children at all: generate, score, train and evaluation's sampling each load models. Run in the
`icr run` process, whatever a stage leaves cached (CUDA allocator blocks, a vLLM engine's
reservation, reference cycles in a model) stays on the GPU for the next stage; a stage run in its
own process returns every byte when the process exits. Shard workers (`workers: N`) also run here.

**The job format.** A job is a folder holding `job.json`:

    {"kind": "generate" | "score" | "train" | "eval_outputs" | "train_rank",
     "config": <the resolved experiment config, ExperimentConfig.to_dict()>,
     "args": {...}}            # what the kind needs beyond the config (an iteration: run_dir, t)

Process i of a job writes `result-<i>.json` (its result) or `error-<i>.json` (an IcrError's one
line, raised again in the parent) into the folder, and its output to `worker_log(job_dir, i)` (the
stage folder's `logs/worker-<i>.log`, kept). The folder is removed when every process succeeded and
kept (with `exit-<i>.json` for a non-zero exit) when one failed.

**Two ways to start a job's processes** (the only `subprocess` calls of icr):

- `run_job(job_dir, job, envs)`: one `python -m icr.workers JOB.json --shard I/N` per environment
  (shard workers; an isolated stage is the case N = 1);
- `run_job_command(job_dir, job, cmd, env)`: one command that starts the job's processes itself and
  ends in `-m icr.workers JOB.json` (`accelerate launch`: one process per rank, rank from the
  environment).

The child side (`python -m icr.workers`) is `icr.workers._worker_main`. `run_workers` places a
job's processes by `cluster.backend`: here (`run_job` with `worker_envs`), or as Ray tasks
(`icr.ray_backend`, which starts the same command lines through `run_processes` on a node Ray
picks: this module still decides what runs, Ray where). `placed_by` tells launched training
(icr.train_launch) that its node groups go to Ray too.
This module imports no other part of icr but `errors`, `runs` and (lazily, for Ray) `ray_backend`,
so every stage can launch.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import IcrError
from .runs import read_json, write_json

log = logging.getLogger("icr")

KINDS = ("generate", "score", "train", "eval_outputs", "train_rank")


def write_job(job_dir: Path, kind: str, config: dict, args: dict) -> Path:
    """Write `job_dir/job.json` (clearing results of an earlier, interrupted attempt); return its path."""
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r} ({', '.join(KINDS)})")
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    for old in job_dir.glob("*-*.json"):
        old.unlink()
    path = job_dir / "job.json"
    write_json(path, {"kind": kind, "config": config, "args": args})
    return path


def worker_command(job_file: Path, shard: tuple[int, int] | None = None) -> list[str]:
    """The child's command line, run with this interpreter (so the same environment)."""
    cmd = [sys.executable, "-m", "icr.workers", str(job_file)]
    return cmd + (["--shard", f"{shard[0]}/{shard[1]}"] if shard else [])


def worker_log(job_dir: Path, index: int) -> Path:
    """Where process `index` of a job writes its output (whatever backend runs it): the `logs/`
    folder of the stage folder beside a `<stage>.workers` job folder, kept after success (the job
    folder goes) so a long run's workers can be read afterwards; `icr status` shows a failed one's
    tail (icr.progress). A job folder of another name keeps its logs in `<job_dir>/logs/`."""
    job_dir = Path(job_dir)
    stage_dir = job_dir.with_name(job_dir.name.removesuffix(".workers")) if job_dir.name.endswith(".workers") \
        else job_dir
    return stage_dir / "logs" / f"worker-{index}.log"


def child_env(extra: dict | None = None) -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **(extra or {}))


def run_job(job_dir: Path, kind: str, config: dict, args: dict, envs: list[dict]) -> list[dict]:
    """Run one process per environment override in `envs` (process i is shard i/len(envs)) and
    return their results in order; raise IcrError if one failed."""
    job_file = write_job(job_dir, kind, config, args)
    n = len(envs)
    commands = [worker_command(job_file, (i, n)) for i in range(n)]
    codes = run_processes(commands, [child_env(e) for e in envs],
                          [worker_log(job_dir, i) for i in range(n)])
    return collect(job_dir, kind, codes)


def run_workers(job_dir: Path, kind: str, cfg, args: dict, workers: int, gpus: int | None = None) -> list[dict]:
    """`workers` processes of a job (process i is shard i/workers), each with `gpus` GPUs (default:
    `gpus_per_worker`), placed by `cfg.cluster.backend`: local (`worker_envs`: this machine's GPUs or
    a share of its cores) or ray (`icr.ray_backend`: Ray grants the GPUs; local ones are not looked at)."""
    gpus = gpus_per_worker(cfg, kind) if gpus is None else gpus
    if cfg.cluster.backend != "ray":
        return run_job(job_dir, kind, cfg.to_dict(), args, worker_envs(workers, cfg.device, gpus))
    from .ray_backend import run_commands

    job_file = write_job(job_dir, kind, cfg.to_dict(), args)
    logs = [worker_log(job_dir, i) for i in range(workers)]
    codes = run_commands([worker_command(job_file, (i, workers)) for i in range(workers)], logs,
                         cluster=cfg.cluster, device=cfg.device, gpus=gpus, start=run_processes, what=kind)
    return collect(job_dir, kind, codes)


_CLUSTER = contextvars.ContextVar("icr_cluster", default=None)


@contextlib.contextmanager
def placed_by(cluster):
    """Within this block, launched training (icr.train_launch, called by the train stage with the
    `train` section only) places its processes by `cluster` (a ClusterConfig)."""
    token = _CLUSTER.set(cluster)
    try:
        yield
    finally:
        _CLUSTER.reset(token)


def active_cluster():
    """The ClusterConfig of the enclosing `placed_by`, or None (local)."""
    return _CLUSTER.get()


def run_job_command(job_dir: Path, kind: str, config: dict, args: dict, command: list[str], env: dict,
                    log_file: Path, *, results: bool = True) -> dict:
    """Run `command` (which starts the job's processes itself, e.g. `accelerate launch ... -m
    icr.workers JOB.json`, see `worker_command`) and return process 0's result. `results=False`:
    the job's process 0 runs elsewhere (a node of a multi-node launch other than node 0): only the
    exit status and any process's error count, and {} is returned."""
    write_job(job_dir, kind, config, args)
    codes = run_processes([command], [env], [log_file])
    if not results:
        collect(job_dir, kind, codes, log_of=lambda i: log_file, results=False)
        return {}
    return collect(job_dir, kind, codes, log_of=lambda i: log_file)[0]


def run_processes(commands: list[list[str]], envs: list[dict], logs: list[Path]) -> list[int]:
    """Start every command (output to its log file), wait for all; on any interruption of the
    parent (Ctrl-C, SIGTERM turned into an exception, an error) stop them: terminate, then kill
    after 30 s. Returns the exit codes (`collect` checks them with what each process left)."""
    procs = []
    try:
        for cmd, env, path in zip(commands, envs, logs):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "wb")
            procs.append((subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT), fh))
        log.info("%d process%s started (logs: %s)", len(procs), "" if len(procs) == 1 else "es",
                 ", ".join(str(p) for p in logs[:2]) + (", ..." if len(logs) > 2 else ""))
        codes = [p.wait() for p, _ in procs]
    except BaseException:
        _stop([p for p, _ in procs])
        raise
    finally:
        for _, fh in procs:
            fh.close()
    return codes


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def collect(job_dir: Path, kind: str, codes: list[int], log_of=None, *, results: bool = True) -> list[dict]:
    """Results of the processes of a finished job (exit `codes`, process i = shard i); a process's
    IcrError is raised here with its one line (any rank's, e.g. under accelerate), any other
    failure with the tail of its log. The job folder goes on success."""
    job_dir = Path(job_dir)
    log_of = log_of or (lambda i: worker_log(job_dir, i))
    n = len(codes)
    for i, code in enumerate(codes):  # kept with the job folder for `icr status` (icr.progress)
        if code != 0:
            write_json(job_dir / f"exit-{i}.json", {"exit": code})
    for error in sorted(job_dir.glob("error-*.json")):  # bad input found in a child: the same line as in-process
        raise IcrError(read_json(error)["error"])
    for i, code in enumerate(codes):
        if code != 0 or (results and not (job_dir / f"result-{i}.json").is_file()):
            raise IcrError(f"{kind}: process {i}/{n} failed (exit {code}; log {log_of(i)}); rerun to resume "
                           f"from the finished work:\n{log_tail(log_of(i))}")
    found = [read_json(job_dir / f"result-{i}.json") for i in range(n)] if results else []
    shutil.rmtree(job_dir, ignore_errors=True)
    return found


# ---------------------------------------------------------------------------------------------
# Placement: which process sees which GPUs (or CPU threads)
# ---------------------------------------------------------------------------------------------

def isolate_stages(cfg) -> bool:
    """Whether stages run in child processes (`isolate_stages`; auto: when the device is CUDA;
    always under `cluster.backend: ray`, where they run on the cluster's nodes)."""
    if cfg.cluster.backend == "ray":
        return True
    if cfg.isolate_stages == "auto":
        from .models import resolve_device

        return resolve_device(cfg.device).startswith("cuda")
    return bool(cfg.isolate_stages)


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out (CUDA_VISIBLE_DEVICES if set, else all)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch/CUDA: no GPUs
        return []


def worker_envs(workers: int, device: str, gpus_per_worker: int = 1) -> list[dict]:
    """Environment overrides per worker: its own GPU(s), or a share of the CPU threads."""
    gpus = [] if device == "cpu" else visible_gpus()
    if gpus:
        need = workers * gpus_per_worker
        if len(gpus) < need:
            raise IcrError(f"workers: {workers} workers x {gpus_per_worker} GPU(s) each need {need} GPUs, "
                           f"{len(gpus)} visible")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * gpus_per_worker:(i + 1) * gpus_per_worker])}
                for i in range(workers)]
    if device == "cuda":
        raise IcrError("workers: device cuda, but no GPU is visible")
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            for _ in range(workers)]


def gpus_per_worker(cfg, kind: str) -> int:
    """A process that samples with vLLM, or scores with it, needs `tensor_parallel_size` GPUs."""
    g = cfg.generation
    samples = kind in ("generate", "eval_outputs") or (kind == "score" and cfg.reward.variant == "translate_to_english")
    vllm_scores = kind == "score" and cfg.reward.backend == "vllm"
    return g.tensor_parallel_size if (g.backend == "vllm" and samples) or vllm_scores else 1


def run_in_child(kind: str, cfg, args: dict, folder: Path) -> dict:
    """Any job kind (e.g. evaluation's sampling, `eval_outputs`) in one child process that sees the
    GPUs its kind needs; returns its result."""
    return run_workers(folder, kind, cfg, args, 1)[0]


def log_tail(path: Path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])
