"""Prompt sets: instructions parallel across languages, keyed by a shared id.

Sources: one file per language (JSONL lines such as `{"instruction", "instruction_id"}`, or a JSON
array of `{"id", "instruction", ...}`), or a Hugging Face dataset by name. Every non-English
prompt needs its English counterpart (same id): the cross-lingual reward is computed under the
English instruction. Errors name the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .config import PromptSource
from .errors import DataError
from .languages import check_language_codes


@dataclass(frozen=True)
class Prompt:
    id: str
    instruction: str


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
        return {lang: [{"id": p.id, "instruction": p.instruction} for p in ps] for lang, ps in self.by_lang.items()}


def _read_rows(path: Path, fmt: str) -> list[tuple[int, dict]]:
    """Rows with the line number (JSONL) or array index + 1 (JSON) used in error messages."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: prompt file not found") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of objects")
        rows = list(enumerate(data, 1))
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}:{where}: expected a JSON object, got {type(row).__name__}")
    return rows


def _pick_id_field(row: dict, configured: str) -> str:
    if configured != "auto":
        return configured
    return "instruction_id" if "instruction_id" in row else "id"


def _parse(rows, source: PromptSource, where: str, line_label: str) -> list[Prompt]:
    prompts, seen = [], {}
    for pos, row in rows:
        loc = f"{where}:{pos}" if line_label == "line" else f"{where} row {pos}"
        id_field = _pick_id_field(row, source.id_field)
        if id_field not in row:
            raise DataError(f"{loc}: missing id field {id_field!r}")
        if source.instruction_field not in row:
            raise DataError(f"{loc}: missing instruction field {source.instruction_field!r}")
        pid, instr = str(row[id_field]), row[source.instruction_field]
        if not isinstance(instr, str) or not instr.strip():
            raise DataError(f"{loc}: empty instruction (id {pid})")
        if pid in seen:
            raise DataError(f"{loc}: duplicate id {pid} (first at {seen[pid]})")
        seen[pid] = pos
        prompts.append(Prompt(pid, instr))
    return prompts


def _load_hf(source: PromptSource, lang: str) -> list[Prompt]:
    import datasets

    name = source.path.replace("{lang}", lang)
    config_name = source.config_name.replace("{lang}", lang) if source.config_name else None
    try:
        ds = datasets.load_dataset(name, config_name, split=source.split)
    except Exception as e:  # datasets raises many types for unreachable or unknown datasets
        raise DataError(f"prompts.path: cannot load dataset {name!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    rows = [(i + 1, dict(r)) for i, r in enumerate(ds)]
    return _parse(rows, source, f"{name}[{source.split}]", "row")


def source_format(source: PromptSource) -> str:
    if source.format != "auto":
        return source.format
    suffix = Path(source.path).suffix
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    return "hf"


def load_language(source: PromptSource, lang: str) -> list[Prompt]:
    fmt = source_format(source)
    if fmt == "hf":
        prompts = _load_hf(source, lang)
    else:
        if "{lang}" not in source.path:
            raise DataError(f"prompts.path: {source.path!r} needs a {{lang}} placeholder (one file per language)")
        path = Path(source.path.replace("{lang}", lang))
        prompts = _parse(_read_rows(path, fmt), source, str(path), "line" if fmt == "jsonl" else "row")
    return prompts[: source.limit] if source.limit else prompts


def load_prompt_set(source: PromptSource, languages: list[str]) -> PromptSet:
    """Load every language (English always) and check that each prompt has its English counterpart.

    `limit` picks the first prompts of each target language; counterparts are looked up by id in the
    whole English file, so a file in another order still finds them.
    """
    check_language_codes(languages)
    full_en = load_language(dataclasses.replace(source, limit=None), "en")
    english = {p.id: p for p in full_en}
    by_lang = {"en": full_en[: source.limit] if source.limit else full_en}
    for lang in languages:
        if lang == "en":
            continue
        by_lang[lang] = load_language(source, lang)
        for pos, p in enumerate(by_lang[lang], 1):
            if p.id not in english:
                raise DataError(f"{source.path.replace('{lang}', lang)}: prompt {pos} (id {p.id}) has no English "
                                f"counterpart in {source.path.replace('{lang}', 'en')}")
    order = ["en"] + [lang for lang in languages if lang != "en"]
    return PromptSet({lang: by_lang[lang] for lang in order if lang in languages}, english=english)
