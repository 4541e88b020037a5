"""The one place where icr adapts to the library versions it supports.

icr runs on every transformers from the floor in pyproject.toml to the newest (5.24 when this was
written), including 5.17 (a stock CUDA image) and 5.20 (vLLM 0.33 pins transformers < 5.21). Two
names changed inside that range:

- the key/value cache argument of a model's forward / `generate` and the output field holding it:
  `past_key_values` up to 5.23, `cache` from 5.24 (which still accepts `past_key_values` with a
  deprecation warning, to be removed in 5.40);
- the training argument switching on activation (gradient) checkpointing:
  `gradient_checkpointing` up to 5.22, `activation_checkpointing` from 5.23 (the old name is a
  deprecated alias there).

Both are decided here by looking at what the installed library offers (the model's forward
signature, the TrainingArguments fields), not by comparing version numbers, so a backport or a
model class that lags behind is handled too. Everything else icr calls exists across the whole range
(the CI floor job runs the unit tests and the tiny loop at the floor versions, see .ci/run).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect


def cache_kwarg(model) -> str:
    """The name under which `model`'s forward (and hence `generate`) takes a key/value cache."""
    return _forward_cache_kwarg(type(model))


@functools.lru_cache(maxsize=None)
def _forward_cache_kwarg(model_class) -> str:
    try:
        params = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def takes_cache(module) -> bool:
    """Whether `module.forward` takes a key/value cache under either name."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in params or "past_key_values" in params


def output_cache(output):
    """The key/value cache a forward returned (`output.cache` from 5.24, `past_key_values` before)."""
    fields = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
    return output.cache if "cache" in fields else output.past_key_values


def checkpointing_kwargs(enabled: bool) -> dict:
    """The TrainingArguments/DPOConfig keyword for activation checkpointing on this transformers."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}
