"""SIGTERM or SIGINT to an icr command ends every process it started, with their own children
(issue 19): the command exits 128 + the signal, its run lock released, and a rerun resumes.

Every process here is started in a session of its own and found by session id, parent pid or
the pid it wrote down; the tests signal and clean up only those."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO

TINY = REPO / "configs" / "tiny.yaml"
ICR = str(Path(sys.executable).parent / "icr")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _running(pid: int, started: int | None = None) -> bool:
    """Whether `pid` runs (a zombie does not), and is the process that started at `started`."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X") and (started is None or st[1] == started)


def _session(sid: int) -> list[int]:
    """The running processes of session `sid`."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != sid:
            with contextlib.suppress(OSError):
                if os.getsid(int(name)) == sid and _running(int(name)):
                    found.append(int(name))
    return found


def _children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{name}/stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    out.append(int(name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def _own_session(cmd: list[str], **kwargs):
    """Popen in a session of its own; on the way out, SIGKILL whatever of that session (and the
    recorded `extra` pids) still runs, so a failing test leaves nothing behind."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    extra: dict[int, int] = {}  # pid -> start time, of processes that left the session
    try:
        yield proc, extra
    finally:
        for pid in [proc.pid, *_session(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid, started in extra.items():
            if _running(pid, started):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# icr.launch.run_processes under a stop: a child's own children, one ignoring SIGTERM, a second signal
# ---------------------------------------------------------------------------------------------

RUNNER = """
import contextlib, os, sys
from pathlib import Path
import icr.launch as launch

launch.STOP_GRACE_SECONDS = float(sys.argv[2])
try:
    with getattr(launch, "stop_on_signals", contextlib.nullcontext)():
        launch.run_processes([["sh", "-c", sys.argv[3]]], [dict(os.environ)], [Path(sys.argv[1])])
except KeyboardInterrupt as e:
    sys.exit(128 + getattr(e, "signum", 2))
"""

# `sh` starts a grandchild that writes its pid, then waits for it (the shape of `accelerate launch`)
GRANDCHILD = "sleep 300 & echo $! > {pids}; wait"
DEAF = "trap '' TERM; sleep 300 & echo $! > {pids}; wait"  # SIGTERM ignored by both (inherited)
OWN_SESSION = (f"{sys.executable} -c 'import os, time; os.setsid(); time.sleep(300)' & echo $! > {{pids}}; wait")


def _run_and_stop(tmp_path, script: str, signals: list[int], grace: float = 30.0, gap: float = 1.0):
    """Start RUNNER with `script`, wait for its grandchild, send `signals` (`gap` s apart) to the
    runner alone; return (exit code, seconds from the first signal to the exit, grandchild gone)."""
    pids = tmp_path / "pids"
    cmd = [sys.executable, "-c", RUNNER, str(tmp_path / "child.log"), str(grace), script.format(pids=pids)]
    with _own_session(cmd) as (proc, extra):
        grandchild = int(_wait_for(lambda: pids.is_file() and pids.read_text().strip(), 60, "the grandchild"))
        started = _wait_for(lambda: _stat(grandchild), 10, "the grandchild's /proc entry")[1]
        extra[grandchild] = started
        time.sleep(0.3)  # the runner is waiting now (and sh has set its trap)
        t0 = time.monotonic()
        for i, sig in enumerate(signals):
            if i:
                time.sleep(gap)
            os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
        seconds = time.monotonic() - t0
        gone = not _running(grandchild, started) and not _session(proc.pid)
        return code, seconds, gone


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_ends_the_childs_own_children(tmp_path, sig):
    code, seconds, gone = _run_and_stop(tmp_path, GRANDCHILD, [sig])
    assert code == 128 + sig and gone and seconds < 10, (code, seconds, gone)


def test_a_grandchild_in_a_session_of_its_own_is_stopped_too(tmp_path):
    """torch's elastic launcher (accelerate launch on several processes) starts each rank with
    start_new_session: its process group is not the launcher's."""
    code, seconds, gone = _run_and_stop(tmp_path, OWN_SESSION, [signal.SIGTERM])
    assert code == 143 and gone and seconds < 10, (code, seconds, gone)


def test_what_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    code, seconds, gone = _run_and_stop(tmp_path, DEAF, [signal.SIGTERM], grace=1.0)
    assert code == 143 and gone and 0.9 < seconds < 10, (code, seconds, gone)


def test_a_second_signal_kills_at_once(tmp_path):
    code, seconds, gone = _run_and_stop(tmp_path, DEAF, [signal.SIGINT, signal.SIGINT], grace=600.0)
    assert code == 130 and gone and seconds < 10, (code, seconds, gone)


def test_a_job_that_ends_by_itself_is_waited_for_and_reaped(tmp_path, monkeypatch):
    import icr.launch as launch

    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self.pid)

    monkeypatch.setattr(launch.subprocess, "Popen", Recorded)
    codes = launch.run_processes([["sh", "-c", "sleep 0.5; exit 3"], ["sh", "-c", "kill -TERM $$"], ["true"]],
                                 [dict(os.environ)] * 3, [tmp_path / f"{i}.log" for i in range(3)])
    assert codes == [3, -signal.SIGTERM, 0] and len(started) == 3
    assert all(_stat(pid) is None for pid in started)  # reaped: no zombie left


# ---------------------------------------------------------------------------------------------
# The real thing: `icr run` with 2 shard workers, stopped while they work, then resumed
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def built(tiny_pair):
    from icr.config import load_config
    from icr.loop import run_prepare

    return run_prepare(load_config(TINY))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_icr_run_stopped_ends_its_workers_and_resumes(tmp_path, built, sig):
    sets = ["--set", f"run_root={tmp_path}", "--set", "iterations=1", "--set", "workers=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(tmp_path / "first.log", "w")
    with _own_session([ICR, "run", str(TINY), *sets], env=env, stdout=log, stderr=subprocess.STDOUT,
                      cwd=REPO) as (proc, extra):
        workers = _wait_for(lambda: [p for p in _children(proc.pid) if "icr.workers" in _cmdline(p)], 300,
                            "a shard worker of icr run")
        for pid in workers:
            extra[pid] = _stat(pid)[1]
        os.kill(proc.pid, sig)  # the command alone, as `kill PID` or a scheduler's stop does
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"icr run still running 30 s after {sig.name}")
        left = _session(proc.pid) + [pid for pid, started in extra.items() if _running(pid, started)]
        assert not left, [(pid, _cmdline(pid)) for pid in left]
    log.close()
    out = (tmp_path / "first.log").read_text()
    assert code == 128 + sig, out[-3000:]
    assert f"icr: interrupted ({sig.name}); rerun the same command to resume" in out
    run = tmp_path / "tiny"
    assert not (run / ".lock").exists()  # the run lock was let go
    assert not (run / "iter1" / "train" / "manifest.json").exists()  # it was stopped mid-run
    again = subprocess.run([ICR, "run", str(TINY), *sets], env=env, capture_output=True, text=True, timeout=600,
                           cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "iter1" / "model" / "model.safetensors").is_file()
