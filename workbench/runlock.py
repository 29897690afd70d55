"""One writer per run folder: :func:`run_lock` (``run_dir/run.lock``), and :func:`locked` for stage entries.

Two runs under one name used to append the same descriptions twice (each LLM prompt paid twice) and
leave a folder that every later run refused. The lock is a file made by an atomic link(), which also
holds on a shared (NFS) disk; a flock on the folder serialises check and take-over among processes of
one host. The holder's token travels to its child processes (the stage kernels of a `workbench run`) in
LOCK_ENV, so a run never blocks its own notebooks. Those children register in the lock as its writers and
stop when the holder is gone: a `workbench run` killed with SIGKILL does not take its kernel (in a session
of its own) along, and ipykernel's parent poller, where it has one, stops only the kernel, not what a
stage started. A run that takes over a dead holder's lock first kills the writers still running.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK = "run.lock"
LOCK_ENV = "WORKBENCH_RUN_LOCKS"
WATCH_INTERVAL = 0.5  # seconds between a writer's checks that its run's holder still runs
STOP_WAIT = 5.0  # seconds a take-over waits for the killed writers of a dead holder to exit


class RunBusyError(RuntimeError):
    """The run folder is locked by another process; ``.holder`` is the lock's record."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state first; Linux), or [] where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _proc_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot; Linux), so a reused PID is not taken for the holder."""
    stat = _proc_stat(pid)
    return stat[19] if len(stat) > 19 else None


def _alive(holder: dict) -> bool:
    """Is the holder (or a writer: ``pid``, ``pid_start``), a process of this host, still running?"""
    pid = int(holder.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    stat, recorded = _proc_stat(pid), holder.get("pid_start")
    if stat and stat[0] in "ZX":  # exited, not yet reaped by its parent: it writes nothing more
        return False
    start = stat[19] if len(stat) > 19 else None
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


# Tokens this process was started with: it is a child (a stage kernel) of their holder, and may write
# into the run folder outside any `run_lock` block too (a notebook's figure cells), so it stays a
# writer, watched, until it exits. A token set later (a test, a notebook by hand) counts per block.
_BORN_WITH = _held_tokens()
_watched: dict[str, tuple[Path, dict]] = {}  # token -> (run folder, holder record) this process writes for
_depth: dict[str, int] = {}  # token -> re-entrant blocks open in this process
_watch_guard = threading.Lock()
_watchdog: list[threading.Thread] = []  # at most one per process


def _after_fork() -> None:
    global _watch_guard
    _watch_guard = threading.Lock()  # a fork copies the lock in whatever state another thread left it
    _watchdog.clear()  # threads do not survive a fork: the child starts its own when it writes
    _watched.clear()
    _depth.clear()


os.register_at_fork(after_in_child=_after_fork)


def _me() -> dict:
    return {"pid": os.getpid(), "pid_start": _proc_start(os.getpid())}


def _rewrite(path: Path, rec: dict) -> None:
    """Replace the lock record ``path`` (it stays in place throughout: a complete file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        tmp.write_text(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _set_writer(run_dir: Path, h: dict, present: bool) -> None:
    """Add this process to (or drop it from) the ``writers`` of the lock record ``h``, under the flock guard;
    writers that are gone are dropped on the way."""
    me = _me()
    writers = [w for w in h.get("writers") or [] if w.get("pid") != me["pid"] and _alive(w)]
    _rewrite(run_dir / LOCK, {**h, "writers": writers + [me] * present})


def _enter_writer(run_dir: Path, h: dict) -> None:
    """This process passes the lock of ``h`` as one of its run's writers (a stage kernel): registered in the
    lock (a take-over stops it) and watched (it stops itself when the holder is gone)."""
    token = h["token"]
    with _watch_guard:
        _depth[token] = _depth.get(token, 0) + 1
        _watched[token] = (run_dir, h)
        if not _watchdog:
            _watchdog.append(threading.Thread(target=_watch, name="workbench-run-lock-watch", daemon=True))
            _watchdog[0].start()
    if _me() not in (h.get("writers") or []):
        _set_writer(run_dir, h, True)


def _leave_writer(run_dir: Path, token: str) -> None:
    """A writer's block of ``token`` closed. After its last one, a process given the token later (not at
    its start) is a writer no more; a child of the holder stays one until it exits."""
    with _watch_guard:
        _depth[token] -= 1
        if _depth[token] or token in _BORN_WITH:
            return
        del _depth[token]
        _watched.pop(token, None)
    with _guard(run_dir):
        h = lock_holder(run_dir)
        if h is not None and h.get("token") == token:
            _set_writer(run_dir, h, False)


def _watch() -> None:
    """Stop this process once the holder of a run it writes for is gone: a killed `workbench run` must
    not leave its kernel writing into a folder whose lock a rerun then takes over."""
    while True:
        time.sleep(WATCH_INTERVAL)
        with _watch_guard:
            watched = list(_watched.values())
        for run_dir, h in watched:
            if not _alive(h):
                os.write(2, f"workbench: the run holding {run_dir} (PID {h.get('pid')}) is gone; this process "
                            f"(PID {os.getpid()}), which wrote into that folder for it, stops\n".encode())
                os._exit(1)


def _stop_writers(h: dict) -> int:
    """Kill (SIGKILL) the writers of a dead holder ``h`` that still run and wait (up to STOP_WAIT) for them
    to exit; returns how many there were."""
    alive = [w for w in h.get("writers") or [] if w.get("pid") != os.getpid() and _alive(w)]
    for w in alive:
        try:
            os.kill(int(w["pid"]), signal.SIGKILL)
        except OSError:
            pass  # gone meanwhile, or not ours to kill: the wait below tells
    end = time.monotonic() + STOP_WAIT
    while any(_alive(w) for w in alive) and time.monotonic() < end:
        time.sleep(0.05)
    return len(alive)


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


def _acquire(run_dir: Path, force: bool) -> tuple[str | None, str | None]:
    """Take the lock: ``(its token, None)``; ``(None, None)`` when this process holds it already, and
    ``(None, holder's token)`` when the run that started this process (or gave it the token) does."""
    path = run_dir / LOCK
    with _guard(run_dir):
        h = lock_holder(run_dir)
        if h is not None:
            if h.get("token") in _held_tokens():
                if h.get("pid") == os.getpid() or h.get("host") != socket.gethostname():
                    return None, None  # the holder itself; or one that cannot be watched from here
                _enter_writer(run_dir, h)
                return None, h["token"]
            local = h.get("host") == socket.gethostname()
            if (local and _alive(h)) or (not local and not force):
                raise _busy(path, h, force)
            why = "its process is gone" if local else "--force"
            stopped = _stop_writers(h) if local else 0
            if stopped:
                why += f"; stopped {stopped} of its processes still writing there (stage kernels)"
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
    return token, None


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
    block, this process and the processes it starts (stage kernels, via ``WORKBENCH_RUN_LOCKS``) pass;
    those register in the lock as the run's writers and exit once the holder is gone, and a take-over
    kills the writers a dead holder left running.
    """
    run_dir = Path(run_dir)
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    token, writer = _acquire(run_dir, force)
    if token is None:
        try:
            yield
        finally:
            if writer is not None:
                _leave_writer(run_dir, writer)
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
