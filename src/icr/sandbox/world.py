"""The sandbox world: small checkable tasks in six languages, parallel by prompt id.

What the world is
-----------------
Five task families whose answer is one integer that code can check, of graded difficulty for a
small model: `add` (a + b, digits), `larger` (the larger of two digits), `max` (of 3-4 distinct
digits), `last` (the last of 3-4 digits) and `count` (how many `*` in a string of 3-6 `*`/`o`).
Every task has an instruction in English, Spanish, German, French, Russian and Swahili (three
phrasings per family and language; the phrasing index is part of the task, so the six
instructions of one id are translations of each other). Swahili is the low-resource language: the
SFT mix holds about 10x fewer Swahili examples (see `build.py`).

An answer has one grammar in every language::

    <TAG>: [... ]*<NUMBER>.          e.g.  "Respuesta: 7."   "Ответ: ... ... 12."

The language tag comes first and is the only language-specific part; everything a judge cares about
apart from the language (the number, the padding `...`, the full stop that ends it) lies on tokens
shared by all languages. That is the lesson of the probe (`shared/notes/sandbox-probe.md`): when
the quality choice sits on language-specific tokens, an English preference cannot move anything in
another language; when it sits on shared tokens after the tag, it can. The content of the
instructions (digits, `+`, `-`, `*`, `o`) is shared too, as numbers and symbols are in real text.

Graded qualities (the oracle in `oracle.py` checks each one from the text alone):

- correctness: the number equals the task's answer;
- language: the tag is the prompt's language;
- conciseness: no `...` filler before the number;
- well-formedness: the whole answer matches the grammar (degenerate outputs - number loops, tag
  stutters, filler runs, empty or truncated answers - do not).

`render_response` writes answers of any chosen quality; `build.py` mixes them into the SFT data so
that pi_SFT's samples vary along every axis, and the tests use them as hand-made cases.

Splits
------
Task ids are drawn once (seeded) from each family's instance space and dealt, families
interleaved, into disjoint splits: `eval` (final evaluation), `dev` (premise measurements),
`train` (ICR prompts), `pref` (English prompts for pi0's DPO pairs) and `sft` (SFT and
pre-training documents). Nothing trained on ever contains an `eval`, `dev` or `train`
instruction. The one exception is world knowledge: the pre-training corpus states every
arithmetic fact ("3 + 4 = 7") and shows the list/count algorithms in shared notation, as a real
base model knows arithmetic before anyone aligns it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

LANGUAGES: tuple[str, ...] = ("en", "es", "de", "fr", "ru", "sw")
LOW_RESOURCE: tuple[str, ...] = ("sw",)
FAMILIES: tuple[str, ...] = ("add", "larger", "max", "last", "count")
SPLITS: tuple[str, ...] = ("eval", "dev", "train", "pref", "sft")

# The language tag that opens every answer. Single words, so the parser is unambiguous.
TAGS: dict[str, str] = {"en": "Answer", "es": "Respuesta", "de": "Antwort", "fr": "Réponse",
                        "ru": "Ответ", "sw": "Jibu"}
FILLER = "..."  # the padding unit: shared by all languages
MAX_FILLER = 6  # more than this many fillers in a row is a runaway, not an answer

# Three phrasings per family and language. Placeholders: {a} {b} (add/larger), {xs} (max/last), {s} (count).
TEMPLATES: dict[str, dict[str, tuple[str, str, str]]] = {
    "add": {
        "en": ("What is {a} + {b}?", "Compute {a} + {b}.", "Add: {a} + {b}"),
        "es": ("¿Cuánto es {a} + {b}?", "Calcula {a} + {b}.", "Suma: {a} + {b}"),
        "de": ("Was ist {a} + {b}?", "Berechne {a} + {b}.", "Addiere: {a} + {b}"),
        "fr": ("Combien font {a} + {b} ?", "Calcule {a} + {b}.", "Additionne : {a} + {b}"),
        "ru": ("Сколько будет {a} + {b}?", "Вычисли {a} + {b}.", "Сложи: {a} + {b}"),
        "sw": ("Ni ngapi {a} + {b}?", "Hesabu {a} + {b}.", "Jumlisha: {a} + {b}"),
    },
    "larger": {
        "en": ("Which is larger: {a} or {b}?", "Larger number: {a} or {b}", "Pick the bigger number: {a} or {b}."),
        "es": ("¿Cuál es mayor: {a} o {b}?", "Número mayor: {a} o {b}", "Elige el número más grande: {a} o {b}."),
        "de": ("Was ist größer: {a} oder {b}?", "Größere Zahl: {a} oder {b}", "Wähle die größere Zahl: {a} oder {b}."),
        "fr": ("Lequel est plus grand : {a} ou {b} ?", "Nombre le plus grand : {a} ou {b}", "Choisis le plus grand nombre : {a} ou {b}."),
        "ru": ("Что больше: {a} или {b}?", "Большее число: {a} или {b}", "Выбери большее число: {a} или {b}."),
        "sw": ("Kipi ni kikubwa: {a} au {b}?", "Namba kubwa: {a} au {b}", "Chagua namba kubwa: {a} au {b}."),
    },
    "max": {
        "en": ("Which number is largest: {xs}?", "Largest number: {xs}", "Find the maximum of {xs}."),
        "es": ("¿Qué número es el mayor: {xs}?", "Número más grande: {xs}", "Encuentra el máximo de {xs}."),
        "de": ("Welche Zahl ist am größten: {xs}?", "Größte Zahl: {xs}", "Finde das Maximum von {xs}."),
        "fr": ("Quel nombre est le plus grand : {xs} ?", "Plus grand nombre : {xs}", "Trouve le maximum de {xs}."),
        "ru": ("Какое число самое большое: {xs}?", "Наибольшее число: {xs}", "Найди максимум из {xs}."),
        "sw": ("Ni namba gani kubwa zaidi: {xs}?", "Namba kubwa zaidi: {xs}", "Tafuta kubwa zaidi kati ya {xs}."),
    },
    "last": {
        "en": ("What is the last number in {xs}?", "Last number: {xs}", "Name the final number of {xs}."),
        "es": ("¿Cuál es el último número en {xs}?", "Último número: {xs}", "Di el número final de {xs}."),
        "de": ("Was ist die letzte Zahl in {xs}?", "Letzte Zahl: {xs}", "Nenne die letzte Zahl von {xs}."),
        "fr": ("Quel est le dernier nombre dans {xs} ?", "Dernier nombre : {xs}", "Donne le nombre final de {xs}."),
        "ru": ("Какое последнее число в {xs}?", "Последнее число: {xs}", "Назови последнее число из {xs}."),
        "sw": ("Namba ya mwisho katika {xs} ni ipi?", "Namba ya mwisho: {xs}", "Taja namba ya mwisho ya {xs}."),
    },
    "count": {
        "en": ("How many stars are in {s}?", "Count the stars: {s}", "Number of * in {s}?"),
        "es": ("¿Cuántas estrellas hay en {s}?", "Cuenta las estrellas: {s}", "¿Número de * en {s}?"),
        "de": ("Wie viele Sterne sind in {s}?", "Zähle die Sterne: {s}", "Anzahl der * in {s}?"),
        "fr": ("Combien d'étoiles dans {s} ?", "Compte les étoiles : {s}", "Nombre de * dans {s} ?"),
        "ru": ("Сколько звёзд в {s}?", "Посчитай звёзды: {s}", "Число * в {s}?"),
        "sw": ("Kuna nyota ngapi katika {s}?", "Hesabu nyota: {s}", "Idadi ya * katika {s}?"),
    },
}

# Qualities `render_response` can produce. "degenerate" picks one of DEGENERATE_KINDS.
QUALITIES: tuple[str, ...] = ("good", "padded", "wrong", "wrong_padded", "wrong_lang", "degenerate")
DEGENERATE_KINDS: tuple[str, ...] = ("loop", "stutter", "empty", "filler_run", "truncated")


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    id: str
    family: str
    operands: tuple  # (a, b) for add/larger; digits for max/last; the star string for count
    template: int  # phrasing index, the same in every language
    split: str = ""

    @property
    def answer(self) -> int:
        return solve(self.family, self.operands)

    def instruction(self, lang: str) -> str:
        return format_instruction(self.family, self.operands, self.template, lang)

    def to_json(self) -> dict:
        return {"family": self.family, "operands": list(self.operands), "template": self.template,
                "split": self.split, "answer": self.answer,
                "instructions": {lang: self.instruction(lang) for lang in LANGUAGES}}


def solve(family: str, operands) -> int:
    if family == "add":
        return operands[0] + operands[1]
    if family == "larger":
        return max(operands)
    if family == "max":
        return max(operands)
    if family == "last":
        return operands[-1]
    if family == "count":
        return operands[0].split().count("*")
    raise ValueError(f"unknown task family {family!r}")


def format_instruction(family: str, operands, template: int, lang: str) -> str:
    text = TEMPLATES[family][lang][template]
    if family in ("add", "larger"):
        return text.format(a=operands[0], b=operands[1])
    if family in ("max", "last"):
        return text.format(xs=", ".join(str(x) for x in operands))
    return text.format(s=operands[0])


def _instance_space(family: str, rng: random.Random, cap: int) -> list[tuple]:
    """Distinct operand tuples of a family, in a seeded order (at most `cap`)."""
    if family == "add":
        space = [(a, b) for a in range(10) for b in range(10)]
    elif family == "larger":
        space = [(a, b) for a in range(10) for b in range(10) if a != b]
    elif family in ("max", "last"):
        seen, space = set(), []
        for _ in range(cap * 4):
            xs = tuple(rng.sample(range(10), rng.randint(3, 4)))
            if len(set(xs)) == len(xs) and xs not in seen:  # distinct digits: one clear answer
                seen.add(xs)
                space.append(xs)
            if len(space) >= cap:
                break
    elif family == "count":
        space = []
        for n in range(3, 7):
            for mask in range(2 ** n):
                s = " ".join("*" if mask >> i & 1 else "o" for i in range(n))
                if "*" in s:
                    space.append((s,))
    else:
        raise ValueError(family)
    rng.shuffle(space)
    return space[:cap]


@dataclass
class World:
    """All tasks with their split, and the seed that made them. Serialised as `world.json`."""

    seed: int
    tasks: dict[str, Task]
    sizes: dict[str, int] = field(default_factory=dict)
    families: tuple[str, ...] = FAMILIES

    def split(self, name: str) -> list[Task]:
        return sorted((t for t in self.tasks.values() if t.split == name), key=lambda t: t.id)

    def prompts(self, split: str, lang: str) -> list[dict]:
        """The prompt-set rows the pipeline reads: `{"instruction_id", "instruction"}`."""
        return [{"instruction_id": t.id, "instruction": t.instruction(lang)} for t in self.split(split)]

    def to_json(self) -> dict:
        return {"format": "icr-sandbox-world/1", "seed": self.seed, "languages": list(LANGUAGES),
                "low_resource": list(LOW_RESOURCE), "families": list(self.families), "tags": TAGS,
                "filler": FILLER, "max_filler": MAX_FILLER, "sizes": self.sizes,
                "tasks": {tid: t.to_json() for tid, t in self.tasks.items()}}

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: dict) -> "World":
        tasks = {tid: Task(tid, d["family"], tuple(d["operands"]), d["template"], d["split"])
                 for tid, d in data["tasks"].items()}
        return cls(seed=data["seed"], tasks=tasks, sizes=data.get("sizes", {}),
                   families=tuple(data.get("families", FAMILIES)))

    @classmethod
    def load(cls, path: str | Path) -> "World":
        path = Path(path)
        if path.is_dir():
            path = path / "world.json"
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


def selected_families(families) -> tuple[str, ...]:
    """The task families a world keeps, in FAMILIES order: all of them for None; ValueError saying what
    is allowed for an empty list or an unknown family (the one check `build_world` and the sandbox's
    `prepare` share)."""
    if families is None:
        return FAMILIES
    kept = tuple(f for f in FAMILIES if f in families)
    if not kept or set(families) - set(FAMILIES):
        raise ValueError(f"a non-empty list of {list(FAMILIES)}, got {list(families)!r}")
    return kept


def build_world(seed: int = 0, n_eval: int = 60, n_dev: int = 60, n_train: int = 100, n_pref: int = 400,
                n_sft: int = 500, families: tuple[str, ...] | list[str] | None = None) -> World:
    """Deal seeded task ids into disjoint splits, families interleaved (same args -> same world).
    `families` (default: all, in FAMILIES order) keeps only those task families in every split."""
    try:
        fams = selected_families(families)
    except ValueError as e:
        raise ValueError(f"families: expected {e}") from None
    sizes = {"eval": n_eval, "dev": n_dev, "train": n_train, "pref": n_pref, "sft": n_sft}
    total = sum(sizes.values())
    rng = random.Random(f"icr-sandbox-world-{seed}")
    per_family = -(-total // len(fams)) + 50
    pools = {}
    for fam in fams:
        ops = _instance_space(fam, rng, per_family * 3)
        # each operand tuple with a seeded phrasing; the phrasing varies, the problem does not repeat
        # within a family unless the family's space is smaller than needed (add, larger): then a
        # problem recurs under another phrasing, still as a distinct task id.
        cands = [(o, rng.randrange(3)) for o in ops]
        if len(cands) < per_family:
            extra = [(o, t) for o in ops for t in range(3)]
            rng.shuffle(extra)
            seen = set(cands)
            cands += [c for c in extra if c not in seen]
        pools[fam] = cands[:per_family]
    ordered = []
    for i in range(per_family):
        for fam in fams:
            if i < len(pools[fam]):
                ordered.append((fam, *pools[fam][i]))
    if len(ordered) < total:
        raise ValueError(f"the world holds {len(ordered)} tasks; {total} were asked for")
    tasks, pos = {}, 0
    for split in SPLITS:
        for k in range(sizes[split]):
            fam, ops, tmpl = ordered[pos]
            pos += 1
            tid = f"{split}-{k:04d}-{fam}"  # sorts in dealing order
            tasks[tid] = Task(tid, fam, ops, tmpl, split)
    return World(seed=seed, tasks=tasks, sizes=sizes, families=fams)


# ---------------------------------------------------------------------------------------------
# Responses of graded quality
# ---------------------------------------------------------------------------------------------

def answer_text(lang: str, number: int, n_filler: int = 0) -> str:
    """A well-formed answer: tag, optional filler, number, full stop."""
    return f"{TAGS[lang]}: " + f"{FILLER} " * n_filler + f"{number}."


def wrong_number(task: Task, rng: random.Random) -> int:
    """A plausible mistake: off by one or two, or (lists) another listed number."""
    ans = task.answer
    if task.family in ("larger", "max", "last") and rng.random() < 0.5:
        return rng.choice([x for x in task.operands if x != ans])
    cands = [ans + d for d in (-2, -1, 1, 2) if ans + d >= 0]
    return rng.choice(cands)


def other_language(lang: str, rng: random.Random) -> str:
    """The language a wrong-language answer is in: mostly English (the usual leak), else another."""
    if lang != "en" and rng.random() < 0.7:
        return "en"
    return rng.choice([x for x in LANGUAGES if x != lang])


def render_response(task: Task, lang: str, quality: str, rng: random.Random, kind: str | None = None) -> str:
    """An answer to `task` for a user writing in `lang`, of the given quality."""
    if quality == "good":
        return answer_text(lang, task.answer)
    if quality == "padded":
        return answer_text(lang, task.answer, rng.randint(1, 3))
    if quality == "wrong":
        return answer_text(lang, wrong_number(task, rng))
    if quality == "wrong_padded":
        return answer_text(lang, wrong_number(task, rng), rng.randint(1, 3))
    if quality == "wrong_lang":
        return answer_text(other_language(lang, rng), task.answer, rng.choice([0, 0, 1]))
    if quality == "degenerate":
        return degenerate_text(task, lang, rng, kind)
    raise ValueError(f"unknown quality {quality!r}; known: {', '.join(QUALITIES)}")


def degenerate_text(task: Task, lang: str, rng: random.Random, kind: str | None = None) -> str:
    kind = kind or rng.choice(DEGENERATE_KINDS)
    tag = f"{TAGS[lang]}:"
    n = task.answer if rng.random() < 0.5 else wrong_number(task, rng)
    if kind == "loop":  # the number over and over, never finished
        return tag + f" {n}" * rng.randint(6, 12)
    if kind == "stutter":  # the tag over and over
        return " ".join([tag] * rng.randint(3, 6))
    if kind == "empty":  # a tag and nothing else
        return tag
    if kind == "filler_run":  # padding that never reaches an answer
        return tag + f" {FILLER}" * rng.randint(5, 10)
    if kind == "truncated":  # the right start, cut off before the full stop
        return f"{tag} " + f"{FILLER} " * rng.randint(0, 2) + f"{n}"
    raise ValueError(f"unknown degenerate kind {kind!r}; known: {', '.join(DEGENERATE_KINDS)}")


def draw_quality(rng: random.Random, mix: dict[str, float]) -> str:
    r, acc = rng.random() * sum(mix.values()), 0.0
    for q, w in mix.items():
        acc += w
        if r < acc:
            return q
    return next(reversed(mix))


# The SFT mixture: most answers good, every flaw well represented so pi_SFT's samples vary.
SFT_MIX: dict[str, float] = {"good": 0.40, "padded": 0.20, "wrong": 0.12, "wrong_padded": 0.06,
                             "wrong_lang": 0.10, "degenerate": 0.12}


def reference_answer(task: Task, lang: str) -> str:
    """The fixed reference answer of the evaluation: correct, in the right language, padded with one
    or two fillers (chosen by a hash of the id, never by a model). Oracle score 0.8: a concise
    correct answer beats it, a padded correct one ties, anything worse loses."""
    n_fill = 1 + int(hashlib.sha256(task.id.encode()).hexdigest(), 16) % 2
    return answer_text(lang, task.answer, n_fill)


# ---------------------------------------------------------------------------------------------
# Pre-training text: world knowledge and parallel data
# ---------------------------------------------------------------------------------------------

LANGUAGE_WORDS = {"en": "English", "es": "Spanish", "de": "German", "fr": "French", "ru": "Russian",
                  "sw": "Swahili"}


def knowledge_text(rng: random.Random, n_algorithmic: int = 300, repeats: int = 1) -> list[str]:
    """Language-neutral knowledge in shared notation: every addition fact (`repeats` times) and
    `n_algorithmic` worked examples of each of larger/max/last/count."""
    lines = [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)] * repeats
    for _ in range(n_algorithmic):
        a, b = rng.sample(range(10), 2)
        lines.append(f"larger {a} {b} = {max(a, b)}")
        xs = rng.sample(range(10), rng.randint(3, 4))
        lines.append(f"max {', '.join(map(str, xs))} = {max(xs)}")
        lines.append(f"last {', '.join(map(str, xs))} = {xs[-1]}")
        st = " ".join(rng.choice("*o") for _ in range(rng.randint(3, 6)))
        lines.append(f"count * in {st} = {st.split().count('*')}")
    return [" " + x for x in lines]  # leading space: the digits tokenise as they do inside instructions


def parallel_text(tasks: list[Task], rng: random.Random, langs=LANGUAGES) -> list[str]:
    """Translation pairs (instruction and answer) between English and each other language, both
    directions, plus some pairs between non-English languages: how real LMs learn that the
    languages mean the same thing."""
    out = []
    for t in tasks:
        a, b = rng.sample(list(langs), 2)
        if "en" not in (a, b) and rng.random() < 0.6:
            a = "en"
        n_fill = rng.choice([0, 0, 1])
        out.append(f"{LANGUAGE_WORDS[a]}: {t.instruction(a)} {answer_text(a, t.answer, n_fill)}\n"
                   f"{LANGUAGE_WORDS[b]}: {t.instruction(b)} {answer_text(b, t.answer, n_fill)}")
    return out


def monolingual_text(tasks: list[Task], lang: str) -> list[str]:
    return [f"{t.instruction(lang)} {answer_text(lang, t.answer)}" for t in tasks]
