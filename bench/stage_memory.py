"""GPU memory in use on the device after each stage of a tiny `icr run`: every process's (NVML or
nvidia-smi), with every GPU stage in its own process (isolate_stages: true) and with all stages in
the `icr run` process (false).

    .venv/bin/python bench/stage_memory.py          # on a machine with a CUDA GPU
    .venv/bin/python bench/stage_memory.py --dry    # on the CPU: checks the script, no figures

A run is `icr run configs/tiny.yaml` (1 iteration, evaluation of M0 and M1 with the `fake` judge, so
evaluation's sampling is a stage too) under a temporary run root, through `icr.loop.run_experiment`
with its `on_stage` hook. What is measured is device-wide: the memory used on each GPU as the
driver counts it (NVML through `pynvml` if importable, else `nvidia-smi --query-gpu=memory.used
--format=csv,noheader,nounits`), once before the run and after each stage. Not the parent's
allocator: with stages isolated the parent allocates nothing by construction (its
`torch.cuda.memory_reserved()` is 0 whatever a stage's process left behind), and what matters is
whether the next stage finds the GPU free, e.g. vLLM's `gpu_memory_utilization` share. The parent's
own allocator is recorded beside it (`parent_reserved_mib`), read only if the parent already uses
CUDA (reading it would create a CUDA context, itself a few hundred MiB of device memory).
Other processes on the same GPUs count too: compare with the `before` figure. Memory only, no
timing.

Where device memory cannot be measured (no NVML, no nvidia-smi: the CPU), the figures are null and
the summary says why, never 0. --dry: device cpu, and the count of transformers models alive in the
parent after each stage (also recorded on the GPU).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import REPO, finish

NVIDIA_SMI_QUERY = ["--query-gpu=memory.used", "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> list[float | None]:
    """MiB used per GPU from `nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits`:
    one line per GPU, a number (a unit, if one is printed anyway, is dropped); `[N/A]` or `[Not
    Supported]` (some MIG and vGPU setups) is None. Anything else raises ValueError."""
    used: list[float | None] = []
    for line in text.splitlines():
        value = line.strip()
        if not value:
            continue
        if value.startswith("[") and value.endswith("]"):
            used.append(None)
            continue
        number = value.removesuffix("MiB").strip()
        try:
            used.append(float(number))
        except ValueError:
            raise ValueError(f"nvidia-smi: expected MiB used per GPU, got the line {line!r}") from None
    if not used:
        raise ValueError("nvidia-smi: no GPU listed")
    return used


class DeviceMemory:
    """Memory used on each GPU by every process, in MiB: NVML (`pynvml`) if it can be imported and
    started, else `nvidia-smi`. `how` says which; where neither works, `how` is None and `why_not`
    says why, and `used_mib()` returns None."""

    def __init__(self):
        self.how: str | None = None
        self.why_not: str | None = None
        self.names: list[str] = []
        self._nvml, self._handles, self._smi = None, [], None
        problems = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.names = [_text(pynvml.nvmlDeviceGetName(h)) for h in self._handles]
            self._nvml, self.how = pynvml, "nvml"
            return
        except Exception as e:  # noqa: BLE001 - not installed, no driver, no GPU
            problems.append(f"NVML: {type(e).__name__}: {e}")
        smi = shutil.which("nvidia-smi")
        if smi is None:
            problems.append("nvidia-smi: not on PATH")
        else:
            try:
                parse_nvidia_smi(self._run_smi(smi, NVIDIA_SMI_QUERY))
                self.names = self._run_smi(smi, ["--query-gpu=name", "--format=csv,noheader"]).strip().splitlines()
                self._smi, self.how = smi, "nvidia-smi"
                return
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                problems.append(f"nvidia-smi: {e}")
        self.why_not = "; ".join(problems)

    @staticmethod
    def _run_smi(smi: str, args: list[str]) -> str:
        done = subprocess.run([smi, *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise subprocess.SubprocessError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}")
        return done.stdout

    def used_mib(self) -> list[float | None] | None:
        """MiB used now on each GPU (every process's), or None where it cannot be measured."""
        if self._nvml is not None:
            return [round(self._nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20, 1) for h in self._handles]
        if self._smi is not None:
            return parse_nvidia_smi(self._run_smi(self._smi, NVIDIA_SMI_QUERY))
        return None


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def alive_models() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    return sum(isinstance(o, PreTrainedModel) and o.base_model is not o for o in gc.get_objects())


def parent_reserved_mib() -> float | None:
    """The `icr run` process's own caching allocator, if it already uses CUDA (else 0, read without
    creating a CUDA context); None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    if not torch.cuda.is_initialized():
        return 0.0
    return round(torch.cuda.memory_reserved() / 2**20, 1)


def one_run(root: Path, isolate: bool, device: str, memory: DeviceMemory) -> dict:
    from icr.config import load_config
    from icr.loop import run_experiment

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"run_root={root}", f"device={device}", f"isolate_stages={str(isolate).lower()}", "iterations=1",
        "evaluation.enabled=true", "evaluation.judge=fake", "evaluation.models=[M0]",
        "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl", "evaluation.max_new_tokens=32"])
    stages = []

    def on_stage(stage: str, result: dict) -> None:
        stages.append({"stage": stage, "device_used_mib": memory.used_mib(),
                       "parent_reserved_mib": parent_reserved_mib(), "models_alive": alive_models()})

    before = memory.used_mib()
    run_experiment(cfg, on_stage=on_stage)
    return {"before_mib": before, "stages": stages}


def held_after_stages(run: dict) -> float | None:
    """The most memory used on the device after any stage beyond what was used before the run
    (summed over GPUs), or None where it could not be measured."""
    before = run["before_mib"]
    if before is None or None in before:
        return None
    worst = None
    for record in run["stages"]:
        used = record["device_used_mib"]
        if used is None or None in used:
            return None
        held = round(sum(used) - sum(before), 1)
        worst = held if worst is None else max(worst, held)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="on the CPU: check the script, record no GPU figures")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("stage_memory: no CUDA device (use --dry on the CPU)")
    memory = DeviceMemory()
    if device == "cuda" and memory.how is None:
        raise SystemExit(f"stage_memory: cannot measure device memory ({memory.why_not}); pip install nvidia-ml-py, "
                         "or put nvidia-smi on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="icr-bench-memory-"))
    try:
        figures = {"bench": "stage_memory", "device": ", ".join(memory.names) or "cpu",
                   "dry": args.dry, "measured_by": memory.how, "not_measured": memory.why_not,
                   "isolated": one_run(tmp / "isolated", True, device, memory),
                   "in_process": one_run(tmp / "in_process", False, device, memory)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    alive = max(r["models_alive"] for r in figures["isolated"]["stages"])
    if memory.how is None:
        summary = (f"stage_memory on {figures['device']}: device memory cannot be measured here ({memory.why_not}); "
                   f"models alive in the parent between stages, isolated: {alive}")
    else:
        held = {k: held_after_stages(figures[k]) for k in ("isolated", "in_process")}
        figures["held_after_stages_mib"] = held
        summary = (f"stage_memory on {figures['device']} ({memory.how}): most device memory in use after a stage, "
                   f"beyond before the run: isolated {held['isolated']} MiB, in-process {held['in_process']} MiB; "
                   f"models alive in the parent, isolated: {alive}")
    finish(summary, figures)


if __name__ == "__main__":
    main()
