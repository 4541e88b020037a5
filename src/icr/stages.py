"""The four stages of an ICR iteration, each a function of (config, iteration plan) writing files
into the plan's folder for it.

    generate: policy + prompts            -> generate/shard-*.jsonl   (N samples per prompt)
    score:    samples + reward models     -> score/shard-*.jsonl      (implicit reward per sample)
    pairs:    scored samples              -> pairs/pairs.jsonl, stats.json, dataset_info.json
    train:    pairs + policy + reference  -> model/                   (DPO + NLL)

`run_generate(cfg, plan)`, `run_score(cfg, plan)`, `run_pairs(cfg, plan)`, `run_train(cfg, plan)`:
what a stage reads and writes, its seed and its models all come from the plan (icr.plan), so a new
input is added in one place. Each stage finishes by writing `manifest.json` with the key it was
computed for; a stage whose manifest matches is skipped.

Generate and score are `ShardedStage`s: shards of `shard_size` prompts, written atomically, resumed
at the first missing shard; each shard is seeded from (seed, shard index), so a resumed or split
stage writes the same bytes as an uninterrupted one. Their three steps are separate so that
`icr.workers` can run the middle one in other processes: `begin` (skip, reuse, or prepare the
folder; loads nothing), `compute` (this worker's missing shards; loads the models), `finish` (join
the shards, write the manifest).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import ExperimentConfig, judge_identity
from .data import PromptSet, load_prompt_set
from .errors import IcrError
from .plan import IterationPlan
from .progress import ProgressWriter, worker_name
from .runs import (append_journal, check_free_disk, chunk, manifest_matches, model_key,
                   read_json, read_jsonl, read_shards, shard_path, text_hash, weight_digests, write_json, write_jsonl,
                   write_manifest)
from .scoring import TRANSLATE_INSTRUCTION  # noqa: F401 - the translation prompt, for the sandbox's pi_SFT

log = logging.getLogger("icr")

Shard = tuple[int, int]  # (i, n): this worker computes the shards whose index % n == i


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


def prompt_items(prompts: PromptSet, languages: list[str]) -> list[tuple[str, str, str]]:
    """(lang, id, instruction) for every prompt, in a fixed order: language, then file order."""
    return [(lang, p.id, p.instruction) for lang in languages for p in prompts.by_lang[lang]]


def prompts_hash(prompts: PromptSet, languages: list[str]) -> str:
    return text_hash(*[f"{lang}\t{pid}\t{text}" for lang, pid, text in prompt_items(prompts, languages)])


def _mine(index: int, shard: Shard | None) -> bool:
    return shard is None or index % shard[1] == shard[0]


@dataclass(frozen=True)
class ShardedStage:
    """A stage computed shard by shard (generate, score): see the module docstring."""

    folder: Callable[[IterationPlan], Path]
    key: Callable[[ExperimentConfig, IterationPlan, PromptSet], dict]
    shards: Callable[[ExperimentConfig, IterationPlan, PromptSet], list[Path]]  # every output shard
    compute: Callable[[ExperimentConfig, IterationPlan, PromptSet, Shard | None], int]  # -> shards computed
    summary: Callable[[ExperimentConfig, IterationPlan, PromptSet, int], dict]  # counts of the joined stage

    def begin(self, cfg: ExperimentConfig, plan: IterationPlan, prompts: PromptSet,
              reuse: IterationPlan | None = None) -> dict | None:
        """The result of a stage that needs no work (finished here, or lent by `reuse`, another run
        folder's plan for the same iteration); else None, with the folder ready for workers."""
        # The key names every model by content (runs.model_key): an iteration model changed since
        # training saved it is refused here, before anything is computed on it.
        stage_dir, key = self.folder(plan), self.key(cfg, plan, prompts)
        if manifest_matches(stage_dir, key):
            return {"skipped": True}
        if reuse is not None and _reuse(stage_dir, key, self.folder(reuse)):
            return {"reused": str(self.folder(reuse))}
        _prepare_stage_dir(stage_dir, key)
        return None

    def finish(self, cfg: ExperimentConfig, plan: IterationPlan, prompts: PromptSet, *, computed: int = 0,
               seconds: float = 0.0) -> dict:
        """Join the shards and write the manifest, or {"partial": True} while shards are missing
        (another worker of `icr generate --shard` has them; the last one to finish writes it)."""
        stage_dir, key = self.folder(plan), self.key(cfg, plan, prompts)
        if manifest_matches(stage_dir, key):  # a worker already joined it
            return dict(read_json(stage_dir / "manifest.json")["counts"])
        if any(not p.is_file() for p in self.shards(cfg, plan, prompts)):
            return {"partial": True}
        counts = self.summary(cfg, plan, prompts, computed)
        write_manifest(stage_dir, key, counts, seconds)
        return counts

    def __call__(self, cfg: ExperimentConfig, plan: IterationPlan, *, prompts: PromptSet | None = None,
                 shard: Shard | None = None, reuse: IterationPlan | None = None) -> dict:
        """The whole stage in this process (or this worker's shards of it, with `shard`)."""
        if prompts is None:
            prompts = load_prompt_set(cfg.prompts, cfg.languages)
        done = self.begin(cfg, plan, prompts, reuse)
        if done:
            return done
        t0 = time.time()
        computed = self.compute(cfg, plan, prompts, shard)
        return self.finish(cfg, plan, prompts, computed=computed, seconds=time.time() - t0)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def generate_key(cfg: ExperimentConfig, plan: IterationPlan, prompts: PromptSet) -> dict:
    return {"stage": "generate", "policy": model_key(plan.policy), "generation": cfg.section_hash("generation"),
            "prompts": prompts_hash(prompts, cfg.languages), "seed": plan.seed,
            "chat_template": cfg.models.chat_template}


def _generate_shards(cfg: ExperimentConfig, plan: IterationPlan, prompts: PromptSet) -> list[tuple[int, list]]:
    return list(chunk(prompt_items(prompts, cfg.languages), cfg.generation.shard_size))


def generate_shards(cfg: ExperimentConfig, plan: IterationPlan, prompts: PromptSet, shard: Shard | None) -> int:
    """Sample `generation.n` responses per prompt of every missing shard of this worker from pi_{t-1}."""
    from .generation import SamplingParams, policy_backend
    from .models import chat_messages, release_memory

    g, stage_dir = cfg.generation, plan.generate_dir
    shards = _generate_shards(cfg, plan, prompts)
    todo = [(i, s) for i, s in shards if not shard_path(stage_dir, i).is_file() and _mine(i, shard)]
    if not todo:
        return 0
    # Upper bound: every sample at the token limit, ~4 bytes per token of JSON-escaped text, x2 for scores.
    check_free_disk(stage_dir, sum(len(s) for _, s in todo) * g.n * (g.max_new_tokens * 4 + 400) * 2, "generate")
    backend = policy_backend(cfg, plan.policy, batch_size=g.batch_size)
    limit = _prompt_token_limit(backend, g)
    progress = ProgressWriter(stage_dir, worker_name(shard), stage="generate", unit="sample",
                              total=sum(len(s) for _, s in todo) * g.n, shards_total=len(shards))
    for i, shard_items in todo:
        convs = [chat_messages(text) for _, _, text in shard_items]
        lengths = [len(ids) for ids in _encode(backend, convs)]
        keep = [j for j, n in enumerate(lengths) if limit is None or n <= limit]
        params = SamplingParams(n=g.n, temperature=g.temperature, top_p=g.top_p,
                                max_new_tokens=g.max_new_tokens, seed=plan.seed * 100_003 + i)
        samples = backend.generate([convs[j] for j in keep], params) if keep else []  # the bar: icr.progress
        records = [{"id": shard_items[j][1], "lang": shard_items[j][0], "prompt": shard_items[j][2], "sample": k,
                    "response": s.text, "finished": s.finished, "n_tokens": s.n_tokens}
                   for j, outs in zip(keep, samples) for k, s in enumerate(outs)]
        kept = set(keep)
        skipped = [{"id": shard_items[j][1], "lang": shard_items[j][0], "prompt_tokens": lengths[j]}
                   for j in range(len(shard_items)) if j not in kept]
        if skipped:
            write_jsonl(stage_dir / f"skipped-{i:05d}.jsonl", skipped)
        write_jsonl(shard_path(stage_dir, i), records)
        append_journal(stage_dir, {"shard": i})
        progress.update(advance=len(shard_items) * g.n, tokens=sum(r["n_tokens"] for r in records), shards=1)
    progress.close()
    backend.close()
    del backend
    release_memory()
    return len(todo)


def _damaged(path: Path, got: int, expected: int, what: str) -> IcrError:
    return IcrError(f"{path}: damaged shard ({got} of {expected} {what}); delete it and rerun to compute it again")


def _generate_summary(cfg: ExperimentConfig, plan: IterationPlan, prompts: PromptSet, computed: int) -> dict:
    stage_dir = plan.generate_dir
    shards = _generate_shards(cfg, plan, prompts)
    records, skipped = [], 0
    for i, items in shards:  # every shard complete: n samples of every prompt it did not skip
        path, skipped_file = shard_path(stage_dir, i), stage_dir / f"skipped-{i:05d}.jsonl"
        shard = read_jsonl(path)
        shard_skipped = len(read_jsonl(skipped_file)) if skipped_file.is_file() else 0
        expected = (len(items) - shard_skipped) * cfg.generation.n
        if len(shard) != expected:
            raise _damaged(path, len(shard), expected, "samples")
        records += shard
        skipped += shard_skipped
    if skipped:
        log.warning("generate: %d prompts longer than the prompt limit were skipped (see %s/skipped-*.jsonl)",
                    skipped, stage_dir)
    return {"prompts": sum(len(s) for _, s in shards), "shards": len(shards), "shards_computed": computed,
            "samples": len(records), "skipped_long_prompts": skipped,
            "hit_token_limit": sum(not r["finished"] for r in records)}


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


GENERATE = ShardedStage(folder=lambda plan: plan.generate_dir, key=generate_key,
                        shards=lambda cfg, plan, prompts: [shard_path(plan.generate_dir, i) for i, _ in
                                                           _generate_shards(cfg, plan, prompts)],
                        compute=generate_shards, summary=_generate_summary)
run_generate = GENERATE


# ---------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------

def score_key(cfg: ExperimentConfig, plan: IterationPlan, prompts: PromptSet) -> dict:
    samples = plan.generate_dir / "manifest.json"
    return {"stage": "score", "reward": cfg.section_hash("reward"), "dpo": model_key(plan.reward_policy),
            "ref": model_key(plan.reward_reference),
            "samples": read_json(samples)["key"] if samples.is_file() else None,
            "translator": model_key(plan.policy) if cfg.reward.variant == "translate_to_english" else None}


def score_shards(cfg: ExperimentConfig, plan: IterationPlan, prompts: PromptSet, shard: Shard | None) -> int:
    """The implicit reward (icr.scoring) of every sample in this worker's missing shards."""
    from .models import release_memory
    from .scoring import scored_shards

    inputs = sorted(plan.generate_dir.glob("shard-*.jsonl"))
    todo = [p for j, p in enumerate(inputs) if not (plan.score_dir / p.name).is_file() and _mine(j, shard)]
    if not todo:
        return 0
    every = [rec for p in inputs for rec in read_jsonl(p)] if cfg.reward.token_set == "authors" else []
    samples = [read_jsonl(p) for p in todo]
    with ProgressWriter(plan.score_dir, worker_name(shard), stage="score", unit="response",
                        total=sum(map(len, samples)), shards_total=len(inputs)) as progress:
        for path, records in zip(todo, scored_shards(cfg, plan, prompts, samples, every)):
            write_jsonl(plan.score_dir / path.name, records)
            append_journal(plan.score_dir, {"shard": path.name})
            progress.update(advance=len(records), tokens=sum(r["reward_tokens"] for r in records), shards=1)
    release_memory()
    return len(todo)


def _score_summary(cfg: ExperimentConfig, plan: IterationPlan, prompts: PromptSet, computed: int) -> dict:
    records = []
    for samples in sorted(plan.generate_dir.glob("shard-*.jsonl")):  # every sample of its shard scored
        path = plan.score_dir / samples.name
        shard, want = read_jsonl(path), [(r["lang"], r["id"], r["sample"]) for r in read_jsonl(samples)]
        if [(r["lang"], r["id"], r["sample"]) for r in shard] != want:
            raise _damaged(path, len(shard), len(want), "scored samples")
        records += shard
    counts = {"scored": len(records), "nonfinite": sum(rec["reward"] is None for rec in records),
              "too_long": sum(bool(rec.get("too_long")) for rec in records)}
    if counts["too_long"]:
        log.warning("score: %d samples are longer than the vLLM engine's context: not scored, excluded from pairs",
                    counts["too_long"])
    if counts["nonfinite"] - counts["too_long"]:
        log.warning("score: %d samples had non-finite log-probs and are excluded from pairs",
                    counts["nonfinite"] - counts["too_long"])
    return counts


SCORE = ShardedStage(folder=lambda plan: plan.score_dir, key=score_key,
                     shards=lambda cfg, plan, prompts: [plan.score_dir / p.name for p in
                                                        sorted(plan.generate_dir.glob("shard-*.jsonl"))],
                     compute=score_shards, summary=_score_summary)
run_score = SCORE
SHARDED = {"generate": GENERATE, "score": SCORE}


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------

def pairs_language_test(cfg: ExperimentConfig) -> Callable[[str, str], bool] | None:
    """The pairs stage's language test (lingua, restricted to the run's languages), or None.

    `pairs.language_filter` needs it, and an ImportError then stands. With the filter off it only
    feeds the fidelity figures of pairs/stats.json (candidate_fidelity, chosen_fidelity); where
    lingua cannot be imported, e.g. on a GPU machine running icr from its source tree (lingua's
    170 MB wheel cannot be brought there: bench/gpu_smoke.sh), those figures are null and the pairs
    are the same."""
    from .languages import language_identifier

    try:
        return language_identifier(tuple(cfg.languages)).is_in
    except ImportError as e:
        if cfg.pairs.language_filter:
            raise
        log.warning("pairs: lingua cannot be imported (%s); the language filter is off, so the pairs do not "
                    "depend on it, but stats.json records no fidelity (null)", e)
        return None


def run_pairs(cfg: ExperimentConfig, plan: IterationPlan, *, judge=None) -> dict:
    """Best vs worst sample per prompt (icr.pairs: length control, filters); `judge` only for
    `pairs.selection: judge` (a judge that scores single answers)."""
    from .evaluation.judges import JudgeItem, can_score
    from .pairs import llamafactory_dataset_info, select_pairs

    stage_dir = plan.pairs_dir
    pairs_cfg = cfg.pairs.at_iteration(plan.t)  # this iteration's bound only (pairs.max_chosen_reward)
    key = {"stage": "pairs", "pairs": cfg.pairs.iteration_hash(plan.t), "seed": plan.seed,
           "scores": read_json(plan.score_dir / "manifest.json")["key"],
           # pairs chosen by the judge depend on which judge: another judge must not reuse them
           **({"judge": judge_identity(cfg)} if cfg.pairs.selection == "judge" else {})}
    if manifest_matches(stage_dir, key):
        return {"skipped": True}
    t0 = time.time()
    scored = read_shards(plan.score_dir)
    expected = read_json(plan.score_dir / "manifest.json")["counts"].get("scored")
    if expected is not None and len(scored) != expected:  # a shard damaged after the stage finished
        raise IcrError(f"{plan.score_dir}: {len(scored)} scored samples, its manifest says {expected}; delete the "
                       "folder and rerun to score again")
    for rec in scored:
        if rec["reward"] is None:
            rec["reward"] = float("nan")
    judge_scores = None
    if cfg.pairs.selection == "judge":
        if not can_score(judge):
            raise IcrError("pairs.selection: judge needs an evaluation judge that scores single answers "
                           "(e.g. reward_model, or the sandbox's icr.sandbox:OracleJudge)")
        items = [JudgeItem(id=r["id"], lang=r["lang"], instruction=r["prompt"], output=r["response"])
                 for r in scored]
        judge_scores = {(r["id"], r["lang"], r["sample"]): s for r, s in zip(scored, judge.score(items))}
    pairs, stats = select_pairs(scored, pairs_cfg, seed=plan.seed, in_language=pairs_language_test(cfg),
                                judge_scores=judge_scores)
    for lang, st in stats["per_language"].items():
        if st["n_pairs"] == 0:  # that language gets no training this iteration: say why
            log.warning("pairs: no pair for %s, so it is not trained this iteration (%d prompts: %d with fewer than "
                        "two answers left after the filters [language %s, truncated %s; %d answers non-finite], %d "
                        "without two distinct answers, %d under the margin)", lang, st["n_prompts"],
                        st["dropped_filters"], "on" if cfg.pairs.language_filter else "off",
                        "dropped" if cfg.pairs.drop_truncated else "kept", st["dropped_nonfinite"],
                        st["dropped_no_pair"], st["dropped_margin"])
    write_jsonl(stage_dir / "pairs.jsonl", pairs)
    write_json(stage_dir / "stats.json", stats)
    write_json(stage_dir / "dataset_info.json", llamafactory_dataset_info(f"icr_{cfg.name}_iter{plan.t}"))
    counts = {"pairs": len(pairs), **{f"pairs_{k}": v["n_pairs"] for k, v in stats["per_language"].items()}}
    write_manifest(stage_dir, key, counts, time.time() - t0)
    return counts


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def train_key(cfg: ExperimentConfig, plan: IterationPlan) -> dict:
    return {"stage": "train", "train": cfg.section_hash("train"), "seed": plan.seed, "policy": model_key(plan.policy),
            "pairs": read_json(plan.pairs_dir / "manifest.json")["key"]}


def train_done(cfg: ExperimentConfig, plan: IterationPlan) -> bool:
    """Whether `run_train` would skip (checked before starting a process for it)."""
    return manifest_matches(plan.train_dir, train_key(cfg, plan)) and plan.model_dir.is_dir()


def run_train(cfg: ExperimentConfig, plan: IterationPlan) -> dict:
    """pi_t = DPO + NLL from pi_{t-1} on the iteration's pairs, reference pi_{t-1} (icr.train); through
    `accelerate launch` (icr.train_launch) when `train.accelerate_config` is set."""
    from .models import release_memory
    from .train import too_long_warning, train_dpo

    stage_dir = plan.train_dir
    key = train_key(cfg, plan)  # verifies pi_{t-1} if a run trained it (runs.model_key)
    if train_done(cfg, plan):
        return {"skipped": True}
    t0 = time.time()
    key_file = stage_dir / "key.json"
    if key_file.is_file() and read_json(key_file) != key:
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # checkpoints of another setup
    write_json(key_file, key)
    pairs = read_jsonl(plan.pairs_dir / "pairs.jsonl")
    if cfg.train.accelerate_config:
        from .train_launch import train_dpo_launched as train_fn
    else:
        train_fn = train_dpo
    metrics = train_fn(pairs, plan.policy, plan.policy, cfg.train, stage_dir, plan.model_dir, seed=plan.seed,
                       device=cfg.device, chat_template=cfg.models.chat_template)
    release_memory()
    if metrics.get("machine_rank"):  # another node of a multi-node launch: node 0 records the stage
        return {"machine_rank": metrics["machine_rank"], "launch_seconds": metrics["launch_seconds"]}
    # What TRL did with pairs too long for train.max_length (icr.train.length_counts); the launched
    # run's own warning went to its log file, so it is repeated here.
    lengths = {k: metrics.get(k) for k in ("pairs_trained", "pairs_dropped_too_long", "pairs_truncated")}
    counts = {"pairs": len(pairs), **lengths, "steps": metrics["steps"], "train_loss": metrics["train_loss"]}
    if cfg.train.accelerate_config and (warning := too_long_warning(counts, cfg.train.max_length)):
        log.warning(warning)
    # The saved weights' digests: a later stage refuses this model if they change (runs.check_trained_model).
    write_manifest(stage_dir, key, counts, time.time() - t0,
                   extra={"last_log": metrics["last_log"], "weight_change": metrics.get("weight_change"),
                          "saved_dtype": metrics.get("saved_dtype"),
                          "weights": weight_digests(plan.model_dir)})
    # The model is saved and the stage recorded: the resume checkpoints (weights + optimizer state,
    # several times the model's size) are no longer needed.
    shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(stage_dir / "launch", ignore_errors=True)
    return counts
