"""`runs/<name>/results.json`: one row per (model, language, judge); for the alignment-tax
check (`evaluation.harness`), one row of kind "harness" per (model, language, task, metric); for
MT-Bench (`evaluation.mt_bench`), rows of kind "mt_bench" per (model, language, judge, turn, category).
Schema: docs/results-schema.md.

Other tools read this file, so the schema is checked on every write and every read: a row with a
missing, extra or mistyped field is an error naming the row and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import IcrError
from ..runs import atomic_write_text

# which length-controlled win rate `lc` is: alpaca_eval's own (length_controlled_v1) or icr's minimal GLM
LC_METHODS = ("alpaca_eval:length_controlled_v1", "icr:minimal")
# fields added after the first release: absent in older files means null
ADDED_FIELDS = {"lc_method", "cached", "requests", "prompt_tokens", "completion_tokens", "cost"}

# field -> (allowed types, may be null, check, description)
SCHEMA: dict[str, tuple[tuple[type, ...], bool, object, str]] = {
    "model": ((str,), False, lambda v: v != "", "non-empty string (sft, M0, M1, ... or a control label)"),
    "iteration": ((int,), False, lambda v: v >= -1, "integer >= -1 (-1 = sft, 0 = M0)"),
    "lang": ((str,), False, lambda v: v != "", "non-empty language code"),
    "judge": ((str,), False, lambda v: v != "", "non-empty judge name"),
    "n": ((int,), False, lambda v: v >= 1, "integer >= 1"),
    "wr": ((int, float), False, lambda v: 0 <= v <= 100, "number in [0, 100]"),
    "wr_se": ((int, float), True, lambda v: v >= 0, "number >= 0, or null"),
    "lc": ((int, float), True, lambda v: 0 <= v <= 100, "number in [0, 100], or null"),
    "lc_method": ((str,), True, lambda v: v in LC_METHODS, f"one of {', '.join(LC_METHODS)}, or null"),
    "fidelity": ((int, float), True, lambda v: 0 <= v <= 1, "number in [0, 1], or null"),
    "mean_len": ((int, float), False, lambda v: v >= 0, "number >= 0"),
    # what judging cost (icr.evaluation.judges.CachedJudge.spent): null where the judge has no such notion
    "cached": ((int,), True, lambda v: v >= 0, "integer >= 0 (judgements taken from the cache), or null"),
    "requests": ((int,), True, lambda v: v >= 0, "integer >= 0 (requests sent to the judge), or null"),
    "prompt_tokens": ((int,), True, lambda v: v >= 0, "integer >= 0, or null"),
    "completion_tokens": ((int,), True, lambda v: v >= 0, "integer >= 0, or null"),
    "cost": ((int, float), True, lambda v: v >= 0, "number >= 0, or null (no price given, or no tokens counted)"),
}
FIELDS = tuple(SCHEMA)
KEY = ("model", "lang", "judge")

# kind "harness": an lm-evaluation-harness metric (icr.evaluation.harness); judge rows have no `kind`
HARNESS_SCHEMA: dict[str, tuple[tuple[type, ...], bool, object, str]] = {
    "kind": ((str,), False, lambda v: v == "harness", '"harness"'),
    "model": SCHEMA["model"],
    "iteration": SCHEMA["iteration"],
    "lang": SCHEMA["lang"],
    "task": ((str,), False, lambda v: v != "", "non-empty lm-eval task name"),
    "metric": ((str,), False, lambda v: v != "", "non-empty metric name (lm-eval's, /filter when not 'none')"),
    "value": ((int, float), False, lambda v: True, "a finite number (lm-eval's value)"),
    "stderr": ((int, float), True, lambda v: v >= 0, "number >= 0, or null"),
    "n": ((int,), True, lambda v: v >= 1, "integer >= 1 (questions scored), or null"),
    "num_fewshot": ((int,), True, lambda v: v >= 0, "integer >= 0, or null"),
}
HARNESS_KEY = ("model", "lang", "task", "metric")

# kind "mt_bench": multilingual MT-Bench (icr.evaluation.mt_bench), per (model, language, judge, turn, category)
MT_BENCH_SCHEMA: dict[str, tuple[tuple[type, ...], bool, object, str]] = {
    "kind": ((str,), False, lambda v: v == "mt_bench", '"mt_bench"'),
    "model": SCHEMA["model"],
    "iteration": SCHEMA["iteration"],
    "lang": SCHEMA["lang"],
    "judge": SCHEMA["judge"],
    "turn": ((int,), False, lambda v: v in (1, 2), "1 or 2"),
    "category": ((str,), False, lambda v: v != "", 'non-empty MT-Bench category, or "all"'),
    "mean": ((int, float), True, lambda v: 1 <= v <= 10, "number in [1, 10], or null (no verdict)"),
    "se": ((int, float), True, lambda v: v >= 0, "number >= 0, or null"),
    "n": ((int,), False, lambda v: v >= 0, "integer >= 0 (judgements with a verdict)"),
    "missing": ((int,), False, lambda v: v >= 0, "integer >= 0 (judge replies without a verdict)"),
    "prompt_tokens": ((int,), False, lambda v: v >= 0, "integer >= 0"),
    "completion_tokens": ((int,), False, lambda v: v >= 0, "integer >= 0"),
    "cost": ((int, float), True, lambda v: v >= 0, "number >= 0, or null (no price given)"),
}
MT_BENCH_KEY = ("model", "lang", "judge", "turn", "category")
KINDS = {"harness": (HARNESS_SCHEMA, HARNESS_KEY), "mt_bench": (MT_BENCH_SCHEMA, MT_BENCH_KEY)}


def row_kind(row) -> str:
    """"judge" (a win-rate row, no `kind` field), "harness" or "mt_bench"."""
    return row.get("kind", "judge") if isinstance(row, dict) else "judge"


def _schema_and_key(row) -> tuple[dict, tuple[str, ...]]:
    return KINDS.get(row_kind(row), (SCHEMA, KEY))


def row_key(row: dict) -> tuple:
    """The identity of a row within results.json (its kind and key fields)."""
    _, key = _schema_and_key(row)
    return (row_kind(row), *(row[k] for k in key))


def _describe(row, index) -> str:
    _, key = _schema_and_key(row)
    if isinstance(row, dict) and all(isinstance(row.get(k), (str, int)) for k in key):
        return f"results row {index} ({', '.join(str(row[k]) for k in key)})"
    return f"results row {index}"


def validate_results(rows) -> None:
    """Raise IcrError naming the first bad row and field; also refuses duplicate keys."""
    if not isinstance(rows, list):
        raise IcrError(f"results: expected a list of rows, got {type(rows).__name__}")
    seen = {}
    for i, row in enumerate(rows):
        where = _describe(row, i)
        if not isinstance(row, dict):
            raise IcrError(f"{where}: expected an object, got {type(row).__name__}")
        if "kind" in row and row["kind"] not in KINDS:
            raise IcrError(f"{where}: field 'kind' is {row['kind']!r}; expected one of {', '.join(map(repr, KINDS))} "
                           "or no kind (a judge row)")
        schema, key_fields = _schema_and_key(row)
        extra = sorted(set(row) - set(schema))
        if extra:
            raise IcrError(f"{where}: unknown field {extra[0]!r} (fields: {', '.join(schema)})")
        for field, (types, nullable, check, desc) in schema.items():
            if field not in row:
                if field in ADDED_FIELDS and schema is SCHEMA:
                    continue
                raise IcrError(f"{where}: missing field {field!r}")
            value = row[field]
            if value is None and nullable:
                continue
            ok = isinstance(value, types) and not isinstance(value, bool)
            if ok and isinstance(value, float) and not math.isfinite(value):
                ok = False
            if not ok or not check(value):
                raise IcrError(f"{where}: field {field!r} is {value!r}; expected {desc}")
        key = row_key(row)
        if key in seen:
            raise IcrError(f"{where}: same ({', '.join(key_fields)}) as row {seen[key]}")
        seen[key] = i


def clean_row(row: dict) -> dict:
    """Fields in schema order, NaN turned into null (JSON has no NaN), fields added later (ADDED_FIELDS)
    null when absent. Other missing or unknown fields are kept as they are, for `validate_results` to name."""
    schema, _ = _schema_and_key(row)
    if schema is SCHEMA:
        row = {**{k: None for k in ADDED_FIELDS}, **row}  # rows from before a field existed: null
    order = [k for k in schema if k in row] + [k for k in row if k not in schema]
    return {k: (None if isinstance(row[k], float) and math.isnan(row[k]) else row[k]) for k in order}


def read_results(path: Path) -> list[dict]:
    """Rows of a results file (validated); an absent file has no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise IcrError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    try:
        validate_results(rows)
    except IcrError as e:
        raise IcrError(f"{path}: {e}") from None
    return rows


def append_results(path: Path, rows: list[dict]) -> list[dict]:
    """Add rows to a results file; a row with the same key (`row_key`) replaces the old one in
    place. Validates everything and writes atomically. Returns the file's rows.

    Not safe against two writers at once: the run lock (`icr.runs.run_lock`) keeps one per run.
    """
    new = [clean_row(r) for r in rows]
    validate_results(new)
    existing = read_results(path)
    index = {row_key(r): i for i, r in enumerate(existing)}
    for row in new:
        key = row_key(row)
        if key in index:
            existing[index[key]] = row
        else:
            index[key] = len(existing)
            existing.append(row)
    atomic_write_text(Path(path), json.dumps(existing, ensure_ascii=False, indent=1) + "\n")
    return existing
