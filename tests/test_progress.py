"""A run you can watch (issue 18, point 4): progress files written by whatever process computes a
stage, one summed view in the parent's terminal, worker logs kept, and `icr status RUN_DIR`."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture()
def icr_log(monkeypatch):
    """The icr logger at INFO, writing to the test's stderr (as `icr` sets it up)."""
    from icr.cli import _setup_logging

    _setup_logging(logging.INFO)
    yield
    logging.getLogger("icr").setLevel(logging.WARNING)


def _record(folder, worker, **fields):
    """A progress file as a worker on some host writes it."""
    now = time.time()
    record = {"stage": "generate", "worker": worker, "unit": "sample", "done": 0, "total": 100, "tokens": 0,
              "loss": None, "shards_done": 0, "shards_total": 5, "state": "running", "started": now - 100,
              "updated": now, "host": socket.gethostname(), "pid": os.getpid(), **fields}
    (folder / "progress").mkdir(parents=True, exist_ok=True)
    (folder / "progress" / f"{worker}.json").write_text(json.dumps(record))
    return record


def _run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: run\niterations: 3\n")
    return run


# ---------------------------------------------------------------------------------------------
# The parent's view
# ---------------------------------------------------------------------------------------------

def test_two_writers_are_summed_into_one_line_with_rate_and_eta(tmp_path, icr_log, capsys, monkeypatch):
    from icr.progress import ProgressWriter, watch

    import icr.progress

    monkeypatch.setenv("ICR_PROGRESS_SECONDS", "0.2")
    monkeypatch.setattr(icr.progress, "WRITE_SECONDS", 0.05)  # this test is about the sum, not the throttle
    stage = tmp_path / "generate"
    with watch(stage, "iter1 generate"):
        a = ProgressWriter(stage, "worker-0", stage="generate", unit="sample", total=40, shards_total=4)
        b = ProgressWriter(stage, "worker-1", stage="generate", unit="sample", total=40, shards_total=4)
        a.update(advance=30, tokens=300, shards=1)
        b.update(advance=10, tokens=100, shards=1)
        time.sleep(1.6)  # the watcher polls each second and logs every 0.2 s here
        a.update(advance=10, tokens=100, shards=1)  # worker 0 done: its last write is never throttled
        b.update(advance=30, tokens=300, shards=1)
        a.close()
        b.close()
    err = capsys.readouterr().err
    running = [line for line in err.splitlines() if "iter1 generate:" in line]
    assert running and "40/80 samples (50%)" in running[0] and "2 workers" in running[0], err
    assert re.search(r"samples/s", running[0]) and "ETA" in running[0] and "400 tokens" in running[0]
    final = [line for line in err.splitlines() if "iter1 generate finished in" in line]
    assert len(final) == 1 and "80/80 samples (100%)" in final[0] and "800 tokens" in final[0], err
    assert not (stage / "progress").exists()  # the stage finished: its manifest says so from now on


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_unless_quiet(tmp_path, icr_log, monkeypatch):
    from icr.progress import ProgressWriter, watch

    for quiet in (False, True):
        logging.getLogger("icr").setLevel(logging.WARNING if quiet else logging.INFO)  # -q or not
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        stage = tmp_path / f"score-{quiet}"
        with watch(stage, "iter1 score"):
            with ProgressWriter(stage, "worker-0", stage="score", unit="response", total=4) as w:
                w.update(advance=4)
        monkeypatch.undo()
        shown = terminal.getvalue()
        if quiet:
            assert shown == ""
        else:
            assert "iter1 score: 100%" in shown and "4/4" in shown and "\r" in shown, shown


def test_a_stopped_stage_keeps_its_progress(tmp_path, icr_log, capsys):
    from icr.progress import ProgressWriter, read_records, watch

    stage = tmp_path / "score"
    with pytest.raises(KeyboardInterrupt):
        with watch(stage, "iter1 score"):
            w = ProgressWriter(stage, "worker-0", stage="score", unit="response", total=10)
            w.update(advance=3)
            raise KeyboardInterrupt  # Ctrl-C: the watcher stops, the open writer is closed as failed
    err = capsys.readouterr().err
    assert "iter1 score stopped after" in err and "3/10 responses" in err
    record = read_records(stage)["worker-0.json"]
    assert record["state"] == "failed" and record["done"] == 3
    assert not [t for t in threading.enumerate() if t.name.startswith("icr-progress")]  # stopped


def test_a_writer_that_cannot_be_used_is_a_one_line_error(monkeypatch):
    from icr.errors import IcrError
    from icr.progress import log_seconds

    monkeypatch.setenv("ICR_PROGRESS_SECONDS", "soon")
    with pytest.raises(IcrError, match="ICR_PROGRESS_SECONDS: expected seconds, got 'soon'"):
        log_seconds()


# ---------------------------------------------------------------------------------------------
# `icr status`
# ---------------------------------------------------------------------------------------------

def test_status_of_a_folder_that_is_not_a_run(cli, tmp_path):
    code, out, err = cli("status", tmp_path)
    assert code == 2 and out == ""
    assert err.strip() == f"icr: error: {tmp_path}: not an icr run folder (no config.yaml)"


def test_status_of_a_running_stage_with_a_live_and_a_stale_writer(cli, tmp_path):
    run = _run_folder(tmp_path)
    gen = run / "iter1" / "generate"
    gen.mkdir(parents=True)
    (gen / "shard-00000.jsonl").write_text("{}\n")
    (gen / "shard-00001.jsonl").write_text("{}\n")
    _record(gen, "worker-0", done=40)
    code, out, _ = cli("status", run)
    assert code == 0
    assert out.splitlines()[0] == f"{run}: running: iter1 generate (of 3 iterations)"
    assert "shards 2/5, 40/100 samples (40%), 0.4 samples/s" in out and "ETA 2m30s" in out
    assert "worker-0 on" in out and "alive" in out

    # a second writer on another node that stopped writing 10 minutes ago: the stage looks failed
    _record(gen, "worker-1", done=20, host="node-7", started=time.time() - 700, updated=time.time() - 600)
    (gen / "logs").mkdir()
    (gen / "logs" / "worker-1.log").write_text("".join(f"line {i}\n" for i in range(40)) + "CUDA out of memory\n")
    code, out, _ = cli("status", run)
    assert out.splitlines()[0] == f"{run}: failed: iter1 generate (of 3 iterations)"
    assert "60/200 samples" in out and "worker-1 on node-7" in out and "no update for 10m00s (stale" in out
    assert "| CUDA out of memory" in out and "| line 39" in out and "| line 10" not in out  # the tail only


def test_status_sees_a_dead_process_on_this_host(cli, tmp_path):
    run = _run_folder(tmp_path)
    train = run / "iter1" / "train"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _record(train, "worker-0", stage="train", unit="step", done=3, total=9, loss=0.69, pid=gone.pid,
            shards_total=None)
    code, out, _ = cli("status", run)
    assert out.splitlines()[0] == f"{run}: failed: iter1 train (of 3 iterations)"
    assert "3/9 steps (33%)" in out and "loss 0.69" in out and "its process is gone" in out


@pytest.mark.slow
def test_status_of_a_failed_worker_shows_its_error_and_log_tail(tiny_pair, tmp_path, cli):
    import dataclasses

    from icr.config import dump_config, load_config
    from icr.errors import IcrError
    from icr.loop import resolve_placeholders
    from icr.plan import iteration_plan
    from icr.workers import run_stage

    cfg = resolve_placeholders(load_config(TINY, [f"run_root={tmp_path}", "prompts.limit=1"]), tiny_pair["root"])
    run = tmp_path / "broken"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    plan = dataclasses.replace(iteration_plan(cfg, run, 1), policy=str(tmp_path / "no-model"))
    with pytest.raises(IcrError):
        run_stage("generate", cfg, plan, isolate=True)
    code, out, _ = cli("status", run)
    assert code == 0 and out.splitlines()[0] == f"{run}: failed: iter1 generate (of 2 iterations)", out
    assert re.search(r"process 0: .*no-model", out)  # the worker's one-line error (error-0.json)
    log_file = run / "iter1" / "generate" / "logs" / "worker-0.log"
    assert f"log {log_file} (last lines)" in out
    assert "| icr worker: error:" in out  # its last line, from the log itself


# ---------------------------------------------------------------------------------------------
# The real thing: `icr run` with 2 shard workers, its stderr a file (not a terminal)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_icr_run_with_two_workers_shows_summed_progress_and_keeps_the_logs(tmp_path, cli):
    env = dict(os.environ, OMP_NUM_THREADS="1", ICR_PROGRESS_SECONDS="1")
    cmd = [sys.executable, "-m", "icr.cli", "run", str(TINY), "--set", f"run_root={tmp_path}",
           "--set", "iterations=1", "--set", "workers=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    assert "\r" not in err  # not a terminal: plain lines, no bar
    run = tmp_path / "tiny"
    samples = json.loads((run / "iter1/generate/manifest.json").read_text())["counts"]["samples"]
    generate = [line for line in err.splitlines() if "iter1 generate finished in" in line]
    assert len(generate) == 1 and f"{samples}/{samples} samples (100%)" in generate[0], err
    assert "2 workers" in generate[0] and "tokens" in generate[0]
    score = [line for line in err.splitlines() if "iter1 score finished in" in line]
    assert len(score) == 1 and f"{samples}/{samples} responses (100%)" in score[0] and "2 workers" in score[0], err
    steps = json.loads((run / "iter1/train/manifest.json").read_text())["counts"]["steps"]
    train = [line for line in err.splitlines() if "iter1 train finished in" in line]
    assert len(train) == 1 and f"{steps}/{steps} steps (100%)" in train[0] and "loss" in train[0], err
    # logs kept after success, beside the outputs; job folders and progress files gone
    for stage in ("generate", "score"):
        for i in (0, 1):
            assert (run / "iter1" / stage / "logs" / f"worker-{i}.log").is_file()
    assert not list(run.rglob("*.workers")) and not list(run.rglob("progress"))
    # `icr status` on the finished run
    code, out, _ = cli("status", run)
    assert code == 0 and out.splitlines()[0] == f"{run}: last finished: iter1 train (of 1 iteration)", out
    assert re.search(rf"iter1 generate\s+done .*samples {samples}", out) and "failed" not in out


@pytest.mark.slow
def test_icr_evaluate_shows_answers_sampled_in_a_child_and_judgements_made(tmp_path, cli):
    from icr.config import load_config
    from icr.loop import run_prepare

    pi0 = run_prepare(load_config(TINY)) / "dpo"
    code, out, err = cli("evaluate", TINY, "--model", pi0, "--label", "M0", "--set", f"run_root={tmp_path}",
                         "--set", "isolate_stages=true", "--set", "evaluation.judge=fake",
                         "--set", "evaluation.prompts.path={prepared}/prompts/eval/{lang}.jsonl",
                         "--set", "evaluation.max_new_tokens=8")
    assert code == 0, err
    final = [line for line in err.splitlines() if "evaluate M0 finished in" in line]
    assert len(final) == 1, err
    answers = re.search(r"(\d+)/\1 answers \(100%\)", final[0])
    rows = [ast.literal_eval(line) for line in out.splitlines()]  # one results row per language, printed as a dict
    assert answers and int(answers.group(1)) == sum(row["n"] for row in rows) and len(rows) == 3
    assert f"{answers.group(1)}/{answers.group(1)} judgements (100%)" in final[0]
    assert (tmp_path / "tiny" / "eval" / "M0" / "logs" / "worker-0.log").is_file()  # the sampling child's
    assert not (tmp_path / "tiny" / "eval" / "M0" / "progress").exists()
