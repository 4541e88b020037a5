"""Every child process icr starts, in one place: one job format, one way to start, wait and stop.

Why children at all: generate, score, train and evaluation's sampling each load models. Run in the
`icr run` process, whatever a stage leaves cached (CUDA allocator blocks, a vLLM engine's
reservation, reference cycles in a model) stays on the GPU for the next stage; a stage run in its
own process returns every byte when the process exits. Shard workers (`workers: N`) also run here.

**The job format.** A job is a folder holding `job.json`:

    {"kind": "generate" | "score" | "train" | "eval_outputs" | "eval_judge" | "train_rank",
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

Each command starts in a process group of its own; `_stop` ends a job's processes with everything
they started (an `accelerate launch` and its ranks), on an error or a stop of this process: SIGINT
or SIGTERM to an icr command raises `Stopped` here (`stop_on_signals`, installed by icr.cli), so the
command unwinds as on Ctrl-C (workers stopped, locks released) and exits 128 + the signal.

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
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import IcrError
from .runs import read_json, write_json

log = logging.getLogger("icr")

KINDS = ("generate", "score", "train", "eval_outputs", "eval_judge", "train_rank")


def import_error(module: str, timeout: float = 600) -> str | None:
    """None if `import <module>` works in a fresh Python (this interpreter, this sys.path), else the
    last line it printed (or that it timed out). A child, because importing some packages (deepspeed)
    takes seconds and probes the accelerator: preflight must not pay or keep that in the parent."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"`import {module}` did not finish in {timeout:.0f} s"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    return (lines or ["no output"])[-1][:300]


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
    """Start every command (output to its log file, in a process group of its own), wait for all;
    on any interruption of the parent (Ctrl-C, SIGTERM: `Stopped`, an error) stop them with
    everything they started (`_stop`). Returns the exit codes (`collect` checks them with what each
    process left)."""
    procs = []
    try:
        for cmd, env, path in zip(commands, envs, logs):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with _signals_held():  # a stop arriving now is seen once the process is on the list
                fh = open(path, "wb")
                try:
                    # stdin: not the terminal, which a process outside its foreground group may not read
                    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                            stderr=subprocess.STDOUT, **OWN_GROUP)
                except BaseException:
                    fh.close()
                    raise
                procs.append((proc, fh))
        log.info("%d process%s started (logs: %s)", len(procs), "" if len(procs) == 1 else "es",
                 ", ".join(str(p) for p in logs[:2]) + (", ..." if len(logs) > 2 else ""))
        # Waited for, not reaped: a process that ended keeps its pid (and so its process group's id)
        # until all have ended, so `_stop` never signals a group whose id was given to another.
        codes = [_wait_unreaped(p) for p, _ in procs]
    except BaseException:
        _stop([p for p, _ in procs])
        raise
    finally:
        for p, fh in procs:
            fh.close()
            if p.returncode is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)  # reaps it (it has ended: waited for above, or killed by _stop)
    return codes


# ---------------------------------------------------------------------------------------------
# Stopping: signals to icr commands, and a job's processes with all they started
# ---------------------------------------------------------------------------------------------

# A child leads a process group of its own, so that its own children (the ranks of `accelerate
# launch`, a vLLM engine's processes) can be stopped with it, and so that Ctrl-C at a terminal
# reaches only the icr command, which stops its workers itself (`_stop`).
OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_SECONDS = 30.0  # from SIGTERM to SIGKILL (torch's elastic launcher gives its ranks 30 s too)


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM received by an icr command (`stop_on_signals`). A KeyboardInterrupt, so
    whatever unwinds on Ctrl-C unwinds on it too (`run_processes` stops the workers, run locks are
    released, Ray tasks are cancelled); the command exits 128 + `signum` (130, 143)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)


_held = 0  # depth of `_signals_held` blocks
_pending: list[int] = []  # signals received inside them


def _on_signal(signum, frame) -> None:
    if _held:
        _pending.append(signum)
        return
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    """For the duration (an icr command's whole life, icr.cli): SIGINT and SIGTERM raise `Stopped`
    in the main thread. The previous handlers are put back afterwards. Outside the main thread
    (where Python allows no handler) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _signals_held():
    """Signals of `stop_on_signals` received in the block are raised at its end (the first one),
    so that the block is never cut short: a process started in it is on the list `_stop` reads,
    and `_stop` itself finishes."""
    global _held
    _held += 1
    signum = None
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending:
            signum = _pending[0]
            _pending.clear()
    if signum is not None:
        raise Stopped(signum)


def _wait_unreaped(p: subprocess.Popen) -> int:
    """Wait for `p` to end and return its exit code as Popen gives it (-N: killed by signal N),
    leaving it unreaped (a zombie holding its pid) where the platform allows."""
    if p.returncode is not None or not hasattr(os, "waitid"):
        return p.wait()
    info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    if info is None:  # not waitable after all
        return p.wait()
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _stop(procs: list[subprocess.Popen], grace: float | None = None) -> None:
    """Stop the processes `run_processes` started (not reaped yet) and everything they started:
    SIGTERM to each one's process group and to each of its descendants found now (torch's elastic
    launcher puts its ranks in sessions of their own), then SIGKILL to whatever of them is left
    after `grace` seconds (STOP_GRACE_SECONDS), at once on a second SIGINT/SIGTERM. Leaves what a
    kill -9 leaves: the stage's finished shards and checkpoints, which a rerun resumes from."""
    procs = [p for p in procs if p.returncode is None]  # a reaped one's pid may be another's now
    if not procs:
        return
    grace = STOP_GRACE_SECONDS if grace is None else grace
    groups = [p.pid for p in procs]
    with _signals_held():  # a second signal hurries the stop, never cuts it short
        tree = _descendants(groups)
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        _signal_tree(tree, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (alive := _alive(groups, tree)) and time.monotonic() < deadline and not _pending:
            time.sleep(0.1)
            tree.update(_descendants(groups))  # started meanwhile
        if alive:
            if _pending:
                log.warning("a second stop signal: killing the workers now")
            for pgid in groups:
                _signal_group(pgid, signal.SIGKILL)
            _signal_tree(tree, signal.SIGKILL)


def _process_table() -> dict[int, tuple[int, int, str, int]] | None:
    """pid -> (parent pid, process group, state, start time) of this host's processes, from /proc;
    None where there is no /proc (then process groups alone are stopped)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    table = {}
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold anything
            table[int(name)] = (int(fields[1]), int(fields[2]), fields[0], int(fields[19]))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not the format expected
            continue
    return table


def _descendants(pids: list[int], table: dict | None = None) -> dict[int, int]:
    """Every descendant of `pids` (not themselves): pid -> its start time (which tells it from a
    later process given the same pid)."""
    table = _process_table() if table is None else table
    if not table:
        return {}
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = table[child][3]
                todo.append(child)
    return found


def _alive(groups: list[int], tree: dict[int, int]) -> bool:
    """Whether a process of these process groups, or of `tree` (pid -> start time), still runs.
    Zombies do not count: where pid 1 reaps nobody (some containers), an orphan's zombie stays."""
    table = _process_table()
    if table is None:  # the group leaders alone (a zombie leader keeps its group "alive" for killpg)
        for pgid in groups:
            try:
                if os.waitid(os.P_PID, pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                    return True
            except ChildProcessError:
                continue
        return False
    wanted = set(groups)
    return any(state not in ("Z", "X") and (pgrp in wanted or tree.get(pid) == started)
               for pid, (_, pgrp, state, started) in table.items())


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # nothing of it is left
        pass


def _signal_tree(tree: dict[int, int], sig: int) -> None:
    """Signal each process of `tree` (pid -> start time) that is still the process recorded."""
    table = _process_table() or {}
    for pid, started in tree.items():
        if pid in table and table[pid][3] == started and table[pid][2] not in ("Z", "X"):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


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
