"""The four stages of an ICR iteration, each a function from inputs to files in its own folder.

    generate: policy + prompts            -> generate/shard-*.jsonl   (N samples per prompt)
    score:    samples + reward models     -> score/shard-*.jsonl      (implicit reward per sample)
    pairs:    scored samples              -> pairs/pairs.jsonl, stats.json, dataset_info.json
    train:    pairs + policy + reference  -> model/                   (DPO + NLL)

Each stage finishes by writing `manifest.json` with the key it was computed for; a stage whose
manifest matches is skipped. Generation and scoring write shards of `shard_size` prompts
atomically and resume at the first missing shard; each shard is seeded from (seed, shard index),
so a resumed stage writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from .config import ExperimentConfig, judge_identity
from .data import PromptSet
from .errors import IcrError
from .generation import SamplingParams, policy_backend
from .models import (chat_messages, check_same_tokenizer, load_causal_lm, load_tokenizer, release_memory,
                     resolve_device)
from .runs import (append_journal, check_free_disk, chunk, manifest_matches, model_key, read_json, read_jsonl,
                   read_shards, shard_path, text_hash, write_json, write_jsonl, write_manifest)

log = logging.getLogger("icr")


def _prepare_stage_dir(stage_dir: Path, key: dict) -> None:
    """Start (or continue) a sharded stage: shards made for a different key are discarded."""
    key_file = stage_dir / "key.json"
    if key_file.is_file() and read_json(key_file) != key:
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if not key_file.is_file():
        write_json(key_file, key)


def _reuse(stage_dir: Path, key: dict, reuse_dir: Path | None) -> bool:
    """Take a finished stage with the same key from another run folder (e.g. a control's first
    iteration samples from the same pi0 with the same seed as the main run): hard links, no work."""
    if reuse_dir is None or not manifest_matches(reuse_dir, key):
        return False
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(reuse_dir, stage_dir, copy_function=os.link)
    except OSError:  # another file system: copy
        shutil.rmtree(stage_dir, ignore_errors=True)
        shutil.copytree(reuse_dir, stage_dir)
    return True


def _already_done(stage_dir: Path, key: dict, reuse: Path | None) -> dict | None:
    """The result of a stage that needs no work: finished here, or lent by another run folder."""
    if manifest_matches(stage_dir, key):
        return {"skipped": True}
    if _reuse(stage_dir, key, reuse):
        return {"reused": str(reuse)}
    return None


def prompt_items(prompts: PromptSet, languages: list[str]) -> list[tuple[str, str, str]]:
    """(lang, id, instruction) for every prompt, in a fixed order: language, then file order."""
    return [(lang, p.id, p.instruction) for lang in languages for p in prompts.by_lang[lang]]


def prompts_hash(prompts: PromptSet, languages: list[str]) -> str:
    return text_hash(*[f"{lang}\t{pid}\t{text}" for lang, pid, text in prompt_items(prompts, languages)])


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def run_generate(cfg: ExperimentConfig, policy_path: str, prompts: PromptSet, stage_dir: Path,
                 *, seed: int, shard: tuple[int, int] | None = None, reuse: Path | None = None) -> dict:
    """Sample `generation.n` responses per prompt per language from the policy."""
    g = cfg.generation
    key = {"stage": "generate", "policy": model_key(policy_path), "generation": cfg.section_hash("generation"),
           "prompts": prompts_hash(prompts, cfg.languages), "seed": seed,
           "chat_template": cfg.models.chat_template}
    stage_dir = Path(stage_dir)
    done = _already_done(stage_dir, key, reuse)
    if done:
        return done
    t0 = time.time()
    _prepare_stage_dir(stage_dir, key)
    items = prompt_items(prompts, cfg.languages)
    shards = list(chunk(items, g.shard_size))
    todo = [(i, s) for i, s in shards if not shard_path(stage_dir, i).is_file()
            and (shard is None or i % shard[1] == shard[0])]
    counts = {"prompts": len(items), "shards": len(shards), "shards_computed": len(todo)}
    if todo:
        # Upper bound: every sample at the token limit, ~4 bytes per token of JSON-escaped text, x2 for scores.
        n_todo = sum(len(s) for _, s in todo)
        check_free_disk(stage_dir, n_todo * g.n * (g.max_new_tokens * 4 + 400) * 2, "generate")
        backend = policy_backend(cfg, policy_path, batch_size=g.batch_size)
        limit = _prompt_token_limit(backend, g)
        for i, shard_items in todo:
            convs = [chat_messages(text) for _, _, text in shard_items]
            lengths = [len(ids) for ids in _encode(backend, convs)]
            keep = [j for j, n in enumerate(lengths) if limit is None or n <= limit]
            params = SamplingParams(n=g.n, temperature=g.temperature, top_p=g.top_p,
                                    max_new_tokens=g.max_new_tokens, seed=seed * 100_003 + i)
            samples = backend.generate([convs[j] for j in keep], params,
                                       desc=f"generate shard {i + 1}/{len(shards)}") if keep else []
            records = []
            for j, outs in zip(keep, samples):
                lang, pid, text = shard_items[j]
                for k, s in enumerate(outs):
                    records.append({"id": pid, "lang": lang, "prompt": text, "sample": k, "response": s.text,
                                    "finished": s.finished, "n_tokens": s.n_tokens})
            kept = set(keep)
            skipped = [{"id": shard_items[j][1], "lang": shard_items[j][0], "prompt_tokens": lengths[j]}
                       for j in range(len(shard_items)) if j not in kept]
            if skipped:
                write_jsonl(stage_dir / f"skipped-{i:05d}.jsonl", skipped)
            write_jsonl(shard_path(stage_dir, i), records)
            append_journal(stage_dir, {"shard": i})
        backend.close()
        del backend
        release_memory()
    if shard is not None and any(not shard_path(stage_dir, i).is_file() for i, _ in shards):
        return {"partial": True, **counts}
    records = read_shards(stage_dir)
    skipped = sum(len(read_jsonl(p)) for p in stage_dir.glob("skipped-*.jsonl"))
    counts.update(samples=len(records), skipped_long_prompts=skipped,
                  hit_token_limit=sum(not r["finished"] for r in records))
    if skipped:
        log.warning("generate: %d prompts longer than the prompt limit were skipped (see %s/skipped-*.jsonl)",
                    skipped, stage_dir)
    write_manifest(stage_dir, key, counts, time.time() - t0)
    return counts


def _encode(backend, convs):
    tok = backend.tokenizer
    return [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for c in convs]


def _prompt_token_limit(backend, g) -> int | None:
    """Prompts longer than this are skipped and reported (documented policy: skip, not error)."""
    if g.max_prompt_tokens is not None:
        return g.max_prompt_tokens
    model = getattr(backend, "model", None)
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None) \
        or getattr(backend, "max_model_len", None)
    return None if ctx is None else max(1, ctx - g.max_new_tokens)


# ---------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------

TRANSLATE_INSTRUCTION = ("Translate the following {language} text into English. Reply with the translation "
                         "only.\n\n{text}")


def reward_tokenizer(dpo_path: str, ref_path: str, cfg: ExperimentConfig):
    """The reward pair's one tokenizer (checked shared), without loading the models."""
    tok_dpo = load_tokenizer(dpo_path, cfg.models.chat_template, what="reward model (policy side)")
    tok_ref = load_tokenizer(ref_path, cfg.models.chat_template, what="reward model (reference side)")
    check_same_tokenizer(tok_dpo, tok_ref, dpo_path, ref_path)
    return tok_dpo


def load_reward_models(dpo_path: str, ref_path: str, cfg: ExperimentConfig):
    from .reward import RewardModels

    tokenizer = reward_tokenizer(dpo_path, ref_path, cfg)
    device = resolve_device(cfg.device)
    return RewardModels(policy=load_causal_lm(dpo_path, device, cfg.models.dtype, what="reward model"),
                        reference=load_causal_lm(ref_path, device, cfg.models.dtype, what="reward reference"),
                        tokenizer=tokenizer)


def run_score(cfg: ExperimentConfig, samples_dir: Path, prompts: PromptSet, dpo_path: str, ref_path: str,
              stage_dir: Path, *, translator_path: str | None = None, shard: tuple[int, int] | None = None,
              reuse: Path | None = None) -> dict:
    """Implicit reward of every sample (see `icr.reward`), shard by shard."""
    from .languages import language_name
    from .reward import implicit_rewards, reward_conversation

    r = cfg.reward
    samples_dir, stage_dir = Path(samples_dir), Path(stage_dir)
    in_shards = sorted(samples_dir.glob("shard-*.jsonl"))
    key = {"stage": "score", "reward": cfg.section_hash("reward"), "dpo": model_key(dpo_path),
           "ref": model_key(ref_path), "samples": read_json(samples_dir / "manifest.json")["key"]
           if (samples_dir / "manifest.json").is_file() else None,
           "translator": model_key(translator_path) if r.variant == "translate_to_english" else None}
    done = _already_done(stage_dir, key, reuse)
    if done:
        return done
    t0 = time.time()
    _prepare_stage_dir(stage_dir, key)
    todo = [p for j, p in enumerate(in_shards) if not (stage_dir / p.name).is_file()
            and (shard is None or j % shard[1] == shard[0])]
    if todo:
        rm = load_reward_models(dpo_path, ref_path, cfg) if r.backend == "hf" else None
        tokenizer = rm.tokenizer if rm is not None else reward_tokenizer(dpo_path, ref_path, cfg)
        padded = _authors_padding(in_shards, prompts, tokenizer, r) if r.token_set == "authors" else None
        translator = None
        if r.variant == "translate_to_english":
            translator = policy_backend(cfg, translator_path, batch_size=cfg.generation.batch_size)

        def shard_inputs(path: Path) -> dict:
            records = read_jsonl(path)
            responses = [rec["response"] for rec in records]
            if translator is not None:
                convs = [chat_messages(TRANSLATE_INSTRUCTION.format(language=language_name(rec["lang"]),
                                                                    text=rec["response"])) for rec in records]
                out = translator.generate(convs, SamplingParams(n=1, temperature=0.0,
                                                                max_new_tokens=r.translate_max_new_tokens),
                                          desc=f"translate {path.stem}")
                responses = [rec["response"] if rec["lang"] == "en" else o[0].text for rec, o in zip(records, out)]
            convs = [reward_conversation(r.variant, rec["lang"], rec["prompt"],
                                         prompts.english(rec["id"]).instruction, r.prefix) for rec in records]
            return {"records": records, "responses": responses, "convs": convs,
                    "padded": None if padded is None else [padded[(rec["lang"], rec["id"], rec["sample"])]
                                                           for rec in records]}

        def write_shard(path: Path, x: dict, res: dict) -> None:
            out_records = []
            for j, rec in enumerate(x["records"]):
                reward = float(res["reward"][j])
                out_records.append({**rec, "reward": reward if reward == reward else None,
                                    "logp_policy": float(res["logp_policy"][j]),
                                    "logp_reference": float(res["logp_reference"][j]),
                                    "reward_tokens": int(res["n_tokens"][j]),
                                    **({"too_long": True} if "too_long" in res and res["too_long"][j] else {}),
                                    **({"translation": x["responses"][j]} if r.variant == "translate_to_english" else {})})
            write_jsonl(stage_dir / path.name, out_records)
            append_journal(stage_dir, {"shard": path.name})

        if rm is not None:  # hf: both models resident, shard by shard (resumes by shard)
            for path in todo:
                x = shard_inputs(path)
                write_shard(path, x, implicit_rewards(rm, x["convs"], x["responses"], batch_tokens=r.batch_tokens,
                                                      desc=f"score {path.stem}", token_set=r.token_set,
                                                      padded=x["padded"]))
        else:  # vllm: an engine start per model is costly, so one pass per model over all this worker's shards
            from .generation.vllm import vllm_implicit_rewards

            xs = [shard_inputs(path) for path in todo]
            if translator is not None:  # its engine leaves the GPU before the scorers load
                translator.close()
                translator = None
            g = cfg.generation
            res = vllm_implicit_rewards(dpo_path, ref_path, tokenizer, [c for x in xs for c in x["convs"]],
                                        [y for x in xs for y in x["responses"]], device=cfg.device,
                                        dtype=cfg.models.dtype, tensor_parallel_size=g.tensor_parallel_size,
                                        gpu_memory_utilization=g.gpu_memory_utilization, token_set=r.token_set,
                                        padded=None if padded is None else [b for x in xs for b in x["padded"]],
                                        desc=f"score {len(todo)} shards")
            start = 0
            for path, x in zip(todo, xs):
                end = start + len(x["records"])
                write_shard(path, x, {k: v[start:end] for k, v in res.items()})
                start = end
        if translator is not None:
            translator.close()
        del rm, translator
        release_memory()
    if shard is not None and any(not (stage_dir / p.name).is_file() for p in in_shards):
        return {"partial": True}
    records = read_shards(stage_dir)
    counts = {"scored": len(records), "nonfinite": sum(rec["reward"] is None for rec in records),
              "too_long": sum(bool(rec.get("too_long")) for rec in records)}
    if counts["too_long"]:
        log.warning("score: %d samples are longer than the vLLM engine's context: not scored, excluded from pairs",
                    counts["too_long"])
    if counts["nonfinite"] - counts["too_long"]:
        log.warning("score: %d samples had non-finite log-probs and are excluded from pairs",
                    counts["nonfinite"] - counts["too_long"])
    write_manifest(stage_dir, key, counts, time.time() - t0)
    return counts


def _authors_padding(sample_shards: list[Path], prompts: PromptSet, tokenizer, r) -> dict[tuple, bool]:
    """For `reward.token_set: authors`: which samples the authors' scorer right-pads.

    Their batches (utils/compute_reward_score.py:40-53) are AUTHORS_BATCH_SIZE consecutive prompts of
    a language's file, one sample index at a time; a row is padded when it is shorter (prompt +
    response + end-of-turn, in tokens) than the longest row of its batch. Batches span icr's shards,
    so every sample is tokenised here first.
    """
    from .reward import AUTHORS_BATCH_SIZE, authors_padded_rows, reward_conversation, reward_token_ids

    position = {(lang, p.id): j for lang, ps in prompts.by_lang.items() for j, p in enumerate(ps)}
    records = [rec for path in sample_shards for rec in read_jsonl(path)]
    convs = [reward_conversation(r.variant, rec["lang"], rec["prompt"], prompts.english(rec["id"]).instruction,
                                 r.prefix) for rec in records]
    prompt_ids, response_ids = reward_token_ids(tokenizer, convs, [rec["response"] for rec in records])
    groups = [(rec["lang"], position[(rec["lang"], rec["id"])] // AUTHORS_BATCH_SIZE, rec["sample"])
              for rec in records]
    flags = authors_padded_rows([len(p) + len(q) for p, q in zip(prompt_ids, response_ids)], groups)
    return {(rec["lang"], rec["id"], rec["sample"]): f for rec, f in zip(records, flags)}


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------

def run_pairs(cfg: ExperimentConfig, scores_dir: Path, stage_dir: Path, *, seed: int, iteration: int,
              judge=None) -> dict:
    from .languages import language_identifier
    from .pairs import llamafactory_dataset_info, select_pairs

    scores_dir, stage_dir = Path(scores_dir), Path(stage_dir)
    key = {"stage": "pairs", "pairs": cfg.section_hash("pairs"), "seed": seed,
           "scores": read_json(scores_dir / "manifest.json")["key"],
           # pairs chosen by the judge depend on which judge: another judge must not reuse them
           **({"judge": judge_identity(cfg)} if cfg.pairs.selection == "judge" else {})}
    if manifest_matches(stage_dir, key):
        return {"skipped": True}
    t0 = time.time()
    scored = read_shards(scores_dir)
    for rec in scored:
        if rec["reward"] is None:
            rec["reward"] = float("nan")
    identifier = language_identifier(tuple(cfg.languages))
    judge_scores = None
    if cfg.pairs.selection == "judge":
        if judge is None or not hasattr(judge, "score"):
            raise IcrError("pairs.selection: judge needs an evaluation judge that scores single answers "
                           "(e.g. reward_model, or the sandbox's icr.sandbox:OracleJudge)")
        from .evaluation.judges import JudgeItem

        items = [JudgeItem(id=r["id"], lang=r["lang"], instruction=r["prompt"], output=r["response"])
                 for r in scored]
        judge_scores = {(r["id"], r["lang"], r["sample"]): s for r, s in zip(scored, judge.score(items))}
    pairs, stats = select_pairs(scored, cfg.pairs, seed=seed, in_language=identifier.is_in,
                                judge_scores=judge_scores)
    write_jsonl(stage_dir / "pairs.jsonl", pairs)
    write_json(stage_dir / "stats.json", stats)
    write_json(stage_dir / "dataset_info.json", llamafactory_dataset_info(f"icr_{cfg.name}_iter{iteration}"))
    counts = {"pairs": len(pairs), **{f"pairs_{k}": v["n_pairs"] for k, v in stats["per_language"].items()}}
    write_manifest(stage_dir, key, counts, time.time() - t0)
    return counts


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def train_key(cfg: ExperimentConfig, pairs_dir: Path, policy_path: str, *, seed: int) -> dict:
    return {"stage": "train", "train": cfg.section_hash("train"), "seed": seed, "policy": model_key(policy_path),
            "pairs": read_json(Path(pairs_dir) / "manifest.json")["key"]}


def train_done(cfg: ExperimentConfig, pairs_dir: Path, policy_path: str, stage_dir: Path, model_dir: Path,
               *, seed: int) -> bool:
    """Whether `run_train` would skip (checked before starting a process for it)."""
    return manifest_matches(stage_dir, train_key(cfg, pairs_dir, policy_path, seed=seed)) and Path(model_dir).is_dir()


def run_train(cfg: ExperimentConfig, pairs_dir: Path, policy_path: str, stage_dir: Path, model_dir: Path,
              *, seed: int) -> dict:
    from .train import train_dpo

    pairs_dir, stage_dir = Path(pairs_dir), Path(stage_dir)
    key = train_key(cfg, pairs_dir, policy_path, seed=seed)
    if manifest_matches(stage_dir, key) and Path(model_dir).is_dir():
        return {"skipped": True}
    t0 = time.time()
    key_file = stage_dir / "key.json"
    if key_file.is_file() and read_json(key_file) != key:
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # checkpoints of another setup
    write_json(key_file, key)
    pairs = read_jsonl(pairs_dir / "pairs.jsonl")
    if cfg.train.accelerate_config:
        from .train_launch import train_dpo_launched as train_fn
    else:
        train_fn = train_dpo
    metrics = train_fn(pairs, policy_path, policy_path, cfg.train, stage_dir, Path(model_dir), seed=seed,
                       device=cfg.device, chat_template=cfg.models.chat_template)
    release_memory()
    counts = {"pairs": len(pairs), "steps": metrics["steps"], "train_loss": metrics["train_loss"]}
    write_manifest(stage_dir, key, counts, time.time() - t0, extra={"last_log": metrics["last_log"]})
    # The model is saved and the stage recorded: the resume checkpoints (weights + optimizer state,
    # several times the model's size) are no longer needed.
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(stage_dir / "launch", ignore_errors=True)
    return counts
