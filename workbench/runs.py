"""The run-directory contract: what each stage writes into ``reports/<name>/`` and how it is read back.

Every stage reads and writes its run directory through here: one reader per file (validating it the
same way for every stage), "run stage X first" errors for a missing input, one rule for merging
a section into ``metrics.json``, and one lock per run folder (:func:`run_lock`).
"""
from __future__ import annotations

import datetime as _dt
import difflib
import fcntl
import functools
import json
import os
import socket
import sys
import uuid
import warnings
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .data.shots import parse_shots
from .io import CorruptFileError, read_json, read_jsonl, set_aside, write_json, write_jsonl

PARAMS = "params.yaml"
METRICS = "metrics.json"
DESCRIPTIONS = "descriptions.jsonl"
MATCHES = "matches.jsonl"
TRAIN_LOG = "train_log.jsonl"
INDEX = "checkpoints/index.json"
CHECKPOINTS = "checkpoints"
LOCK = "run.lock"

# Which stage writes each file, for "run the ... first" errors.
WRITERS = {
    DESCRIPTIONS: "describe stage (01_describe)",
    MATCHES: "match stage (02_match)",
    TRAIN_LOG: "fine-tuning stage (03_finetune)",
    INDEX: "fine-tuning stage (03_finetune)",
}
# Methods whose fine-tuned checkpoints a run directory can hold.
FINETUNE_METHODS = ("gist", "finetune-classname")


def stage_file(run_dir_or_path: str | Path, name: str) -> Path:
    """``run_dir/name`` (or the file itself when a file is given); a missing file names the stage that writes it."""
    path = Path(run_dir_or_path)
    if path.is_dir():
        path = path / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the {WRITERS.get(name, 'stage that writes it')} first")
    return path


# ----------------------------------------------------------------------------- metrics.json
# How a section merges into what metrics.json holds. A list of rows with declared key fields is the
# current configuration's rows, whole: it replaces the old list, and old rows whose key is not among the
# new ones (a method, shots value or seed no longer configured) move to ``metrics["stale"][section]``
# with the time they left, so no table or plot of this run shows them. "keys": a dict merged key by key.
# A dotted name applies to one key of a dict section. Everything else is replaced whole.
MERGE: dict[str, Any] = {
    "accuracy": ("method", "shots", "seed"),
    "comparisons": ("a", "b", "shots"),
    "finetune.runs": ("run",),
    "timing": "keys",
}
STALE = "stale"


def _row_key(how: tuple, r: dict) -> tuple:
    return tuple(str(r.get(k)) for k in how)


def _merge(path: str, old: Any, new: Any, stale: dict) -> Any:
    how = MERGE.get(path)
    if how == "keys" and isinstance(old, dict) and isinstance(new, dict):
        return {**old, **new}
    if isinstance(how, tuple) and isinstance(old, list) and isinstance(new, list):
        fresh = {_row_key(how, r) for r in new}
        gone = [r for r in old if _row_key(how, r) not in fresh]
        kept = [r for r in stale.get(path, []) if _row_key(how, r) not in fresh]  # back in the configuration
        when = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        stale[path] = kept + [{**r, "stale_since": when} for r in gone]
        if not stale[path]:
            stale.pop(path)
        return list(new)
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: _merge(f"{path}.{k}", old[k], v, stale) if k in old else v for k, v in new.items()}
    return new


def read_metrics(run_dir: str | Path) -> dict:
    """``metrics.json`` ({} before any stage wrote one). A broken one (cut off, not a JSON object) is moved
    aside to ``metrics.json.broken-<time>``, with a warning naming both, and read as {}: no stage trips on it."""
    path = Path(run_dir) / METRICS
    try:
        metrics = read_json(path) if path.exists() else {}
    except CorruptFileError as e:
        set_aside(path, str(e))
        return {}
    if not isinstance(metrics, dict):
        set_aside(path, f"{path}: holds a JSON {type(metrics).__name__}, not an object of sections")
        return {}
    return metrics


def update_metrics(run_dir: str | Path, section: str, value: Any) -> dict:
    """Merge ``value`` into ``metrics.json[section]`` by the one rule (:data:`MERGE`: row lists are the
    current configuration's, earlier rows no longer in it move to ``metrics["stale"]``); atomic write. Keys
    that start with "_", at any depth (per-image outcomes a stage keeps in memory), are not written."""
    value = _public(value)
    metrics = read_metrics(run_dir)
    stale = metrics.pop(STALE, {})
    metrics[section] = _merge(section, metrics[section], value, stale) if section in metrics else value
    if stale:
        metrics[STALE] = stale
    write_json(Path(run_dir) / METRICS, metrics)
    return metrics


def _public(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


# ----------------------------------------------------------------------------- descriptions
def read_descriptions(run_dir_or_path: str | Path) -> list[dict]:
    """The records of ``descriptions.jsonl`` (a run directory or the file), each id once (see :func:`dedupe_jsonl`)."""
    return dedupe_jsonl(stage_file(run_dir_or_path, DESCRIPTIONS))


def dedupe_jsonl(path: str | Path, key: str = "id") -> list[dict]:
    """The records of a JSONL file, the first of each ``key`` only. Repeats (two runs that appended at
    once, before run folders were locked) are also dropped from the file, so the folder heals and no
    later stage trips over them; only under the run lock, and left on disk when another process holds it."""
    path = Path(path)
    records = read_jsonl(path)
    seen: set = set()
    unique = []
    for r in records:
        k = r.get(key)
        if k is None or k not in seen:
            seen.add(k)
            unique.append(r)
    if len(unique) < len(records):
        try:
            with run_lock(path.parent):
                write_jsonl(path, unique)
            warnings.warn(f"{path}: dropped {len(records) - len(unique)} repeated record(s) (same {key}; "
                          "the first of each is kept)", stacklevel=2)
        except RunBusyError:
            pass  # its writer will heal it
    return unique


def check_descriptions(records: Sequence[dict], classnames: Sequence[str], needed: Sequence[str]) -> dict[str, list[int]]:
    """Record indices per class. Raises (listing every offender) on classes not in the dataset, missing
    or duplicate ids, empty texts, and classes in ``needed`` that have no description."""
    problems = []
    unknown = sorted({r.get("class") for r in records} - set(classnames), key=str)
    if unknown:
        hints = []
        for c in unknown:
            close = difflib.get_close_matches(str(c), classnames, n=1)
            hints.append(f"{c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        problems.append(f"descriptions name {len(unknown)} class(es) not in the dataset: " + ", ".join(hints))
    counts = Counter(r.get("id") for r in records)
    dup = sorted((i for i, n in counts.items() if n > 1 or i is None), key=str)
    if dup:
        problems.append(f"missing or duplicate description ids: {dup[:20]}")
    empty = [r.get("id") for r in records if not str(r.get("text") or "").strip()]
    if empty:
        problems.append(f"{len(empty)} description(s) with empty text: {empty[:20]}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.get("class")].append(i)
    missing = [c for c in needed if not groups.get(c)]
    if missing:
        problems.append(f"{len(missing)} class(es) have no descriptions: " + ", ".join(map(repr, missing)))
    if problems:
        raise ValueError("descriptions do not fit the dataset:\n- " + "\n- ".join(problems))
    return dict(groups)


# ----------------------------------------------------------------------------- matches
def read_matches(run_dir_or_path: str | Path) -> list[dict]:
    return read_jsonl(stage_file(run_dir_or_path, MATCHES))


def write_matches(run_dir: str | Path, records: Sequence[dict]) -> Path:
    path = Path(run_dir) / MATCHES
    write_jsonl(path, records)
    return path


# ----------------------------------------------------------------------------- checkpoints
def read_index(run_dir: str | Path, required: bool = True) -> list[dict] | None:
    """The entries of ``checkpoints/index.json``, validated, with ``shots`` parsed and ``abspath`` set.

    A missing index raises ("run the fine-tuning stage first"), or gives None with ``required=False``.
    """
    path = Path(run_dir) / INDEX
    if not path.exists():
        if required:
            stage_file(run_dir, INDEX)
        return None
    entries = read_json(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of checkpoint entries, got {type(entries).__name__}")
    problems, out = [], []
    for i, e in enumerate(entries):
        miss = [k for k in ("method", "shots", "seed", "path", "model") if k not in e]
        if miss:
            problems.append(f"entry {i}: missing {miss}")
            continue
        if e["method"] not in FINETUNE_METHODS:
            problems.append(f"entry {i}: method {e['method']!r} is not one of {list(FINETUNE_METHODS)}")
        try:
            shots = parse_shots([e["shots"]])[0]
        except ValueError as err:
            problems.append(f"entry {i}: {err}")
            continue
        ckpt = Path(e["path"]) if Path(e["path"]).is_absolute() else Path(run_dir) / e["path"]
        if not ckpt.exists():
            problems.append(f"entry {i}: checkpoint file not found: {ckpt}")
        out.append({**e, "shots": shots, "seed": int(e["seed"]), "abspath": str(ckpt.resolve())})
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return out


def update_index(run_dir: str | Path, rows: Sequence[dict]) -> None:
    """Merge rows into ``checkpoints/index.json``: rows of the same (method, shots, seed) are replaced."""
    path = Path(run_dir) / INDEX
    old = read_json(path) if path.exists() else []
    new = {_index_key(r) for r in rows}
    write_json(path, [r for r in old if _index_key(r) not in new] + list(rows))


def _index_key(r: dict) -> tuple:
    return r["method"], str(r["shots"]), int(r["seed"])


def retire_index(run_dir: str | Path, planned: Sequence[tuple]) -> list[dict]:
    """Move the index entries of runs not in ``planned`` ((method, shots, seed) of the current configuration)
    to ``checkpoints/index.stale.json``, so evaluation never probes them; their files stay. Returns them."""
    path = Path(run_dir) / INDEX
    if not path.exists():
        return []
    keep = {(m, str(k), int(s)) for m, k, s in planned}
    entries = read_json(path)
    gone = [e for e in entries if _index_key(e) not in keep]
    if gone:
        stale_path = path.with_name("index.stale.json")
        old = read_json(stale_path) if stale_path.exists() else []
        fresh = {_index_key(e) for e in gone}
        write_json(stale_path, [e for e in old if _index_key(e) not in fresh] + gone)
        write_json(path, [e for e in entries if _index_key(e) in keep])
    return gone


def read_train_log(run_dir: str | Path) -> list[dict]:
    return read_jsonl(stage_file(run_dir, TRAIN_LOG))


# ----------------------------------------------------------------------------- the run lock
# One writer per run folder: two runs under one name used to append the same descriptions twice (each
# LLM prompt paid twice) and leave a folder that every later run refused. The lock is a file made by an
# atomic link(), which also holds on a shared (NFS) disk; a flock on the folder serialises check and
# take-over among processes of one host. The holder's token travels to its child processes (the stage
# kernels of a `workbench run`) in LOCK_ENV, so a run never blocks its own notebooks.
LOCK_ENV = "WORKBENCH_RUN_LOCKS"


class RunBusyError(RuntimeError):
    """The run folder is locked by another process; ``.holder`` is the lock's record."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _proc_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot; Linux), so a reused PID is not taken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Is the holder, a process of this host, still running?"""
    pid = int(holder.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    start, recorded = _proc_start(pid), holder.get("pid_start")
    return recorded is None or start is None or start == recorded


def lock_holder(run_dir: str | Path) -> dict | None:
    """The record of whoever holds the run folder's lock (``pid, host, started, command``), or None."""
    path = Path(run_dir) / LOCK
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "host": "unknown", "started": "unknown", "command": f"unreadable lock file {path}"}


def _who(h: dict) -> str:
    return f"PID {h.get('pid')} on host {h.get('host')}, started {h.get('started')} (`{h.get('command')}`)"


def _busy(path: Path, h: dict, force: bool = False) -> RunBusyError:
    if h.get("host") == socket.gethostname():
        how = "Wait for it to finish, stop it, or use another run name (--name)." + (
            " --force breaks only locks whose holder cannot be checked: this process is alive." if force else "")
    else:
        how = ("That host cannot be checked from here: if the process no longer runs, break the lock with "
               f"`workbench run ... --force` (or delete {path}).")
    return RunBusyError(f"run folder {path.parent} is in use: locked by {_who(h)}. {how}", h)


def _held_tokens() -> set[str]:
    return set(filter(None, os.environ.get(LOCK_ENV, "").split(",")))


@contextmanager
def _guard(run_dir: Path) -> Iterator[None]:
    """Serialise lock checks among this host's processes (a no-op where flock is unsupported)."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


def _acquire(run_dir: Path, force: bool) -> str | None:
    """Take the lock and return its token; None when this process (or the run that started it) holds it."""
    path = run_dir / LOCK
    with _guard(run_dir):
        h = lock_holder(run_dir)
        if h is not None:
            if h.get("token") in _held_tokens():
                return None
            local = h.get("host") == socket.gethostname()
            if (local and _alive(h)) or (not local and not force):
                raise _busy(path, h, force)
            why = "its process is gone" if local else "--force"
            warnings.warn(f"{path}: took over the lock of {_who(h)}: {why}", stacklevel=4)
            path.unlink(missing_ok=True)
        token = uuid.uuid4().hex
        rec = {"pid": os.getpid(), "host": socket.gethostname(),
               "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python",
               "pid_start": _proc_start(os.getpid()), "token": token}
        try:
            _create(path, json.dumps(rec) + "\n")
        except FileExistsError:  # another host took the lock in the meantime
            raise _busy(path, lock_holder(run_dir) or {}) from None
    return token


def _create(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, failing if it exists, and never visible half-written: a
    complete temporary file is hard-linked into place (an exclusive create where links are unsupported)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system (some FUSE/SMB mounts)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as f:
            f.write(text)
    finally:
        tmp.unlink(missing_ok=True)


def _release(run_dir: Path, token: str) -> None:
    if not run_dir.is_dir():
        return
    with _guard(run_dir):
        h = lock_holder(run_dir)
        if h is not None and h.get("token") == token:  # not a lock someone broke and retook
            (run_dir / LOCK).unlink(missing_ok=True)


@contextmanager
def run_lock(run_dir: str | Path, force: bool = False) -> Iterator[None]:
    """Hold the run folder's lock (``run_dir/run.lock``) for the ``with`` block.

    Another holder raises :class:`RunBusyError` at once, naming it (PID, host, start time, command).
    A lock left by a dead process of this host is taken over (with a warning); one held from another
    host (a shared disk) cannot be checked and is broken only with ``force``. Re-entrant: inside the
    block, this process and the processes it starts (stage kernels, via ``WORKBENCH_RUN_LOCKS``) pass.
    """
    run_dir = Path(run_dir)
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    token = _acquire(run_dir, force)
    if token is None:
        yield
        return
    before = os.environ.get(LOCK_ENV)
    os.environ[LOCK_ENV] = ",".join(filter(None, [before, token]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = before
        _release(run_dir, token)
        try:
            for d in created:  # folders made here that nothing was written to: leave no trace
                d.rmdir()
        except OSError:
            pass


def locked(fn):
    """Run a stage entry ``fn(p, ...)`` holding the lock of its run folder (``p["run_dir"]``, or ``p``
    itself when it is a path): a notebook run by hand (JupyterLab, papermill) cannot write into a
    folder that a `workbench run` or another notebook is writing, while a `workbench run`'s own
    notebooks pass (see :func:`run_lock`)."""

    @functools.wraps(fn)
    def wrapper(p, *args, **kwargs):
        with run_lock(p if isinstance(p, (str, os.PathLike)) else p["run_dir"]):
            return fn(p, *args, **kwargs)

    return wrapper
