"""Run-level tracking (`report_to`, icr.tracking): the tiny loop with evaluation writes tensorboard
event files under runs/<name>/tracking/ holding the win rates, pair statistics, reward agreement,
stage counts and the training loss; a resume sends nothing twice; bad names and missing packages
are one-line errors before any stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"
EVALUATION = ["--set", "iterations=1", "--set", "evaluation.enabled=true", "--set", "evaluation.judge=fake",
              "--set", "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl",
              "--set", "evaluation.max_new_tokens=16", "--set", "evaluation.reward_agreement=true",
              "--set", "controls=[{label: random-pairs, overrides: {pairs: {selection: random}}}]"]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the event files in `folder`, read as tensorboard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_points(folder: Path) -> dict[str, list[int]]:
    """{tag: [step, ...]} of every scalar written to `folder`'s event files, duplicates kept (the
    accumulator would fold a repeated step)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points: dict[str, list[int]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                points.setdefault(value.tag, []).append(event.step)
    return points


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    from icr.cli import main

    root = tmp_path_factory.mktemp("runs")
    assert main(["run", str(TINY), "--set", f"run_root={root}", "-q", *EVALUATION,
                 "--set", "report_to=[tensorboard]"]) == 0
    return root / "tiny"


@pytest.mark.slow
def test_event_files_hold_win_rates_pair_statistics_and_training_loss(tracked_run):
    run = tracked_run
    scalars = _scalars(run / "tracking")
    rows = json.loads((run / "results.json").read_text())
    assert {(r["model"], r["lang"]) for r in rows} == {(m, lang) for m in ("sft", "M0", "M1", "M1-random-pairs")
                                                     for lang in ("en", "es", "de")}
    for row in rows:  # every win rate per language and model, at its iteration, as results.json has it
        assert scalars[f"eval/{row['model']}/{row['lang']}/win_rate"] == [(row["iteration"], pytest.approx(row["wr"]))]
        lc = scalars.get(f"eval/{row['model']}/{row['lang']}/lc_win_rate")
        assert lc == (None if row["lc"] is None else [(row["iteration"], pytest.approx(row["lc"]))])
    m1 = [r for r in rows if r["model"] == "M1"]
    assert scalars["eval/M1/avg/win_rate"] == [(1, pytest.approx(sum(r["wr"] for r in m1) / 3))]
    stats = json.loads((run / "iter1/pairs/stats.json").read_text())["per_language"]
    for lang, st in stats.items():
        assert scalars[f"pairs/{lang}/alpha"] == [(1, pytest.approx(st["alpha"]))]
        assert scalars[f"pairs/{lang}/pairs"] == [(1, st["n_pairs"])]
        assert scalars[f"pairs/{lang}/chosen_length"] == [(1, pytest.approx(st["chosen_len_mean"]))]
        assert scalars[f"pairs/{lang}/candidate_fidelity"] == [(1, pytest.approx(st["candidate_fidelity"]))]
    generate = json.loads((run / "iter1/generate/manifest.json").read_text())
    assert scalars["generate/samples"] == [(1, generate["counts"]["samples"])]
    for stage in ("generate", "score", "pairs", "train"):
        seconds = json.loads((run / f"iter1/{stage}/manifest.json").read_text())["seconds"]
        assert scalars[f"{stage}/seconds"] == [(1, pytest.approx(seconds))]
    train = json.loads((run / "iter1/train/manifest.json").read_text())["counts"]
    assert scalars["train/steps"] == [(1, train["steps"])]
    assert scalars["train/mean_loss"] == [(1, pytest.approx(train["train_loss"]))]
    agreement = json.loads((run / "diagnostics/reward_agreement_iter1.json").read_text())["agreement"]
    assert set(agreement) == {"en", "es", "de"}
    for lang, kinds in agreement.items():
        assert scalars[f"agreement/{lang}/all"] == [(1, pytest.approx(kinds["all"]["agree"]))]
    # the Trainer's own losses, step by step, kept in the run folder (the checkpoints are gone)
    losses = _scalars(run / "tracking" / "train-iter1")["train/loss"]
    assert len(losses) >= 2 and [s for s, _ in losses] == sorted(s for s, _ in losses)
    assert not (run / "iter1/train/checkpoints").exists()
    # a control: its stages under its label, its training losses in their own folder
    control = json.loads((run / "controls/random-pairs/iter1/pairs/stats.json").read_text())["per_language"]
    assert scalars["random-pairs/pairs/es/pairs"] == [(1, control["es"]["n_pairs"])]
    assert scalars["random-pairs/generate/samples"] == scalars["generate/samples"]
    assert "train/loss" in _scalars(run / "tracking" / "train-random-pairs-iter1")
    assert not list((run / "iter1").rglob("events.out.tfevents.*"))
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # set for the train stage only


@pytest.mark.slow
def test_a_resumed_run_sends_no_point_twice(tracked_run, cli):
    run = tracked_run
    before = _raw_points(run / "tracking")
    manifests = {p: p.read_bytes() for p in run.glob("iter1/*/manifest.json")}
    code, _, err = cli("run", TINY, "--set", f"run_root={run.parent}", *EVALUATION, "--set", "report_to=[tensorboard]")
    assert code == 0, err
    assert err.count("skipped (manifest matches)") == 8
    after = _raw_points(run / "tracking")
    assert after == before and all(len(steps) == len(set(steps)) for steps in after.values())
    # A tracker added later (report_to alone changed: the same run folder) receives the recorded past:
    # the ledger says what tensorboard has, so nothing is sent to it again.
    ledger = json.loads((run / "tracking/logged.json").read_text())
    assert ledger["tensorboard"]["pairs/es/alpha@1"] == _scalars(run / "tracking")["pairs/es/alpha"][0][1]
    code, _, err = cli("run", TINY, "--set", f"run_root={run.parent}", *EVALUATION, "--set", "report_to=[]")
    assert code == 0 and err.count("skipped (manifest matches)") == 8, err
    assert _raw_points(run / "tracking") == before
    assert {p: p.read_bytes() for p in run.glob("iter1/*/manifest.json")} == manifests


def test_skipped_stage_sends_its_recorded_counts_once(tmp_path):
    """Unit: a skipped stage's scalars come from its manifest; the ledger keeps them from being sent twice."""
    from icr.config import load_config
    from icr.runs import write_json
    from icr.tracking import SINKS, Tracker

    sent = []

    class Recorder:
        def __init__(self, cfg, folder):
            pass

        def log(self, scalars, step):
            sent.append((step, dict(scalars)))

        def close(self):
            sent.append("closed")

    stage = tmp_path / "iter1" / "generate"
    write_json(stage / "manifest.json", {"key": {}, "counts": {"samples": 48, "prompts": 12}, "seconds": 3.5})
    cfg = load_config(TINY, [f"run_root={tmp_path}", "report_to=[tensorboard]"])
    old = SINKS["tensorboard"]
    SINKS["tensorboard"] = Recorder
    try:
        tracker = Tracker(cfg, tmp_path)
        tracker.stage(1, "generate", {"skipped": True}, stage)
        tracker.stage(1, "generate", {"skipped": True}, stage)
        tracker.stage(1, "generate", {"skipped": True}, stage, label="ctl")
        tracker.close()
    finally:
        SINKS["tensorboard"] = old
    assert sent == [(1, {"generate/samples": 48.0, "generate/prompts": 12.0, "generate/seconds": 3.5}),
                    (1, {"ctl/generate/samples": 48.0, "ctl/generate/prompts": 12.0, "ctl/generate/seconds": 3.5}),
                    "closed"]


def test_tracker_is_closed_when_the_run_fails(tmp_path):
    from icr.config import load_config
    from icr.tracking import SINKS, open_tracker

    closed = []

    class Sink:
        def __init__(self, cfg, folder):
            pass

        def log(self, scalars, step):
            pass

        def close(self):
            closed.append(True)

    cfg = load_config(TINY, [f"run_root={tmp_path}", "report_to=[tensorboard]"])
    old = SINKS["tensorboard"]
    SINKS["tensorboard"] = Sink
    try:
        with pytest.raises(RuntimeError, match="stage failed"), open_tracker(cfg, tmp_path):
            raise RuntimeError("stage failed")
    finally:
        SINKS["tensorboard"] = old
    assert closed == [True]


def _one_line_error(code, err):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("icr: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("value, message", [
    ("[tensorbord]", "report_to: unknown tracker 'tensorbord' (tensorboard, wandb, trackio, or none)"),
    ("[none, wandb]", "report_to: 'none' together with trackers"),
])
def test_bad_tracker_name_fails_validation_in_one_line(value, message, tmp_path, cli):
    line = _one_line_error(*cli("run", TINY, "--set", f"run_root={tmp_path}", "--set", f"report_to={value}")[::2])
    assert message in line
    assert not (tmp_path / "tiny").exists()


def test_missing_tracker_package_is_one_line_before_any_stage(tmp_path, cli, monkeypatch):
    import importlib.util

    import icr.loop

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    monkeypatch.setattr(icr.loop, "run_prepare", lambda cfg: pytest.fail("prepare ran before the check"))
    line = _one_line_error(*cli("run", TINY, "--set", f"run_root={tmp_path}", "--set", "report_to=[wandb]")[::2])
    assert line == "icr: error: report_to: wandb is not installed (pip install wandb), or remove it from report_to"
    assert not (tmp_path / "tiny").exists()


def test_training_report_to_adds_tensorboard_only_for_the_run_level_tracker(monkeypatch):
    from icr.tracking import TRAIN_TENSORBOARD_ENV, training_report_to

    monkeypatch.delenv(TRAIN_TENSORBOARD_ENV, raising=False)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/elsewhere")  # restored by monkeypatch
    assert training_report_to([]) == "none" and training_report_to(["wandb"]) == ["wandb"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/elsewhere"
    monkeypatch.setenv(TRAIN_TENSORBOARD_ENV, "/x/tracking/train-iter1")
    assert training_report_to([]) == ["tensorboard"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/x/tracking/train-iter1"  # read by the Trainer's callback
    assert training_report_to(["none"]) == ["tensorboard"]
    assert training_report_to(["wandb", "tensorboard"]) == ["wandb", "tensorboard"]


def test_evaluation_scalars_average_as_the_report_does():
    from icr.tracking import evaluation_scalars

    row = {"model": "M1", "iteration": 1, "judge": "fake", "n": 3, "wr_se": None, "lc_method": None,
           "fidelity": None, "mean_len": 10.0}
    rows = [{**row, "lang": "en", "wr": 60.0, "lc": 50.0}, {**row, "lang": "es", "wr": 40.0, "lc": 30.0},
            {**row, "lang": "sw", "wr": 90.0, "lc": None},  # no references: left out of the average
            {"kind": "harness", "model": "M1", "iteration": 1, "lang": "es", "task": "arc_es", "metric": "acc",
             "value": 0.25, "stderr": None, "n": 4, "num_fewshot": 0}]
    out = evaluation_scalars(rows)[1]
    assert out["eval/M1/avg/win_rate"] == 50.0 and out["eval/M1/avg/lc_win_rate"] == 40.0
    assert out["eval/M1/sw/win_rate"] == 90.0 and "eval/M1/sw/lc_win_rate" not in out
    assert out["eval/M1/es/arc_es/acc"] == 0.25


def test_wandb_offline_run_is_continued_on_resume(tmp_path, monkeypatch):
    """With wandb installed (not in the dev extra): offline through wandb's own WANDB_MODE, files in
    tracking/wandb/, the same W&B run id on a resume, and no point sent twice."""
    pytest.importorskip("wandb")
    from icr.config import load_config
    from icr.tracking import open_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(TINY, [f"run_root={tmp_path}", "report_to=[wandb]"])
    ids = []
    for _ in range(2):
        with open_tracker(cfg, cfg.run_dir) as tracker:
            tracker.log(-1, {"eval/sft/es/win_rate": 40.0})
            tracker.log(1, {"generate/samples": 48.0})
        ids.append(json.loads((cfg.run_dir / "tracking/wandb-run.json").read_text())["id"])
    assert ids[0] == ids[1]
    assert sorted(p.name.rsplit("-", 1)[1] for p in (cfg.run_dir / "tracking/wandb").glob("offline-run-*")) == ids
    ledger = json.loads((cfg.run_dir / "tracking/logged.json").read_text())
    assert ledger == {"wandb": {"eval/sft/es/win_rate@-1": 40.0, "generate/samples@1": 48.0}}
