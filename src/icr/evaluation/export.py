"""Evaluation data in alpaca_eval's formats: prompt sets, reference outputs, model outputs.

alpaca_eval's model-output format is a JSON array of
`{"instruction", "output", "generator", "dataset", "id"}` — what `alpaca_eval evaluate
--model_outputs` reads, and the format of X-AlpacaEval's reference answers. Prompt sets and
references come from a file per language (`{lang}` in the path; JSON array or JSONL) or from a
Hugging Face dataset by name (one config per language via `{lang}` in the config name, or a
`lang`/`language` column).

Ids are compared as strings. A record without an id gets its 1-based position, which is
X-AlpacaEval's id (1..805, in AlpacaEval order).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError, IcrError
from ..runs import atomic_write_text, read_jsonl

MODEL_OUTPUT_FIELDS = ("instruction", "output", "generator", "dataset", "id")
DEFAULT_DATASET = "x_alpaca_eval"


# ---------------------------------------------------------------------------------------------
# Model outputs
# ---------------------------------------------------------------------------------------------

def to_model_outputs(prompts: list[dict], outputs: list[str], generator: str) -> list[dict]:
    """Rows in alpaca_eval's model-output format, one per prompt, in prompt order."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    return [{"instruction": p["instruction"], "output": out, "generator": generator,
             "dataset": p.get("dataset", DEFAULT_DATASET), "id": p["id"]}
            for p, out in zip(prompts, outputs)]


def write_model_outputs(path: Path, rows: list[dict]) -> None:
    atomic_write_text(Path(path), json.dumps(rows, ensure_ascii=False, indent=1) + "\n")


def read_model_outputs(path: Path) -> list[dict]:
    """Read and check a model-output file (each row needs at least `instruction` and `output`)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IcrError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of model outputs, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [k for k in ("instruction", "output") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}: row {i}: missing or non-string field(s) {', '.join(missing)}")
    return rows


# ---------------------------------------------------------------------------------------------
# Records from a file or a Hugging Face dataset
# ---------------------------------------------------------------------------------------------

def _detect_format(spec: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if spec.endswith(".jsonl"):
        return "jsonl"
    if spec.endswith(".json") or Path(spec).is_file():
        return "json"
    return "hf"


def load_records(spec: str, lang: str, fmt: str = "auto", split: str = "test",
                 config_name: str | None = None) -> tuple[list[dict], str]:
    """Records for one language, and a description of where they came from (for messages).

    `spec` is a path or a dataset name, either possibly containing `{lang}`.
    """
    where = spec.replace("{lang}", lang)
    kind = _detect_format(where, fmt)
    if kind in ("json", "jsonl"):
        path = Path(where)
        if not path.is_file():
            raise IcrError(f"{path}: not found (data for language {lang!r})")
        if kind == "jsonl":
            return read_jsonl(path), str(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records")
        return data, str(path)
    if kind != "hf":
        raise IcrError(f"unknown data format {fmt!r} (auto | json | jsonl | hf)")
    return _load_hf(where, lang, split, config_name.replace("{lang}", lang) if config_name else None)


def _load_hf(name: str, lang: str, split: str, config_name: str | None) -> tuple[list[dict], str]:
    import datasets

    where = f"dataset {name}" + (f" ({config_name})" if config_name else "") + f" split {split}"
    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot load"
        raise IcrError(f"{where}: cannot load ({type(e).__name__}: {e})") from None
    rows = ds.to_list()
    column = next((c for c in ("lang", "language") if c in ds.column_names), None)
    if column is not None:
        rows = [r for r in rows if r[column] == lang]
        if not rows:
            raise IcrError(f"{where}: no rows with {column} == {lang!r}")
    elif config_name is None and "{lang}" not in name:
        raise IcrError(f"{where}: cannot tell which rows are in {lang!r}: put {{lang}} in the dataset or "
                       "config name, or use a dataset with a lang/language column")
    return rows, where


def _record_id(record: dict, position: int, id_field: str) -> str:
    if id_field == "auto":
        id_field = next((f for f in ("id", "instruction_id") if f in record), "")
    if not id_field:
        return str(position + 1)
    if id_field not in record:
        raise KeyError(id_field)
    return str(record[id_field])


def _checked(records: list[dict], where: str, id_field: str, text_field: str) -> list[tuple[str, dict]]:
    out, seen = [], set()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: record {i} is not an object")
        try:
            rid = _record_id(rec, i, id_field)
        except KeyError:
            raise DataError(f"{where}: record {i} has no id field {id_field!r}") from None
        if not isinstance(rec.get(text_field), str):
            raise DataError(f"{where}: record {i} (id {rid}) has no string field {text_field!r}")
        if rid in seen:
            raise DataError(f"{where}: duplicate id {rid!r} (record {i})")
        seen.add(rid)
        out.append((rid, rec))
    return out


def load_eval_prompts(source, langs) -> dict[str, list[dict]]:
    """Evaluation prompts per language: `{lang: [{"id", "instruction", "dataset"}]}`.

    `source` is an `icr.config.PromptSource` (path with {lang}, format, id_field,
    instruction_field, split, config_name, limit).
    """
    if not source.path:
        raise IcrError("evaluation.prompts.path: not set")
    prompts = {}
    for lang in langs:
        records, where = load_records(source.path, lang, source.format, source.split, source.config_name)
        rows = [{"id": rid, "instruction": rec[source.instruction_field],
                 "dataset": rec.get("dataset") or DEFAULT_DATASET}
                for rid, rec in _checked(records, where, source.id_field, source.instruction_field)]
        if not rows:
            raise DataError(f"{where}: no prompts")
        prompts[lang] = rows[:source.limit] if source.limit else rows
    return prompts


def load_references(spec: str, langs, fmt: str = "auto", split: str = "test", config_name: str | None = None,
                    id_field: str = "auto", output_field: str = "output") -> dict[str, dict[str, str]]:
    """Reference answers per language: `{lang: {id: output}}` (alpaca_eval model-output format)."""
    if not spec:
        raise IcrError("evaluation.references: not set (reference outputs per language, with {lang})")
    refs = {}
    for lang in langs:
        records, where = load_records(spec, lang, fmt, split, config_name)
        refs[lang] = {rid: rec[output_field] for rid, rec in _checked(records, where, id_field, output_field)}
    return refs
