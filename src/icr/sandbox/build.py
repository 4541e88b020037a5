"""Build the sandbox's starting pair (pi_SFT, pi0), its prompt files, references and premise check.

`prepare(out_dir, **recipe)` is the config's `prepare.call` target (`icr.sandbox:prepare`). The
caller picks `out_dir` (a cache folder keyed by the arguments); every step writes its outputs
there and is skipped when they are already present, so a second call costs nothing.

Steps, each with the reason it is there:

1. **World** (`world.py`): seeded tasks dealt into disjoint splits -> `world.json`.
2. **Tokenizer**: byte-level BPE on the pre-training and SFT text, ChatML template.
3. **Base model** (pre-training, loss on every token): arithmetic facts and list/count worked
   examples in shared notation (knowledge), instruction+answer documents in every language
   (Swahili at `low_resource_ratio`), and parallel pairs ("English: ... / Spanish: ...") of the
   same instruction and answer. The parallel data and the shared digits are what give the base
   model cross-lingual structure, as translation data does for real multilingual LMs.
4. **pi_SFT**: chat SFT on `sft` tasks in every language with answers drawn from
   `world.SFT_MIX` (good, padded, wrong, wrong-language, degenerate), so its samples vary along
   every quality; plus English instructions behind the language prefix answered in the named
   language (the format the cross-lingual reward scores), and translation-to-English examples
   (the format `translate_to_english` uses). Swahili gets `low_resource_ratio` of the data.
   **Check and repair** (`sft_check.json`): pi_SFT is sampled on the `dev` prompts of every
   language; a language below the floors (`sft_floor_well_formed`, `sft_floor_language`) gets up
   to `sft_repair_rounds` more SFT epochs with its own conversations repeated `sft_repair_weight`
   times, each kept only if it brings them closer to the floors and puts none newly below. Why: the same recipe on another CPU (other float kernels) once left pi_SFT answering
   Swahili with Spanish tags, and every model after it scored 0 there, silently (issue 25).
5. **pi0**: DPO (TRL `DPOTrainer`, sigmoid loss, reference = pi_SFT) on ENGLISH-ONLY pairs of
   pi_SFT samples on the `pref` tasks, chosen/rejected by the oracle, of the kinds `dpo_pair_kinds`
   (not `language`: those taught every language to answer in English). Checked: a language pi0
   answers in the right language less than half the time sends pi_SFT back for a repair epoch in
   that language and pi0 is built again (`pi0_repair_rounds`, `build_pi0`).
6. **Files for the pipeline**: `prompts/{train,eval}/{lang}.jsonl`, `references/{lang}.json`
   (the fixed reference answers, `world.reference_answer`: correct, right language, padded with
   one or two fillers; oracle score 0.8; it depends on nothing but the world).
7. **Premise** (`premise.json`), measured on the `dev` tasks before any ICR: pi0 vs pi_SFT oracle
   win rate per language (sampled at temperature 0.6, top-p 0.9), and how often pi0's implicit
   reward log pi0(y|x) - log pi_SFT(y|x) (summed over response tokens incl. the end token) orders
   two pi_SFT samples as the oracle does: English under the English instruction; every other
   language under the English instruction behind the prefix (cross-lingual), and, for comparison,
   under its own instruction (multilingual); split by the kind of pair.
8. **Self-check** (`language_flags.json`): every language whose final pi_SFT (the check's last
   measurement, the one that ended the repair) or pi0 (the premise's samples) is below the floors is
   flagged with one line saying which model, which share and which floor. `icr run` logs each flag as a warning and
   report.md / report.html mark the language (the loop reads `language_flags.json` from any
   prepare folder); the build does not fail, so the run still shows what happened.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..compat import checkpointing_kwargs
from ..config import RewardConfig
from ..runs import atomic_write_text, write_json
from ..stages import TRANSLATE_INSTRUCTION as _TRANSLATE_INSTRUCTION
from ..errors import ConfigError
from .oracle import KINDS as PAIR_KINDS
from .oracle import OracleJudge
from .recipe import arg
from .recipe import check as check_recipe
from .recipe import defaults as recipe_defaults
from .world import (LANGUAGE_WORDS, LANGUAGES, LOW_RESOURCE, SFT_MIX, TAGS, World, build_world,
                    draw_quality, knowledge_text, monolingual_text, parallel_text, reference_answer,
                    render_response, selected_families)

# The pipeline's own formats, so the sandbox's models are trained and checked on exactly what the
# pipeline sends: the cross-lingual reward prefix (the config default) and the translation prompt.
PREFIX = RewardConfig().prefix
TRANSLATE_INSTRUCTION = _TRANSLATE_INSTRUCTION

@dataclass
class ToyRecipe:
    """`icr.sandbox:prepare`'s arguments (`prepare.args` in configs/sandbox.yaml). Every field is part of
    the build's identity (`recipe.json`, `given_args`); the defaults are the recipe docs/sandbox.md
    measures. Sizes are per language unless said otherwise."""

    seed: int = arg(0, "Seed of the world's tasks and splits, the data draws and every training step.")
    # world
    n_eval: int = arg(60, "Evaluation prompts per language (the same task ids in every language): "
                          "60 gives a win-rate standard error of ~6 points per language.")
    n_dev: int = arg(60, "Premise-check prompts per language, disjoint from every other split.")
    n_train: int = arg(100, "ICR training prompts per language (the loop's `prompts`).")
    n_pref: int = arg(400, "English prompts whose pi_SFT samples make pi0's DPO pairs (~1,200 pairs at the "
                           "defaults).")
    n_sft: int = arg(500, "Tasks behind the SFT and pre-training documents (each in every high-resource "
                          "language).")
    families: list[str] | None = arg(None, "Task families of the world, every split (null: all five, "
                                           "`icr.sandbox.world.FAMILIES`). Issue 21's experiment keeps the "
                                           "family whose correctness the small pi0 learns from English DPO "
                                           "(`max`; docs/sandbox.md, 'Does the reward transfer a quality pi0 knows').")
    low_resource_ratio: float = arg(0.1, "Share of SFT and monolingual pre-training documents kept for "
                                         "Swahili, the low-resource language (10x less data).")
    # model
    vocab_size: int = arg(800, "BPE vocabulary size (tokens): enough for six languages' tags and words of a "
                               "small world.")
    hidden_size: int = arg(128, "Hidden size of the Llama model (~0.5 M parameters with num_layers 2): "
                                "trains in minutes on 2 CPU cores.")
    num_layers: int = arg(2, "Transformer layers.")
    # pre-training (loss on every token)
    knowledge_repeats: int = arg(5, "Times each addition fact appears in the pre-training corpus, so the base "
                                    "knows arithmetic before alignment.")
    knowledge_algorithmic: int = arg(500, "Worked larger/max/last/count examples of each family in shared "
                                          "notation.")
    pretrain_steps: int = arg(1200, "Pre-training batches of 32 documents.")
    pretrain_lr: float = arg(3e-3, "Pre-training peak learning rate (AdamW; 5% warm-up, linear decay to 10%).")
    # SFT (assistant tokens)
    sft_epochs: int = arg(2, "SFT epochs over the conversations.")
    sft_lr: float = arg(3e-3, "SFT learning rate.")
    sft_prefixed_ratio: float = arg(0.3, "Per SFT task and non-English language: chance of an extra example of "
                                         "the English instruction behind the reward prefix, answered in that "
                                         "language (the format the cross-lingual reward scores).")
    sft_translate_ratio: float = arg(0.2, "Per SFT task: chance of a translate-to-English example (the format "
                                          "of the pipeline's translation prompt).")
    # English DPO -> pi0
    pref_samples: int = arg(6, "pi_SFT samples per English pref prompt (temperature 1), oracle-scored.")
    pref_pairs_per_prompt: int = arg(3, "Oracle-labelled pairs per pref prompt at most (best vs worst first).")
    dpo_epochs: int = arg(2, "pi0's DPO epochs over the English pairs.")
    dpo_beta: float = arg(0.1, "DPO beta (sigmoid loss), as the loop's train.beta.")
    dpo_lr: float = arg(1e-4, "DPO learning rate (cosine schedule, 5 warm-up steps).")
    dpo_batch_size: int = arg(16, "DPO pairs per step.")
    dpo_pair_kinds: list[str] = arg(["well-formedness", "correctness", "conciseness"],
                                    "Oracle pair kinds pi0's DPO trains on. Not `language`: English pairs of that "
                                    "kind (an `Answer:` over a `Jibu:` to an English prompt) taught the small model to "
                                    "reject the other tags in every language (build seed 2: pi0 answered every "
                                    "Swahili prompt in English), as they did Gemma (docs/sandbox.md, recipe 2). "
                                    "All pairs are kept in pi0_pairs.jsonl.")
    # premise
    premise_samples: int = arg(4, "pi_SFT samples per dev prompt (temperature 1) whose pairs test the reward.")
    premise_wr_samples: int = arg(2, "Samples per dev prompt and model for pi0 vs pi_SFT's win rate "
                                     "(T 0.6, top-p 0.9, as the evaluation samples).")
    max_new_tokens: int = arg(24, "Sampling limit (tokens) for pairs and premise: a world answer is ~5-15.")
    # self-check (floors fixed from the SFT mix's design, not from any ICR result)
    sft_floor_well_formed: float = arg(0.5, "Floor on pi_SFT's share of well-formed answers per language (dev "
                                            "prompts, T 0.6): 88% of its SFT answers are well-formed; the "
                                            "high-resource languages reach ~0.65 at the default budget.")
    sft_floor_language: float = arg(0.8, "Floor on pi_SFT's right-language share among its well-formed answers "
                                         "per language: 90% of its SFT answers are in the right language.")
    pi0_floor_language: float = arg(0.5, "Floor on pi0's right-language share (all answers) per language: below "
                                         "it, English DPO has taught the language to answer in another one.")
    sft_repair_rounds: int = arg(3, "Extra SFT epochs at most for languages below pi_SFT's floors, one at a "
                                    "time, checking after each (0: check and flag only).")
    pi0_repair_rounds: int = arg(2, "When pi0 answers some language in the right language less than "
                                    "`pi0_floor_language` of the time (dev prompts, T 0.6), pi_SFT gets one more "
                                    "repair epoch in that language and pi0 is built again, up to this many times "
                                    "(0: flag only).")
    sft_repair_weight: int = arg(4, "In a repair epoch, the failing languages' own conversations are repeated "
                                    "this many times among the whole SFT mix (once each).")
    threads: int = arg(1, "Torch threads while building: on a shared 2-core machine one thread trained "
                          "10-20x faster than two competing ones (measured 15,000 vs 700 tokens/s).")


# The defaults as a dict (what `recipe.json` holds for an empty recipe).
DEFAULTS: dict = recipe_defaults(ToyRecipe)


def given_args(recipe: dict) -> dict:
    """A recipe's arguments without the None-valued ones: what identifies a build. An argument added
    later with a None default (= the old behaviour) keeps folders and keys built before it valid."""
    return {k: v for k, v in recipe.items() if v is not None}


def recipe_folder(out_dir: str | Path, recipe: dict, recipe_class, name: str) -> tuple[dict, Path]:
    """(the full recipe as a dict, the build folder): unknown arguments and wrong types refused
    (`recipe.check`: one IcrError line naming `prepare.args.<field>`), the folder created, and a
    folder built with another recipe refused (its recipe.json is the record of what it holds)."""
    cfg = check_recipe(recipe_class, recipe, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.json"
    if recipe_path.exists() and given_args(json.loads(recipe_path.read_text())) != given_args(cfg):
        raise ValueError(f"{out}: built with a different recipe ({recipe_path}); use another folder")
    write_json(recipe_path, given_args(cfg))  # as identified: a None argument (the old behaviour) is left out
    return cfg, out


def prepare(out_dir: str | Path, **recipe) -> dict:
    """Build (or reuse) everything under `out_dir`; returns paths and the premise numbers."""
    kinds = check_recipe(ToyRecipe, recipe, "icr.sandbox.prepare")["dpo_pair_kinds"]
    if not kinds or set(kinds) - set(PAIR_KINDS):  # before the folder is made: nothing half-written
        raise ConfigError(f"prepare.args.dpo_pair_kinds: expected a non-empty list of {list(PAIR_KINDS)}, got {kinds!r}")
    try:
        selected_families(recipe.get("families"))
    except ValueError as e:
        raise ConfigError(f"prepare.args.families: expected null or {e}") from None
    cfg, out = recipe_folder(out_dir, recipe, ToyRecipe, "icr.sandbox.prepare")
    timings = load_json(out / "timings.json") or {}
    t_all = time.time()

    import torch

    # One thread: on a shared 2-core machine, two OpenMP threads competing with other processes
    # ran tiny-model training 10-20x slower than one (measured: 700 vs 15,000 tokens/s).
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        return _prepare(out, cfg, timings, t_all)
    finally:
        torch.set_num_threads(threads)


def _prepare(out: Path, cfg: dict, timings: dict, t_all: float) -> dict:
    import torch

    torch.manual_seed(cfg["seed"])
    world = build_world(cfg["seed"], cfg["n_eval"], cfg["n_dev"], cfg["n_train"], cfg["n_pref"], cfg["n_sft"],
                        cfg["families"])
    if not (out / "world.json").exists():
        write_json(out / "world.json", world.to_json())
    write_prompt_files(world, out)
    oracle = OracleJudge(out)

    rng = random.Random(f"sandbox-data-{cfg['seed']}")
    pre_texts = pretraining_texts(world, rng, cfg)
    sft_items = sft_conversations_by_language(world, rng, cfg)
    sft_convs = [conv for _, conv in sft_items]

    if not is_model(out / "sft") and is_model(out / "sft.old"):  # killed between build_pi0's two renames
        (out / "sft.old").rename(out / "sft")
    if not is_model(out / "sft"):
        t = time.time()
        from ..tiny import build_model, build_tokenizer, fit_causal_lm

        tok_texts = (pre_texts + [m["content"] for c in sft_convs for m in c]
                     + [PREFIX, TRANSLATE_INSTRUCTION, "user\nassistant\n"] * 20)
        tok = build_tokenizer(tok_texts, vocab_size=cfg["vocab_size"])
        model = build_model(tok, hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                            max_position_embeddings=512, seed=cfg["seed"])
        pretrain(model, tok, pre_texts, steps=cfg["pretrain_steps"], lr=cfg["pretrain_lr"], seed=cfg["seed"])
        timings["pretrain_s"] = round(time.time() - t, 1)
        t = time.time()
        fit_causal_lm(model, tok, sft_convs, epochs=cfg["sft_epochs"], lr=cfg["sft_lr"], batch_size=32,
                      seed=cfg["seed"])
        write_json(out / "sft_check.json", check_and_repair_sft(world, oracle, model, tok, sft_items, cfg))
        model.save_pretrained(out / "sft")
        tok.save_pretrained(out / "sft")
        timings["sft_s"] = round(time.time() - t, 1)
        write_json(out / "timings.json", timings)

    if not is_model(out / "dpo"):
        t = time.time()
        build_pi0(out, world, oracle, sft_items, cfg)
        timings["pairs_and_dpo_s"] = round(time.time() - t, 1)
        write_json(out / "timings.json", timings)

    if not (out / "premise.json").exists():
        t = time.time()
        sft_model, tok = load_model(out / "sft")
        dpo_model, _ = load_model(out / "dpo")
        premise = measure_premise(world, oracle, dpo_model, sft_model, tok, cfg)
        timings["premise_s"] = round(time.time() - t, 1)
        premise["build_timings_s"] = timings
        write_json(out / "premise.json", premise)
        write_json(out / "timings.json", timings)
    if not (out / LANGUAGE_FLAGS).exists():
        sft_check = load_json(out / "sft_check.json")
        final = [r for r in sft_check["rounds"] if r["kept"]][-1]["quality"] if sft_check else None
        write_json(out / LANGUAGE_FLAGS, self_check(load_json(out / "premise.json")["sample_quality"], cfg, final))
    timings["this_call_s"] = round(time.time() - t_all, 1)
    return {"sft": str(out / "sft"), "dpo": str(out / "dpo"), "world": str(out / "world.json"),
            "premise": str(out / "premise.json"), "prompts": str(out / "prompts"),
            "references": str(out / "references")}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def _keep(lang: str, rng: random.Random, cfg: dict) -> bool:
    return lang not in LOW_RESOURCE or rng.random() < cfg["low_resource_ratio"]


def pretraining_texts(world: World, rng: random.Random, cfg: dict) -> list[str]:
    """Knowledge (shared notation) + monolingual documents + parallel pairs, shuffled."""
    tasks = world.split("sft") + world.split("pref")
    texts = knowledge_text(rng, n_algorithmic=cfg["knowledge_algorithmic"], repeats=cfg["knowledge_repeats"])
    for lang in LANGUAGES:
        texts += [d for d in monolingual_text(tasks, lang) if _keep(lang, rng, cfg)]
    texts += parallel_text(tasks, rng)
    rng.shuffle(texts)
    return texts


def translate_to_english(text: str) -> str:
    """The faithful English translation of a world answer: every language tag becomes English's."""
    for tag in TAGS.values():
        text = re.sub(rf"(?<![^\W\d_]){re.escape(tag)}(?=\s*:)", TAGS["en"], text)
    return text


def sft_conversations(world: World, rng: random.Random, cfg: dict) -> list[list[dict]]:
    """pi_SFT's chat conversations, shuffled (`sft_conversations_by_language` without the languages)."""
    return [conv for _, conv in sft_conversations_by_language(world, rng, cfg)]


def sft_conversations_by_language(world: World, rng: random.Random, cfg: dict) -> list[tuple[str, list[dict]]]:
    """(language the answer is asked in, conversation) for every SFT conversation, shuffled;
    translation examples have the language `translate`."""
    items = []

    def chat(lang, user, assistant):
        items.append((lang, [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]))

    for t in world.split("sft"):
        for lang in LANGUAGES:
            if _keep(lang, rng, cfg):
                chat(lang, t.instruction(lang), render_response(t, lang, draw_quality(rng, SFT_MIX), rng))
            if lang != "en" and rng.random() < cfg["sft_prefixed_ratio"] and _keep(lang, rng, cfg):
                chat(lang, PREFIX.format(language=LANGUAGE_WORDS[lang]) + t.instruction("en"),
                     render_response(t, lang, draw_quality(rng, SFT_MIX), rng))
        if rng.random() < cfg["sft_translate_ratio"]:
            lang = rng.choice([x for x in LANGUAGES if x != "en"])
            text = render_response(t, lang, draw_quality(rng, SFT_MIX), rng)
            chat("translate", TRANSLATE_INSTRUCTION.format(language=LANGUAGE_WORDS[lang], text=text),
                 translate_to_english(text))
    rng.shuffle(items)  # the same permutation a list of bare conversations got: builds before this kept
    return items


def write_prompt_files(world: World, out: Path) -> None:
    """The pipeline's files: `prompts/{train,eval}/{lang}.jsonl` and `references/{lang}.json` (kept if present)."""
    for split in ("train", "eval"):
        for lang in LANGUAGES:
            path = out / "prompts" / split / f"{lang}.jsonl"
            if not path.exists():
                atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                for r in world.prompts(split, lang)))
    for lang in LANGUAGES:
        path = out / "references" / f"{lang}.json"
        if not path.exists():
            rows = [{"id": t.id, "instruction": t.instruction(lang), "output": reference_answer(t, lang),
                     "generator": "sandbox_reference", "dataset": f"sandbox_{lang}"} for t in world.split("eval")]
            write_json(path, rows)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def pretrain(model, tok, texts: list[str], steps: int, lr: float, seed: int, batch_size: int = 32) -> None:
    """Next-token training on every token of short documents, `steps` batches drawn at random
    (documents end with <|endoftext|>; batches padded to their longest document)."""
    import torch

    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    docs = [ids + [sep] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.1, 1 - s / steps))
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = [docs[rng.randrange(len(docs))] for _ in range(batch_size)]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, d in enumerate(batch):
            ids[row, :len(d)] = torch.tensor(d)
            labels[row, :len(d)] = torch.tensor(d)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()


def train_dpo(policy, reference, tok, pairs: list[dict], out_path: Path, cfg: dict) -> None:
    """TRL DPO (sigmoid loss) from pi_SFT toward the oracle's English choices; saves pi0."""
    import tempfile

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["instruction"]}],
                             "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, loss_type=["sigmoid"], beta=cfg["dpo_beta"],
                         learning_rate=cfg["dpo_lr"], num_train_epochs=cfg["dpo_epochs"],
                         per_device_train_batch_size=cfg["dpo_batch_size"], lr_scheduler_type="cosine",
                         warmup_steps=5, bf16=False, use_cpu=True, **checkpointing_kwargs(False),
                         report_to="none", save_strategy="no",
                         logging_steps=10, disable_tqdm=True, seed=cfg["seed"], max_length=256,
                         dataset_num_proc=None)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds, processing_class=tok)
        trainer.train()
    policy.eval()
    policy.save_pretrained(out_path)
    tok.save_pretrained(out_path)


# ---------------------------------------------------------------------------------------------
# Sampling, scoring, pairs
# ---------------------------------------------------------------------------------------------

def is_model(path: Path) -> bool:
    """Whether `path` holds a saved model (a finished training step)."""
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def load_model(path: Path):
    """(model, tokenizer) of a saved model, in eval mode, padding on the left for sampling."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, tok


def load_json(path: Path):
    """A JSON file's content, or None when it does not exist."""
    return json.loads(path.read_text()) if path.exists() else None


def sample(model, tok, instructions: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int,
           seed: int, batch_size: int = 64) -> list[list[str]]:
    """n sampled answers per instruction, through the pipeline's own `hf` backend (the same
    batching, seeding and end-of-turn rule as `icr generate`)."""
    from ..generation import SamplingParams
    from ..generation.hf import HFBackend

    backend = HFBackend("unused", device="cpu", model=model, tokenizer=tok, batch_size=batch_size)
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    return [[s.text for s in outs] for outs in backend.generate([[{"role": "user", "content": x}] for x in instructions],
                                                               params)]


def response_logprobs(model, tok, instructions: list[str], responses: list[str], batch_size: int = 64):
    """Summed log-prob of each response (incl. its end token) after its instruction, through the
    pipeline's scorer (`icr.reward`: TRL's tokenisation, exact to 1e-4 against the plain path)."""
    from ..logprobs import sequence_logprobs
    from ..reward import tokenize_pair

    pairs = [tokenize_pair(tok, [{"role": "user", "content": x}], y) for x, y in zip(instructions, responses)]
    return [float(v) for v in sequence_logprobs([model], [p for p, _ in pairs], [r for _, r in pairs],
                                                pad_id=tok.pad_token_id)[0]]


def english_pairs(world: World, oracle: OracleJudge, sft_model, tok, cfg: dict) -> list[dict]:
    """Oracle-labelled pairs of pi_SFT samples on the English `pref` prompts (best vs worst first,
    then other pairs with different scores, up to `pref_pairs_per_prompt` per prompt)."""
    tasks = world.split("pref")
    samples = sample(sft_model, tok, [t.instruction("en") for t in tasks], cfg["pref_samples"], 1.0, 1.0,
                     cfg["max_new_tokens"], seed=cfg["seed"])
    rng = random.Random(f"sandbox-pairs-{cfg['seed']}")
    pairs = []
    for t, outs in zip(tasks, samples):
        scored = {}
        for o in outs:
            scored.setdefault(o, oracle.score_text(o, t.id, "en"))
        uniq = sorted(scored, key=lambda o: -scored[o])
        cand = [(a, b) for a, b in itertools.combinations(uniq, 2) if scored[a] != scored[b]]
        if not cand:
            continue
        first = (uniq[0], uniq[-1])
        rest = [c for c in cand if c != first]
        rng.shuffle(rest)
        for a, b in [first] + rest[:cfg["pref_pairs_per_prompt"] - 1]:
            pairs.append({"id": t.id, "instruction": t.instruction("en"), "chosen": a, "rejected": b,
                          "chosen_score": scored[a], "rejected_score": scored[b],
                          "kind": oracle.pair_kind(a, b, t.id, "en")})
    if not pairs:
        raise ValueError("icr.sandbox: no two pi_SFT samples of any English pref prompt differ in oracle score, so "
                         "there is nothing for DPO to learn; train pi_SFT longer (pretrain_steps, sft_epochs) or "
                         "sample more (pref_samples)")
    return pairs


# ---------------------------------------------------------------------------------------------
# Self-check: no language may fail silently
# ---------------------------------------------------------------------------------------------

LANGUAGE_FLAGS = "language_flags.json"  # {lang: one line}: read by icr's loop from any prepare folder
FLOOR_FIELDS = ("sft_floor_well_formed", "sft_floor_language", "pi0_floor_language")


def language_quality(world: World, oracle: OracleJudge, model, tok, cfg: dict, seed: int) -> dict[str, dict]:
    """`quality_shares` of `model`'s samples on the dev prompts of every language (T 0.6, top-p 0.9,
    `premise_wr_samples` per prompt: the premise's win-rate samples)."""
    tasks = world.split("dev")
    out = {}
    for lang in LANGUAGES:
        outs = sample(model, tok, [t.instruction(lang) for t in tasks], cfg["premise_wr_samples"], 0.6, 0.9,
                      cfg["max_new_tokens"], seed)
        out[lang] = quality_shares(oracle.verdict(o, t.id, lang) for t, os_ in zip(tasks, outs) for o in os_)
    return out


def sft_shortfalls(quality: dict[str, dict], cfg: dict) -> dict[str, str]:
    """{lang: what is below pi_SFT's floors} for the languages of `quality` (`quality_shares` per
    language) that miss a floor. Right language is counted among well-formed answers (a malformed
    answer has no language), so it does not count the same failure twice."""
    out = {}
    for lang, q in quality.items():
        problems = []
        if q["well_formed"] < cfg["sft_floor_well_formed"]:
            problems.append(f"well-formed {q['well_formed']:.2f} < floor {cfg['sft_floor_well_formed']}")
        right = right_language_share(q)
        if right < cfg["sft_floor_language"]:
            problems.append(f"right language {right:.2f} of well-formed answers < floor {cfg['sft_floor_language']}")
        if problems:
            out[lang] = ", ".join(problems)
    return out


def build_pi0(out: Path, world: World, oracle: OracleJudge, items: list[tuple[str, list[dict]]], cfg: dict) -> None:
    """pi0 = English DPO of pi_SFT (`english_pairs`, `train_dpo`), checked: a language pi0 answers in
    the right language less than `pi0_floor_language` of the time sends pi_SFT back for one more
    repair epoch in that language (as `check_and_repair_sft`), then pi0 is built again, up to
    `pi0_repair_rounds` times. Why: English DPO moves every language toward the English tag, most
    where pi_SFT holds its language least (build seed 2: Swahili 0.28 with pi_SFT passing its floor).
    Each round is recorded in sft_check.json (`pi0_rounds`) as it ends, so a killed build resumes at
    its round; pi_SFT is replaced through a rename, never half-written."""
    import shutil

    from ..runs import write_jsonl

    record = load_json(out / "sft_check.json") or {}
    rounds = record.setdefault("pi0_rounds", [])
    while True:
        r = len(rounds)
        sft_model, tok = load_model(out / "sft")
        pairs = english_pairs(world, oracle, sft_model, tok, cfg)
        write_jsonl(out / "pi0_pairs.jsonl", pairs)
        policy, _ = load_model(out / "sft")
        train_dpo(policy, sft_model, tok, [p for p in pairs if p["kind"] in cfg["dpo_pair_kinds"]], out / "dpo", cfg)
        quality = language_quality(world, oracle, policy, tok, cfg, seed=cfg["seed"] + 13)
        below = sorted(lang for lang, q in quality.items() if q["language"] < cfg["pi0_floor_language"])
        rounds.append({"round": r, "pi0_quality": quality, "below_floor": below,
                       "sft_repaired": bool(below) and r < cfg["pi0_repair_rounds"]})
        write_json(out / "sft_check.json", record)
        if not rounds[-1]["sft_repaired"]:
            return
        repair_epoch(sft_model, tok, items, below, cfg, seed=cfg["seed"] + 200 + r)
        sft_model.eval()
        shutil.rmtree(out / "dpo")  # pi0 of the old pi_SFT: built again below
        shutil.rmtree(out / "sft.new", ignore_errors=True)
        sft_model.save_pretrained(out / "sft.new")
        tok.save_pretrained(out / "sft.new")
        (out / "sft").rename(out / "sft.old")
        (out / "sft.new").rename(out / "sft")
        shutil.rmtree(out / "sft.old")


def repair_epoch(model, tok, items: list[tuple[str, list[dict]]], languages, cfg: dict, seed: int) -> None:
    """One SFT epoch over the whole mix with `languages`' own conversations repeated
    `sft_repair_weight` times (the repair both checks use)."""
    from ..tiny import fit_causal_lm

    convs = [c for _, c in items] + [c for lang, c in items if lang in languages] * (cfg["sft_repair_weight"] - 1)
    fit_causal_lm(model, tok, convs, epochs=1, lr=cfg["sft_lr"], batch_size=32, seed=seed)


def right_language_share(q: dict) -> float:
    """The right-language share among well-formed answers (a malformed answer has no language)."""
    return q["language"] / q["well_formed"] if q["well_formed"] else 0.0


def floor_deficit(quality: dict[str, dict], cfg: dict) -> float:
    """How far below pi_SFT's floors the languages are, summed (0 when all pass): the repair's
    progress measure, so a round that lifts a language part of the way counts."""
    total = 0.0
    for q in quality.values():
        right = right_language_share(q)
        total += max(0.0, cfg["sft_floor_well_formed"] - q["well_formed"]) + max(0.0, cfg["sft_floor_language"] - right)
    return total


def check_and_repair_sft(world: World, oracle: OracleJudge, model, tok, items: list[tuple[str, list[dict]]],
                         cfg: dict) -> dict:
    """Measure pi_SFT per language; for the languages below its floors, one more SFT epoch with their
    conversations repeated `sft_repair_weight` times, up to `sft_repair_rounds` times. A round is kept
    only if it brings the languages closer to the floors (`floor_deficit`) and puts none newly below;
    otherwise its weights are put back and the repair stops (seen on a small build: an extra epoch
    can also unlearn).
    Changes `model` in place; returns the record (`sft_check.json`): every measurement, what was kept."""
    import copy

    model.eval()
    quality = language_quality(world, oracle, model, tok, cfg, seed=cfg["seed"] + 11)
    below = sft_shortfalls(quality, cfg)
    rounds = [{"round": 0, "quality": quality, "below_floor": below, "kept": True}]
    for r in range(1, cfg["sft_repair_rounds"] + 1):
        if not below:
            break
        before = copy.deepcopy(model.state_dict())
        repair_epoch(model, tok, items, below, cfg, seed=cfg["seed"] + 99 + r)
        model.eval()
        quality = language_quality(world, oracle, model, tok, cfg, seed=cfg["seed"] + 11)
        now = sft_shortfalls(quality, cfg)
        kept = set(now) <= set(below) and floor_deficit(quality, cfg) < floor_deficit(rounds[-1]["quality"], cfg)
        rounds.append({"round": r, "repaired": sorted(below), "quality": quality, "below_floor": now, "kept": kept})
        if not kept:
            model.load_state_dict(before)
            break
        below = now
    return {"floors": {k: cfg[k] for k in FLOOR_FIELDS}, "repair_epochs": sum(x["kept"] for x in rounds[1:]),
            "rounds": rounds, "still_below_floor": below}


def self_check(sample_quality: dict[str, dict], cfg: dict, sft_quality: dict[str, dict] | None = None
               ) -> dict[str, str]:
    """{lang: one line} for every language whose final pi_SFT or pi0 is below the floors; {} when all
    pass. pi0 is judged on the premise's samples (`sample_quality[lang]["pi0"]`); pi_SFT on
    `sft_quality`, the check-and-repair's last measurement, when given (the draw that ended the
    repair decides: a second draw of the same model near a floor would contradict it by noise
    alone — seen on build seed 1: Swahili 0.81 there, 0.76 on the premise's samples), else on the premise's."""
    sft = sft_shortfalls(sft_quality or {lang: q["sft"] for lang, q in sample_quality.items()}, cfg)
    flags = {}
    for lang, q in sample_quality.items():
        problems = [f"pi_SFT {sft[lang]}"] if lang in sft else []
        if q["pi0"]["language"] < cfg["pi0_floor_language"]:
            problems.append(f"pi0 right language {q['pi0']['language']:.2f} < floor {cfg['pi0_floor_language']}")
        if problems:
            flags[lang] = "; ".join(problems) + " (dev prompts, T 0.6)"
    return flags


# ---------------------------------------------------------------------------------------------
# Premise
# ---------------------------------------------------------------------------------------------

def measure_premise(world: World, oracle: OracleJudge, dpo_model, sft_model, tok, cfg: dict) -> dict:
    tasks = world.split("dev")
    seed = cfg["seed"] + 7
    res = {"split": "dev", "n_prompts": len(tasks), "win_rate_pi0_vs_sft": {}, "reward_accuracy": {},
           "reward_accuracy_multilingual": {}, "reward_accuracy_by_kind": {}, "n_pairs": {},
           "sample_quality": {}, "prefix": PREFIX,
           "notes": "win rate: oracle preference of a pi0 sample over a pi_SFT sample for the same prompt "
                    "(T 0.6, top-p 0.9; ties 0.5). reward_accuracy: share of pairs of pi_SFT samples "
                    "(T 1.0) with different oracle scores that pi0's implicit reward orders as the "
                    "oracle does (reward ties 0.5); English under the English instruction, other "
                    "languages under the English instruction behind the prefix (cross-lingual); "
                    "reward_accuracy_multilingual: under the language's own instruction."}
    for lang in LANGUAGES:
        instr = [t.instruction(lang) for t in tasks]
        k = cfg["premise_wr_samples"]
        s0 = sample(dpo_model, tok, instr, k, 0.6, 0.9, cfg["max_new_tokens"], seed)
        s1 = sample(sft_model, tok, instr, k, 0.6, 0.9, cfg["max_new_tokens"], seed + 1)
        wins, quality = [], {}
        for name, ss in (("pi0", s0), ("sft", s1)):
            quality[name] = quality_shares([oracle.verdict(o, t.id, lang) for t, outs in zip(tasks, ss) for o in outs])
        for t, a_outs, b_outs in zip(tasks, s0, s1):
            for a, b in zip(a_outs, b_outs):
                sa, sb = oracle.score_text(a, t.id, lang), oracle.score_text(b, t.id, lang)
                wins.append(1.0 if sa > sb else 0.0 if sa < sb else 0.5)
        res["win_rate_pi0_vs_sft"][lang] = rounded_mean(wins)
        res["sample_quality"][lang] = quality

        # reward accuracy on pairs of pi_SFT samples
        outs = sample(sft_model, tok, instr, cfg["premise_samples"], 1.0, 1.0, cfg["max_new_tokens"], seed + 2)
        rows = []
        for t, o in zip(tasks, outs):
            for y in dict.fromkeys(o):
                rows.append((t, y))
        cross = [reward_instruction(t, lang) for t, _ in rows]
        native = [t.instruction(lang) for t, _ in rows]
        ys = [y for _, y in rows]
        r_cross = implicit_rewards(dpo_model, sft_model, tok, cross, ys)
        r_native = r_cross if lang == "en" else implicit_rewards(dpo_model, sft_model, tok, native, ys)
        cross_acc = oracle_agreement(oracle, rows, r_cross, lang)
        acc = cross_acc.pop("all")
        res["reward_accuracy"][lang] = rounded_mean(acc)
        res["reward_accuracy_multilingual"][lang] = rounded_mean(oracle_agreement(oracle, rows, r_native, lang,
                                                                            kinds=False)["all"])
        res["reward_accuracy_by_kind"][lang] = {k: {"accuracy": rounded_mean(v), "n": len(v)}
                                                for k, v in sorted(cross_acc.items())}
        res["n_pairs"][lang] = len(acc)
    return res


def oracle_agreement(oracle: OracleJudge, rows: list[tuple], rewards: list[float], lang: str,
                     kinds: bool = True) -> dict[str, list[float]]:
    """The reward's agreement with the oracle on every pair of `rows` ((task, answer) pairs, a task's
    answers distinct) to the same task: `icr.diagnostics.pair_agreement`, the loop's own measure,
    with the oracle's score and (if `kinds`) pair kind in `lang`."""
    from ..diagnostics import pair_agreement

    return pair_agreement([t.id for t, _ in rows], [y for _, y in rows], rewards,
                          [oracle.score_text(y, t.id, lang) for t, y in rows],
                          (lambda a, b, tid: oracle.pair_kind(a, b, tid, lang)) if kinds else None)


def implicit_rewards(dpo_model, sft_model, tok, instructions, responses) -> list[float]:
    """The implicit reward log pi0(y|x) - log pi_SFT(y|x) of each response, summed over its tokens."""
    a = response_logprobs(dpo_model, tok, instructions, responses)
    b = response_logprobs(sft_model, tok, instructions, responses)
    return [x - y for x, y in zip(a, b)]


def reward_instruction(task, lang: str) -> str:
    """G(x) of the cross-lingual reward: the task's English instruction, behind the "answer using
    only {language}" prefix for every other language."""
    return task.instruction("en") if lang == "en" else PREFIX.format(language=LANGUAGE_WORDS[lang]) + task.instruction("en")


def quality_shares(verdicts) -> dict:
    """Mean oracle score and the share of answers with each quality, over oracle verdicts."""
    verdicts = list(verdicts)
    return {name: rounded_mean(getattr(v, name) for v in verdicts)
            for name in ("score", "well_formed", "correct", "language", "concise")}


def rounded_mean(xs) -> float | None:
    """The mean to 4 decimals (the premise's numbers), None for no values."""
    xs = list(xs)
    return round(sum(float(x) for x in xs) / len(xs), 4) if xs else None
