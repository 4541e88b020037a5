"""bench/stage_memory.py measures device-wide memory (issue 19): nvidia-smi's output parsed, and
where nothing can measure it (the CPU) the figures are null with the reason, never 0."""

from __future__ import annotations

import pytest

from .conftest import load_bench


@pytest.fixture(scope="module")
def bench():
    module = load_bench("stage_memory")
    return module


def test_nvidia_smi_memory_used_is_parsed_per_gpu(bench):
    # `nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits` on a node of 4 GPUs
    assert bench.parse_nvidia_smi("0\n81234\n  512 \n3\n") == [0.0, 81234.0, 512.0, 3.0]
    assert bench.parse_nvidia_smi("1024 MiB\n") == [1024.0]  # a unit printed anyway
    assert bench.parse_nvidia_smi("[N/A]\n2048\n") == [None, 2048.0]  # MIG / vGPU: not reported
    assert bench.parse_nvidia_smi("\n17\n\n") == [17.0]
    for bad in ("", "\n", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."):
        with pytest.raises(ValueError):
            bench.parse_nvidia_smi(bad)


def test_without_nvml_or_nvidia_smi_it_says_it_cannot_measure(bench, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    memory = bench.DeviceMemory()
    assert memory.how is None and memory.used_mib() is None
    assert "pynvml" in memory.why_not and "nvidia-smi: not on PATH" in memory.why_not
    run = {"before_mib": None, "stages": [{"stage": "iter1/generate", "device_used_mib": None}]}
    assert bench.held_after_stages(run) is None  # not 0


def test_nvidia_smi_is_used_when_nvml_is_not(bench, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "pynvml" else real_import(name, *a, **k))
    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    readings = iter(["100\n200\n", "H200\nH200\n", "4196\n200\n"])
    monkeypatch.setattr(bench.DeviceMemory, "_run_smi", staticmethod(lambda smi, args: next(readings)))
    memory = bench.DeviceMemory()
    assert memory.how == "nvidia-smi" and memory.names == ["H200", "H200"]
    assert memory.used_mib() == [4196.0, 200.0]
    run = {"before_mib": [100.0, 200.0], "stages": [{"device_used_mib": [4196.0, 200.0]},
                                                    {"device_used_mib": [100.0, 200.0]}]}
    assert bench.held_after_stages(run) == 4096.0
