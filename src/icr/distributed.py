"""Beyond one process: training launched through `accelerate`, and stages split across local workers.

Training. `train_dpo_launched` runs `icr.train.train_dpo` under `accelerate launch` with one of the
shipped configs (`configs/accelerate/{ddp,deepspeed_zero2,deepspeed_zero3,fsdp,cpu_2proc}.yaml`):
it writes a job file and starts

    python -m accelerate.commands.launch --config_file CFG [--num_processes N] --mixed_precision P
        --main_process_port PORT [$ICR_ACCELERATE_ARGS] -m icr.train_worker JOB.json

and returns the main process's metrics. Several machines run the same command, each with its own
`--machine_rank` (docs/distributed.md); `ICR_ACCELERATE_ARGS` carries such per-node arguments.

Sampling and scoring. `run_generate_sharded` / `run_score_sharded` take the arguments of
`stages.run_generate` / `stages.run_score` plus `workers`: they start `workers` local processes,
worker i computing the stage's shards with index % workers == i (the same split as
`icr generate --shard i/N`), each on its own GPU(s) when there are GPUs, then join the shards
(the merge writes the stage manifest). The result is byte-identical to the unsharded stage: each
shard is seeded from (seed, shard index), not from the worker that computes it.

A worker is `python -m icr.distributed JOB.json --shard I/N`; the job file holds the resolved
experiment config and the stage's arguments, so workers also serve control runs, whose folders
differ from `{run_root}/{name}`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import IcrError

log = logging.getLogger("icr")

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
# A shard selector that matches no shard: run_generate/run_score called with it only check the
# manifest and prepare the stage folder (discarding shards of another key), without loading models.
_NO_SHARD = (10**9 - 1, 10**9)


# ---------------------------------------------------------------------------------------------
# Training through accelerate launch
# ---------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_accelerate_config(path: str) -> Path:
    """A config path as given, or a shipped name: `ddp`, `deepspeed_zero3`, ... (configs/accelerate/)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    shipped = REPO_CONFIGS / (path if path.endswith(".yaml") else f"{path}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in REPO_CONFIGS.glob("*.yaml"))
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
    `cfg.accelerate_config`. Returns train_dpo's metrics from the main process (plus
    `num_processes`, `distributed_type`, `backend`). Output goes to `log_file` (default
    out_dir/launch.log) and is echoed to this process's stderr; a failure raises IcrError with
    its tail.
    """
    from .models import resolve_device
    from .runs import write_json, write_jsonl

    accelerate_config = accelerate_config or cfg.accelerate_config
    if not accelerate_config:
        raise IcrError("train.accelerate_config: not set (a shipped name such as ddp, or a file)")
    config_file = resolve_accelerate_config(accelerate_config)
    device = resolve_device(device)
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    job_dir = out_dir / "launch"
    job_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(job_dir / "pairs.jsonl", pairs)
    result = job_dir / "result.json"
    result.unlink(missing_ok=True)
    job = {"pairs": str(job_dir / "pairs.jsonl"), "policy_path": policy_path, "reference_path": reference_path,
           "train": dataclasses.asdict(cfg), "out_dir": str(out_dir), "model_dir": str(model_dir), "seed": seed,
           "device": device, "chat_template": chat_template, "result": str(result)}
    write_json(job_dir / "job.json", job)
    nproc = num_processes or _config_num_processes(config_file)
    threads = max(1, (os.cpu_count() or 1) // nproc) if device == "cpu" else None
    cmd = accelerate_command(config_file, "icr.train_worker", [str(job_dir / "job.json")],
                             num_processes=num_processes, precision=mixed_precision(cfg.precision, device),
                             extra_args=extra_launch_args, cpu_threads=threads)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log_file = Path(log_file or out_dir / "launch.log")
    log.info("train: launching %s", shlex.join(cmd))
    t0 = time.time()
    code = _run_logged(cmd, env, log_file)
    if code != 0 or not result.is_file():
        raise IcrError(f"train: accelerate launch failed (exit {code}; log {log_file}):\n{_tail(log_file)}")
    metrics = json.loads(result.read_text(encoding="utf-8"))
    metrics["launch_seconds"] = round(time.time() - t0, 2)
    return metrics


def _run_logged(cmd: list[str], env: dict, log_file: Path) -> int:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------------------------
# Sharded generate / score in local worker processes
# ---------------------------------------------------------------------------------------------

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


def run_generate_sharded(cfg, policy_path: str, prompts, stage_dir: Path, *, seed: int, workers: int = 1,
                         **stage_kwargs) -> dict:
    """`stages.run_generate`, split across `workers` local processes (1: in this process).

    Other keyword arguments (e.g. `reuse=`) go to the in-process calls only: the first one, which
    checks the manifest and prepares the folder before any worker starts."""
    from .stages import run_generate

    if workers <= 1:
        return run_generate(cfg, policy_path, prompts, stage_dir, seed=seed, **stage_kwargs)
    args = {"policy_path": policy_path, "stage_dir": str(stage_dir), "seed": seed}
    return _run_sharded("generate", cfg, args, workers,
                        lambda shard, **kw: run_generate(cfg, policy_path, prompts, stage_dir, seed=seed, shard=shard,
                                                         **kw), stage_kwargs)


def run_score_sharded(cfg, samples_dir: Path, prompts, dpo_path: str, ref_path: str, stage_dir: Path, *,
                      translator_path: str | None = None, workers: int = 1, **stage_kwargs) -> dict:
    """`stages.run_score`, split across `workers` local processes (1: in this process)."""
    from .stages import run_score

    if workers <= 1:
        return run_score(cfg, samples_dir, prompts, dpo_path, ref_path, stage_dir, translator_path=translator_path,
                         **stage_kwargs)
    args = {"samples_dir": str(samples_dir), "dpo_path": dpo_path, "ref_path": ref_path,
            "stage_dir": str(stage_dir), "translator_path": translator_path}
    return _run_sharded("score", cfg, args, workers,
                        lambda shard, **kw: run_score(cfg, samples_dir, prompts, dpo_path, ref_path, stage_dir,
                                                      translator_path=translator_path, shard=shard, **kw),
                        stage_kwargs)


def _run_sharded(stage: str, cfg, args: dict, workers: int, call, stage_kwargs: dict) -> dict:
    """Prepare in-process, run the workers, merge in-process (the merge only reads shards)."""
    from .runs import read_json, write_json

    stage_dir = Path(args["stage_dir"])
    # Manifest check (and reuse, if asked) + stale-shard cleanup, before any worker starts.
    first = call(_NO_SHARD, **stage_kwargs)
    if first.get("skipped") or not first.get("partial"):
        return first
    job_dir = stage_dir.parent / f"{stage_dir.name}.workers"
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json(job_dir / "job.json", {"stage": stage, "config": cfg.to_dict(), "args": args})
    g = cfg.generation
    gpus_each = g.tensor_parallel_size if (g.backend == "vllm" and stage == "generate") else 1
    envs = worker_envs(workers, cfg.device, gpus_each)
    procs = []
    t0 = time.time()
    for i, extra in enumerate(envs):
        cmd = [sys.executable, "-m", "icr.distributed", str(job_dir / "job.json"), "--shard", f"{i}/{workers}"]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
        fh = open(job_dir / f"worker-{i}.log", "wb")
        procs.append((subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT), fh))
    log.info("%s: %d workers started (logs in %s)", stage, workers, job_dir)
    try:
        codes = [p.wait() for p, _ in procs]
    except BaseException:
        for p, _ in procs:
            p.terminate()
        raise
    finally:
        for _, fh in procs:
            fh.close()
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed:
        i = failed[0]
        raise IcrError(f"{stage}: worker {i}/{workers} failed (exit {codes[i]}; log {job_dir}/worker-{i}.log); "
                       f"rerun to resume from the finished shards:\n{_tail(job_dir / f'worker-{i}.log')}")
    result = call(None)  # all shards present: joins them and writes the manifest (unless a worker did)
    if result.get("skipped"):
        result = dict(read_json(stage_dir / "manifest.json")["counts"])
    result["workers"] = workers
    result["workers_seconds"] = round(time.time() - t0, 2)
    import shutil

    shutil.rmtree(job_dir, ignore_errors=True)
    return result


def _worker_main(argv: list[str]) -> int:
    """`python -m icr.distributed JOB.json --shard I/N`: one worker of `_run_sharded`."""
    import argparse

    from .config import config_from_dict
    from .data import load_prompt_set
    from .stages import run_generate, run_score

    parser = argparse.ArgumentParser(prog="python -m icr.distributed")
    parser.add_argument("job")
    parser.add_argument("--shard", required=True)
    a = parser.parse_args(argv)
    i, n = (int(x) for x in a.shard.split("/"))
    job = json.loads(Path(a.job).read_text(encoding="utf-8"))
    cfg = config_from_dict(job["config"], a.job)
    args = job["args"]
    prompts = load_prompt_set(cfg.prompts, cfg.languages)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s icr worker " + a.shard + " %(message)s")
    if job["stage"] == "generate":
        result = run_generate(cfg, args["policy_path"], prompts, Path(args["stage_dir"]), seed=args["seed"],
                              shard=(i, n))
    elif job["stage"] == "score":
        result = run_score(cfg, Path(args["samples_dir"]), prompts, args["dpo_path"], args["ref_path"],
                           Path(args["stage_dir"]), translator_path=args.get("translator_path"), shard=(i, n))
    else:
        raise SystemExit(f"unknown stage {job['stage']!r}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.exit(_worker_main(sys.argv[1:]))
    except IcrError as e:
        print(f"icr worker: error: {e}", file=sys.stderr)
        sys.exit(2)
