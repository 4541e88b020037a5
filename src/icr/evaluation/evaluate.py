"""Evaluate a model X-AlpacaEval style: one answer per prompt per language, judged against references.

The whole path lives here: `Evaluator` (what `icr run` calls after each model and `icr evaluate`
calls once) reads the evaluation data once (`load_evaluation_data`), builds the judge
(`make_judge`), samples the answers through the configured backend (`sample_outputs`, in a child
process when stages are isolated: icr.launch), judges them and computes the metrics
(`evaluate_model`), adds the alignment-tax benchmarks (`icr.evaluation.harness`) and appends the
rows to results.json (`icr.evaluation.results`). What a judge can do it declares
(`judges.can_score`). With stages isolated, what loads a model runs in a child process, never in
the `icr run` process: the sampling, the judging when the judge loads a model (`judges.loads_model`:
the reward-model judge, which preflight builds without its weights) and the harness (job kind
`eval_judge`, `judge_in_child`).

Layout under `out_dir` (the run's `eval/` folder):

    <label>/<lang>/model_outputs.json   alpaca_eval model-output format (feed it to alpaca_eval directly)
    <label>/<lang>/generation.json      what produced it (model, decoding, prompt hash) and counts
    <label>/<lang>/judgements.<judge>.json   per-id preference, for inspection and agreement studies
    judge_cache.jsonl                   every judgement ever paid for, by content hash

Resumable at language granularity: outputs whose `generation.json` matches the current model,
decoding and prompts are reused; judgements come from the cache.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from ..errors import IcrError
from ..progress import ProgressWriter, watch, worker_name
from ..runs import read_json, text_hash, write_json
from .export import read_model_outputs, to_model_outputs, write_model_outputs
from .judges import CachedJudge, JudgeItem
from .metrics import (alpaca_eval_length_controlled_win_rate, fidelity, length_controlled_win_rate, mean_length,
                      win_rate)


# Answers are judged stripped of surrounding whitespace, as the authors' (their sampler keeps
# `output.text.strip()`: utils/inference.py:144, called from utils/batch_inference.py:29 for X-AlpacaEval);
# special tokens are already left out when decoding. The outputs' key records it: answers saved before
# (unstripped, a key without "output") are stripped once when reused, and their generation.json says so.
OUTPUT_FORM = "stripped"


def _generation_key(model_path: str, params, chat_template: str | None, prompts: list[dict]) -> dict:
    return {"model_path": str(model_path), "params": dataclasses.asdict(params),
            "chat_template": text_hash(chat_template or ""),
            "prompts": text_hash(*(f"{p['id']}\t{p['instruction']}" for p in prompts)), "output": OUTPUT_FORM}


def _reusable(lang_dir: Path, key: dict, prompts: list[dict]) -> list[dict] | None:
    """The saved outputs if they were made by the same model, decoding and prompts."""
    try:
        saved = read_json(lang_dir / "generation.json")
        old = saved.get("key")
        unstripped = isinstance(old, dict) and "output" not in old and {**old, "output": OUTPUT_FORM} == key
        if old != key and not unstripped:
            return None
        rows = read_model_outputs(lang_dir / "model_outputs.json")
    except (OSError, ValueError, IcrError):
        return None
    same = len(rows) == len(prompts) and all(
        str(r.get("id")) == str(p["id"]) and r["instruction"] == p["instruction"] for r, p in zip(rows, prompts))
    if not same:
        return None
    if unstripped:  # saved before answers were stripped: strip them now, once, and record it
        changed = sum(r["output"] != r["output"].strip() for r in rows)
        rows = [{**r, "output": r["output"].strip()} for r in rows]
        write_model_outputs(lang_dir / "model_outputs.json", rows)
        write_json(lang_dir / "generation.json", {**saved, "key": key, "stripped_when_reused": changed})
    return rows


def _check_references(prompts: dict, references: dict) -> None:
    for lang, rows in prompts.items():
        refs = references.get(lang)
        if not refs:
            continue  # reference-free: the judge compares against an empty answer
        missing = [str(p["id"]) for p in rows if str(p["id"]) not in refs]
        if missing:
            raise IcrError(f"evaluation: {len(missing)} of {len(rows)} {lang} prompts have no reference output "
                           f"(ids {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")


def eval_params(ev, seed: int):
    """The evaluation decoding (one answer per prompt), `ev` an EvaluationConfig."""
    from ..generation import SamplingParams

    return SamplingParams(n=1, temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens, seed=seed)


def missing_outputs(model_path: str, label: str, prompts: dict[str, list[dict]], ev, out_dir: Path, *,
                    seed: int = 42, chat_template: str | None = None) -> list[str]:
    """Languages whose saved outputs were not made by this model, decoding and prompts."""
    params = eval_params(ev, seed)
    return [lang for lang, rows in prompts.items()
            if _reusable(Path(out_dir) / label / lang, _generation_key(model_path, params, chat_template, rows),
                         rows) is None]


def generate_outputs(model_path: str, label: str, prompts: dict[str, list[dict]], ev, out_dir: Path, *,
                     seed: int = 42, chat_template: str | None = None, backend=None,
                     load_backend=None, generator: str | None = None) -> dict[str, list[dict]]:
    """One answer per prompt and language, saved as `<label>/<lang>/model_outputs.json`; saved
    outputs of the same model, decoding and prompts are reused.

    `backend` (optional) is an already loaded generation backend, used as is and not closed;
    otherwise `load_backend(model_path)` is called only if some language needs generating, and
    the backend is closed afterwards. `generator` names the model in the exported model outputs
    (default: `label`; a run passes "<run name>/<label>").
    """
    out_dir = Path(out_dir)
    params = eval_params(ev, seed)
    outputs: dict[str, list[dict]] = {}
    todo = []
    for lang, rows in prompts.items():
        key = _generation_key(model_path, params, chat_template, rows)
        saved = _reusable(out_dir / label / lang, key, rows)
        if saved is None:
            todo.append((lang, key))
        else:
            outputs[lang] = saved
    if not todo:
        return outputs
    own = backend is None
    if own:
        if load_backend is None:
            raise IcrError(f"evaluation: outputs of {label} must be generated, but no backend was given")
        backend = load_backend(model_path)
    progress = ProgressWriter(out_dir / label, worker_name(), stage="evaluate", unit="answer",
                              total=sum(len(prompts[lang]) for lang, _ in todo))
    try:
        for lang, key in todo:
            rows = prompts[lang]
            samples = backend.generate([[{"role": "user", "content": p["instruction"]}] for p in rows], params)
            texts = [s[0].text.strip() for s in samples]  # OUTPUT_FORM: judged as the authors judge them
            outputs[lang] = to_model_outputs(rows, texts, generator=generator or label)
            lang_dir = out_dir / label / lang
            write_model_outputs(lang_dir / "model_outputs.json", outputs[lang])
            write_json(lang_dir / "generation.json", {
                "key": key, "n": len(rows), "unfinished": sum(not s[0].finished for s in samples),
                "stripped": sum(s[0].text != t for s, t in zip(samples, texts)),
                "mean_tokens": sum(s[0].n_tokens for s in samples) / max(len(samples), 1)})
            progress.update(advance=len(rows), tokens=sum(s[0].n_tokens for s in samples))
        progress.close()  # after an error: closed as failed by icr.progress.watch, or with its process
    finally:
        if own:
            backend.close()
    return outputs


def evaluate_model(model_path: str, label: str, iteration: int, prompts: dict[str, list[dict]],
                   references: dict[str, dict[str, str]], judge, cfg, out_dir: Path, *,
                   seed: int = 42, chat_template: str | None = None, backend=None,
                   identifier=None, generator: str | None = None) -> list[dict]:
    """Judge and score one model's answers (generated first with `backend` if not saved, see
    `generate_outputs`); one results row per language.

    A language without references (absent or empty in `references`) is judged against an empty
    reference answer: meaningful for judges that grade answers on their own (the sandbox oracle:
    WR = share of answers better than nothing); its `lc` is null. A language whose references
    miss some prompt ids is an error.

    `cfg` is an `icr.config.EvaluationConfig` (decoding). `identifier` defaults to the offline
    language identifier over the evaluated languages.
    """
    out_dir = Path(out_dir)
    _check_references(prompts, references)
    if not isinstance(judge, CachedJudge):
        judge = CachedJudge(judge, out_dir / "judge_cache.jsonl")
    outputs = generate_outputs(model_path, label, prompts, cfg, out_dir, seed=seed, chat_template=chat_template,
                               backend=backend, generator=generator)

    if identifier is None:
        from ..languages import language_identifier

        identifier = language_identifier(tuple(sorted(prompts)))
    results = []
    judged = ProgressWriter(out_dir / label, "judge", stage="evaluate", unit="judgement",
                            total=sum(len(outputs[lang]) for lang in prompts))
    for lang in prompts:
        rows = outputs[lang]
        items = [JudgeItem(id=str(r["id"]), lang=lang, instruction=r["instruction"], output=r["output"],
                           reference=references.get(lang, {}).get(str(r["id"]), "")) for r in rows]
        mark = judge.mark()
        prefs = judge.compare(items)
        judged.update(advance=len(items))
        failed = sum(math.isnan(p) for p in prefs)
        if failed:
            raise IcrError(f"judge {judge.name}: {failed} of {len(items)} judgements failed for {label}/{lang}; "
                           "rerun to retry them (the others are cached)")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", judge.name)
        write_json(out_dir / label / lang / f"judgements.{safe}.json",
                   [{"id": it.id, "preference": p} for it, p in zip(items, prefs)])
        texts = [it.output for it in items]
        wr, wr_se = win_rate(prefs)
        lc, lc_method = _length_controlled(cfg, prefs, items) if references.get(lang) else (None, None)
        results.append({
            "model": label, "iteration": iteration, "lang": lang, "judge": judge.name, "n": len(items),
            "wr": wr, "wr_se": None if math.isnan(wr_se) else wr_se, "lc": lc, "lc_method": lc_method,
            "fidelity": fidelity(texts, lang, identifier), "mean_len": mean_length(texts),
            **judge.spent(mark)})  # judgements from the cache, and what those sent now used
    judged.close()
    return results


def _length_controlled(cfg, prefs: list[float], items: list[JudgeItem]) -> tuple[float, str]:
    """(LC in %, which LC) as `cfg.lc_method` asks; alpaca_eval's finds each instruction by its id."""
    if getattr(cfg, "lc_method", "minimal") == "alpaca_eval":
        lc = alpaca_eval_length_controlled_win_rate(prefs, [it.output for it in items],
                                                    [it.reference for it in items], [it.id for it in items],
                                                    data_dir=getattr(cfg, "lc_data_dir", None))
        return lc, "alpaca_eval:length_controlled_v1"
    return (length_controlled_win_rate(prefs, [len(it.output) for it in items], [len(it.reference) for it in items]),
            "icr:minimal")


# ---------------------------------------------------------------------------------------------
# The run's evaluation: data, judge, sampling, judging, results
# ---------------------------------------------------------------------------------------------

def load_evaluation_data(cfg, judge):
    """(evaluation prompt set, references matched to it) for every language; see `icr.data`.
    `cfg` is the ExperimentConfig."""
    from ..data import load_prompt_set, load_references
    from .judges import can_score

    ev = cfg.evaluation
    prompts = load_prompt_set(ev.prompts, cfg.languages, field="evaluation.prompts")
    references = load_references(ev.references, prompts, cfg.languages, judge_scores_alone=can_score(judge),
                                 judge_name=ev.judge)
    return prompts, references


def make_judge(cfg):
    """The configured evaluation judge, with its judgements cached in the run folder. It carries
    `spec`, what builds it again in another process (`judge_from_spec`)."""
    return judge_from_spec({"judge": cfg.evaluation.judge, "judge_args": dict(cfg.evaluation.judge_args),
                            "cache": str(cfg.run_dir / "eval" / "judge_cache.jsonl")})


def judge_from_spec(spec: dict) -> CachedJudge:
    """The judge `spec` names ({judge, judge_args, cache}: see `make_judge`), its judgements cached
    in the file `cache`."""
    from .judges import get_judge

    judge = CachedJudge(get_judge(spec["judge"], **spec["judge_args"]), Path(spec["cache"]))
    judge.spec = spec
    return judge


def judge_in_child(cfg, args: dict) -> dict:
    """Job kind `eval_judge` (icr.workers), run when stages are isolated: what of an evaluation
    loads a model, in this child process. `args["judge"]` (a judge's `spec`, or None): judge the
    saved answers of `args["label"]` with it (`evaluate_model`); `args["harness"]`: run the harness.
    Returns {"judged": rows or None, "harness": rows or None}."""
    from .harness import evaluate_harness

    out_dir, model_path, label, t = Path(args["out_dir"]), args["model_path"], args["label"], args["iteration"]
    judged = harness = None
    if args.get("judge") is not None:
        judge = judge_from_spec(args["judge"])
        try:
            prompt_set, references = load_evaluation_data(cfg, judge)
            judged = evaluate_model(model_path, label, t, prompt_set.as_rows(), references, judge, cfg.evaluation,
                                    out_dir, seed=cfg.seed, chat_template=cfg.models.chat_template,
                                    generator=f"{cfg.name}/{label}")
        finally:
            judge.close()
    if args.get("harness"):
        harness = evaluate_harness(model_path, label, t, cfg.evaluation.harness, out_dir, device=cfg.device,
                                   dtype=cfg.models.dtype, seed=cfg.seed, chat_template=cfg.models.chat_template)
    return {"judged": judged, "harness": harness}


def sample_outputs(cfg, model_path: str, label: str, out_dir: Path, prompts: dict | None = None) -> None:
    """Evaluation's sampling: one answer per evaluation prompt and language through the configured
    backend, saved under `out_dir/<label>/` (job kind `eval_outputs` when stages are isolated).
    `prompts`: the evaluation prompts' rows, if already loaded."""
    from ..data import load_prompt_set
    from ..generation import policy_backend

    from .mt_bench import generate_answers

    if prompts is None:
        prompts = load_prompt_set(cfg.evaluation.prompts, cfg.languages, field="evaluation.prompts").as_rows()
    backend = _LazyBackend(lambda: policy_backend(cfg, model_path, batch_size=cfg.evaluation.batch_size))
    try:
        generate_outputs(model_path, label, prompts, cfg.evaluation, out_dir, seed=cfg.seed,
                         chat_template=cfg.models.chat_template, backend=backend, generator=f"{cfg.name}/{label}")
        generate_answers(cfg, model_path, label, out_dir, backend)  # MT-Bench's two turns, when configured
    finally:
        backend.close()


class _LazyBackend:
    """A sampling backend loaded on the first `generate`, so that the X-AlpacaEval answers and the
    MT-Bench answers share one load and nothing is loaded when both are saved."""

    def __init__(self, load):
        self._load, self._backend = load, None

    def generate(self, conversations, params, desc=None):
        if self._backend is None:
            self._backend = self._load()
        return self._backend.generate(conversations, params)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


class Evaluator:
    """The one evaluation path (`icr run` after each model, `icr evaluate` for one): sample one answer
    per evaluation prompt and language (in its own process when stages are isolated), judge against
    the references, add the rows to `results_path`.

    Outputs go to `<run_dir>/eval/<label>/<lang>/`; prompts and references are read once."""

    def __init__(self, cfg, run_dir: Path, judge, results_path: Path):
        if not cfg.evaluation.prompts.path:
            raise IcrError("evaluation.prompts.path: required to evaluate")
        self.cfg, self.judge, self.results_path = cfg, judge, Path(results_path)
        self.out_dir = Path(run_dir) / "eval"
        prompt_set, self.references = load_evaluation_data(cfg, judge)
        self.prompts = prompt_set.as_rows()

    def __call__(self, model_path: str, label: str, t: int) -> list[dict]:
        with watch(self.out_dir / label, f"evaluate {label}"):  # answers sampled, judgements made
            return self._evaluate(model_path, label, t)

    def _evaluate(self, model_path: str, label: str, t: int) -> list[dict]:
        from ..launch import isolate_stages, run_in_child
        from .harness import evaluate_harness, harness_enabled
        from .judges import loads_model
        from .mt_bench import evaluate_mt_bench, missing_answers
        from .results import append_results

        from ..runs import check_trained_model

        cfg = self.cfg
        check_trained_model(model_path)
        isolate = isolate_stages(cfg)
        # With stages isolated, what loads a model runs in a child: the judge, if it loads one (and
        # can be built there: `spec`), and the harness. A reward model this process loaded for
        # something else (pairs.selection: judge, reward agreement) is dropped first: the children
        # get the device to themselves.
        judge_there = isolate and loads_model(self.judge) and getattr(self.judge, "spec", None) is not None
        harness_there = isolate and harness_enabled(cfg.evaluation.harness)
        if isolate and callable(getattr(self.judge, "close", None)):
            self.judge.close()
        if missing_outputs(model_path, label, self.prompts, cfg.evaluation, self.out_dir, seed=cfg.seed,
                           chat_template=cfg.models.chat_template) \
                or missing_answers(cfg, model_path, label, self.out_dir):
            if isolate:
                run_in_child("eval_outputs", cfg, {"model_path": model_path, "label": label,
                                                   "out_dir": str(self.out_dir)}, self.out_dir / f"{label}.workers")
            else:
                sample_outputs(cfg, model_path, label, self.out_dir, self.prompts)
        there = {}
        if judge_there or harness_there:
            there = run_in_child("eval_judge", cfg, {
                "model_path": model_path, "label": label, "iteration": t, "out_dir": str(self.out_dir),
                "judge": self.judge.spec if judge_there else None, "harness": harness_there},
                self.out_dir / label / "judge.workers")  # its log: <label>/judge/logs/worker-0.log
        # The answers are on disk now: evaluate_model only judges and scores them.
        rows = there["judged"] if judge_there else evaluate_model(
            model_path, label, t, self.prompts, self.references, self.judge, cfg.evaluation, self.out_dir,
            seed=cfg.seed, chat_template=cfg.models.chat_template, generator=f"{cfg.name}/{label}")
        # The alignment-tax benchmarks (lm-evaluation-harness), when configured.
        rows += there["harness"] if harness_there else evaluate_harness(
            model_path, label, t, cfg.evaluation.harness, self.out_dir, device=cfg.device, dtype=cfg.models.dtype,
            seed=cfg.seed, chat_template=cfg.models.chat_template)
        # Multilingual MT-Bench (the paper's Table 3), when configured: its answers were sampled above.
        rows += evaluate_mt_bench(cfg, label, t, self.out_dir)
        append_results(self.results_path, rows)
        return rows
