"""GPU memory the `icr run` process holds between stages: torch.cuda.memory_reserved() in the parent
after each stage of a tiny run, with every GPU stage in its own process (isolate_stages: true) and
with all stages in this process (false).

    .venv/bin/python bench/stage_memory.py          # on a machine with a CUDA GPU
    .venv/bin/python bench/stage_memory.py --dry    # on the CPU: checks the script, no figures

A run is `icr run configs/tiny.yaml` (1 iteration, evaluation of M0 and M1 with the `fake` judge, so
evaluation's sampling is a stage too) under a temporary run root, through `icr.loop.run_experiment`
with its `on_stage` hook. Isolated, the parent should hold 0 bytes after every stage; in-process,
the figure is what the caching allocator keeps after the stage released its models
(`icr.models.release_memory`). Memory only, no timing. --dry: device cpu, reserved bytes recorded
as null, and the count of transformers models alive in the parent after each stage instead.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
from pathlib import Path

from common import REPO, finish


def alive_models() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    return sum(isinstance(o, PreTrainedModel) and o.base_model is not o for o in gc.get_objects())


def one_run(root: Path, isolate: bool, device: str) -> list[dict]:
    import torch

    from icr.config import load_config
    from icr.loop import run_experiment

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"run_root={root}", f"device={device}", f"isolate_stages={str(isolate).lower()}", "iterations=1",
        "evaluation.enabled=true", "evaluation.judge=fake", "evaluation.models=[M0]",
        "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl", "evaluation.max_new_tokens=32"])
    records = []

    def on_stage(stage: str, result: dict) -> None:
        cuda = device == "cuda"
        records.append({"stage": stage, "reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1) if cuda else None,
                        "allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1) if cuda else None,
                        "models_alive": alive_models()})

    run_experiment(cfg, on_stage=on_stage)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="on the CPU: check the script, record no GPU figures")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("stage_memory: no CUDA device (use --dry on the CPU)")
    tmp = Path(tempfile.mkdtemp(prefix="icr-bench-memory-"))
    try:
        figures = {"bench": "stage_memory", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry)",
                   "isolated": one_run(tmp / "isolated", True, device),
                   "in_process": one_run(tmp / "in_process", False, device)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    worst = {k: max((r["reserved_mib"] or 0) for r in figures[k]) for k in ("isolated", "in_process")}
    finish(f"stage_memory on {figures['device']}: max reserved in the parent between stages "
           f"isolated {worst['isolated']} MiB, in-process {worst['in_process']} MiB; models alive "
           f"isolated {max(r['models_alive'] for r in figures['isolated'])}", figures)


if __name__ == "__main__":
    main()
