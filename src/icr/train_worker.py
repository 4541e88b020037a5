"""The per-process entry point of launched training: `accelerate launch -m icr.train_worker JOB.json`.

`icr.train_launch.train_dpo_launched` writes a job file (pairs file, model paths, the `train`
section, output folders, seed) and launches this module once per process with an accelerate
config. Each process sets up its distributed state first (so `cuda` means its own GPU), then calls
`icr.train.train_dpo`; TRL's `DPOTrainer` does the rest (DDP, DeepSpeed, FSDP from the launch
environment). The main process writes the metrics to the job's `result` file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def train_config_from_dict(data: dict):
    """A `TrainConfig` from its `dataclasses.asdict` form (as written into the job file)."""
    from .config import LoraConfig, TrainConfig

    data = dict(data)
    data["lora"] = LoraConfig(**data.get("lora", {}))
    return TrainConfig(**data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m icr.train_worker JOB.json (normally started by accelerate launch)", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from accelerate import PartialState

    from .runs import read_jsonl
    from .train import train_dpo

    # Before any model is loaded: binds this process to its GPU (LOCAL_RANK) and opens the process
    # group (nccl on GPUs, gloo on CPU), so "cuda" below is this rank's device.
    state = PartialState(cpu=job["device"] == "cpu")
    pairs = read_jsonl(job["pairs"])
    # train_dpo saves through trainer.save_model on every rank (gathering sharded weights);
    # only the main process writes model_dir.
    model_dir = Path(job["model_dir"])
    metrics = train_dpo(pairs, job["policy_path"], job["reference_path"], train_config_from_dict(job["train"]),
                        Path(job["out_dir"]), model_dir, seed=job["seed"], device=job["device"],
                        chat_template=job.get("chat_template"))
    state.wait_for_everyone()
    if state.is_main_process:
        metrics = {**metrics, "num_processes": state.num_processes,
                   "distributed_type": str(state.distributed_type), "backend": state.backend}
        tmp = Path(job["result"] + ".tmp")
        tmp.write_text(json.dumps(metrics, default=str), encoding="utf-8")
        os.replace(tmp, job["result"])
    state.wait_for_everyone()
    state.destroy_process_group() if hasattr(state, "destroy_process_group") else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
