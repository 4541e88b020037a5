"""Recipes of a `prepare` function: documented dataclasses, checked strictly, keyed as plain dicts.

A recipe is a dataclass whose fields are the function's keyword arguments (`prepare.args` in the
config), each documented in `metadata["help"]` as the experiment config's fields are. `check`
refuses an unknown argument or a value of the wrong type with one `IcrError` line naming
`prepare.args.<field>`, and returns the merged recipe as a plain dict: defaults updated by the given
arguments, values exactly as given (an int for a float field stays an int). That dict, not the
dataclass, is what the builds hash (`build.given_args`) and store (`recipe.json`), so folders and
keys built before the recipes became dataclasses stay valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field

from ..errors import ConfigError


def arg(default, help: str):
    """A recipe field with its documentation (unit, and why it has this value)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def defaults(cls) -> dict:
    """The recipe's defaults as a dict, in field order."""
    return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}


def describe(cls) -> list[str]:
    """One line per field: `name (default): help`."""
    return [f"{name} (default {value!r}): {f.metadata['help']}"
            for (name, value), f in zip(defaults(cls).items(), dataclasses.fields(cls))]


def _type_ok(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    return isinstance(value, tp)


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def check(cls, recipe: dict, name: str) -> dict:
    """The full recipe (defaults updated by `recipe`), or one IcrError line listing every unknown
    argument and wrong type, each as `prepare.args.<field>`."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    errors = []
    for key, value in recipe.items():
        where = f"prepare.args.{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), known, n=1)
            errors.append(f"{where}: unknown recipe argument" + (f" (did you mean {close[0]!r}?)" if close else
                                                                  f" (known: {', '.join(known)})"))
        elif not _type_ok(value, hints[key]):
            hint = " (YAML reads 5e-6 as text: write 5.0e-6)" if hints[key] is float and isinstance(value, str) else ""
            errors.append(f"{where}: expected {_type_name(hints[key])}, got {type(value).__name__} {value!r}{hint}")
    if errors:
        raise ConfigError(f"{name}: " + "; ".join(errors))
    return {**defaults(cls), **recipe}
