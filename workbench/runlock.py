"""One writer per run folder: :func:`run_lock` (``run_dir/run.lock``), and :func:`locked` for stage entries.

Two runs under one name used to append the same descriptions twice (each LLM prompt paid twice) and
leave a folder that every later run refused. The lock is a file made by an atomic link(), which also
holds on a shared (NFS) disk; a flock on the folder serialises check and take-over among processes of
one host. The holder's token travels to its child processes (the stage kernels of a `workbench run`) in
LOCK_ENV, so a run never blocks its own notebooks.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import json
import os
import socket
import sys
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK = "run.lock"
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
