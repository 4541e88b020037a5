"""`icr run CONFIG`: the whole ICR loop, composed from the stages.

    prepare (optional)  -> {prepared}: local models / prompts, cached by its arguments
    evaluate pi_SFT, pi0 (if evaluation.enabled)
    for t in 1..iterations:
        generate  from pi_{t-1}
        score     with the reward pair chosen by reward.models
        pairs     best vs worst per prompt
        train     pi_t = DPO+NLL(pi_{t-1} -> pairs), reference pi_{t-1}
        evaluate  pi_t
    controls (if any): the same loop with config overrides, under controls/<label>/

Layout: runs/<name>/config.yaml, runs/<name>/iter<t>/{generate,score,pairs,train}/,
runs/<name>/iter<t>/model/, runs/<name>/results.json. Re-running skips every stage whose
manifest matches; an interrupted stage resumes from its last shard or checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .config import ExperimentConfig, config_from_dict, dump_config, judge_identity, uses_judge, with_overrides
from .data import load_prompt_set
from .errors import IcrError
from .plan import iteration_plan, model_label, model_paths
from .runs import atomic_write_text, cache_root, environment_errors, hold_lock, read_json, run_lock, text_hash, write_json

log = logging.getLogger("icr")


def run_prepare(cfg: ExperimentConfig) -> Path | None:
    """Run the config's `prepare` function once per distinct (call, args); return its folder."""
    if cfg.prepare is None:
        return None
    call, args = cfg.prepare.call, cfg.prepare.args
    out = prepared_dir(cfg)
    done = out / "done.json"
    if done.is_file():
        return out
    module, _, fn = call.rpartition(":")
    if module.endswith(".py"):  # research code outside the package: `path/to/file.py:function`, path from the cwd
        path = Path(module)
        if not path.is_file():
            raise IcrError(f"prepare.call: no file {module} (a .py path is relative to the working directory "
                           f"{Path.cwd()})")
        import sys
        from importlib.util import module_from_spec, spec_from_file_location

        name = f"icr_prepare_{path.stem}_{text_hash(str(path.resolve()))}"
        if name not in sys.modules:  # registered before it runs: dataclasses look their module up
            spec = spec_from_file_location(name, path)
            sys.modules[name] = module_from_spec(spec)
            try:
                spec.loader.exec_module(sys.modules[name])
            except BaseException:
                del sys.modules[name]
                raise
        func = getattr(sys.modules[name], fn, None)
        if not callable(func):
            raise IcrError(f"prepare.call: {module} has no function {fn!r}")
    else:
        try:
            func = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise IcrError(f"prepare.call: cannot import {call!r} ({e})") from None
    # Two commands sharing a prepare step (two runs, or the shard workers of one on several nodes)
    # must not build into the same folder at once: the second waits for the first.
    with hold_lock(out.with_name(out.name + ".lock"), f"prepare: {out} is being built", wait=True):
        if done.is_file():  # built by another process while this one started
            return out
        log.info("prepare: building %s into %s", call, out)
        t0 = time.time()
        try:
            func(out, **args)
        except TypeError as e:
            raise IcrError(f"prepare.args: {call} rejected the arguments ({e})") from None
        write_json(done, {"call": call, "args": args, "seconds": round(time.time() - t0, 1)})
    return out


# A prepare function may flag languages it built badly: `<prepared>/language_flags.json`,
# {lang: one line}. The loop does not judge them (it knows no world): it warns, keeps a copy in the
# run folder, and the report marks those languages, so a failed language is never silent.
LANGUAGE_FLAGS = "language_flags.json"


def prepare_flags(prepared: Path | None) -> dict[str, str]:
    """The languages a prepare folder flagged ({} when it flags none or has no such file)."""
    path = prepared / LANGUAGE_FLAGS if prepared is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        flags = read_json(path)
    except json.JSONDecodeError as e:
        raise IcrError(f"{path}: invalid JSON ({e.msg})") from None
    if not isinstance(flags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in flags.items()):
        raise IcrError(f"{path}: expected an object of language -> one line")
    return flags


def prepared_dir(cfg: ExperimentConfig) -> Path | None:
    """The folder `prepare` builds (or built) for this config, whether or not it exists yet."""
    if cfg.prepare is None:
        return None
    call, args = cfg.prepare.call, cfg.prepare.args
    name = call.replace(":", ".").replace("/", "_").replace("\\", "_")  # a file call (dir/x.py:f): one flat folder
    return cache_root() / "prepared" / f"{name}-{text_hash(call, json.dumps(args, sort_keys=True))}"


def resolve_placeholders(cfg: ExperimentConfig, prepared: Path | None) -> ExperimentConfig:
    """Replace `{prepared}` in every string field."""
    if prepared is None:
        return cfg
    data = cfg.to_dict()

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str):
            return node.replace("{prepared}", str(prepared))
        return node

    return config_from_dict(walk(data), "config")


# What icr writes at the top of a run folder: all that `--force` may delete (anything else there
# is the user's and stays).
RUN_FOLDER_ENTRIES = re.compile(r"config\.yaml|results\.json|report\.(md|html)|timings\.json|language_flags\.json|"
                                r"iter\d+|controls|eval|diagnostics|tracking|\.shared-locks|"
                                r"wr_by_iteration\..+\.png|alpha_curve_iter\d+\.png")


# Fields that say where and how a run executes and who watches it, not what it computes: no stage's
# output depends on them (tests/test_workers.py, test_ray.py compare the files), so commands that
# differ only there share a run folder (e.g. a resume with more workers, a node with its own
# placement), and config.yaml keeps the first command's values.
PLACEMENT_FIELDS = ("workers", "isolate_stages", "cluster", "report_to")


def _output_identity(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in PLACEMENT_FIELDS}


def config_digest(cfg: ExperimentConfig) -> str:
    """Identity of a resolved config (the run lock's: commands with equal digests may share a
    folder), placement (PLACEMENT_FIELDS) left out."""
    return text_hash(json.dumps(_output_identity(cfg.to_dict()), sort_keys=True))


def check_run_folder(cfg: ExperimentConfig, run_dir: Path, force: bool) -> None:
    """A run folder belongs to one config: refuse to mix, unless --force starts over.

    Not a mix, so no --force needed: a folder in which nothing was computed yet (a failed start:
    no stage manifest, no shard, no results) takes the new config; a finished run extended to more
    iterations (the same config but `iterations`) keeps everything. `--force` deletes only what icr
    writes in a run folder (RUN_FOLDER_ENTRIES), never other files, and never a folder without
    icr's config.yaml."""
    saved = run_dir / "config.yaml"
    resolved = dump_config(cfg)
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {} if saved.is_file() else None
    new = _output_identity(cfg.to_dict())
    if old is not None and _output_identity(old) != new:
        old = _output_identity(old)
        if not _computed_anything(run_dir):
            log.info("%s: nothing was computed with its old config; taking the new one", run_dir)
        elif ({**old, "iterations": None} == {**new, "iterations": None}
              and isinstance(old.get("iterations"), int) and new["iterations"] > old["iterations"]):
            log.info("%s: extending the run from %d to %d iterations", run_dir, old["iterations"], new["iterations"])
        elif not force:
            raise IcrError(f"{run_dir}: made with a different config (see {saved}); use a new name, "
                           "or --force to delete icr's files in it and start over")
        else:
            _delete_run_files(run_dir)
        atomic_write_text(saved, resolved)
    if not saved.is_file():
        atomic_write_text(saved, resolved)


@contextlib.contextmanager
def run_folder(cfg: ExperimentConfig, run_dir: Path, *, force: bool = False, shared: bool = False):
    """Work in `run_dir` as `cfg`'s: its lock taken for this config (`shared`: beside other commands
    of the same config, see runs.run_lock), its config.yaml checked (`check_run_folder`). What every
    command that writes into a run folder holds (icr run, the stage commands, icr evaluate)."""
    with run_lock(run_dir, config_digest(cfg), shared=shared):
        check_run_folder(cfg, run_dir, force)
        yield


def _computed_anything(run_dir: Path) -> bool:
    return any(True for pattern in ("results.json", "**/manifest.json", "**/shard-*.jsonl")
               for _ in run_dir.glob(pattern))


def _delete_run_files(run_dir: Path) -> None:
    import shutil

    kept = []
    for child in sorted(run_dir.iterdir()):
        if child.name == ".lock":
            continue
        if not RUN_FOLDER_ENTRIES.fullmatch(child.name) or child.is_symlink():
            kept.append(child.name)
        elif child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    if kept:
        log.warning("%s: --force kept what icr did not write: %s", run_dir, ", ".join(kept))


def run_loop(cfg: ExperimentConfig, run_dir: Path, *, label: str | None = None, judge=None,
             timings: dict | None = None, results_path: Path | None = None, reuse_from: Path | None = None,
             on_stage: Callable[[str, dict], None] | None = None, tracker=None) -> list[dict]:
    """Iterate generate -> score -> pairs -> train; evaluate when configured; return result rows.

    Result rows are added to `results_path` as each model is evaluated. `reuse_from` (a control's
    main run) lends finished generate/score stages whose keys match (same policy, seed, settings).
    `on_stage(name, result)` is called after each stage (e.g. bench/stage_memory.py records the
    GPU memory this process holds between stages). `tracker` (icr.tracking.Tracker) receives each
    stage's counts and time, the pair statistics, reward agreement and win rates.
    """
    from .evaluation.evaluate import Evaluator
    from .stages import run_pairs
    from .workers import run_stage

    timings = {} if timings is None else timings
    prompts = load_prompt_set(cfg.prompts, cfg.languages)
    paths = model_paths(cfg, run_dir)
    rows: list[dict] = []
    evaluate = Evaluator(cfg, run_dir, judge, results_path or run_dir / "results.json") \
        if cfg.evaluation.enabled else None

    def timed(name: str, fn) -> dict:
        t0 = time.time()
        # A full disk or a file size limit ends in one line naming the stage's folder (resumable).
        with environment_errors(run_dir / ("eval" if "evaluate" in name else name)):
            result = fn()
        if not (isinstance(result, dict) and result.get("skipped")):  # a skipped stage keeps the time it took when it ran
            timings[f"{label + '/' if label else ''}{name}"] = round(time.time() - t0, 2)
        if on_stage is not None:
            on_stage(name, result)
        return result

    if evaluate and label is None:
        for name in cfg.evaluation.models:
            t = {"sft": -1, "M0": 0}.get(name)
            if t is None:
                raise IcrError(f"evaluation.models: unknown model {name!r} (sft, M0)")
            rows += _tracked(tracker, timed(f"evaluate/{name}", lambda: evaluate(paths[t], model_label(t), t)))
    for t in range(1, cfg.iterations + 1):
        it = iteration_plan(cfg, run_dir, t)
        lent = iteration_plan(cfg, reuse_from, t) if reuse_from else None
        for stage, fn in (
            ("generate", lambda: run_stage("generate", cfg, it, prompts=prompts, reuse=lent)),
            ("score", lambda: run_stage("score", cfg, it, prompts=prompts, reuse=lent)),
            ("pairs", lambda: run_pairs(cfg, it, judge=judge)),
            ("train", lambda: run_stage("train", cfg, it)),
        ):
            with tracker.training(t, label) if tracker and stage == "train" else contextlib.nullcontext():
                result = timed(f"iter{t}/{stage}", fn)
            if tracker:
                tracker.stage(t, stage, result, getattr(it, f"{stage}_dir"), label)
            status = ("skipped (manifest matches)" if result.get("skipped") else
                      "reused from the main run" if result.get("reused") else "done")
            log.info("%s iter%d %-8s %s %s", label or cfg.name, t, stage, status,
                     "" if result.get("skipped") or result.get("reused") else json.dumps(result))
            if stage == "score" and cfg.evaluation.reward_agreement and judge is not None:
                agreement = _agreement(cfg, run_dir, it.score_dir, t, judge)
                if tracker:
                    tracker.agreement(t, agreement, label)
            if stage == "pairs" and callable(getattr(judge, "close", None)):
                judge.close()  # a reward-model judge used for agreement or pairs gives its GPU back before training
        if evaluate:
            rows += _tracked(tracker, timed(f"iter{t}/evaluate",
                                            lambda: evaluate(paths[t], model_label(t, label), t)))
    return rows


def _tracked(tracker, rows: list[dict]) -> list[dict]:
    if tracker:
        tracker.evaluation(rows)
    return rows


def _agreement(cfg: ExperimentConfig, run_dir: Path, scores_dir: Path, t: int, judge) -> Path:
    """diagnostics/reward_agreement_iter<t>.json (iteration 1 also as reward_agreement.json, the
    agreement of pi0's reward, which the report shows), written unless up to date; returns its path."""
    from .diagnostics import reward_agreement
    from .evaluation.judges import can_score
    from .runs import read_shards

    out = run_dir / "diagnostics" / f"reward_agreement_iter{t}.json"
    key = {"scores": read_json(scores_dir / "manifest.json")["key"], **judge_identity(cfg)}
    if out.is_file() and read_json(out).get("key") == key:
        return out
    if not can_score(judge):
        raise IcrError("evaluation.reward_agreement: the judge cannot score single answers (use reward_model, "
                       "or the sandbox's icr.sandbox:OracleJudge)")
    agreement = reward_agreement(read_shards(scores_dir), judge)
    write_json(out, {"key": key, "agreement": agreement})
    if t == 1:
        write_json(run_dir / "diagnostics" / "reward_agreement.json", agreement)
    log.info("reward agreement iter%d: %s", t, {lang: round(v["all"]["agree"], 3) for lang, v in agreement.items()})
    return out


def run_experiment(cfg: ExperimentConfig, *, force: bool = False, reuse_from: Path | None = None,
                   on_stage: Callable[[str, dict], None] | None = None) -> Path:
    """The `icr run` entry point: prepare, main loop, controls, results and report.

    `reuse_from`: another run folder whose finished stages with identical keys are hard-linked
    instead of recomputed (ablations share the baseline's first-iteration samples and scores)."""
    from .tracking import check_trackers, open_tracker

    check_trackers(cfg.report_to)  # before prepare, which may take long
    prepared = run_prepare(cfg)
    flags = prepare_flags(prepared)
    for lang, why in flags.items():
        log.warning("prepare flagged language %s: %s (the report marks it)", lang, why)
    cfg = resolve_placeholders(cfg, prepared)
    judge = preflight(cfg)
    run_dir = cfg.run_dir
    with run_folder(cfg, run_dir, force=force), open_tracker(cfg, run_dir) as tracker:
        if flags:
            write_json(run_dir / LANGUAGE_FLAGS, flags)
        elif (run_dir / LANGUAGE_FLAGS).is_file():
            (run_dir / LANGUAGE_FLAGS).unlink()
        timings: dict = {}
        rows = run_loop(cfg, run_dir, judge=judge, timings=timings, reuse_from=reuse_from, on_stage=on_stage,
                        tracker=tracker)
        for i, control in enumerate(cfg.controls):
            label = control["label"]
            ccfg = with_overrides(cfg, control.get("overrides", {}), f"controls[{i}]")
            rows += run_loop(ccfg, run_dir / "controls" / label, label=label, judge=judge, timings=timings,
                             results_path=run_dir / "results.json", reuse_from=run_dir, on_stage=on_stage,
                             tracker=tracker)
        old = read_json(run_dir / "timings.json") if (run_dir / "timings.json").is_file() else {}
        write_json(run_dir / "timings.json", {**old, **timings})
        if cfg.evaluation.enabled:
            from .report import write_report

            log.info("report: %s", write_report(run_dir))
    return run_dir


def preflight(cfg: ExperimentConfig):
    """Check every input before anything is written; return the judge (None when the run uses none).

    Checked: prompts and evaluation prompts for every language, references matched to them,
    models (config, tokenizer, weight headers, shared tokenizer), the chat template (a named .jinja
    file exists; the template renders a user message and puts the message in the prompt), what
    check_backends checks (packages, deepspeed, train.optimizer's bitsandbytes, GPUs for the
    accelerate config), the GPU memory and disk training needs (check_training_resources), the
    judge (built, its API key), alpaca_eval's
    length-control data (lc_method alpaca_eval), and that the run folder can be created. `icr
    validate` runs the same checks.
    """
    from .config import is_template_text
    from .evaluation.evaluate import make_judge
    from .models import chat_messages, check_model, check_same_tokenizer, load_tokenizer

    check_run_root(cfg)
    check_backends(cfg)
    load_prompt_set(cfg.prompts, cfg.languages)
    names = check_model(cfg.models.dpo, "models.dpo")
    check_model(cfg.models.sft, "models.sft")
    if cfg.train.lora.enabled and names is not None:
        from .models import check_lora_targets

        check_lora_targets(list(cfg.train.lora.target_modules), names, f"models.dpo {cfg.models.dpo!r}")
    check_training_resources(cfg)
    template = cfg.models.chat_template
    if template and not is_template_text(template) and not Path(template).is_file():
        raise IcrError(f"models.chat_template: {template!r} is not a file (a value without {{{{ or {{% names a "
                       f".jinja file; a relative path is from {Path.cwd()})")
    tok_dpo = load_tokenizer(cfg.models.dpo, template, what="models.dpo")
    tok_sft = load_tokenizer(cfg.models.sft, template, what="models.sft")
    check_same_tokenizer(tok_dpo, tok_sft, cfg.models.dpo, cfg.models.sft)
    where = "models.chat_template" if template else f"models.dpo: the chat template of {cfg.models.dpo!r}"
    marker = "icr-preflight-instruction"
    try:
        rendered = tok_dpo.apply_chat_template(chat_messages(marker), add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja2's syntax/undefined/raised errors and transformers' own
        line = f" at line {e.lineno}" if getattr(e, "lineno", None) else ""
        raise IcrError(f"{where}: does not render a user message{line} ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]})") from None
    if marker not in str(rendered):
        raise IcrError(f"{where}: the rendered prompt does not contain the user's message (the template never "
                       "writes message['content'])")
    judge = make_judge(cfg) if uses_judge(cfg) else None
    from .evaluation.judges import AlpacaEvalJudge

    if isinstance(getattr(judge, "judge", None), AlpacaEvalJudge):  # inside the CachedJudge make_judge returns
        judge.judge.check_credentials()  # its annotators' API key (without judge_args base_url)
    if cfg.evaluation.enabled:
        from .evaluation.evaluate import load_evaluation_data
        from .evaluation.harness import check_harness
        from .evaluation.mt_bench import check_mt_bench

        prompts, references = load_evaluation_data(cfg, judge)
        if cfg.evaluation.lc_method == "alpaca_eval":
            from .evaluation.metrics import check_lc_data

            rows = prompts.as_rows()
            ids = {lang: [str(r["id"]) for r in rows[lang]] for lang in rows if references.get(lang)}
            if ids:  # LC is computed for the languages with references only
                check_lc_data(cfg.evaluation.lc_data_dir, ids)
        check_harness(cfg.evaluation.harness, cfg.languages)
        check_mt_bench(cfg)  # the question and judge-prompt files, and the grading server answers
    return judge


def check_backends(cfg: ExperimentConfig) -> None:
    """What the config asks for is installed or found (else it would fail mid-run): vllm for a vllm
    backend, the package of each report_to and train.report_to tracker, train.accelerate_config
    (a file or a shipped name, readable as a YAML mapping), deepspeed (importable, at least
    DEEPSPEED_FLOOR) when that config is a DeepSpeed one, no LoRA under ZeRO-3, train.optimizer's
    package and training path (check_optimizer), and the GPUs (check_gpu_count)."""
    import importlib.util

    from .generation.vllm import vllm_missing
    from .tracking import check_trackers

    check_trackers(cfg.report_to)
    if cfg.cluster.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise IcrError("cluster.backend: ray needs the ray package (pip install 'icr[ray]')")
    if cfg.device == "cuda" and cfg.cluster.backend == "local":  # on Ray the nodes have the GPUs, not the head
        import torch

        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise IcrError(f"device: cuda, but this machine has no usable GPU (torch {torch.__version__}, {built}; "
                           "CUDA_VISIBLE_DEVICES=" + os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>") +
                           "); use device: auto or cpu")

    for field, backend in (("generation.backend", cfg.generation.backend), ("reward.backend", cfg.reward.backend)):
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise vllm_missing(field)
    trackers = [name for name in cfg.train.report_to if name not in ("all", "none")]
    if trackers:
        from transformers.integrations import INTEGRATION_TO_CALLBACK

        # tracker -> the modules its transformers callback imports (any one of them will do)
        modules = {"wandb": ["wandb"], "tensorboard": ["tensorboard", "tensorboardX"], "comet_ml": ["comet_ml"],
                   "mlflow": ["mlflow"], "neptune": ["neptune"], "clearml": ["clearml"], "dagshub": ["dagshub"],
                   "codecarbon": ["codecarbon"], "dvclive": ["dvclive"], "flyte": ["flytekit"],
                   "azure_ml": ["azureml"], "swanlab": ["swanlab"], "trackio": ["trackio"]}
        for name in trackers:
            if name not in INTEGRATION_TO_CALLBACK:
                known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
                raise IcrError(f"train.report_to: unknown tracker {name!r} (transformers knows: {known})")
            needed = modules.get(name, [])
            if needed and all(importlib.util.find_spec(m) is None for m in needed):
                raise IcrError(f"train.report_to: {name} is not installed (pip install {needed[0]}), "
                               "or remove it from train.report_to")
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if cfg.train.lr_scheduler not in schedulers:
        raise IcrError(f"train.lr_scheduler: {cfg.train.lr_scheduler!r} is not a transformers scheduler "
                       f"({', '.join(schedulers)})")
    path, data = accelerate_config_data(cfg)
    check_optimizer(cfg, path, data)
    if data is not None and str(data.get("distributed_type", "")).upper() == "DEEPSPEED":
        check_deepspeed(path)
        stage = (data.get("deepspeed_config") or {}).get("zero_stage", 2)
        if cfg.train.lora.enabled and str(stage) == "3":
            raise IcrError(f"train.lora: merging LoRA adapters under DeepSpeed ZeRO-3 ({path}) is not supported "
                           "(training would fail when saving the model); use deepspeed_zero2, ddp or fsdp")
    check_gpu_count(cfg, path, data)


def bitsandbytes_floor() -> str:
    """The oldest bitsandbytes the installed transformers' Trainer accepts for its bitsandbytes
    optimizers (transformers' BITSANDBYTES_MIN_VERSION, 0.46.1 in 5.17 and 5.24): an older one
    raises ImportError when the Trainer creates the optimizer, hours into a run."""
    try:
        from transformers.utils.import_utils import BITSANDBYTES_MIN_VERSION

        return str(BITSANDBYTES_MIN_VERSION)
    except ImportError:
        return "0.46.1"


def bitsandbytes_installed() -> bool:
    """bitsandbytes is installed, at least `bitsandbytes_floor` (not imported: see check_optimizer)."""
    return package_version("bitsandbytes", bitsandbytes_floor())[0] == "ok"


def package_version(package: str, floor: str) -> tuple[str, str | None]:
    """(status, installed version) of `package`, found without importing it: "missing", "old" (below
    `floor`), "unknown" (found, but no readable version) or "ok"."""
    import importlib.metadata
    import importlib.util

    from packaging.version import InvalidVersion, Version

    if importlib.util.find_spec(package) is None:
        return "missing", None
    try:
        found = importlib.metadata.version(package)
        return ("old" if Version(found) < Version(floor) else "ok"), found
    except (importlib.metadata.PackageNotFoundError, InvalidVersion):
        return "unknown", None


def check_optimizer(cfg: ExperimentConfig, path: Path | None, data: dict | None) -> None:
    """train.optimizer adamw_bnb_8bit: in one process or DDP (DeepSpeed runs the optimizer itself: an
    optimizer block in its config replaces the Trainer's, ZeRO partitions and wraps any other;
    bitsandbytes' 8-bit update fails on FSDP2's DTensor parameters, measured on CPU with gloo, and
    FSDP1 is untested), with bitsandbytes installed, at least `bitsandbytes_floor`, and importable (in
    a child process, as deepspeed is checked)."""
    from .resources import EIGHT_BIT_OPTIMIZERS

    name = cfg.train.optimizer
    if name not in EIGHT_BIT_OPTIMIZERS:
        return
    kind = str((data or {}).get("distributed_type", "")).upper()
    if kind == "DEEPSPEED":
        raise IcrError(f"train.optimizer: {name} cannot run under DeepSpeed ({path}): DeepSpeed runs the optimizer "
                       "itself (an optimizer block in its config replaces the Trainer's; ZeRO wraps any other); use "
                       "adamw_torch_fused, and DeepSpeed's own savings (ZeRO-3, offload_optimizer_device: cpu), or "
                       "train.accelerate_config: ddp with the 8-bit optimizer")
    if kind == "FSDP":
        raise IcrError(f"train.optimizer: {name} cannot run under FSDP ({path}): bitsandbytes' 8-bit update fails on "
                       "FSDP2's sharded (DTensor) parameters (FSDP1: untested); use adamw_torch_fused with FSDP, or "
                       "train.accelerate_config: ddp with the 8-bit optimizer")
    if not bitsandbytes_installed():
        raise IcrError(f"train.optimizer: {name} needs bitsandbytes >= {bitsandbytes_floor()}: pip install -U "
                       f"'bitsandbytes>={bitsandbytes_floor()}' (on every training machine), or set train.optimizer "
                       "to adamw_torch_fused")
    from .launch import import_error

    error = import_error("bitsandbytes", timeout=600)
    if error is not None:
        raise IcrError(f"train.optimizer: {name} needs bitsandbytes, which does not import ({error}); reinstall it, "
                       "or set train.optimizer to adamw_torch_fused")


def accelerate_config_data(cfg: ExperimentConfig) -> tuple[Path | None, dict | None]:
    """(path, parsed YAML) of train.accelerate_config, or (None, None) when it is not set."""
    if not cfg.train.accelerate_config:
        return None, None
    from .train_launch import resolve_accelerate_config

    path = resolve_accelerate_config(cfg.train.accelerate_config)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise IcrError(f"train.accelerate_config: cannot read {path} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise IcrError(f"train.accelerate_config: {path} is not an accelerate config (expected a YAML mapping)")
    return path, data


# The oldest deepspeed the installed stack runs with: accelerate 1.16's Accelerator refuses older ones
# on CUDA ("DeepSpeed version must be >= 0.9.3", accelerator.py; 0.14.3 on MUSA, 0.15.2 on MLU), and
# transformers' dependency table (dependency_versions_table.py) asks the same; the higher of this and
# the installed transformers' entry is used. (TRL 1.16's optional extra trl[deepspeed] declares
# deepspeed>=0.18.6, but nothing refuses an older one at run time, so that is not enforced.)
DEEPSPEED_FLOOR = "0.9.3"


def check_deepspeed(path: Path) -> None:
    """A DeepSpeed accelerate config: deepspeed is installed, at least DEEPSPEED_FLOOR, and imports
    (in a child process: importing it takes seconds and logs its accelerator; its failure here
    would otherwise come from `accelerate launch` after sampling and scoring)."""
    where = f"train.accelerate_config: {path} is a DeepSpeed config (distributed_type: DEEPSPEED)"
    status, found = package_version("deepspeed", deepspeed_floor())
    if status == "missing":
        raise IcrError(f"{where}, but deepspeed is not installed: pip install 'deepspeed>={deepspeed_floor()}' "
                       "(on every training machine), or set train.accelerate_config to fsdp or ddp")
    found = found or "of unknown version"
    if status == "old":
        raise IcrError(f"{where}, but deepspeed {found} is installed and accelerate needs >= {deepspeed_floor()}: "
                       f"pip install -U 'deepspeed>={deepspeed_floor()}'")
    from .launch import import_error

    error = import_error("deepspeed", timeout=600)
    if error is not None:
        raise IcrError(f"{where}, but deepspeed {found} does not import ({error}); "
                       "reinstall it, or set train.accelerate_config to fsdp or ddp")


def deepspeed_floor() -> str:
    """DEEPSPEED_FLOOR, or the installed transformers' own floor if higher."""
    from packaging.version import Version

    floor = DEEPSPEED_FLOOR
    try:
        from transformers.dependency_versions_table import deps

        theirs = re.sub(r"^deepspeed\s*>=\s*", "", deps.get("deepspeed", ""))
        if theirs and Version(theirs) > Version(floor):
            floor = theirs
    except Exception:  # noqa: BLE001 - a table of another shape: keep accelerate's floor
        pass
    return floor


def training_device(cfg: ExperimentConfig) -> str | None:
    """Where training runs as seen from this machine: cuda or cpu; None under Ray (the nodes'
    GPUs, not this machine's)."""
    if cfg.cluster.backend != "local":
        return None
    if cfg.device == "cpu":
        return "cpu"
    import torch

    return "cuda" if cfg.device == "cuda" or torch.cuda.is_available() else "cpu"


def _launch_arg(name: str) -> int | None:
    """An integer `--name N` / `--name=N` of ICR_ACCELERATE_ARGS (they override the config file)."""
    import shlex

    args = shlex.split(os.environ.get("ICR_ACCELERATE_ARGS", ""))
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in (f"--{name}", f"--{name.replace('_', '-')}"):
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            try:
                return int(value)
            except ValueError:
                raise IcrError(f"ICR_ACCELERATE_ARGS: --{name} must be an integer, got {value!r}") from None
    return None


def launch_processes(data: dict | None) -> tuple[int, int]:
    """(processes in all, machines) of launched training: the accelerate config's num_processes and
    num_machines, overridden by ICR_ACCELERATE_ARGS; (1, 1) without an accelerate config."""
    if data is None:
        return 1, 1
    try:
        total = _launch_arg("num_processes") or int(data.get("num_processes") or 1)
        machines = _launch_arg("num_machines") or int(data.get("num_machines") or 1)
    except (TypeError, ValueError):
        raise IcrError("train.accelerate_config: num_processes and num_machines must be integers") from None
    return max(1, total), max(1, machines)


def check_gpu_count(cfg: ExperimentConfig, path: Path | None, data: dict | None) -> None:
    """Training on GPUs (device cuda, or auto with a GPU; not under Ray) has a GPU per process on
    this machine: the accelerate config's num_processes / num_machines (ICR_ACCELERATE_ARGS
    overriding) at most the GPUs visible (torch.cuda.device_count(), which CUDA_VISIBLE_DEVICES
    limits) or listed in its gpu_ids; without an accelerate config, one process that sees one GPU
    (icr.train.check_one_device_per_process, which the train stage would raise)."""
    if training_device(cfg) != "cuda" or (data is not None and str(data.get("use_cpu", False)).lower() == "true"):
        return
    import torch

    visible = torch.cuda.device_count()
    shown = f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}"
    if data is None:
        from .train import check_one_device_per_process

        check_one_device_per_process("cuda", visible, 1)
        return
    total, machines = launch_processes(data)
    here = -(-total // machines)
    gpu_ids = str(data.get("gpu_ids", "all") if data.get("gpu_ids") is not None else "all").strip()
    available = visible
    if gpu_ids.lower() != "all" and gpu_ids:
        ids = [i.strip() for i in gpu_ids.split(",") if i.strip()]
        bad = [i for i in ids if not i.isdigit() or int(i) >= visible]
        if bad:
            raise IcrError(f"train.accelerate_config: {path} lists gpu_ids {gpu_ids}, but GPU {bad[0]} is not one of "
                           f"the {visible} visible ({shown}); set gpu_ids: all or ids below {visible}")
        available = len(ids)
    if here > available:
        of = f"num_processes {total}" + (f" / num_machines {machines}" if machines > 1 else "")
        fix = max(1, available) * machines
        raise IcrError(f"train.accelerate_config: {path} starts {here} training processes on this machine ({of}) "
                       f"but {available} GPU(s) are {'listed in gpu_ids' if available != visible else 'visible'} "
                       f"({shown}); set num_processes: {fix} in a copy of the config, or --num_processes {fix} in "
                       "ICR_ACCELERATE_ARGS, or make more GPUs visible")


def check_training_resources(cfg: ExperimentConfig) -> None:
    """Before anything is loaded: the GPU memory and disk training needs (icr.resources, from the
    shapes of models.dpo, the policy every iteration trains), refused with the numbers and what to
    set. GPU memory is compared when training runs on this machine's GPUs (per process: the
    smallest GPU it may get); disk: every iteration model not saved yet (main run and controls)
    and one resume checkpoint, against the free space of the run folder's file system."""
    import shutil

    from .resources import (checkpoint_bytes, fp32_state_count, gib, layout_from_accelerate, lora_parameter_count,
                            model_shapes, parameter_count, saved_model_bytes)

    shapes = model_shapes(cfg.models.dpo)
    if not shapes:
        return
    lora = cfg.train.lora
    params = parameter_count(shapes)
    trained = lora_parameter_count(shapes, list(lora.target_modules), lora.r) if lora.enabled \
        else parameter_count(shapes, skip=list(cfg.train.freeze))
    fp32_state = 0 if lora.enabled else fp32_state_count(shapes, skip=list(cfg.train.freeze))
    path, data = accelerate_config_data(cfg)
    total, machines = launch_processes(data)
    layout = layout_from_accelerate(data, total)
    device = training_device(cfg)
    what = f"models.dpo {cfg.models.dpo!r}: {params / 1e9:.2f}e9 parameters"
    if device == "cuda":
        check_gpu_memory(cfg, path, layout, -(-total // machines), shapes, params, trained, what, fp32_state)

    model = saved_model_bytes(params, cfg.train.save_dtype)
    checkpoint = checkpoint_bytes(params, layout, trained=trained, lora=lora.enabled, device=device or "cuda",
                                  optimizer=cfg.train.optimizer, fp32_state=fp32_state)
    folders = [cfg.run_dir] + [cfg.run_dir / "controls" / c["label"] for c in cfg.controls
                               if isinstance(c, dict) and isinstance(c.get("label"), str)]
    models = sum(not (folder / f"iter{t}" / "model").is_dir() for folder in folders
                 for t in range(1, cfg.iterations + 1))
    if not models:
        return
    needed = models * model + checkpoint
    probe = cfg.run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise IcrError(f"run_root: training needs at least {gib(needed)} of disk ({models} iteration model(s) of "
                       f"{gib(model)} + a resume checkpoint of {gib(checkpoint)}, weights and optimizer state; {what}) "
                       f"but {probe} has {gib(free)} free; free space there or set run_root to a larger disk")


def check_gpu_memory(cfg: ExperimentConfig, path: Path | None, layout, here: int, shapes: dict, params: int,
                     trained: int, what: str, fp32_state: int) -> None:
    """The model states of one training process (icr.resources.training_memory, with train.optimizer)
    fit the smallest of the `here` GPUs this machine's processes get; else one line with the estimate,
    and what to set with the estimate under it (`memory_options`)."""
    import torch

    from .resources import gib, training_memory

    visible = torch.cuda.device_count()
    if visible < 1:
        return
    here = min(visible, max(1, here))
    gpus = [torch.cuda.get_device_properties(i) for i in range(here)]
    smallest = min(range(here), key=lambda i: gpus[i].total_memory)
    capacity = gpus[smallest].total_memory
    need = training_memory(params, layout, trained=trained, lora=cfg.train.lora.enabled,
                           optimizer=cfg.train.optimizer, fp32_state=fp32_state)
    if need.total <= capacity:
        return
    options = memory_options(cfg, layout, visible, shapes, params, trained, fp32_state)
    fits = [f"{name} (~{gib(b)})" for name, b in options if b <= capacity]
    other = [f"{name} (~{gib(b)}, still too much)" for name, b in options if b > capacity]
    advice = ("set " + " or ".join(fits)) if fits else \
        ("none of " + "; ".join(other) + " fits: " if other else "") + "use more or larger GPUs or a smaller model"
    field = "train.accelerate_config" if path is not None else "train"
    raise IcrError(f"{field}: training needs ~{gib(need.total)} of GPU memory per process before activations "
                   f"({need.describe()}; {layout.describe()}; {what}) but GPU {smallest} "
                   f"({gpus[smallest].name}) has {gib(capacity)}; {advice}")


def memory_options(cfg: ExperimentConfig, layout, visible: int, shapes: dict, params: int, trained: int,
                   fp32_state: int) -> list[tuple[str, float]]:
    """(what to set, bytes per process with it) for a training that does not fit: ZeRO-3 (FSDP without
    deepspeed) over the `visible` GPUs, LoRA, CPU offload of the sharded layouts, and
    train.optimizer adamw_bnb_8bit in one process or DDP when bitsandbytes is installed
    (`bitsandbytes_installed`) and the optimizer is not 8-bit already. Each other than the 8-bit one
    keeps train.optimizer as it is."""
    import importlib.util

    from .resources import EIGHT_BIT_OPTIMIZERS, Layout, lora_parameter_count, training_memory

    lora, optimizer = cfg.train.lora.enabled, cfg.train.optimizer
    n = max(layout.processes, visible)
    sharded = "deepspeed_zero3" if importlib.util.find_spec("deepspeed") is not None else "fsdp"
    options = []
    if not (layout.kind == "deepspeed" and layout.zero_stage == 3 or layout.kind == "fsdp" and layout.shard_weights) \
            or n > layout.processes:
        shard = Layout("deepspeed", n, zero_stage=3) if sharded == "deepspeed_zero3" else Layout("fsdp", n)
        options.append((f"train.accelerate_config: {sharded} on {n} GPU(s)" +
                        (" with train.optimizer: adamw_torch_fused" if optimizer in EIGHT_BIT_OPTIMIZERS else ""),
                        training_memory(params, shard, trained=trained, lora=lora).total))
    if not lora:
        adapters = lora_parameter_count(shapes, list(cfg.train.lora.target_modules), cfg.train.lora.r)
        base = Layout("deepspeed", layout.processes, zero_stage=2) \
            if layout.kind == "deepspeed" and layout.zero_stage == 3 else layout
        options.append(("train.lora.enabled: true" + (" with deepspeed_zero2" if base is not layout else ""),
                        training_memory(params, base, trained=adapters, lora=True, optimizer=optimizer).total))
    offloaded_all = layout.offload_optimizer and (layout.offload_params or layout.zero_stage < 3)
    if layout.kind == "deepspeed" and not offloaded_all:
        offloaded = Layout("deepspeed", layout.processes, zero_stage=layout.zero_stage, offload_optimizer=True,
                           offload_params=layout.zero_stage == 3)
        keys = "offload_optimizer_device: cpu" + (" and offload_param_device: cpu" if layout.zero_stage == 3 else "")
        options.append((f"{keys} in a copy of the accelerate config",
                        training_memory(params, offloaded, trained=trained, lora=lora).total))
    elif layout.kind == "fsdp" and not layout.offload_params:
        offloaded = Layout("fsdp", layout.processes, shard_weights=layout.shard_weights,
                           shard_states=layout.shard_states, offload_params=True, offload_optimizer=True)
        options.append(("fsdp_offload_params: true in a copy of the accelerate config",
                        training_memory(params, offloaded, trained=trained, lora=lora).total))
    if layout.kind in ("single", "ddp") and optimizer not in EIGHT_BIT_OPTIMIZERS and bitsandbytes_installed():
        options.append(("train.optimizer: adamw_bnb_8bit", training_memory(
            params, layout, trained=trained, lora=lora, optimizer="adamw_bnb_8bit",
            fp32_state=0 if lora else fp32_state).total))
    return options


def check_run_root(cfg: ExperimentConfig) -> None:
    """The run folder can be made: `run_root` is a folder (or can become one) we may write in."""
    import os

    existing = cfg.run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise IcrError(f"run_root: {existing} is a file, not a folder (run folder {cfg.run_dir})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise IcrError(f"run_root: cannot write in {existing} (permission denied); set run_root to a writable folder")
