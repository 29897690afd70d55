"""Progress bars that tell time: a rate and an estimate left, in the terminal under ``workbench run`` and as
a widget bar in JupyterLab, never a flood in a notebook's stored output.

Every long loop calls :func:`progress_bar` (tqdm's signature). In a notebook or a terminal it is
``tqdm.auto``'s bar. A stage kernel of ``workbench run`` is told a file by :data:`PROGRESS_ENV`: its bars write
their state there as JSON lines, not into the notebook, and the runner's :func:`relay` shows them on its own
stderr: on a terminal one status line redrawn in place, and, terminal or log file, one line per finished bar
(a unit of work: a fine-tuning run, a pass of encoding) with its count, time, rate and what was left.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Iterator

import tqdm.std
from tqdm.auto import tqdm as auto_tqdm

PROGRESS_ENV = "WORKBENCH_PROGRESS"  # the file a runner relays; set for its stage kernels only
_write_lock = threading.Lock()


class _Discard:
    """tqdm's own output of a relayed bar: dropped (the state goes to the relay file)."""

    encoding = "utf-8"

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class _RelayedBar(tqdm.std.tqdm):
    """A tqdm bar whose every refresh appends ``{"id", "event", "line"}`` to the relay file."""

    def __init__(self, *args, relay_file: str, **kw):
        self._relay_file = relay_file
        kw.setdefault("mininterval", 0.5)
        super().__init__(*args, file=_Discard(), **kw)

    def _emit(self, event: str) -> None:
        if self._relay_file is None:
            return
        rec = {"id": f"{os.getpid()}-{id(self)}", "event": event, "line": str(self)}
        try:
            with _write_lock, open(self._relay_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError:  # a progress line is never worth stopping the work for: this bar goes quiet
            self._relay_file = None

    def display(self, msg=None, pos=None):
        if msg is None:  # tqdm clears a bar with msg=""; close() below says it ended
            self._emit("update")
        return True

    def close(self):
        was_open = not self.disable
        super().close()
        if was_open:
            self._emit("close")


def progress_bar(iterable=None, *args, **kw):
    """``tqdm.auto.progress_bar(iterable, ...)``, or, in a stage kernel of ``workbench run``, a bar relayed to the
    runner's terminal (see the module docstring). ``disable=True`` shows nothing anywhere."""
    path = os.environ.get(PROGRESS_ENV)
    if path and not kw.get("disable"):
        return _RelayedBar(iterable, *args, relay_file=path, **kw)
    return auto_tqdm(iterable, *args, **kw)


# ----------------------------------------------------------------------------- the runner's side
class _Relay:
    """Reads the relay file and writes its bars to ``out`` (a terminal: a status line of the open bars,
    redrawn in place; otherwise one in ``every`` seconds), each finished bar's last state on a line of its own."""

    def __init__(self, out: IO, prefix: str, tty: bool, every: float = 30.0, width: int | None = None):
        width = width or shutil.get_terminal_size((120, 24)).columns - 1  # the status line must not wrap
        self.out, self.prefix, self.tty, self.every, self.width = out, prefix, tty, every, width
        self.open: dict[str, str] = {}  # bar id -> its last line, in the order the bars opened
        self.status_shown, self.last_status = False, time.monotonic()

    def feed(self, raw: str) -> None:
        for text in raw.splitlines():
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                continue  # a line cut off mid-write is whole on the next read
            if rec.get("event") == "close":
                self.open.pop(rec.get("id"), None)
                self._line(f"{self.prefix}{rec.get('line', '')}")
            else:
                self.open[rec.get("id")] = rec.get("line", "")
        self._status()

    def _line(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        self.out.flush()

    def _clear(self) -> None:
        if self.tty and self.status_shown:
            self.out.write("\r\x1b[K")
            self.status_shown = False

    def _status(self) -> None:
        if not self.open:
            return
        now = time.monotonic()
        text = self.prefix + " · ".join(self.open.values())
        if self.tty:
            self.out.write("\r\x1b[K" + text[: self.width])
            self.status_shown = True
            self.out.flush()
        elif now - self.last_status >= self.every:
            self.last_status = now
            self._line(text)

    def finish(self) -> None:
        self._clear()
        self.out.flush()


def _follow(path: Path, relay: _Relay, stop: threading.Event, poll: float) -> None:
    with open(path, encoding="utf-8") as f:
        pending = ""
        while True:
            stopping = stop.is_set()
            pending += f.read()
            whole, _, pending = pending.rpartition("\n")
            if whole:
                relay.feed(whole)
            if stopping:
                return
            stop.wait(poll)


@contextlib.contextmanager
def relay(prefix: str = "", out: IO | None = None, every: float = 30.0, poll: float = 0.2) -> Iterator[Path]:
    """While the block runs, kernels started in it (they inherit :data:`PROGRESS_ENV`) show their bars on
    ``out`` (default: this process's stderr), each line starting with ``prefix``; yields the relay file."""
    out = out or sys.stderr
    fd, name = tempfile.mkstemp(prefix="wb-progress-", suffix=".jsonl")
    os.close(fd)
    path, before = Path(name), os.environ.get(PROGRESS_ENV)
    tty = bool(getattr(out, "isatty", lambda: False)())
    shown = _Relay(out, prefix, tty, every)
    stop = threading.Event()
    thread = threading.Thread(target=_follow, args=(path, shown, stop, poll), daemon=True, name="wb-progress")
    os.environ[PROGRESS_ENV] = str(path)
    thread.start()
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = before
        stop.set()
        thread.join(timeout=5)
        shown.finish()
        path.unlink(missing_ok=True)
