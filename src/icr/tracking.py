"""Run-level tracking (`report_to`): what a run did, iteration by iteration, in a tracker.

`report_to: [tensorboard]` (or wandb, trackio; `[]` or `[none]` = off) makes `icr run` send, with
the iteration as the step (pi_SFT's evaluation at -1, pi0's at 0):

    <stage>/<count>, <stage>/seconds    every stage's counts and seconds, as its manifest records
                                        them (generate/samples, score/scored, train/steps, ...)
    pairs/<lang>/{alpha,pairs,chosen_length,rejected_length,chosen_fidelity,candidate_fidelity}
    agreement/<lang>/<kind>             the reward's agreement with the judge (kind "all", ...)
    eval/<model>/<lang>/{win_rate,win_rate_se,lc_win_rate,fidelity,mean_length}
    eval/<model>/avg/{win_rate,lc_win_rate}   averaged as report.md averages them
    eval/<model>/<lang>/<task>/<metric> the alignment-tax benchmarks (evaluation.harness)

A control's scalars carry its label first (`random-pairs/pairs/es/alpha`); its models are named
as in results.json (`eval/M1-random-pairs/es/win_rate`). `train/mean_loss` is the stage's mean
training loss (TRL's `train_loss`, renamed so it is not drawn over the Trainer's own curve).

Backends, each the library's own writer, imported only when asked for:
- tensorboard: `torch.utils.tensorboard.SummaryWriter` into `runs/<name>/tracking/` (kept with the
  run; `tensorboard --logdir runs/<name>/tracking`). The training losses step by step come from
  the Trainer's own TensorBoard callback, pointed at `tracking/train-iter<t>/`
  (`tracking/train-<label>-iter<t>/` for a control) by transformers' TENSORBOARD_LOGGING_DIR, so
  they are no longer deleted with the checkpoints. With the run-level tensorboard on,
  `train.report_to: [tensorboard]` adds nothing (the same writer); `train.report_to` keeps every
  other Trainer integration as it was (e.g. wandb: one W&B run per training).
- wandb: one W&B run per run folder, named after the run; its id is kept in
  `tracking/wandb-run.json`, so a resumed `icr run` continues it. Offline: `WANDB_MODE=offline`
  (wandb's own variable; the run lands in `tracking/wandb/`, `wandb sync` uploads it later);
  project `icr`, or `WANDB_PROJECT`. Scalars are drawn against `iteration` (`define_metric`).
- trackio: `trackio.init(project="icr", name=<run name>-<start time>, resume="allow")`, the name
  kept in `tracking/trackio-run.json`; `trackio.log(scalars, step=iteration)`.

Resume: a point is sent once per tracker. `tracking/logged.json` records, per tracker, the value
sent for each (tag, step); a resumed run sends a skipped stage's recorded counts and seconds (its
manifest's, so the same values as when it ran) only where that tracker has not received them, and
re-evaluated models (answers and judgements reused) send nothing new. So a tracker added to a
half-finished run receives its past (not the step-by-step losses of trainings already done: those
were the Trainer's to log), and no tracker gets a point twice; a
value that changed (a stage recomputed after its folder was deleted) is sent again at its step
(tensorboard then shows the newer one). The Trainer's own losses are not in the ledger: a training
resumed from a checkpoint logs again from that checkpoint's step, which tensorboard treats as a
restart (points at and after that step are replaced).

Nothing here writes outside `tracking/` (and the trackers' own folders): no stage output or
manifest depends on it, and changing `report_to` alone does not ask for a new run folder
(icr.loop.PLACEMENT_FIELDS).

What is written here, and why: the mapping from icr's own records (manifests, pairs/stats.json,
the agreement files, results rows) to named scalars, and the ledger, since no tracker knows which
of a resumed run's stages it has already seen; the writing itself is each library's. Tested: the
tensorboard path end to end (tests/test_tracking.py), wandb 0.31 offline (a test that runs where
wandb is installed; not in the dev extra); trackio only as written against its documented API
(init/log/finish, `resume="allow"`), not run here (it pulls gradio).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

from .errors import IcrError
from .runs import read_json, write_json

# name -> (module imported, package to install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio")}
OFF = "none"
# Set around the train stage when the run-level tensorboard is on: the folder its losses go to.
# train.dpo_config then adds tensorboard to the Trainer's report_to and points transformers' own
# TENSORBOARD_LOGGING_DIR there (training_report_to). Child processes inherit it.
TRAIN_TENSORBOARD_ENV = "ICR_TRAIN_TENSORBOARD_DIR"


def report_to_problems(report_to) -> list[str]:
    """What is wrong with a `report_to` list, as config errors (empty when nothing)."""
    if not isinstance(report_to, list) or any(not isinstance(n, str) for n in report_to):
        return [f"report_to: expected a list of tracker names (e.g. [tensorboard]), got {report_to!r}"]
    problems = [f"report_to: unknown tracker {n!r} ({', '.join(TRACKERS)}, or none)"
                for n in report_to if n not in TRACKERS and n != OFF]
    if OFF in report_to and len(report_to) > 1:
        problems.append(f"report_to: 'none' together with trackers ({report_to!r}); use [] or [none] for off")
    if len(set(report_to)) != len(report_to):
        problems.append(f"report_to: a tracker named twice ({report_to!r})")
    return problems


def active_trackers(report_to) -> list[str]:
    return [name for name in report_to if name != OFF]


def check_trackers(report_to) -> None:
    """IcrError in one line for the first tracker whose package is not installed (found before any
    stage runs: `icr.loop.check_backends`)."""
    import importlib.util

    for name in active_trackers(report_to):
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            extra = " (or pip install 'icr[track]')" if name == "tensorboard" else ""
            raise IcrError(f"report_to: {name} is not installed (pip install {package}){extra}, "
                           "or remove it from report_to")


def training_report_to(report_to: list) -> list | str:
    """The Trainer's report_to for `train.report_to`: as given, plus tensorboard when the run-level
    tensorboard asked for the training losses (TRAIN_TENSORBOARD_ENV set, in whichever process
    trains: a child, a rank under accelerate, a Ray task, which forwards ICR_* variables); its
    callback is then pointed there through TENSORBOARD_LOGGING_DIR, read when the Trainer is built."""
    names = [n for n in report_to if n != OFF]
    folder = os.environ.get(TRAIN_TENSORBOARD_ENV)
    if folder:
        os.environ["TENSORBOARD_LOGGING_DIR"] = folder
        if "tensorboard" not in names and "all" not in names:
            names.append("tensorboard")
    return names or "none"


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def stage_scalars(stage: str, result: dict, folder: Path) -> dict[str, float]:
    """A stage's counts and seconds as its manifest records them: the same values whether the stage
    ran now, was skipped (recorded by the invocation that ran it) or lent by the main run (a
    control's). The seconds are the stage's own (the manifest's); timings.json's also count
    process starts."""
    manifest = folder / "manifest.json"
    recorded = read_json(manifest) if manifest.is_file() else {}
    counts = dict(recorded.get("counts") or ({} if result.get("skipped") or result.get("reused") else result))
    seconds = recorded.get("seconds")
    if stage == "pairs":  # per language from stats.json (pair_scalars), not pairs_<lang>
        counts = {k: v for k, v in counts.items() if not k.startswith("pairs_")}
    if stage == "train" and "train_loss" in counts:
        counts["mean_loss"] = counts.pop("train_loss")
    out = {f"{stage}/{k}": v for k, v in ((k, _number(v)) for k, v in counts.items()) if v is not None}
    if _number(seconds) is not None:
        out[f"{stage}/seconds"] = float(seconds)
    return out


PAIR_STATS = {"alpha": "alpha", "n_pairs": "pairs", "chosen_len_mean": "chosen_length",
              "rejected_len_mean": "rejected_length", "chosen_fidelity": "chosen_fidelity",
              "candidate_fidelity": "candidate_fidelity", "n_prompts": "prompts"}


def pair_scalars(stats: dict) -> dict[str, float]:
    """Per language: alpha, pairs, mean chosen/rejected length (characters), fidelity (pairs/stats.json)."""
    out = {}
    for lang, st in (stats.get("per_language") or {}).items():
        for key, name in PAIR_STATS.items():
            if (value := _number(st.get(key))) is not None:
                out[f"pairs/{lang}/{name}"] = value
    return out


def agreement_scalars(agreement: dict) -> dict[str, float]:
    """`{lang: {kind: {agree, n}}}` (icr.diagnostics.reward_agreement) as agreement/<lang>/<kind>."""
    out = {}
    for lang, kinds in agreement.items():
        for kind, v in kinds.items():
            out[f"agreement/{lang}/{kind}"] = float(v["agree"])
            out[f"agreement/{lang}/{kind}_pairs"] = float(v["n"])
    return out


JUDGE_FIELDS = {"wr": "win_rate", "wr_se": "win_rate_se", "lc": "lc_win_rate", "fidelity": "fidelity",
                "mean_len": "mean_length"}


def evaluation_scalars(rows: list[dict]) -> dict[int, dict[str, float]]:
    """{iteration: scalars} of results rows: win rates per model and language, their average (over
    the languages with a length-controlled rate when some have one, as report.md), harness metrics."""
    out: dict[int, dict[str, float]] = {}
    judged: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        scalars = out.setdefault(row["iteration"], {})
        if row.get("kind") == "harness":
            if (value := _number(row["value"])) is not None:
                scalars[f"eval/{row['model']}/{row['lang']}/{row['task']}/{row['metric']}"] = value
            continue
        judged.setdefault((row["model"], row["iteration"]), []).append(row)
        for field, name in JUDGE_FIELDS.items():
            if (value := _number(row.get(field))) is not None:
                scalars[f"eval/{row['model']}/{row['lang']}/{name}"] = value
    for (model, t), have in judged.items():
        averaged = [r for r in have if r["lc"] is not None] or have
        out[t][f"eval/{model}/avg/win_rate"] = sum(r["wr"] for r in averaged) / len(averaged)
        if all(r["lc"] is not None for r in averaged):
            out[t][f"eval/{model}/avg/lc_win_rate"] = sum(r["lc"] for r in averaged) / len(averaged)
    return out


# ---------------------------------------------------------------------------------------------
# The backends: each the library's own writer
# ---------------------------------------------------------------------------------------------

class TensorboardSink:
    def __init__(self, cfg, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # visible to a running tensorboard at once

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, cfg, folder: Path):
        import wandb

        state = folder / "wandb-run.json"
        run_id = read_json(state)["id"] if state.is_file() else None  # None: wandb makes one, kept below
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "icr", name=cfg.name, id=run_id,
                              resume="allow", dir=str(folder), config=cfg.to_dict())
        write_json(state, {"id": self.run.id})
        self.run.define_metric("iteration")
        self.defined: set[str] = set()

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag in scalars.keys() - self.defined:  # per key, not "*": the Trainer's wandb callback defines its own
            self.run.define_metric(tag, step_metric="iteration")
            self.defined.add(tag)
        self.run.log({**scalars, "iteration": step})

    def close(self) -> None:
        self.run.finish()


class TrackioSink:
    def __init__(self, cfg, folder: Path):
        import trackio

        state = folder / "trackio-run.json"
        name = read_json(state)["name"] if state.is_file() else f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run = trackio.init(project="icr", name=name, config=cfg.to_dict(), resume="allow")
        write_json(state, {"name": name})

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorboardSink, "wandb": WandbSink, "trackio": TrackioSink}


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


class Tracker:
    """The run's trackers (`open_tracker`): `log(step, scalars)` sends what each has not had yet."""

    def __init__(self, cfg, run_dir: Path):
        self.folder = Path(run_dir) / "tracking"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ledger_path = self.folder / "logged.json"
        self.ledger: dict[str, dict[str, float]] = read_json(self.ledger_path) if self.ledger_path.is_file() else {}
        self.sinks: dict = {}
        try:
            for name in active_trackers(cfg.report_to):
                self.sinks[name] = SINKS[name](cfg, self.folder)
        except BaseException:
            self.close()
            raise

    def log(self, step: int, scalars: dict[str, float], label: str | None = None) -> None:
        prefix = f"{label}/" if label else ""
        scalars = {prefix + tag: v for tag, v in scalars.items()}
        for name, sink in self.sinks.items():
            sent = self.ledger.setdefault(name, {})
            new = {tag: v for tag, v in scalars.items()
                   if f"{tag}@{step}" not in sent or not _same(sent[f"{tag}@{step}"], v)}
            if new:
                sink.log(new, step)
                sent.update({f"{tag}@{step}": v for tag, v in new.items()})
                write_json(self.ledger_path, self.ledger)

    def stage(self, t: int, stage: str, result: dict, folder: Path, label: str | None = None) -> None:
        scalars = stage_scalars(stage, result, folder)
        if stage == "pairs" and (folder / "stats.json").is_file():
            scalars.update(pair_scalars(read_json(folder / "stats.json")))
        self.log(t, scalars, label)

    def evaluation(self, rows: list[dict]) -> None:
        for t, scalars in evaluation_scalars(rows).items():
            self.log(t, scalars)

    @contextlib.contextmanager
    def training(self, t: int, label: str | None = None):
        """Around the train stage: the Trainer's losses into tracking/train-[<label>-]iter<t>/ when
        tensorboard is on (TRAIN_TENSORBOARD_ENV, inherited by the training process, where
        training_report_to sets TENSORBOARD_LOGGING_DIR; both are as before afterwards)."""
        if "tensorboard" not in self.sinks:
            yield
            return
        folder = self.folder / f"train-{label + '-' if label else ''}iter{t}"
        old = {n: os.environ.get(n) for n in (TRAIN_TENSORBOARD_ENV, "TENSORBOARD_LOGGING_DIR")}
        os.environ[TRAIN_TENSORBOARD_ENV] = str(folder)
        try:
            yield
        finally:
            for n, v in old.items():
                if v is None:
                    os.environ.pop(n, None)
                else:
                    os.environ[n] = v

    def agreement(self, t: int, path: Path, label: str | None = None) -> None:
        """diagnostics/reward_agreement_iter<t>.json (icr.loop._agreement) as agreement/<lang>/<kind>."""
        self.log(t, agreement_scalars(read_json(path)["agreement"]), label)

    def close(self) -> None:
        """Close every backend (all of them, even when one fails; the first failure is raised)."""
        sinks, self.sinks = self.sinks, {}
        failed = []
        for sink in sinks.values():
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - the others are closed all the same
                failed.append(e)
        if failed:
            raise failed[0]


@contextlib.contextmanager
def open_tracker(cfg, run_dir: Path):
    """The run's Tracker while the run lasts (None when report_to is off); closed at the end and on error."""
    if not active_trackers(cfg.report_to):
        yield None
        return
    tracker = Tracker(cfg, run_dir)
    try:
        yield tracker
    finally:
        tracker.close()
