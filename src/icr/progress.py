"""Progress of a long stage, written to files by whatever process computes it, and read by the
process that waits for it (`icr run`'s terminal) or by anyone else (`icr status RUN_DIR`).

Why files, and not a queue, a socket or tqdm in the child: a stage's work runs in this process, in
a local child process (`isolate_stages`, `workers: N`), or in a Ray task on another node. What
they all share is the run folder (on a shared file system across nodes), and a second terminal
that asks "where is my run?" has nothing else to connect to. So each process of a stage writes its
own small JSON file into the stage folder, atomically (a temporary file and a rename), at most
every `WRITE_SECONDS`, and the parent polls the folder:

    <stage_dir>/progress/<worker>.json   {"stage", "worker", "unit", "done", "total", "tokens",
                                          "loss", "shards_done", "shards_total", "state",
                                          "started", "updated", "host", "pid"}
    <stage_dir>/logs/worker-<i>.log      what process i printed (icr.launch.worker_log); kept

One file per writer and no shared counter: two processes never write the same file, so nothing
needs a lock across nodes. A writer also refreshes its file every `HEARTBEAT_SECONDS` while it
lives, so a reader can tell a slow shard from a dead worker.

- `ProgressWriter`: the writing side (generate and score per shard, evaluation per language,
  training per optimizer step through `training_callback`).
- `watch(stage_dir, title)`: the parent's side, around a stage however it runs: one bar summed over
  every writer of the stage (a tqdm bar on a terminal; a plain log line every `LOG_SECONDS` and at
  the end when stderr is not a terminal, so CI logs and `nohup` files stay readable; nothing under
  `-q`). On success the stage's progress files are removed (the manifest says the stage is done);
  after a failure they stay for `icr status`.
- `run_status(run_dir)`: the text of `icr status`.

Progress files never change a stage's outputs: they live in their own sub-folders, which no
shard glob (`shard-*.jsonl`), manifest or key reads, and the data-file comparisons of the test
suite name the stage outputs by pattern. Stage timings and counts stay in the manifests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import IcrError
from .runs import pid_alive

log = logging.getLogger("icr")

PROGRESS_DIR = "progress"
WRITE_SECONDS = 2.0  # a writer rewrites its file at most this often (and at its end)
HEARTBEAT_SECONDS = 10.0  # ... and at least this often while its process lives
STALE_SECONDS = 120.0  # a running writer whose file is older than this looks dead
POLL_SECONDS = 1.0  # the parent reads the files this often


def log_seconds() -> float:
    """How often a plain progress line is logged when stderr is not a terminal (ICR_PROGRESS_SECONDS)."""
    value = os.environ.get("ICR_PROGRESS_SECONDS", "30")
    try:
        seconds = float(value)
    except ValueError:
        raise IcrError(f"ICR_PROGRESS_SECONDS: expected seconds, got {value!r}") from None
    if seconds <= 0:
        raise IcrError(f"ICR_PROGRESS_SECONDS: must be > 0, got {value!r}")
    return seconds


def progress_dir(stage_dir: Path) -> Path:
    return Path(stage_dir) / PROGRESS_DIR


def worker_name(shard: tuple[int, int] | None = None) -> str:
    """This process's name among a stage's writers: its shard index, else its rank, else 0."""
    return f"worker-{shard[0] if shard else int(os.environ.get('RANK', '0'))}"


def _write_atomic(path: Path, data: dict) -> None:
    """A temporary file and a rename: a reader sees the old record or the new one, never half.
    Not runs.atomic_write_text: that one fsyncs, which every worker would pay every 2 s on a shared
    file system for a record that is only a view (a lost one is rewritten by the next update)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The writing side
# ---------------------------------------------------------------------------------------------

_OPEN: set[ProgressWriter] = set()  # writers of this process not yet closed (closed by `watch`)
_OPEN_LOCK = threading.Lock()


class ProgressWriter:
    """The counts of one process of a stage, in `<stage_dir>/progress/<worker>.json`.

    `update(advance=..., tokens=..., loss=..., done=...)` as work finishes; `close()` at the end
    (or `with ProgressWriter(...)`: closed as "failed" on an exception). Writes are throttled to
    one per WRITE_SECONDS; a heartbeat thread refreshes the file while the writer is open."""

    def __init__(self, stage_dir: Path, worker: str, *, stage: str, unit: str, total: int,
                 shards_total: int | None = None):
        self.path = progress_dir(stage_dir) / f"{worker}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.record = {"stage": stage, "worker": worker, "unit": unit, "done": 0, "total": int(total),
                       "tokens": 0, "loss": None, "shards_done": 0, "shards_total": shards_total,
                       "state": "running", "started": now, "updated": now, "host": socket.gethostname(),
                       "pid": os.getpid()}
        self._lock = threading.Lock()
        self._written = 0.0
        self._dirty = False  # counts newer than the file (a throttled update): written by the heartbeat
        self._stop = threading.Event()
        self._flush(force=True)
        self._heartbeat = threading.Thread(target=self._beat, name=f"icr-progress-{worker}", daemon=True)
        self._heartbeat.start()
        with _OPEN_LOCK:
            _OPEN.add(self)

    def update(self, *, advance: int = 0, tokens: int = 0, shards: int = 0, done: int | None = None,
               loss: float | None = None) -> None:
        with self._lock:
            r = self.record
            r["done"] = r["done"] + advance if done is None else int(done)
            r["tokens"] += int(tokens)
            r["shards_done"] += shards
            if loss is not None:
                r["loss"] = float(loss)
        self._flush(force=self.record["done"] >= self.record["total"])

    def close(self, state: str = "done") -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        with _OPEN_LOCK:
            _OPEN.discard(self)
        with self._lock:
            self.record["state"] = state
        self._flush(force=True)
        if threading.current_thread() is not self._heartbeat:
            self._heartbeat.join(timeout=5)

    def _flush(self, force: bool = False) -> None:
        with self._lock:
            now = time.time()
            if not force and now - self._written < WRITE_SECONDS:
                self._dirty = True
                return
            self.record["updated"] = now
            self._written, self._dirty = now, False
            with contextlib.suppress(OSError):  # progress is a view: never the reason a stage fails
                _write_atomic(self.path, self.record)

    def _beat(self) -> None:
        """A throttled update reaches the file within WRITE_SECONDS; a quiet writer still refreshes
        it every HEARTBEAT_SECONDS (a slow shard is not a dead worker)."""
        while not self._stop.wait(WRITE_SECONDS):
            if self._dirty or time.time() - self._written >= HEARTBEAT_SECONDS:
                self._flush(force=True)

    def __enter__(self) -> ProgressWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close("done" if kind is None else "failed")


def close_open_writers(state: str) -> None:
    """Close every writer of this process still open (a stage that raised before closing its own)."""
    with _OPEN_LOCK:
        writers = list(_OPEN)
    for writer in writers:
        writer.close(state)


def training_callback(stage_dir: Path):
    """A transformers TrainerCallback writing optimizer steps and the loss from the main process."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        writer: ProgressWriter | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.writer = ProgressWriter(stage_dir, worker_name(), stage="train", unit="step",
                                             total=state.max_steps)
                self.writer.update(done=state.global_step)  # a resumed run starts at its checkpoint

        def on_step_end(self, args, state, control, **kwargs):
            if self.writer is not None:
                self.writer.update(done=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.writer is not None and logs and "loss" in logs:
                self.writer.update(done=state.global_step, loss=logs["loss"])

        def on_train_end(self, args, state, control, **kwargs):
            if self.writer is not None:
                self.writer.close()

    return ProgressCallback()


# ---------------------------------------------------------------------------------------------
# Reading: one stage's records summed
# ---------------------------------------------------------------------------------------------

def read_records(stage_dir: Path) -> dict[str, dict]:
    """Every readable progress record of a stage, by file name (a half-copied file is skipped)."""
    records = {}
    folder = progress_dir(stage_dir)
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "done" in record and "unit" in record:
            records[path.name] = record
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per unit (sample, response, step, answer, judgement): done and total summed over writers,
    rate = the sum of each writer's own rate (writers run side by side), tokens/s alike, the last
    loss, and the ETA of the slowest remaining work at that rate."""
    by_unit: dict[str, dict] = {}
    for r in records:
        u = by_unit.setdefault(r["unit"], {"unit": r["unit"], "done": 0, "total": 0, "tokens": 0, "rate": 0.0,
                                           "token_rate": 0.0, "loss": None, "writers": 0, "shards_done": 0})
        seconds = max(float(r["updated"]) - float(r["started"]), 1e-6)
        u["done"] += int(r["done"])
        u["total"] += int(r["total"])
        u["tokens"] += int(r.get("tokens") or 0)
        u["shards_done"] += int(r.get("shards_done") or 0)
        u["writers"] += 1
        if r["done"] and r.get("state") in ("running", "done"):
            u["rate"] += r["done"] / seconds
            u["token_rate"] += (r.get("tokens") or 0) / seconds
        u["loss"] = r["loss"] if r.get("loss") is not None else u["loss"]
    for u in by_unit.values():
        left = u["total"] - u["done"]
        u["eta"] = left / u["rate"] if u["rate"] > 0 and left > 0 else (0.0 if left <= 0 else None)
    return list(by_unit.values())


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def describe(summary: dict) -> str:
    """One unit's summary as text: '120/480 samples (25%), 3.2 samples/s, 410 tokens/s, ETA 1m52s'."""
    u = summary
    pct = f" ({100 * u['done'] / u['total']:.0f}%)" if u["total"] else ""
    parts = [f"{u['done']}/{u['total']} {u['unit']}s{pct}"]
    if u["rate"]:
        parts.append(f"{u['rate']:.3g} {u['unit']}s/s")
    if u["tokens"]:
        parts.append(f"{u['tokens']} tokens" + (f" ({u['token_rate']:.3g}/s)" if u["token_rate"] else ""))
    if u["loss"] is not None:
        parts.append(f"loss {u['loss']:.4g}")
    if u["writers"] > 1:
        parts.append(f"{u['writers']} workers")
    if u["done"] < u["total"]:
        parts.append(f"ETA {_duration(u['eta'])}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# The parent's side: one bar for the stage
# ---------------------------------------------------------------------------------------------

class _Watcher:
    """Polls a stage's progress files in a background thread and shows their sum (see `watch`)."""

    def __init__(self, stage_dir: Path, title: str, quiet: bool = False):
        self.stage_dir, self.title, self.quiet = Path(stage_dir), title, quiet
        self.stream = sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # Files already there belong to an earlier attempt (or another command): counted only
        # once they change. Comparing what they hold, not clocks, works across hosts.
        self.before = {name: r.get("updated") for name, r in read_records(self.stage_dir).items()}
        self.seen: dict[str, dict] = {}
        self.bars: dict = {}
        self.started = self.last_line = time.monotonic()
        self.interval = log_seconds()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="icr-progress-watch", daemon=True)

    def current(self) -> list[dict]:
        for name, r in read_records(self.stage_dir).items():
            if name in self.seen or self.before.get(name) != r.get("updated"):
                self.seen[name] = r
        return summarize(list(self.seen.values()))

    def _loop(self) -> None:
        while not self.quiet and not self.stop.wait(POLL_SECONDS):
            try:
                self.show(self.current(), final=False)
            except Exception:  # noqa: BLE001 - the view must never stop the stage
                log.debug("progress: cannot show %s", self.stage_dir, exc_info=True)

    def show(self, units: list[dict], final: bool, outcome: str = "") -> None:
        if not units or self.quiet:
            return
        if self.tty:
            self._bars(units, final)
        elif final or time.monotonic() - self.last_line >= self.interval:
            self.started = self.last_line = time.monotonic()
            log.info("%s%s: %s", self.title, f" {outcome}" if outcome else "", "; ".join(describe(u) for u in units))

    def _bars(self, units: list[dict], final: bool) -> None:
        from tqdm.auto import tqdm

        for u in units:
            bar = self.bars.get(u["unit"])
            if bar is None:
                bar = self.bars[u["unit"]] = tqdm(total=u["total"], desc=self.title, unit=u["unit"],
                                                  file=self.stream, dynamic_ncols=True, leave=True)
            bar.total = max(u["total"], u["done"])
            bar.update(u["done"] - bar.n)
            extra = {}
            if u["tokens"]:
                extra["tok/s"] = f"{u['token_rate']:.3g}"
            if u["loss"] is not None:
                extra["loss"] = f"{u['loss']:.4g}"
            if u["writers"] > 1:
                extra["workers"] = u["writers"]
            bar.set_postfix(extra, refresh=True)
        if final:
            for bar in self.bars.values():
                bar.close()

    def finish(self, ok: bool) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        close_open_writers("done" if ok else "failed")
        units = self.current()
        took = _duration(time.monotonic() - self.started)
        try:
            self.show(units, final=True, outcome=f"finished in {took}" if ok else f"stopped after {took}")
        except Exception:  # noqa: BLE001 - the view must never fail the stage, nor hide its error
            log.debug("progress: cannot show %s", self.stage_dir, exc_info=True)
        if ok:  # the manifest says the stage is done; a stage that did not finish keeps them for `icr status`
            for name, r in self.seen.items():
                if r.get("state") == "done":
                    with contextlib.suppress(OSError):
                        (progress_dir(self.stage_dir) / name).unlink()
            with contextlib.suppress(OSError):
                progress_dir(self.stage_dir).rmdir()  # only if empty: another command may still write


@contextlib.contextmanager
def watch(stage_dir: Path, title: str):
    """Show the progress of the stage in `stage_dir` while the block runs (see the module docstring).
    Silent under `-q` (the icr logger above INFO). Stops with the block, also on an error or Ctrl-C;
    writers of this process still open then are closed ("failed" after an error)."""
    watcher = _Watcher(stage_dir, title, quiet=not log.isEnabledFor(logging.INFO))
    watcher.thread.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        watcher.finish(ok)


# ---------------------------------------------------------------------------------------------
# `icr status RUN_DIR`: where a run stands, from its files alone
# ---------------------------------------------------------------------------------------------

STAGES = ("generate", "score", "pairs", "train")
LOG_TAIL_LINES = 15


def _job_folder(stage_dir: Path) -> Path:
    """The stage's job folder (icr.workers.job_dir: beside the stage folder)."""
    return stage_dir.parent / f"{stage_dir.name}.workers"


def _writer_health(record: dict, now: float) -> tuple[str, str]:
    """(state, detail) of one progress record: running, done, failed, or dead (stale or gone)."""
    age = now - float(record.get("updated") or 0)
    where = f"{record.get('worker')} on {record.get('host')} pid {record.get('pid')}"
    state = record.get("state", "running")
    if state != "running":
        return state, f"{where}: {state}"
    if record.get("host") == socket.gethostname() and not pid_alive(int(record.get("pid") or 0)):
        return "dead", f"{where}: its process is gone (last update {_duration(age)} ago)"
    if age > STALE_SECONDS:
        return "dead", f"{where}: no update for {_duration(age)} (stale; alive processes write every " \
                       f"{HEARTBEAT_SECONDS:.0f} s)"
    return "running", f"{where}: alive, updated {_duration(age)} ago"


def _failures(stage_dir: Path) -> list[tuple[str, str]]:
    """(what failed, worker index) from the job folder: error-<i>.json (its one line), exit-<i>.json."""
    job = _job_folder(stage_dir)
    found = []
    for path in sorted(job.glob("error-*.json")) + sorted(job.glob("exit-*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        index = path.stem.split("-", 1)[1]
        what = data.get("error") or f"exit {data.get('exit')}"
        found.append((f"process {index}: {what}", index))
    return found


def stage_status(stage_dir: Path, now: float | None = None, finished: bool | None = None) -> dict:
    """One stage folder's state: done, running, failed, incomplete (started, nothing running) or
    absent; with lines to show. `finished`: whether its outputs are complete (default: a manifest)."""
    from .launch import log_tail, worker_log

    now = time.time() if now is None else now
    stage_dir = Path(stage_dir)
    records = list(read_records(stage_dir).values())
    health = [_writer_health(r, now) for r in records]
    failures = _failures(stage_dir)
    lines, logs = [], []
    if records:
        lines.append(" ; ".join(describe(u) for u in summarize(records)))
        shards_total = max((r.get("shards_total") or 0 for r in records), default=0)
        if shards_total:
            done = len(list(stage_dir.glob("shard-*.jsonl")))
            lines[-1] = f"shards {done}/{shards_total}, " + lines[-1]
        lines += [detail for _, detail in health]
    failed_workers = {idx for _, idx in failures}
    failed_workers |= {str(r.get("worker", "")).removeprefix("worker-") for r, (s, _) in zip(records, health)
                       if s in ("dead", "failed")}
    lines += [what for what, _ in failures]
    for index in sorted(failed_workers):
        path = worker_log(_job_folder(stage_dir), int(index)) if index.isdigit() else None
        if path is not None and path.is_file():
            logs.append(f"log {path} (last lines):\n" + "\n".join(
                "    | " + line for line in log_tail(path, LOG_TAIL_LINES).splitlines()))
    finished = (stage_dir / "manifest.json").is_file() if finished is None else finished
    if finished and not any(s == "running" for s, _ in health):
        state = "done"
    elif failed_workers:
        state = "failed"
    elif any(s == "running" for s, _ in health) or _job_folder(stage_dir).is_dir():
        state = "running"
    elif stage_dir.is_dir():
        state = "incomplete"  # started, not finished, nothing running: rerun to resume
    else:
        state = "absent"
    return {"state": state, "lines": lines, "logs": logs}


def _manifest_summary(stage_dir: Path) -> str:
    try:
        manifest = json.loads((stage_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    counts = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in (manifest.get("counts") or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool))
    seconds = manifest.get("seconds")
    return counts + (f" in {_duration(seconds)}" if isinstance(seconds, (int, float)) else "")


def _stage_folders(run_dir: Path) -> list[tuple[str, Path, bool | None]]:
    """(title, folder, finished; None: by its manifest) of every stage the run has begun, in the
    order the loop runs them."""
    import re

    found: list[tuple[str, Path, bool | None]] = []
    runs = [("", run_dir)] + [(f"{c.name}/", c) for c in sorted((run_dir / "controls").glob("*")) if c.is_dir()]
    for prefix, root in runs:
        iterations = sorted((int(m.group(1)), p) for p in root.glob("iter*")
                            if p.is_dir() and (m := re.fullmatch(r"iter(\d+)", p.name)))
        for t, it in iterations:
            found += [(f"{prefix}iter{t} {stage}", it / stage, None) for stage in STAGES
                      if (it / stage).is_dir() or _job_folder(it / stage).is_dir()]
    eval_dir = run_dir / "eval"
    labels = {p.name.removesuffix(".workers") for p in eval_dir.glob("*") if p.is_dir()}
    # an evaluation has no manifest: its answers are judged once a judgements file exists
    found += [(f"evaluate {label}", eval_dir / label, any((eval_dir / label).glob("*/judgements.*.json")))
              for label in sorted(labels)]
    return found


def run_status(run_dir: Path, now: float | None = None) -> str:
    """The text of `icr status RUN_DIR`: what runs (or failed, or finished last), with counts, rates,
    ETA, the writers' health and a failed worker's log tail. IcrError for a folder that is not a run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise IcrError(f"{run_dir}: not an icr run folder (no config.yaml)")
    rows, headline = [], None
    last_done = None
    for title, folder, finished in _stage_folders(run_dir):
        st = stage_status(folder, now, finished)
        if st["state"] == "done":
            last_done = title
            rows.append(f"  {title:<22} done     {_manifest_summary(folder)}")
            continue
        if st["state"] in ("running", "failed") and headline is None:
            headline = f"{st['state']}: {title}"
        rows.append(f"  {title:<22} {st['state']:<8} " + (st["lines"][0] if st["lines"] else ""))
        rows += [f"      {line}" for line in st["lines"][1:]]
        rows += [f"      {block}" for block in st["logs"]]
    if headline is None:
        headline = f"last finished: {last_done}" if last_done else "nothing computed yet"
    iterations = _configured_iterations(run_dir)
    if iterations:
        headline += f" (of {iterations} iteration{'s' * (iterations != 1)})"
    return "\n".join([f"{run_dir}: {headline}", *rows])


def _configured_iterations(run_dir: Path) -> int | None:
    import yaml

    try:
        value = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("iterations")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return value if isinstance(value, int) else None
