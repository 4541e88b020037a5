"""Run folders: atomic files, JSONL shards, stage manifests and the one-writer lock.

A stage writes into its own folder and finishes by writing `manifest.json` (config hash, input
hashes, library versions, counts, timings). A stage whose manifest matches the current key is
skipped. Long stages write numbered shards (`shard-00000.jsonl`), each atomically (temporary
file + rename), so an interrupted stage resumes at the first missing shard and nothing
half-written is ever read back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from .errors import IcrError

log = logging.getLogger("icr")


# ---------------------------------------------------------------------------------------------
# Errors the environment causes
# ---------------------------------------------------------------------------------------------

ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                      errno.EISDIR, errno.EFBIG}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# A full disk seen through a library that does not raise OSError: safetensors' Rust writer ("No
# space left on device (os error 28)"), torch's writer ("file write failed", the OSError as context).
_FULL_MESSAGE = re.compile(r"No space left on device|Disk quota exceeded|File too large|os error (28|27|122)\b|"
                           r"PytorchStreamWriter failed writing file")
_RESUME = "; free space (or raise the file size limit) and rerun the same command to resume"


def environment_problem(error: BaseException) -> str | None:
    """The one line for an error the environment caused (a full disk, a file size limit, a
    permission, a read-only file system, a file where a folder should be), found in `error` or the
    errors it came from; None for anything else (a bug: its traceback stays)."""
    chain = []  # the error and those it came from (raise ... from, or raised while handling)
    while error is not None and all(error is not e for e in chain) and not isinstance(error, IcrError):
        chain.append(error)
        error = error.__cause__ or error.__context__
    for e in chain:  # the OSError itself names the file
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            where = f"{e.filename}: " if e.filename else ""
            return f"{where}{e.strerror}{_RESUME if e.errno in _FULL else ''}"
    for e in chain:
        if _FULL_MESSAGE.search(str(e)):
            return f"{str(e).strip().splitlines()[0][:300]} ({type(e).__name__}){_RESUME}"
    return None


@contextlib.contextmanager
def environment_errors(folder: Path):
    """Within the block, an error the environment caused (`environment_problem`) becomes an
    IcrError naming `folder` (where the stage was writing), so it ends in one line; what was
    written before stays and the rerun resumes from it."""
    try:
        yield
    except IcrError:
        raise
    except Exception as e:
        problem = environment_problem(e)
        if problem is None:
            raise
        raise IcrError(f"{folder}: {problem}" if str(folder) not in problem else problem) from e


# ---------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; the renamed result gets the mode any new file gets (0666 less
        # the umask), so other accounts on a shared cluster can read results as the user intends.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno == errno.ENOSPC:
            raise IcrError(f"{path}: no space left on device while writing") from None
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def honour_umask(folder: Path) -> None:
    """Give the files a library wrote under `folder` the mode the user's umask asks for:
    safetensors writes its files 0600 whatever the umask, so a model icr saved would be unreadable
    to the user's group (0644 under umask 022)."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def dumps_record(record: dict) -> str:
    # Sorted keys and no float reformatting: the same record always gives the same bytes.
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    lines = [dumps_record(r) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise IcrError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    return out


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def text_hash(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------

def shard_path(stage_dir: Path, index: int) -> Path:
    return Path(stage_dir) / f"shard-{index:05d}.jsonl"


def read_shards(stage_dir: Path) -> list[dict]:
    records = []
    for path in sorted(Path(stage_dir).glob("shard-*.jsonl")):
        records.extend(read_jsonl(path))
    return records


def chunk(items: list, size: int) -> Iterator[tuple[int, list]]:
    for index, start in enumerate(range(0, len(items), size)):
        yield index, items[start:start + size]


def append_journal(stage_dir: Path, event: dict) -> None:
    """Append one line to `journal.jsonl`: which process finished which shard, when.

    Written after the shard's rename, so a shard in the journal twice was computed twice (the
    kill-and-resume harness checks that this never happens)."""
    line = dumps_record({**event, "pid": os.getpid(), "time": round(time.time(), 3)}) + "\n"
    with open(Path(stage_dir) / "journal.jsonl", "a", encoding="utf-8") as fh:
        fh.write(line)


def check_free_disk(folder: Path, needed_bytes: int, what: str) -> None:
    """Warn when the disk holding `folder` has less free space than a stage expects to write."""
    import logging
    import shutil as _shutil

    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    free = _shutil.disk_usage(probe).free
    if free < needed_bytes:
        logging.getLogger("icr").warning(
            "%s: may write up to %.1f GB but only %.1f GB are free on %s", what, needed_bytes / 1e9, free / 1e9, probe)


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------

def library_versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("icr", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    return versions


def manifest_matches(stage_dir: Path, key: dict) -> bool:
    path = Path(stage_dir) / "manifest.json"
    if not path.is_file():
        return False
    try:
        return read_json(path).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False


def write_manifest(stage_dir: Path, key: dict, counts: dict, seconds: float, extra: dict | None = None) -> None:
    write_json(Path(stage_dir) / "manifest.json", {
        "key": key,
        "counts": counts,
        "seconds": round(seconds, 3),
        "versions": library_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    })


# ---------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------

SHARED_LOCKS = ".shared-locks"  # one file per live shared holder (generate/score on their shards)


@contextlib.contextmanager
def run_lock(run_dir: Path, config: str | None = None, *, shared: bool = False):
    """Hold the run folder for the duration, compatibly with the other commands working in it.

    `config` identifies the config the command runs (`text_hash(dump_config(cfg))`). Exclusive
    holders (`icr run`, `pairs`, `train`, `evaluate`: `run_dir/.lock`) exclude each other; shared
    holders (`icr generate/score`, each on its shards: one file each under `.shared-locks/`) run
    beside each other and beside an exclusive holder, as long as all of them run the same config.
    A different config is refused whichever came first, so no folder ever mixes two configs'
    outputs. Holders whose process is gone (same host) are ignored and their files removed.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IcrError(f"{run_dir}: cannot create the run folder ({e.strerror or type(e).__name__})") from None
    if not shared:
        with hold_lock(run_dir / ".lock", f"{run_dir}: in use", extra={"config": config}):
            _refuse_other_configs(run_dir, config, _live_shared(run_dir))
            yield
        return
    me = run_dir / SHARED_LOCKS / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    me.parent.mkdir(exist_ok=True)
    atomic_write_text(me, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "config": config}))
    beat = _Heartbeat(me)
    try:
        # Registered first, checked second: of two commands starting together at least one sees
        # the other, so two configs never both go ahead.
        others = [h for h in _live_shared(run_dir) if h["file"] != me]
        exclusive = _live_holder(run_dir / ".lock")
        _refuse_other_configs(run_dir, config, others + ([exclusive] if exclusive else []))
        yield
    finally:
        beat.stop()
        me.unlink(missing_ok=True)


def lease_seconds() -> float:
    """How long a lock of another host stays valid without a heartbeat (ICR_LOCK_LEASE, default 600 s)."""
    try:
        return max(1.0, float(os.environ.get("ICR_LOCK_LEASE", "600")))
    except ValueError:
        raise IcrError(f"ICR_LOCK_LEASE: expected seconds, got {os.environ['ICR_LOCK_LEASE']!r}") from None


class _Heartbeat:
    """Touches a lock file every lease/10 seconds while its holder lives: the lease other hosts read.

    Why our own and not filelock's SoftFileLock: a soft lock left by a crashed node blocks forever
    (its pid means nothing on another host) and filelock has no lease. Liveness across hosts is
    the file's modification time, renewed here and compared with the shared file system's own
    clock (`_fs_now`), so the nodes' clocks need not agree."""

    def __init__(self, path: Path):
        self.path, self._stop = Path(path), threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"icr-lock-heartbeat-{self.path.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(lease_seconds() / 10):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _fs_now(folder: Path) -> float:
    """The shared file system's current time: the modification time of a file created now in `folder`."""
    fd, tmp = tempfile.mkstemp(prefix=".icr-clock-", dir=folder)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(tmp)


def _live_holder(lock: Path) -> dict | None:
    """What a lock file says of its holder, or None: unreadable, not icr's, or its process gone (same host)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    if holder.get("host") == socket.gethostname():
        if not pid_alive(holder["pid"]):
            return None
    else:  # another host's process: alive while it renews its lease (_Heartbeat)
        try:
            silent = _fs_now(lock.parent) - lock.stat().st_mtime
        except OSError:
            return None
        if silent > lease_seconds():
            log.warning("%s: taking over from process %s on %s, silent for %.0f s (lease %.0f s)", lock,
                        holder.get("pid"), holder.get("host"), silent, lease_seconds())
            return None
    return {**holder, "file": lock}


def _live_shared(run_dir: Path) -> list[dict]:
    holders = []
    for path in sorted((run_dir / SHARED_LOCKS).glob("*.json")):
        holder = _live_holder(path)
        if holder is None:
            path.unlink(missing_ok=True)  # its process is gone (or not icr's): a killed shard worker
        else:
            holders.append(holder)
    return holders


def _refuse_other_configs(run_dir: Path, config: str | None, holders: list[dict]) -> None:
    for h in holders:
        if h.get("config") != config:
            raise IcrError(f"{run_dir}: in use with a different config by process {h.get('pid')} on {h.get('host')} "
                           "(same config: allowed beside it; a different one: use another name, or wait)")


@contextlib.contextmanager
def hold_lock(lock: Path, busy: str, extra: dict | None = None, *, wait: bool = False):
    """Hold the lock file `lock` for the duration; refuse (IcrError starting with `busy`) if a live
    process holds it.

    The lock records host and pid and is created with its content in one step (written to a
    temporary file, then hard-linked into place), so a lock file is never seen empty while its
    holder lives. A lock whose process is gone (same host), or whose holder on another host stopped
    renewing its lease (`_Heartbeat`, ICR_LOCK_LEASE), is taken over, so a killed run never blocks
    its own resume; so is an empty or unreadable one (not written by icr). `wait`: wait for a live
    holder to let go instead of refusing.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), **(extra or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}.", dir=lock.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(me, fh)
    try:
        attempts, told = 0, False
        while True:
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                holder = _live_holder(lock)
                if holder is None:  # empty or garbage (no live icr process wrote it), or its process is gone
                    lock.unlink(missing_ok=True)
                    attempts += 1
                    if attempts > 3:
                        raise IcrError(f"{busy}: could not take {lock}") from None
                    continue
                if not wait:
                    raise IcrError(
                        f"{busy} by process {holder.get('pid')} on {holder.get('host')} "
                        f"(remove {lock} if that process is gone)") from None
                if not told:
                    log.info("%s by process %s on %s: waiting", busy, holder.get("pid"), holder.get("host"))
                    told = True
                time.sleep(1.0)
    finally:
        os.unlink(tmp)
    beat = _Heartbeat(lock)
    try:
        yield
    finally:
        beat.stop()
        lock.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host exists (another account's counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cache_root() -> Path:
    """Where icr keeps what it builds once for many runs (prepared folders, converted GGUF files)."""
    return Path(os.environ.get("ICR_CACHE", ".cache/icr"))


# What a model folder's identity is made of: weights, configs, tokenizer files, a chat template.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken", ".gguf")


def model_key(name_or_path: str | None) -> str | None:
    """Identity of a model for stage keys, from its content, never from where it is mounted.

    A hub id as is; a local folder by the sha256 of its files (MODEL_FILE_SUFFIXES, top level: the
    weights, config and tokenizer); a local GGUF file (`x.gguf` or `folder::x.gguf`) by its sha256.
    So the same model seen under two paths (two mount points of a shared file system, a symlink, a
    copy) has one key, and nodes never discard each other's shards, while retraining a run's model
    changes it. A model a run trained brings its weights' digests in its train manifest (free);
    other files are hashed once per machine and remembered (`file_digest`)."""
    if name_or_path is None:
        return None
    path = Path(name_or_path.replace("::", "/", 1)) if "::" in name_or_path else Path(name_or_path)
    if path.is_file():
        return text_hash("file", file_digest(path))
    if not path.is_dir():
        return name_or_path
    recorded = check_trained_model(path)  # a run's model: its verified digests, not hashed again
    files = sorted(p for p in path.iterdir() if p.suffix in MODEL_FILE_SUFFIXES and p.is_file())
    return text_hash("folder", *[f"{p.name}:{recorded.get(p.name) or file_digest(p)}" for p in files])


_digests: dict[tuple, str] = {}  # (real path, size, mtime_ns, inode) -> sha256, this process


def file_digest(path: Path) -> str:
    """sha256 of a file's content, remembered by (real path, size, modification time, inode) in
    this process and in `cache_root()/file-digests.json` (per machine: an 8B model's 16 GB take
    ~10 s to hash; a file that changes gets a new stamp and is hashed again)."""
    path = Path(path)
    st = path.stat()
    stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if stamp in _digests:
        return _digests[stamp]
    if st.st_size < (1 << 20):  # small files: hashing is cheaper than the cache
        _digests[stamp] = file_sha256(path)
        return _digests[stamp]
    cache = cache_root() / "file-digests.json"
    entry = "|".join(map(str, stamp))
    try:
        known = read_json(cache)
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if not isinstance(known.get(entry), str):
        known[entry] = file_sha256(path)
        with contextlib.suppress(OSError):  # a read-only cache only costs the hash again
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache, known)
    _digests[stamp] = known[entry]
    return known[entry]


# ---------------------------------------------------------------------------------------------
# Models icr wrote: verified before use
# ---------------------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_verified: dict[tuple, bool] = {}  # (folder, (name, size, mtime_ns)...) -> checked in this process


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def weight_digests(model_dir: Path) -> dict[str, str]:
    """sha256 of every weight file of a model folder (what `run_train` records when it saves one).

    Full hashes, not a sample: a model zeroed or cut in place keeps its size, and a partial read
    would miss damage elsewhere. Cost ~1-2 GB/s on one core (an 8B model in fp32: ~20 s), paid once
    per model and process (`verify_weights` remembers what it checked)."""
    return {path.name: file_sha256(path) for path in sorted(Path(model_dir).iterdir())
            if path.suffix in WEIGHT_SUFFIXES and path.is_file()}


def _weights_stamp(model_dir: Path) -> tuple:
    return (str(Path(model_dir).resolve()), *[(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                              for p in sorted(Path(model_dir).iterdir()) if p.suffix in WEIGHT_SUFFIXES])


def verify_weights(model_dir: Path, recorded: dict[str, str], what: str) -> None:
    """Refuse a model whose weight files are not the ones recorded when icr saved it."""
    model_dir = Path(model_dir)
    stamp = _weights_stamp(model_dir)
    if _verified.get(stamp):
        return
    now = weight_digests(model_dir)
    if now != recorded:
        changed = sorted(set(now) ^ set(recorded) | {k for k in now if k in recorded and now[k] != recorded[k]})
        raise IcrError(f"{model_dir}: its weights are not the ones {what} saved ({', '.join(changed)} changed); "
                       "delete the iteration's train/ and model/ folders and rerun to train it again")
    _verified[stamp] = True


def check_trained_model(path: str | Path | None) -> dict[str, str]:
    """If `path` is an iteration model a run trained (`<run>/iter<t>/model`, its train manifest beside
    it records the weights' digests), refuse it unless its weights are still those, and return the
    digests. Other models (pi0, pi_SFT, hub ids) are the user's and pass as they are: {}.
    `model_key` calls it, so every stage key built on a run's model verifies it first."""
    if path is None:
        return {}
    model_dir = Path(str(path))
    manifest = model_dir.parent / "train" / "manifest.json"
    if model_dir.name != "model" or not model_dir.is_dir() or not manifest.is_file():
        return {}
    recorded = read_json(manifest).get("weights") or {}
    if recorded:
        verify_weights(model_dir, recorded, f"{model_dir.parent.name}'s training")
    return recorded
