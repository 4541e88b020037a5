"""Reliability: kill-and-resume, one writer per run folder, full disk, long prompts, identical answers."""

from __future__ import annotations

import errno
import json
import time
import os
import subprocess
import sys

import pytest

from icr.errors import IcrError
from icr.runs import atomic_write_text, run_lock

from .conftest import REPO
from .test_loop import TINY, _one_line_error


@pytest.mark.slow
def test_kill_and_resume_harness_quick(tmp_path):
    """bench/kill_resume.py --quick: 3 SIGKILLs across stages; same bytes, same weights, no shard twice."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kill_resume.py"), "--quick", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert result["kills"] >= 2 and not result["mismatched_files"] and not result["recomputed_shards"]
    assert result["max_weight_diff"] <= 1e-5


def test_kill_resume_reads_the_stage_journal_and_skips_a_line_cut_by_a_kill(tmp_path):
    import runpy

    from icr.runs import append_journal

    read_journal = runpy.run_path(str(REPO / "bench" / "kill_resume.py"))["read_journal"]
    assert read_journal(tmp_path) == []  # no journal yet
    append_journal(tmp_path, {"shard": 0})
    append_journal(tmp_path, {"shard": 1})
    with open(tmp_path / "journal.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"shard": 2, "pi')  # killed mid-write
    assert [e["shard"] for e in read_journal(tmp_path)] == [0, 1]
    assert read_journal(tmp_path)[0]["pid"] == os.getpid()


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        with pytest.raises(IcrError, match="in use by process"):
            with run_lock(run_dir):
                pass
    # A lock left by a process that no longer exists (killed run) does not block the resume.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with run_lock(run_dir):
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    assert not (run_dir / ".lock").exists()


def test_an_empty_or_garbage_lock_does_not_block(tmp_path):
    """An empty .lock (not written by icr, whose locks appear with their content) is taken over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for content in ("", "{}", "not json"):
        (run_dir / ".lock").write_text(content)
        with run_lock(run_dir):
            assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
        assert not (run_dir / ".lock").exists()


def test_prepare_runs_under_a_lock(tmp_path, monkeypatch):
    """Two commands sharing a prepare step never build into the same folder at once: the second
    waits for the first (shard workers of one run start together on several nodes) and then uses
    what it built; if the builder dies, the waiter builds."""
    import threading

    import socket
    import types

    from icr.config import PrepareConfig, load_config
    from icr.loop import prepared_dir, run_prepare

    calls = []
    mod = types.ModuleType("my_prepare")
    mod.build = lambda out, **kw: calls.append(out) or out.mkdir(parents=True, exist_ok=True)
    monkeypatch.setitem(sys.modules, "my_prepare", mod)
    monkeypatch.setenv("ICR_CACHE", str(tmp_path / "cache"))
    cfg = load_config(TINY, [f"run_root={tmp_path}"])
    cfg.prepare = PrepareConfig(call="my_prepare:build", args={"n": 1})
    out = prepared_dir(cfg)
    lock = out.with_name(out.name + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        got = []
        waiter = threading.Thread(target=lambda: got.append(run_prepare(cfg)))
        waiter.start()
        waiter.join(timeout=2.5)
        assert waiter.is_alive() and calls == []  # waiting, not building, not refused
        out.mkdir(parents=True)
        (out / "done.json").write_text("{}")  # the holder finished building
        holder.kill()
        holder.wait()
        waiter.join(timeout=30)
        assert got == [out] and calls == []  # used what the other built
    finally:
        holder.kill()
        holder.wait()
    (out / "done.json").unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))  # a builder that died
    assert run_prepare(cfg) == out and calls == [out] and not lock.exists()
    assert run_prepare(cfg) == out and calls == [out]  # built once


def test_a_lock_of_another_host_is_taken_over_only_when_its_lease_ran_out(tmp_path, monkeypatch):
    """Across hosts a pid means nothing: a holder elsewhere is alive while it renews its lease
    (the lock file's modification time, touched by a heartbeat); a silent one is taken over."""
    from icr.runs import hold_lock

    monkeypatch.setenv("ICR_LOCK_LEASE", "5")
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": 1, "host": "node-that-is-not-this-one"}))
    with pytest.raises(IcrError, match="in use by process 1 on node-that-is-not-this-one"):
        with hold_lock(lock, "in use"):
            pass
    old = time.time() - 6
    os.utime(lock, (old, old))  # no heartbeat for longer than the lease: that node is gone
    with hold_lock(lock, "in use"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        os.utime(lock, (old, old))
        time.sleep(1.5)  # our own heartbeat (every lease/10 s) renews it
        assert time.time() - lock.stat().st_mtime < 2
    assert not lock.exists()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    """Results must be readable by whoever the user's umask allows (not 0600 from mkstemp)."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == mode


def test_second_run_on_a_folder_in_use_is_refused(tmp_path, cli, capsys):
    from icr.config import load_config
    from icr.loop import run_prepare

    run_prepare(load_config(TINY))  # built beforehand: only the refusal is on stderr
    capsys.readouterr()
    run_dir = tmp_path / "tiny"
    with run_lock(run_dir):
        code, _, err = cli("run", TINY, "--set", f"run_root={tmp_path}")
    assert "in use by process" in _one_line_error(code, err)


def test_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "out" / "shard-00000.jsonl"

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(IcrError, match="no space left on device"):
        atomic_write_text(target, "data\n" * 100)
    assert list(target.parent.iterdir()) == []


def test_full_disk_during_a_run_exits_2(tmp_path, cli, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    code, _, err = cli("run", TINY, "--set", f"run_root={tmp_path}")
    assert "no space left on device" in _one_line_error(code, err)


def test_long_prompts_are_skipped_and_reported(tmp_path, tiny_pair):
    from icr.config import load_config
    from icr.data import load_prompt_set
    from icr.plan import iteration_plan
    from icr.stages import run_generate

    cfg = load_config(TINY, [f"run_root={tmp_path}", f"models.dpo={tiny_pair['dpo']}",
                             f"models.sft={tiny_pair['sft']}",
                             f"prompts.path={tiny_pair['root']}/prompts/train/{{lang}}.jsonl",
                             "generation.max_prompt_tokens=14", "generation.n=2"])
    prompts = load_prompt_set(cfg.prompts, cfg.languages)
    plan = iteration_plan(cfg, tmp_path / "run", 1)
    stage = plan.generate_dir
    counts = run_generate(cfg, plan, prompts=prompts)
    assert counts["skipped_long_prompts"] > 0
    assert counts["samples"] == 2 * (counts["prompts"] - counts["skipped_long_prompts"])
    skipped = [json.loads(line) for p in stage.glob("skipped-*.jsonl") for line in p.read_text().splitlines()]
    assert all(s["prompt_tokens"] > 14 for s in skipped)


def test_identical_responses_never_form_a_pair():
    from icr.config import PairsConfig
    from icr.pairs import select_pairs

    recs = [{"id": "a", "lang": "es", "prompt": "q", "sample": k, "response": "", "finished": True, "n_tokens": 1,
             "reward": 0.1 + 1e-9 * k} for k in range(4)]
    pairs, stats = select_pairs(recs, PairsConfig(language_filter=False))
    assert pairs == [] and stats["per_language"]["es"]["dropped_no_pair"] == 1
