"""The alignment-tax check (the paper's Table 4): benchmarks per language through lm-evaluation-harness.

The paper shows that ICR leaves multilingual ARC, HellaSwag, MMLU and TruthfulQA where they were.
icr does not re-implement any benchmark: `evaluation.harness.tasks` names lm-eval tasks per
language, and each evaluated checkpoint (pi_SFT, pi0, pi1, ...) is run through
`lm_eval.simple_evaluate` on lm-eval's `HFLM`, wrapped around the model icr's own loader returns
(so GGUF specs, `models.dtype` and the device mean what they mean elsewhere in icr). Every seed
lm-eval takes is the run's seed.

What is kept: per (language, task, metric) one results.json row of kind "harness"
(`icr.evaluation.results`), and under `eval/<label>/harness.json` lm-eval's own numbers with the
key that made them (model identity, the harness settings, lm-eval's version): a rerun with the same
key reuses them. A task that is a group (e.g. `mmlu`) reports the group's aggregate; its n is the
sum over its subtasks.

Task data usually comes from the Hugging Face hub (lm-eval downloads it on a networked machine);
`include_path` adds local task YAMLs, e.g. offline copies.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import IcrError
from ..runs import model_key, read_json, write_json

# metrics that are fractions (shown x100 in the report); others are shown as lm-eval gives them
FRACTION_METRICS = ("acc", "acc_norm", "mc1", "mc2", "exact_match", "f1")


def harness_enabled(hcfg) -> bool:
    return bool(hcfg.tasks)


def check_harness(hcfg, languages: list[str]) -> None:
    """Validate the harness settings without running anything: lm-eval installed, languages known,
    task names lm-eval (or `include_path`) knows."""
    if not harness_enabled(hcfg):
        return
    if not isinstance(hcfg.tasks, dict):
        raise IcrError("evaluation.harness.tasks: expected a mapping language -> list of lm-eval task names")
    for lang, names in hcfg.tasks.items():
        where = f"evaluation.harness.tasks.{lang}"
        if lang not in languages:
            raise IcrError(f"{where}: {lang!r} is not one of the run's languages ({', '.join(languages)})")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise IcrError(f"{where}: expected a non-empty list of lm-eval task names")
    if hcfg.include_path is not None and not Path(hcfg.include_path).is_dir():
        raise IcrError(f"evaluation.harness.include_path: {hcfg.include_path} is not a folder")
    if hcfg.limit is not None and hcfg.limit > 1 and hcfg.limit != int(hcfg.limit):
        raise IcrError(f"evaluation.harness.limit: {hcfg.limit} is neither a whole count nor a fraction below 1")
    if importlib.util.find_spec("lm_eval") is None:
        raise IcrError("evaluation.harness: lm-evaluation-harness is not installed (pip install 'icr[harness]')")
    known = set(_task_manager(hcfg).all_tasks)
    for lang, names in hcfg.tasks.items():
        unknown = [n for n in names if n not in known]
        if unknown:
            raise IcrError(f"evaluation.harness.tasks.{lang}: lm-eval has no task {unknown[0]!r}"
                           + ("" if hcfg.include_path else " (local tasks: set evaluation.harness.include_path)"))


def _task_manager(hcfg):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=hcfg.include_path)


def _limit(hcfg):
    if hcfg.limit is None:
        return None
    return int(hcfg.limit) if hcfg.limit >= 1 else float(hcfg.limit)


def _key(model_path: str, hcfg, device: str, dtype: str, seed: int) -> dict:
    import dataclasses

    import lm_eval

    return {"model": model_key(model_path), "harness": dataclasses.asdict(hcfg), "device": device, "dtype": dtype,
            "seed": seed, "lm_eval": getattr(lm_eval, "__version__", None) or _version("lm_eval")}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist.replace("_", "-"))
    except PackageNotFoundError:
        return None


def run_harness(model_path: str, hcfg, out_dir: Path, *, device: str = "auto", dtype: str = "auto",
                seed: int = 42, chat_template: str | None = None) -> dict:
    """lm-eval's numbers for one model on every configured task (reused from `out_dir/harness.json`
    when made with the same key). Returns {"key", "results", "groups", "n-shot", "n-samples",
    "group_subtasks"} as lm-eval reports them."""
    from ..models import release_memory, resolve_device

    device = resolve_device(device)
    path = Path(out_dir) / "harness.json"
    key = _key(model_path, hcfg, device, dtype, seed)
    if path.is_file():
        saved = read_json(path)
        if saved.get("key") == key:
            return saved
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from ..models import load_causal_lm, load_tokenizer

    tasks = sorted({n for names in hcfg.tasks.values() for n in names})
    model = load_causal_lm(model_path, device, dtype, what="harness model")
    tokenizer = load_tokenizer(model_path, chat_template, what="harness model")
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=hcfg.batch_size, device=device)
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=hcfg.num_fewshot, limit=_limit(hcfg),
                                      task_manager=_task_manager(hcfg), log_samples=False,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    finally:
        del model
        release_memory()
    kept = {"key": key, **{k: res.get(k, {}) for k in ("results", "groups", "n-shot", "n-samples", "group_subtasks")}}
    write_json(path, kept)
    return kept


def _leaves(name: str, group_subtasks: dict) -> list[str]:
    subs = group_subtasks.get(name)
    if not subs:
        return [name]
    return [leaf for s in subs for leaf in _leaves(s, group_subtasks)]


def harness_rows(saved: dict, hcfg, label: str, iteration: int) -> list[dict]:
    """results.json rows (kind "harness") for one model from `run_harness`'s output."""
    rows = []
    for lang, names in hcfg.tasks.items():
        for name in names:
            entry = saved["groups"].get(name) or saved["results"].get(name)
            if entry is None:
                raise IcrError(f"evaluation.harness: lm-eval returned no result for task {name!r}")
            leaves = _leaves(name, saved["group_subtasks"])
            n = sum(int(saved["n-samples"].get(leaf, {}).get("effective", 0)) for leaf in leaves) or None
            shots = saved["n-shot"].get(name)
            if shots is None:  # a group: its subtasks' (equal) shot count
                counts = {saved["n-shot"].get(leaf) for leaf in leaves} - {None}
                shots = counts.pop() if len(counts) == 1 else None
            for field, value in entry.items():
                # metrics are "name,filter"; other entries (alias, sample_len, ...) are not results
                metric, comma, filt = field.partition(",")
                if not comma or "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                se = entry.get(f"{metric}_stderr,{filt}")
                rows.append({"kind": "harness", "model": label, "iteration": iteration, "lang": lang,
                             "task": name, "metric": metric if filt in ("", "none") else f"{metric}/{filt}",
                             "value": float(value), "stderr": float(se) if isinstance(se, (int, float)) else None,
                             "n": n, "num_fewshot": shots if isinstance(shots, int) else None})
    return rows


def evaluate_harness(model_path: str, label: str, iteration: int, hcfg, out_dir: Path, *, device: str = "auto",
                     dtype: str = "auto", seed: int = 42, chat_template: str | None = None) -> list[dict]:
    """Run (or reuse) lm-eval on one model; its results.json rows. Questions are scored as plain
    text (lm-eval's default, as the paper's Table 4 benchmarks are); the chat template only
    satisfies icr's tokenizer loader."""
    if not harness_enabled(hcfg):
        return []
    saved = run_harness(model_path, hcfg, Path(out_dir) / label, device=device, dtype=dtype, seed=seed,
                        chat_template=chat_template)
    return harness_rows(saved, hcfg, label, iteration)
