"""Faults of the environment and of inputs found only once something loads (issue: nothing lost,
nothing silently wrong): each through the real CLI, ending in one line, nothing silently wrong,
and what was written kept for the rerun."""

from __future__ import annotations

import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"
ICR = str(Path(sys.executable).parent / "icr")


def _one_line_error(code, err):
    assert code == 2, err
    lines = [line for line in err.splitlines() if "icr: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def built(tiny_pair):
    from icr.config import load_config
    from icr.loop import run_prepare

    return run_prepare(load_config(TINY))


@pytest.mark.slow
def test_a_file_size_limit_mid_training_ends_in_one_line_and_the_rerun_finishes(tmp_path, built):
    """`ulimit -f` (EFBIG; the same path as a full disk's ENOSPC): safetensors reports it as a
    SafetensorError, not an OSError. One line naming the stage folder; the rerun resumes."""
    sets = ["--set", f"run_root={tmp_path}", "--set", "iterations=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))  # shards fit, a checkpoint does not

    first = subprocess.run([ICR, "run", TINY, *sets], env=env, preexec_fn=limited, capture_output=True, text=True,
                           timeout=600)
    line = _one_line_error(first.returncode, first.stderr)
    assert f"{tmp_path}/tiny/iter1/train: " in line and "File too large" in line and "rerun" in line
    assert (tmp_path / "tiny" / "iter1" / "score" / "manifest.json").is_file()  # what was done is kept
    again = subprocess.run([ICR, "run", TINY, *sets], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "iter1 generate skipped" in again.stderr or "generate skipped" in again.stderr
    # The model is readable as the umask says (safetensors alone writes 0600).
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "tiny" / "iter1" / "model").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_the_environment_problem_is_found_through_wrapping_libraries():
    import errno

    from icr.runs import environment_problem

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/run/x.bin")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as wrapped:
        assert environment_problem(wrapped).startswith("/data/run/x.bin: No space left on device; free space")
    assert environment_problem(RuntimeError("I/O error: No space left on device (os error 28)")).endswith(
        "rerun the same command to resume")
    assert environment_problem(ValueError("a bug")) is None  # keeps its traceback


def _with_nan(model_dir: Path, out: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    name = sorted(n for n in weights if "mlp" in n)[0]
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_a_model_with_nan_weights_is_refused_when_loaded(tmp_path, cli, built, tiny_pair):
    """A header-valid file whose weights hold NaN: before, every reward was NaN or the samples
    garbled, with exit 0."""
    bad = _with_nan(Path(tiny_pair["dpo"]), tmp_path / "nan-dpo")
    code, _, err = cli("generate", TINY, "--set", f"run_root={tmp_path}", "--set", f"models.dpo={bad}",
                       "--iteration", "1")
    line = _one_line_error(code, err)
    assert "policy: " in line and "holds 1 NaN or inf value(s)" in line and "mlp" in line
    assert not list((tmp_path / "tiny" / "iter1" / "generate").glob("shard-*"))


def test_lora_targets_that_name_no_module_fail_validation(cli, built):
    code, _, err = cli("validate", TINY, "--set", "train.lora.enabled=true",
                       "--set", "train.lora.target_modules=[q_proj, qkv_proj]")
    line = _one_line_error(code, err)
    assert "train.lora.target_modules: 'qkv_proj' names no module of models.dpo" in line and "q_proj" in line
    code, _, err = cli("validate", TINY, "--set", "train.lora.enabled=true",
                       "--set", "train.lora.target_modules=[q_proj, v_proj]")
    assert code == 0, err


def test_device_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path, cli, built):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = cli("run", TINY, "--set", f"run_root={tmp_path}", "--set", "device=cuda")
    assert "device: cuda, but this machine has no usable GPU" in _one_line_error(code, err)
    assert not (tmp_path / "tiny").exists()


def test_check_finite_names_the_weight():
    import torch

    from icr.errors import IcrError
    from icr.models import check_finite

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_finite(model, "ok")
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(IcrError, match=r"^train: weight 1.bias holds 1 NaN or inf value\(s\) of 2$"):
        check_finite(model, "train")


@pytest.mark.slow
def test_quiet_prints_nothing_but_the_result_line(tmp_path, built):
    """`-q`: only icr's warnings and errors. Before, the libraries' bars (loading and writing
    weights, tokenizing), deprecation notices and TRL's metric dicts filled the terminal, also from
    stage processes."""
    done = subprocess.run([ICR, "run", "-q", TINY, "--set", f"run_root={tmp_path}", "--set", "iterations=1",
                           "--set", "isolate_stages=true"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "" and done.stdout.splitlines() == [f"icr: run finished: {tmp_path}/tiny",
                                                              f"icr: browse the run: {tmp_path}/tiny/report.html"]
    loud = subprocess.run([ICR, "train", TINY, "--set", f"run_root={tmp_path / 'loud'}", "--iteration", "1"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert "{'loss'" not in loud.stdout + loud.stderr  # TRL's metric dicts are not printed even without -q


def test_validate_finds_a_ray_backend_without_ray(cli, built, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as when not installed
    code, _, err = cli("validate", TINY, "--set", "cluster.backend=ray")
    assert "cluster.backend: ray needs the ray package (pip install 'icr[ray]')" in _one_line_error(code, err)


def test_validate_checks_the_cluster_address(cli, built):
    code, _, err = cli("validate", TINY, "--set", "cluster.address=not an address")
    assert "cluster.address: expected auto, local, host:port or ray://host:port, got 'not an address'" in \
        _one_line_error(code, err)
    assert cli("validate", TINY, "--set", "cluster.address=10.0.0.1:6379")[0] == 0
