"""The GPU path checked before the first stage (issue 19), through the real CLI: deepspeed for a
DeepSpeed accelerate config, the processes against the GPUs visible, GPU memory and disk for
training, the judge's API key, alpaca_eval's length-control data. Each refusal is one line
`icr: error: <field or file>: ...`, exit code 2, and nothing written."""

from __future__ import annotations

import importlib.util
import json
import types

import pytest

from icr.resources import GIB

from .conftest import REPO
from .test_bad_input import _config, _eval_files, _good_prompts

P8B = 8_030_261_248  # Llama-3-8B (tests/test_resources.py counts it by hand)


def _error(code, err):
    """The one `icr: error:` line of a refused command (library warnings aside)."""
    lines = [line for line in err.splitlines() if line.startswith("icr: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def stand_in_package(root, name: str, version: str, body: str = ""):
    """A folder holding package `name` (its __init__ is `body`) with installed-distribution metadata of
    `version`, as pip would leave it: what importlib.metadata and importlib see."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(body)
    dist = root / f"{name}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


@pytest.fixture
def no_real_deepspeed():
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")


@pytest.fixture
def fake_deepspeed(tmp_path, monkeypatch, no_real_deepspeed):
    """Put a stand-in deepspeed package (a version in its dist-info, an __init__ body) on sys.path."""
    import accelerate.utils  # noqa: F401 - imported before the stand-in exists (it looks for deepspeed)

    def install(version: str, body: str = "") -> None:
        monkeypatch.syspath_prepend(str(stand_in_package(tmp_path / "site", "deepspeed", version, body)))

    return install


@pytest.fixture
def gpus(monkeypatch):
    """Make torch see `count` CUDA GPUs of `memory` bytes each."""
    import torch

    def fake(count: int, memory: int = 80 * GIB, name: str = "Fake H100") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i: types.SimpleNamespace(total_memory=memory, name=name))

    return fake


def llama3_8b_shapes(monkeypatch, free_disk: int = 10_000 * GIB):
    """models.dpo reads as Llama-3-8B's shapes (the files stay the tiny model's); the disk has
    `free_disk` bytes free."""
    import collections
    import shutil

    import icr.resources

    from .test_resources import llama3_8b_shapes as shapes

    monkeypatch.setattr(icr.resources, "model_shapes", lambda name: shapes())
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(free_disk + GIB, GIB, free_disk))


# ---------------------------------------------------------------------------------------------
# 1. deepspeed
# ---------------------------------------------------------------------------------------------

def test_paper_config_without_deepspeed_is_refused_naming_deepspeed(tmp_path, monkeypatch, cli, no_real_deepspeed):
    """The issue's done-when: `icr validate configs/paper-llama3-8b.yaml --set generation.backend=hf`
    without deepspeed exits 2 naming deepspeed (before the prompt files and hub models, which this
    machine does not have), and writes nothing."""
    monkeypatch.chdir(tmp_path)  # the config's run_root (runs) and data paths are relative
    code, out, err = cli("validate", REPO / "configs" / "paper-llama3-8b.yaml", "--set", "generation.backend=hf")
    line = _error(code, err)
    assert line.startswith("icr: error: train.accelerate_config: ") and "deepspeed_zero3.yaml is a DeepSpeed " \
        "config (distributed_type: DEEPSPEED), but deepspeed is not installed: pip install 'deepspeed>=" in line
    assert list(tmp_path.iterdir()) == []


def test_validate_checks_deepspeed_before_the_prepare_step_has_run(tmp_path, cli, no_real_deepspeed):
    """A config whose prepare step has not run is validated as a config only (its files do not exist
    yet), but the backends need none of them: deepspeed is named all the same."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["prepare"]["args"]["seed"] = 987654  # never built in this session
    cfg.update(run_root=str(tmp_path / "runs"), train={**cfg["train"], "accelerate_config": "deepspeed_zero2"})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    line = _error(*cli("validate", config)[::2])
    assert "deepspeed_zero2.yaml is a DeepSpeed config (distributed_type: DEEPSPEED), but deepspeed is not " \
           "installed" in line
    assert not (tmp_path / "runs").exists()


def test_deepspeed_older_than_accelerate_needs_is_refused(tmp_path, tiny_pair, cli, fake_deepspeed):
    fake_deepspeed("0.8.0")
    _good_prompts(tmp_path / "prompts")
    code, _, err = cli("run", _config(tmp_path, tiny_pair, train__accelerate_config="deepspeed_zero2"))
    line = _error(code, err)
    assert "deepspeed 0.8.0 is installed and accelerate needs >= 0.9.3: pip install -U 'deepspeed>=0.9.3'" in line
    assert not (tmp_path / "runs").exists()


def test_deepspeed_that_does_not_import_is_refused(tmp_path, tiny_pair, cli, fake_deepspeed):
    fake_deepspeed("0.18.6", "raise RuntimeError('CUDA_HOME does not exist, unable to compile CUDA op(s)')\n")
    _good_prompts(tmp_path / "prompts")
    code, _, err = cli("run", _config(tmp_path, tiny_pair, train__accelerate_config="deepspeed_zero3"))
    line = _error(code, err)
    assert "but deepspeed 0.18.6 does not import (RuntimeError: CUDA_HOME does not exist" in line
    assert not (tmp_path / "runs").exists()


def test_a_deepspeed_that_imports_passes_and_lora_under_zero3_is_refused(tmp_path, tiny_pair, cli, fake_deepspeed):
    fake_deepspeed("0.18.6")
    _good_prompts(tmp_path / "prompts")
    config = _config(tmp_path, tiny_pair, train__accelerate_config="deepspeed_zero2")
    code, out, err = cli("validate", config)
    assert code == 0 and out.strip() == f"{config}: ok", err
    code, _, err = cli("run", _config(tmp_path, tiny_pair, train__accelerate_config="deepspeed_zero3",
                                      train__lora={"enabled": True}))
    assert "train.lora: merging LoRA adapters under DeepSpeed ZeRO-3" in _error(code, err)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# 2. processes against GPUs
# ---------------------------------------------------------------------------------------------

def test_more_processes_than_visible_gpus_is_refused(tmp_path, tiny_pair, cli, gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("ICR_ACCELERATE_ARGS", raising=False)
    _good_prompts(tmp_path / "prompts")
    config = _config(tmp_path, tiny_pair, device="cuda", train__accelerate_config="ddp")
    code, _, err = cli("run", config)
    line = _error(code, err)
    assert line.startswith("icr: error: train.accelerate_config: ") and line.endswith(
        "ddp.yaml starts 8 training processes on this machine (num_processes 8) but 2 GPU(s) are visible "
        "(CUDA_VISIBLE_DEVICES=0,1); set num_processes: 2 in a copy of the config, or --num_processes 2 in "
        "ICR_ACCELERATE_ARGS, or make more GPUs visible"), line
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("ICR_ACCELERATE_ARGS", "--num_processes 2")  # overrides the file, as accelerate does
    code, out, err = cli("validate", config)
    assert code == 0 and out.strip().endswith(": ok"), err
    # several machines: num_processes counts all of them
    monkeypatch.setenv("ICR_ACCELERATE_ARGS", "--num_machines 2 --num_processes 4 --machine_rank 0")
    assert cli("validate", config)[0] == 0
    monkeypatch.setenv("ICR_ACCELERATE_ARGS", "--num_machines 2 --num_processes 8 --machine_rank 0")
    assert "(num_processes 8 / num_machines 2) but 2 GPU(s)" in _error(*cli("validate", config)[::2])


def test_gpu_ids_beyond_the_visible_gpus_are_refused(tmp_path, tiny_pair, cli, gpus, monkeypatch):
    gpus(2)
    monkeypatch.delenv("ICR_ACCELERATE_ARGS", raising=False)
    (tmp_path / "accel.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 2\ngpu_ids: 0,3\n")
    _good_prompts(tmp_path / "prompts")
    code, _, err = cli("validate", _config(tmp_path, tiny_pair, device="cuda",
                                           train__accelerate_config=str(tmp_path / "accel.yaml")))
    assert "lists gpu_ids 0,3, but GPU 3 is not one of the 2 visible" in _error(code, err)


def test_one_training_process_that_sees_several_gpus_is_refused_before_the_first_stage(tmp_path, tiny_pair, cli,
                                                                                     gpus):
    """Without train.accelerate_config the train stage refuses a process that sees several GPUs;
    now preflight says it before sampling and scoring."""
    gpus(4)
    _good_prompts(tmp_path / "prompts")
    code, _, err = cli("run", _config(tmp_path, tiny_pair, device="cuda"))
    assert "icr: error: train: 4 GPUs are visible to one training process; set train.accelerate_config" \
        in _error(code, err)
    assert not (tmp_path / "runs").exists()
    gpus(1)
    code, out, err = cli("validate", _config(tmp_path, tiny_pair, device="cuda"))
    assert code == 0, err


def test_auto_device_on_a_cpu_machine_checks_no_gpus(tmp_path, tiny_pair, cli, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: pytest.fail("counted GPUs on a CPU run"))
    _good_prompts(tmp_path / "prompts")
    code, out, err = cli("validate", _config(tmp_path, tiny_pair, device="auto", train__accelerate_config="ddp"))
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# 5. GPU memory and disk for training
# ---------------------------------------------------------------------------------------------

def test_training_that_cannot_fit_the_gpu_is_refused_with_the_numbers(tmp_path, tiny_pair, cli, gpus, monkeypatch):
    """Llama-3-8B's shapes, one 80 GiB GPU, no sharding: 16 bytes per parameter (fp32 weights,
    gradients, AdamW) + the bf16 reference = 134.6 GiB per process; LoRA would fit (30.5 GiB)."""
    llama3_8b_shapes(monkeypatch)
    gpus(1, 80 * GIB)
    _good_prompts(tmp_path / "prompts")
    code, _, err = cli("run", _config(tmp_path, tiny_pair, device="cuda"))
    line = _error(code, err)
    assert line.startswith("icr: error: train: training needs ~134.6 GiB of GPU memory per process before "
                           "activations (weights 29.9 GiB + gradients 29.9 GiB + AdamW 59.8 GiB + reference "
                           "15.0 GiB; no sharding, 1 process; models.dpo "), line
    assert ": 8.03e9 parameters) but GPU 0 (Fake H100) has 80.0 GiB; set train.lora.enabled: true (~30.5 GiB)" in line
    assert not (tmp_path / "runs").exists()


def test_ddp_of_an_8b_model_on_8_gpus_is_refused_and_told_to_shard(tmp_path, tiny_pair, cli, gpus, monkeypatch):
    llama3_8b_shapes(monkeypatch)
    gpus(8, 80 * GIB)
    monkeypatch.delenv("ICR_ACCELERATE_ARGS", raising=False)
    _good_prompts(tmp_path / "prompts")
    config = _config(tmp_path, tiny_pair, device="cuda", train__accelerate_config="ddp")
    line = _error(*cli("run", config)[::2])
    sharded = "deepspeed_zero3 on 8 GPU(s) (~18.7 GiB)" if importlib.util.find_spec("deepspeed") \
        else "fsdp on 8 GPU(s) (~16.8 GiB)"
    assert line.startswith("icr: error: train.accelerate_config: training needs ~134.6 GiB"), line
    assert "DDP, nothing sharded, 8 processes" in line
    assert line.endswith(f"has 80.0 GiB; set train.accelerate_config: {sharded} or train.lora.enabled: true "
                         "(~30.5 GiB)"), line
    assert not (tmp_path / "runs").exists()
    # FSDP over the 8 GPUs fits: (16 + 2) bytes per parameter / 8
    code, out, err = cli("validate", _config(tmp_path, tiny_pair, device="cuda", train__accelerate_config="fsdp"))
    assert code == 0, err


def test_a_disk_too_small_for_the_models_and_a_checkpoint_is_refused(tmp_path, tiny_pair, cli, monkeypatch):
    """Two iterations of fp32 full fine-tuning on the CPU: 2 models of 4 bytes per parameter and a
    checkpoint of 12 (weights + AdamW) = 20 x 8.03e9 bytes = 149.6 GiB."""
    llama3_8b_shapes(monkeypatch, free_disk=10 * GIB)
    _good_prompts(tmp_path / "prompts")
    config = _config(tmp_path, tiny_pair)  # device cpu, 2 iterations
    line = _error(*cli("run", config)[::2])
    assert line.startswith("icr: error: run_root: training needs at least 149.6 GiB of disk (2 iteration "
                           "model(s) of 29.9 GiB + a resume checkpoint of 89.7 GiB, weights and optimizer state; "
                           "models.dpo "), line
    assert f"but {tmp_path} has 10.0 GiB free; free space there or set run_root to a larger disk" in line
    assert round(20 * P8B / GIB, 1) == 149.6
    assert not (tmp_path / "runs").exists()
    # the models already saved (a resumed run) are not counted again
    for t in (1, 2):
        (tmp_path / "runs" / "tiny" / f"iter{t}" / "model").mkdir(parents=True)
    code, out, err = cli("validate", config)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# 3. the judge's API key
# ---------------------------------------------------------------------------------------------

def test_alpaca_eval_judge_without_an_api_key_is_refused(tmp_path, tiny_pair, cli, monkeypatch):
    pytest.importorskip("alpaca_eval")
    from alpaca_eval import constants

    for name in ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "OPENAI_API_KEYS", None)
    monkeypatch.setattr(constants, "OPENAI_CLIENT_CONFIG_PATH", tmp_path / "client_configs.yaml")
    _good_prompts(tmp_path / "prompts")
    _eval_files(tmp_path)
    config = _config(tmp_path, tiny_pair, evaluation__enabled=True, evaluation__judge="alpaca_eval",
                     evaluation__prompts={"path": str(tmp_path / "prompts" / "{lang}.jsonl")},
                     evaluation__references=str(tmp_path / "refs" / "{lang}.json"))
    line = _error(*cli("run", config)[::2])
    assert line == ("icr: error: evaluation.judge: alpaca_eval's annotator 'weighted_alpaca_eval_gpt4_turbo' "
                    "(alpaca_eval:weighted_alpaca_eval_gpt4_turbo_multilingual) calls the OpenAI API, but no key is "
                    "set: set OPENAI_API_KEY (or OPENAI_CLIENT_CONFIG_PATH to an alpaca_eval client config file), "
                    "or evaluation.judge_args base_url (+ model, api_key_env) for another OpenAI-compatible server")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "client_configs.yaml").write_text("default:\n  - api_key: sk-from-file\n")
    assert cli("validate", config)[0] == 0
    (tmp_path / "client_configs.yaml").unlink()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    code, out, err = cli("validate", config)
    assert code == 0 and out.strip().endswith(": ok"), err


# ---------------------------------------------------------------------------------------------
# 4. alpaca_eval's length-control data
# ---------------------------------------------------------------------------------------------

def _lc_config(tmp_path, tiny_pair, ids=("1", "2"), **changes):
    """Evaluation with X-AlpacaEval-like ids (1..805), the fake judge and lc_method alpaca_eval."""
    _good_prompts(tmp_path / "prompts")
    texts = {"en": ["Name a colour.", "Name a fruit."], "es": ["Nombra un color.", "Nombra un fruto."]}
    for lang, rows in texts.items():
        (tmp_path / "eval").mkdir(exist_ok=True)
        (tmp_path / "eval" / f"{lang}.json").write_text(json.dumps(
            [{"id": i, "instruction": t} for i, t in zip(ids, rows)]))
        (tmp_path / "eval" / f"{lang}.refs.json").write_text(json.dumps(
            [{"id": i, "instruction": t, "output": "x"} for i, t in zip(ids, rows)]))
    return _config(tmp_path, tiny_pair, evaluation__enabled=True, evaluation__judge="fake",
                   evaluation__prompts={"path": str(tmp_path / "eval" / "{lang}.json")},
                   evaluation__references=str(tmp_path / "eval" / "{lang}.refs.json"),
                   evaluation__lc_method="alpaca_eval", **changes)


def _df_gamed(path, rows=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("index,instruction_difficulty,model,not_gamed_baseline\n" +
                    "".join(f"{i},0.{i + 1},m,True\n" for i in range(rows)))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """alpaca_eval's hub cache (constants.DEFAULT_CACHE_DIR) in tmp_path, the hub offline."""
    pytest.importorskip("alpaca_eval")
    import huggingface_hub.constants
    from alpaca_eval import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "DEFAULT_CACHE_DIR", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_lc_by_alpaca_eval_offline_without_its_data_is_refused(tmp_path, tiny_pair, cli, hub_cache):
    config = _lc_config(tmp_path, tiny_pair)
    line = _error(*cli("run", config)[::2])
    assert line == ("icr: error: evaluation.lc_data_dir: not set, and alpaca_eval's length-control data "
                    "(df_gamed.csv of the hub dataset tatsu-lab/alpaca_eval) is not in the hub cache while the hub is "
                    "offline (HF_HUB_OFFLINE=1); download it where there is network (hf download tatsu-lab/alpaca_eval "
                    "df_gamed.csv --repo-type dataset --local-dir DIR) and set evaluation.lc_data_dir: DIR, or set "
                    "evaluation.lc_method: minimal")
    assert not (tmp_path / "runs").exists()
    # in the hub cache (where alpaca_eval's own download puts it): found offline
    snapshot = hub_cache / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / "abc123"
    _df_gamed(snapshot / "df_gamed.csv")
    (hub_cache / "datasets--tatsu-lab--alpaca_eval" / "refs").mkdir()
    (hub_cache / "datasets--tatsu-lab--alpaca_eval" / "refs" / "main").write_text("abc123")
    code, out, err = cli("validate", config)
    assert code == 0 and out.strip().endswith(": ok"), err


def test_lc_data_dir_is_checked_with_the_evaluation_ids(tmp_path, tiny_pair, cli, hub_cache):
    _df_gamed(tmp_path / "lc" / "df_gamed.csv", rows=2)
    code, out, err = cli("validate", _lc_config(tmp_path, tiny_pair, evaluation__lc_data_dir=str(tmp_path / "lc")))
    assert code == 0, err
    line = _error(*cli("run", _lc_config(tmp_path, tiny_pair, evaluation__lc_data_dir=str(tmp_path / "nowhere")))[::2])
    assert line == f"icr: error: evaluation.lc_data_dir: {tmp_path / 'nowhere' / 'df_gamed.csv'} not found " \
                   "(alpaca_eval's df_gamed.csv)"
    # an id alpaca_eval's data does not know fails now, not after every answer is judged
    line = _error(*cli("run", _lc_config(tmp_path, tiny_pair, ids=("1", "7"),
                                         evaluation__lc_data_dir=str(tmp_path / "lc")))[::2])
    assert "evaluation.lc_method alpaca_eval: prompt id '7' is not one of AlpacaEval's instruction ids 1..2" in line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# 6. train.optimizer: bitsandbytes' 8-bit AdamW
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def bitsandbytes(tmp_path, monkeypatch):
    """install(version, body): a stand-in bitsandbytes package (a version in its dist-info, an
    __init__ body) first on sys.path; install(None): bitsandbytes not found, whatever is installed."""
    real_find_spec = importlib.util.find_spec
    count = iter(range(100))

    def install(version: str | None, body: str = "") -> None:
        if version is None:
            monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "bitsandbytes"
                                else real_find_spec(name, *a, **k))
            return
        monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
        root = stand_in_package(tmp_path / f"site-bnb-{next(count)}", "bitsandbytes", version, body)
        monkeypatch.syspath_prepend(str(root))

    return install


def test_8bit_optimizer_without_a_working_bitsandbytes_is_refused(tmp_path, tiny_pair, cli, bitsandbytes):
    """train.optimizer adamw_bnb_8bit needs bitsandbytes, at least the version transformers' Trainer
    accepts (0.46.1; older raises ImportError when the optimizer is created), and importable: else
    one line naming train.optimizer and the install, before anything is written."""
    _good_prompts(tmp_path / "prompts")
    config = _config(tmp_path, tiny_pair, train__optimizer="adamw_bnb_8bit")
    missing = ("icr: error: train.optimizer: adamw_bnb_8bit needs bitsandbytes >= 0.46.1: pip install -U "
               "'bitsandbytes>=0.46.1' (on every training machine), or set train.optimizer to adamw_torch_fused")
    bitsandbytes(None)
    assert _error(*cli("run", config)[::2]) == missing
    assert not (tmp_path / "runs").exists()
    bitsandbytes("0.45.5")
    assert _error(*cli("validate", config)[::2]) == missing
    bitsandbytes("0.50.2", "raise RuntimeError('no usable GPU backend')\n")
    assert _error(*cli("validate", config)[::2]) == (
        "icr: error: train.optimizer: adamw_bnb_8bit needs bitsandbytes, which does not import (RuntimeError: "
        "no usable GPU backend); reinstall it, or set train.optimizer to adamw_torch_fused")
    bitsandbytes("0.50.2")
    code, out, err = cli("validate", config)
    assert code == 0 and out.strip().endswith(": ok"), err
    # one process or DDP only: DeepSpeed runs the optimizer itself, FSDP2's DTensors fail in its update
    code, out, err = cli("validate", _config(tmp_path, tiny_pair, train__optimizer="adamw_bnb_8bit",
                                             train__accelerate_config="ddp"))
    assert code == 0, err
    line = _error(*cli("run", _config(tmp_path, tiny_pair, train__optimizer="adamw_bnb_8bit",
                                      train__accelerate_config="deepspeed_zero2"))[::2])
    assert line.startswith("icr: error: train.optimizer: adamw_bnb_8bit cannot run under DeepSpeed (") and \
        "deepspeed_zero2.yaml): DeepSpeed runs the optimizer itself" in line, line
    line = _error(*cli("run", _config(tmp_path, tiny_pair, train__optimizer="adamw_bnb_8bit",
                                      train__accelerate_config="fsdp"))[::2])
    assert line.startswith("icr: error: train.optimizer: adamw_bnb_8bit cannot run under FSDP (") and \
        "fsdp.yaml): bitsandbytes' 8-bit update fails on FSDP2's sharded (DTensor) parameters" in line, line
    assert not (tmp_path / "runs").exists()


def test_the_fit_refusal_offers_the_8bit_optimizer_only_when_bitsandbytes_is_installed(tmp_path, tiny_pair, cli,
                                                                                      gpus, monkeypatch, bitsandbytes):
    """Llama-3-8B in one process on a 100 GiB GPU: 134.6 GiB with AdamW does not fit; 8-bit AdamW
    (18.1 GiB of optimizer state instead of 59.8: tests/test_resources.py) needs 92.9 GiB, offered
    with its estimate when bitsandbytes is installed, not otherwise."""
    llama3_8b_shapes(monkeypatch)
    gpus(1, 100 * GIB, "Fake 100 GiB GPU")
    _good_prompts(tmp_path / "prompts")
    config = _config(tmp_path, tiny_pair, device="cuda")
    bitsandbytes(None)
    line = _error(*cli("run", config)[::2])
    assert line.startswith("icr: error: train: training needs ~134.6 GiB") and line.endswith(
        "has 100.0 GiB; set train.lora.enabled: true (~30.5 GiB)"), line
    bitsandbytes("0.50.2")
    line = _error(*cli("run", config)[::2])
    assert line.endswith("has 100.0 GiB; set train.lora.enabled: true (~30.5 GiB) or train.optimizer: "
                         "adamw_bnb_8bit (~92.9 GiB)"), line
    assert not (tmp_path / "runs").exists()


def test_the_fit_check_counts_the_8bit_optimizer_when_it_is_set(tmp_path, tiny_pair, cli, gpus, monkeypatch,
                                                               bitsandbytes):
    """With train.optimizer adamw_bnb_8bit the estimate is the 8-bit one (92.9 GiB for Llama-3-8B in
    one process): it fits 100 GiB, not 80; the 8-bit optimizer is not offered again, and sharding
    (where it cannot run) is offered with adamw_torch_fused."""
    llama3_8b_shapes(monkeypatch)
    bitsandbytes("0.50.2")
    monkeypatch.delenv("ICR_ACCELERATE_ARGS", raising=False)
    _good_prompts(tmp_path / "prompts")
    config = _config(tmp_path, tiny_pair, device="cuda", train__optimizer="adamw_bnb_8bit")
    gpus(1, 100 * GIB)
    code, out, err = cli("validate", config)
    assert code == 0, err
    gpus(1, 80 * GIB)
    line = _error(*cli("run", config)[::2])
    assert line.startswith("icr: error: train: training needs ~92.9 GiB of GPU memory per process before "
                           "activations (weights 29.9 GiB + gradients 29.9 GiB + 8-bit AdamW 18.1 GiB + reference "
                           "15.0 GiB; no sharding, 1 process; models.dpo "), line
    assert line.endswith("has 80.0 GiB; set train.lora.enabled: true (~30.3 GiB)"), line
    gpus(8, 80 * GIB)
    line = _error(*cli("run", _config(tmp_path, tiny_pair, device="cuda", train__optimizer="adamw_bnb_8bit",
                                      train__accelerate_config="ddp"))[::2])
    sharded = ("deepspeed_zero3 on 8 GPU(s) (~18.7 GiB)" if importlib.util.find_spec("deepspeed")
               else "fsdp on 8 GPU(s) (~16.8 GiB)").replace(" (", " with train.optimizer: adamw_torch_fused (")
    assert "DDP, nothing sharded, 8 processes" in line and line.endswith(
        f"has 80.0 GiB; set train.accelerate_config: {sharded} or train.lora.enabled: true (~30.3 GiB)"), line
    assert not (tmp_path / "runs").exists()


def test_the_disk_check_counts_the_8bit_optimizer_state_of_the_resume_checkpoint(tmp_path, tiny_pair, cli,
                                                                                  monkeypatch, bitsandbytes):
    """Two iterations on the CPU with adamw_bnb_8bit: 2 fp32 models of 29.9 GiB + a checkpoint of the
    fp32 weights and 8-bit AdamW's state, 48.0 GiB (tests/test_resources.py) instead of 89.7."""
    llama3_8b_shapes(monkeypatch, free_disk=10 * GIB)
    bitsandbytes("0.50.2")
    _good_prompts(tmp_path / "prompts")
    line = _error(*cli("run", _config(tmp_path, tiny_pair, train__optimizer="adamw_bnb_8bit"))[::2])
    assert round((8 * P8B + 51_568_115_840) / GIB, 1) == 107.9
    assert line.startswith("icr: error: run_root: training needs at least 107.9 GiB of disk (2 iteration model(s) "
                           "of 29.9 GiB + a resume checkpoint of 48.0 GiB, weights and optimizer state; "), line
    assert not (tmp_path / "runs").exists()
