"""Prompt sets and reference answers: one loader for both.

Sources: one file per language (`{lang}` in the path; JSONL lines such as `{"instruction",
"instruction_id"}`, or a JSON array of `{"id", "instruction", ...}` such as X-AlpacaEval's files),
or a Hugging Face dataset by name (one dataset or config per language via `{lang}`, or a
`lang`/`language` column). Prompts and references share the same fields (`id_field`,
`instruction_field`), formats and checks; errors name the file and line (JSONL) or row (JSON array,
dataset), and the field. A UTF-8 byte-order mark is accepted.

Prompts: every non-English prompt needs its English counterpart (same id), because the
cross-lingual reward is computed under the English instruction. Ids are strings or integers;
`Prompt.id` is the id as a string (the key used everywhere), `Prompt.source_id` the value as the
source wrote it, which exports keep (an integer id stays an integer).

References (answers the evaluated model is compared with) are matched to the evaluation prompts,
never by position: by id when the reference file has ids, and then its instruction (when present)
must also equal the prompt's; without ids, by instruction. Instructions are compared after
whitespace normalisation. A prompt without a matching reference is an error naming the first one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import PromptSource, ReferenceSource
from .errors import DataError
from .languages import check_language_codes


@dataclass(frozen=True)
class Prompt:
    id: str
    instruction: str
    source_id: Any = None  # the id as the source wrote it (str or int); exports keep it
    dataset: str | None = None  # alpaca_eval's `dataset` field, when the source has one


class PromptSet:
    """`{lang: [Prompt, ...]}` in file order, plus lookup of the English counterpart by id."""

    def __init__(self, by_lang: dict[str, list[Prompt]], english: dict[str, Prompt] | None = None):
        self.by_lang = by_lang
        self._english = english if english is not None else {p.id: p for p in by_lang.get("en", [])}

    @property
    def languages(self) -> list[str]:
        return list(self.by_lang)

    def english(self, prompt_id: str) -> Prompt:
        return self._english[prompt_id]

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_lang.values())

    def as_rows(self) -> dict[str, list[dict]]:
        """Rows for evaluation and export: the id as the source wrote it, and `dataset` when known."""
        return {lang: [{"id": p.source_id if p.source_id is not None else p.id, "instruction": p.instruction,
                        **({"dataset": p.dataset} if p.dataset else {})} for p in ps]
                for lang, ps in self.by_lang.items()}


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Reading rows from a file or a dataset
# ---------------------------------------------------------------------------------------------

def source_format(source) -> str:
    if source.format != "auto":
        return source.format
    suffix = Path(source.path.replace("{lang}", "xx")).suffix
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    return "hf"


def read_records(path: Path, fmt: str, what: str) -> list[tuple[str, dict]]:
    """(location, row) pairs of a JSONL (`fmt` jsonl) or JSON-array file of objects; the location is
    `file:line` or `file row N`. Unreadable files, bad UTF-8, bad JSON and non-objects are one line each."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a {what} file ({fmt})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} file ({e.strerror or type(e).__name__})") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: a leading byte-order mark (some editors write one) is dropped
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
        rows = [(f"{path} row {i}", row) for i, row in enumerate(data, 1)]
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    for loc, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{loc}: expected a JSON object, got {type(row).__name__}")
    return rows


def _read_dataset(source, lang: str, field: str) -> tuple[list[tuple[str, dict]], str]:
    import datasets

    name = source.path.replace("{lang}", lang)
    config_name = source.config_name.replace("{lang}", lang) if source.config_name else None
    where = f"{name}[{source.split}]" + (f" ({config_name})" if config_name else "")
    try:
        ds = datasets.load_dataset(name, config_name, split=source.split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreachable or unknown datasets
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{field}: cannot load dataset {where} ({type(e).__name__}: {first})") from None
    rows = [(f"{where} row {i}", dict(r)) for i, r in enumerate(ds, 1)]
    per_language = "{lang}" in source.path or "{lang}" in (source.config_name or "")
    column = next((c for c in ("lang", "language") if c in ds.column_names), None)
    if column is not None and not per_language:
        rows = [(loc, r) for loc, r in rows if r[column] == lang]
        if not rows:
            raise DataError(f"{field}: dataset {where} has no rows with {column} == {lang!r}")
    elif not per_language:
        raise DataError(f"{field}: cannot tell which rows of dataset {where} are in {lang!r}: put {{lang}} in "
                        "the dataset or config name, or use a dataset with a lang/language column")
    return rows, where


def read_rows(source, lang: str, field: str, what: str) -> tuple[list[tuple[str, dict]], str]:
    """The rows of one language's file or dataset, each with its location for messages.

    `field` is the config field the source came from (for messages), `what` the kind of file.
    A file source needs `{lang}` in its path: the same file for every language would pair, say,
    Spanish prompts with English references.
    """
    fmt = source_format(source)
    if fmt == "hf":
        return _read_dataset(source, lang, field)
    if "{lang}" not in source.path:
        raise DataError(f"{field}: {source.path!r} needs a {{lang}} placeholder (one file per language)")
    path = Path(source.path.replace("{lang}", lang))
    return read_records(path, fmt, what), str(path)


# ---------------------------------------------------------------------------------------------
# Fields
# ---------------------------------------------------------------------------------------------

def _id_field(row: dict, configured: str) -> str | None:
    if configured != "auto":
        return configured
    return next((f for f in ("instruction_id", "id") if f in row), None)


def _id_value(loc: str, row: dict, field: str):
    value = row[field]
    if value is None:
        raise DataError(f"{loc}: id field {field!r} is null")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{loc}: id field {field!r} must be a string or an integer, got {type(value).__name__} "
                        f"{value!r}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{loc}: id field {field!r} is empty")
    return value


def _text_value(loc: str, row: dict, field: str, what: str) -> str:
    if field not in row:
        raise DataError(f"{loc}: missing {what} field {field!r}")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{loc}: {what} field {field!r} must be a string, got {type(value).__name__} {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): no tokenizer or file can take it
        raise DataError(f"{loc}: {what} field {field!r} holds a lone surrogate {value[e.start]!r} at character "
                        f"{e.start}, which is not text") from None
    return value


def _parse_prompts(rows: list[tuple[str, dict]], source, where: str) -> list[Prompt]:
    prompts, seen = [], {}
    for loc, row in rows:
        id_field = _id_field(row, source.id_field)
        if id_field is None or id_field not in row:
            raise DataError(f"{loc}: missing id field {id_field or 'id'!r}"
                            + (" (auto: instruction_id or id)" if source.id_field == "auto" else ""))
        source_id = _id_value(loc, row, id_field)
        pid = str(source_id)
        instr = _text_value(loc, row, source.instruction_field, "instruction")
        if not instr.strip():
            raise DataError(f"{loc}: empty instruction (id {pid})")
        if pid in seen:
            raise DataError(f"{loc}: duplicate id {pid} (first at {seen[pid]})")
        seen[pid] = loc[len(where):].lstrip(":").strip() if loc.startswith(where) else loc
        dataset = row.get("dataset") if isinstance(row.get("dataset"), str) else None
        prompts.append(Prompt(pid, instr, source_id, dataset))
    if not prompts:
        raise DataError(f"{where}: no prompts (the file is empty or has only blank lines)")
    return prompts


# ---------------------------------------------------------------------------------------------
# Prompt sets
# ---------------------------------------------------------------------------------------------

def load_language(source: PromptSource, lang: str, field: str = "prompts") -> list[Prompt]:
    rows, where = read_rows(source, lang, f"{field}.path", "prompt")
    prompts = _parse_prompts(rows, source, where)
    return prompts[: source.limit] if source.limit else prompts


def load_prompt_set(source: PromptSource, languages: list[str], field: str = "prompts") -> PromptSet:
    """Load every language (English always) and check that each prompt has its English counterpart.

    `limit` picks the first prompts of each target language; counterparts are looked up by id in the
    whole English file, so a file in another order still finds them. `field` names the config
    section in messages (prompts, evaluation.prompts).
    """
    check_language_codes(languages)
    full_en = load_language(dataclasses.replace(source, limit=None), "en", field)
    english = {p.id: p for p in full_en}
    by_lang = {"en": full_en[: source.limit] if source.limit else full_en}
    for lang in languages:
        if lang == "en":
            continue
        by_lang[lang] = load_language(source, lang, field)
        for pos, p in enumerate(by_lang[lang], 1):
            if p.id not in english:
                raise DataError(f"{source.path.replace('{lang}', lang)}: prompt {pos} (id {p.id}) has no English "
                                f"counterpart in {source.path.replace('{lang}', 'en')}")
    en_ids = [p.id for p in by_lang["en"]]
    for lang in languages:  # parallel sets are the method's premise: say where they are not
        ids = {p.id for p in by_lang[lang]}
        missing = [i for i in en_ids if i not in ids]
        if lang != "en" and missing:
            logging.getLogger("icr").warning(
                "%s: %s has %d of the %d English prompts (missing ids %s%s); the languages are not parallel",
                field, lang, len(en_ids) - len(missing), len(en_ids), ", ".join(missing[:5]),
                ", ..." if len(missing) > 5 else "")
    order = ["en"] + [lang for lang in languages if lang != "en"]
    return PromptSet({lang: by_lang[lang] for lang in order if lang in languages}, english=english)


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

def _short(text: str, n: int = 60) -> str:
    text = normalize_whitespace(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def match_references(rows: list[tuple[str, dict]], source: ReferenceSource, where: str, lang: str,
                     prompts: list[Prompt]) -> dict[str, str]:
    """`{prompt id: reference output}` for every prompt; an error names the first that cannot be matched.

    With ids: the reference with the prompt's id, whose instruction (when the file has one) must
    equal the prompt's. Without ids: the reference whose instruction equals the prompt's.
    """
    refs = []  # (loc, id or None, instruction or None, output)
    for loc, row in rows:
        id_field = _id_field(row, source.id_field)
        if source.id_field != "auto" and id_field not in row:
            raise DataError(f"{loc}: missing id field {id_field!r}")
        rid = str(_id_value(loc, row, id_field)) if id_field in row else None
        instr = _text_value(loc, row, source.instruction_field, "instruction") \
            if source.instruction_field in row else None
        refs.append((loc, rid, instr, _text_value(loc, row, source.output_field, "output")))
    if not refs:
        raise DataError(f"{where}: no references (the file is empty or has only blank lines)")
    with_ids = [r for r in refs if r[1] is not None]
    if with_ids and len(with_ids) != len(refs):
        loc = next(r[0] for r in refs if r[1] is None)
        raise DataError(f"{loc}: reference without an id, while other references have ids")
    out: dict[str, str] = {}
    if with_ids:
        by_id = {}
        for ref in refs:
            if ref[1] in by_id:
                raise DataError(f"{ref[0]}: duplicate id {ref[1]} (first at {by_id[ref[1]][0]})")
            by_id[ref[1]] = ref
        for pos, p in enumerate(prompts, 1):
            ref = by_id.get(p.id)
            if ref is None:
                raise DataError(f"{where}: no reference with id {p.id} ({lang} evaluation prompt {pos})")
            if ref[2] is not None and normalize_whitespace(ref[2]) != normalize_whitespace(p.instruction):
                raise DataError(f"{ref[0]}: reference id {p.id} is for the instruction {_short(ref[2])!r}, but the "
                                f"{lang} prompt with that id is {_short(p.instruction)!r} (references of another "
                                "language or another version of the prompts?)")
            out[p.id] = ref[3]
        return out
    by_instruction = {}
    for ref in refs:
        if ref[2] is None:
            raise DataError(f"{ref[0]}: reference has neither an id nor an instruction field "
                            f"{source.instruction_field!r}, so it cannot be matched to a prompt")
        key = normalize_whitespace(ref[2])
        if key in by_instruction and by_instruction[key][3] != ref[3]:
            raise DataError(f"{ref[0]}: two references without ids for the same instruction {_short(ref[2])!r} "
                            f"(first at {by_instruction[key][0]}); add ids to tell them apart")
        by_instruction.setdefault(key, ref)
    for pos, p in enumerate(prompts, 1):
        ref = by_instruction.get(normalize_whitespace(p.instruction))
        if ref is None:
            raise DataError(f"{where}: no reference whose instruction matches {lang} evaluation prompt {pos} "
                            f"(id {p.id}: {_short(p.instruction)!r}); references without ids are matched "
                            "by instruction")
        out[p.id] = ref[3]
    return out


def reference_file_exists(source: ReferenceSource, lang: str) -> bool:
    """False when a per-language reference file is absent (the language has no references)."""
    if source_format(source) == "hf":
        return True
    return Path(source.path.replace("{lang}", lang)).exists()


def load_references(source: ReferenceSource, prompts: PromptSet, languages: list[str], *,
                    judge_scores_alone: bool, judge_name: str = "the judge") -> dict[str, dict[str, str]]:
    """Reference answers per language, matched to the evaluation prompts: `{lang: {prompt id: output}}`.

    A language without references (no `evaluation.references`, or its file absent) is allowed only
    when the judge scores single answers (`judge_scores_alone`): it is then judged against an empty
    reference. Otherwise it is an error, raised at validation.
    """
    refs: dict[str, dict[str, str]] = {}
    for lang in languages:
        if not source.path or not reference_file_exists(source, lang):
            if judge_scores_alone:
                continue
            missing = (f"no reference file for {lang} ({source.path.replace('{lang}', lang)})" if source.path
                       else "not set")
            raise DataError(f"evaluation.references: {missing}; judge {judge_name!r} compares each answer with a "
                            f"reference: add references for {lang}, drop it from languages, or use a judge that "
                            "scores answers alone")
        rows, where = read_rows(source, lang, "evaluation.references.path", "reference")
        refs[lang] = match_references(rows, source, where, lang, prompts.by_lang[lang])
    return refs
