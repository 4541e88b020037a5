"""icr.compat picks the names each transformers version understands (5.17 ... 5.24 and on).

The whole suite also runs at the floor versions and at vLLM's transformers pin in CI (.ci/run);
these tests pin down the choice itself, against stand-ins of both API generations and against the
transformers installed here.
"""

from __future__ import annotations

import dataclasses
import warnings

from icr.compat import cache_kwarg, checkpointing_kwargs, output_cache, takes_cache


class _NewModel:  # transformers >= 5.24
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        pass


class _OldModel:  # transformers <= 5.23
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        pass


class _NoCache:
    def forward(self, input_ids=None, **kwargs):
        pass


@dataclasses.dataclass
class _NewOutput:
    last_hidden_state: object = None
    cache: object = None


@dataclasses.dataclass
class _OldOutput:
    last_hidden_state: object = None
    past_key_values: object = None


def test_cache_argument_follows_the_forward_signature():
    assert cache_kwarg(_NewModel()) == "cache"
    assert cache_kwarg(_OldModel()) == "past_key_values"
    assert takes_cache(_NewModel()) and takes_cache(_OldModel()) and not takes_cache(_NoCache())
    assert output_cache(_NewOutput(cache="kv")) == "kv"
    assert output_cache(_OldOutput(past_key_values="kv")) == "kv"


def test_installed_llama_gets_its_own_cache_name_without_deprecation(tiny_pair):
    """The installed version's Llama takes the name chosen, and the forward returns the cache there."""
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(tiny_pair["sft"])
    name = cache_kwarg(model)
    params = inspect.signature(type(model).forward).parameters
    assert name in params
    if "cache" in params:  # 5.24+: past_key_values is a deprecated alias there, never chosen
        assert name == "cache"
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model.model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **{name: cache})
    assert output_cache(out) is cache and cache.get_seq_length() == 3


def test_checkpointing_keyword_is_accepted_without_future_warning(tmp_path):
    from trl import DPOConfig

    for enabled in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                             **checkpointing_kwargs(enabled))
        assert args.gradient_checkpointing is enabled


def test_pyproject_lower_bounds_are_the_versions_ci_tests():
    """pyproject.toml's floors = .ci/constraints-floor.txt's pins (what .ci/compat-job installs)."""
    import re

    import pytest

    from .conftest import REPO

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {m.group(1): m.group(2) for d in deps if (m := re.match(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", d))}
    pins = dict(line.split("==") for line in (REPO / ".ci" / "constraints-floor.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert set(pins) == {"transformers", "trl", "peft", "accelerate", "datasets"}
    assert {name: floors.get(name) for name in pins} == pins
