"""The runner: resolve a configuration, then execute the stage notebooks with papermill into a run
directory, one executed notebook (+ HTML) per stage. It runs notebooks and nothing else."""
from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import nbformat
import papermill as pm
from ipykernel.kernelspec import install as install_kernel
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from nbclient.exceptions import DeadKernelError
from papermill.exceptions import PapermillExecutionError

from . import __version__
from . import config as C
from . import reuse as reuse_mod
from .data import load_dataset
from .identity import table_sha256
from .io import atomic_write_text
from .progress import relay
from .runs import PARAMS, run_lock, update_metrics

KERNEL_NAME = "gist-workbench"


def _runs_this_python(name: str) -> bool:
    """Does the kernel spec ``name`` run this interpreter's environment (same ``bin`` folder)?"""
    try:
        argv0 = KernelSpecManager().get_kernel_spec(name).argv[0]
    except NoSuchKernel:
        return False
    if argv0 in ("python", "python3"):  # jupyter_client runs these as sys.executable
        return True
    return Path(argv0).parent.resolve() == Path(sys.executable).parent.resolve()


def ensure_kernel() -> str:
    """The Jupyter kernel the stages run in: the notebooks' own ``gist-workbench``, running *this*
    interpreter so they see the installed workbench. Registered in ``sys.prefix`` when missing. Where
    that cannot be written (or another Python's kernel of that name comes first), a kernel spec in a
    private temporary folder on ``JUPYTER_PATH`` lends the name to this interpreter, with a note."""
    if _runs_this_python(KERNEL_NAME):
        return KERNEL_NAME
    why = "another Python's kernel of that name comes first on Jupyter's path"
    try:
        install_kernel(kernel_name=KERNEL_NAME, display_name="GIST workbench", prefix=sys.prefix)
        if _runs_this_python(KERNEL_NAME):
            return KERNEL_NAME
    except OSError as e:
        why = f"it cannot be registered in {sys.prefix} ({e.strerror or e})"
    folder = tempfile.mkdtemp(prefix="wb-kernelspec-")
    atexit.register(shutil.rmtree, folder, True)
    write_kernel_spec(Path(folder, "kernels", KERNEL_NAME), overrides={"display_name": "GIST workbench"})
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (folder, os.environ.get("JUPYTER_PATH")) if p)
    print(f"note: the Jupyter kernel {KERNEL_NAME!r} does not run this Python ({sys.executable}): {why}. The "
          "notebooks run in this Python anyway; to open them in JupyterLab with it, register it once: "
          f"{sys.executable} -m ipykernel install --user --name {KERNEL_NAME}", file=sys.stderr)
    return KERNEL_NAME


class StageFailed(RuntimeError):
    """A stage notebook raised; the partly executed notebook is kept at ``.notebook``."""

    def __init__(self, stage: str, notebook: Path, cell: int | None, ename: str, evalue: str):
        self.stage, self.notebook, self.cell, self.ename, self.evalue = stage, notebook, cell, ename, evalue
        where = f"cell {cell}" if cell is not None else "a cell"
        super().__init__(
            f"stage {stage!r} failed in {where}: {ename}: {evalue}\n"
            f"The partly executed notebook is kept at {notebook} (and {notebook.with_suffix('.html')})."
        )


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during stage ``.stage``; its kernel has been shut down."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


_kernels: weakref.WeakSet = weakref.WeakSet()  # this process's kernel managers, for Ctrl-C to reach


def _signal_kernels(signum: int) -> bool:
    """Send ``signum`` to the process group of each running stage kernel; False when none runs."""
    sent = False
    for km in list(_kernels):
        pgid = getattr(km.provisioner, "pgid", None) if km.has_kernel else None
        if pgid:
            try:
                os.killpg(pgid, signum)
                sent = True
            except OSError:
                pass
    return sent


class _Interrupts:
    """Ctrl-C while a stage runs. The kernel runs in a session of its own, so a terminal's SIGINT never
    reaches it: the first is passed on to it (its cell stops with KeyboardInterrupt, its ``finally``
    blocks run, and papermill saves the notebook and shuts the kernel down as after any failed cell);
    a second kills a kernel deaf to it. With no kernel running, KeyboardInterrupt as usual.
    ``.count`` says how many came."""

    def __init__(self):
        self.count, self.before = 0, None
        self.log, self.log_was = logging.getLogger("papermill"), None

    def _on_sigint(self, signum, frame):
        self.count += 1
        if self.count > 1 and self.log_was is None:  # the kernel killed on purpose: no "Kernel died" error
            self.log_was, self.log.disabled = self.log.disabled, True
        if not _signal_kernels(signal.SIGINT if self.count == 1 else signal.SIGKILL):
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.before = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            signal.signal(signal.SIGINT, self.before)
        if self.log_was is not None:
            self.log.disabled = self.log_was


def _kernel_manager_class():
    """Kernels talk over Unix sockets in a private (0700) temporary folder of their own rather than TCP
    on localhost, which other users of a shared machine can reach (ipykernel warns about that on every
    start). Each kernel gets its own folder, so parallel runs never share a socket path. Each manager is
    known to Ctrl-C (``_kernels``)."""

    class TrackedKernelManager(AsyncKernelManager):
        def __init__(self, **kw):
            super().__init__(**kw)
            _kernels.add(self)

    class IPCKernelManager(TrackedKernelManager):
        def __init__(self, **kw):
            self._socket_dir = tempfile.mkdtemp(prefix="wb-kernel-")
            kw.setdefault("transport", "ipc")
            kw.setdefault("ip", os.path.join(self._socket_dir, "k"))
            super().__init__(**kw)

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if not restart:
                shutil.rmtree(self._socket_dir, ignore_errors=True)

        # nbclient cleans up after a dead kernel through this name, which jupyter_client binds to the
        # base class's coroutine; without it the folder of a killed kernel stays behind
        cleanup_resources = _async_cleanup_resources

    # Unix socket paths are limited to ~107 bytes; a deep TMPDIR keeps the TCP default.
    return IPCKernelManager if len(os.path.join(tempfile.gettempdir(), "wb-kernel-xxxxxxxx", "k-65535")) < 100 \
        else TrackedKernelManager


def run_notebook(src: str | Path, out: str | Path, parameters: dict, cwd: str | Path,
                 stage: str | None = None, html: bool = True) -> Path:
    """Execute one notebook with papermill (kernel of this interpreter), save it and an HTML copy."""
    from .htmlreport import export_html  # here: it reads the stages' packages (torch, open_clip), which a
    # `workbench run` whose stages are all reused never needs
    out = Path(out)
    try:
        pm.execute_notebook(
            str(src), str(out), parameters=parameters, kernel_name=ensure_kernel(), cwd=str(cwd),
            progress_bar=False, request_save_on_cell_execute=True, kernel_manager_class=_kernel_manager_class(),
        )
    except PapermillExecutionError as e:
        if html:
            export_html(out)
        raise StageFailed(stage or Path(src).stem, out, e.cell_index, e.ename, e.evalue) from None
    except DeadKernelError:
        cell, evalue = _record_dead_kernel(out)
        if html:
            export_html(out)
        raise StageFailed(stage or Path(src).stem, out, cell, "DeadKernelError", evalue) from None
    if html:
        export_html(out)
    return out


def _record_dead_kernel(out: Path) -> tuple[int | None, str]:
    """The kernel died (kill -9, the out-of-memory killer): find the last cell papermill started in the
    partly executed notebook, put an error output on it so the notebook and its HTML say what happened,
    and return (its index, a message naming it)."""
    nb = nbformat.read(out, as_version=4)
    started = [(c.metadata.get("papermill", {}).get("start_time") or "", i) for i, c in enumerate(nb.cells)
               if c.cell_type == "code"]
    when, cell = max(started, default=("", None))
    if not when:
        return None, "the kernel died before running any cell"
    first = next((ln.strip() for ln in nb.cells[cell].source.splitlines() if ln.strip()), "")
    evalue = (f"the kernel died while running this cell ({first[:80]!r}): it was killed, e.g. by kill -9 or the "
              "out-of-memory killer (see `dmesg`; smaller batches or images need less memory)")
    nb.cells[cell].setdefault("outputs", []).append(
        nbformat.v4.new_output("error", ename="DeadKernelError", evalue=evalue, traceback=[f"DeadKernelError: {evalue}"]))
    # papermill marked every cell "completed" on its way out; say which failed and which never ran
    nb.metadata.setdefault("papermill", {})["exception"] = True
    nb.cells[cell].metadata.papermill.update(status="failed", exception=True)
    for c in nb.cells[cell + 1:]:
        c.metadata.get("papermill", {})["status"] = "pending"
    atomic_write_text(out, nbformat.writes(nb))
    return cell, evalue


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class RunPlan:
    name: str
    run_dir: Path
    config: dict
    stages: dict[str, Path]
    schema: dict[str, dict[str, dict]]


def plan(target: str, sets: list[str] = (), name: str | None = None, stages: list[str] | None = None,
         reports: str | Path = "reports", nb_dir: str | Path | None = None) -> RunPlan:
    """Resolve and validate everything before any notebook runs."""
    all_stages = C.discover_stages(nb_dir)
    schema = {s: C.notebook_parameters(p) for s, p in all_stages.items()}
    cfg = C.resolve(schema, [C.load_source(target)], sets)
    if stages:
        cfg["stages"] = list(stages)
        C.validate(cfg, schema)
    # Notebooks run with the run directory as cwd: a relative path must not change meaning.
    if cfg.get("data_root"):
        cfg["data_root"] = _absolute(cfg["data_root"])
    if cfg.get("shot_files"):
        cfg["shot_files"] = {k: _absolute(v) for k, v in cfg["shot_files"].items()}
    chosen = cfg.get("stages") or list(all_stages)
    selected = {s: p for s, p in all_stages.items() if s in chosen}
    name = check_run_name(name or (Path(target).stem if Path(target).suffix in (".yaml", ".yml") else target))
    return RunPlan(name, Path(reports).resolve() / name, cfg, selected, schema)


def _absolute(path) -> str:
    return str(Path(path).expanduser().resolve())


RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_run_name(name: str) -> str:
    """``name`` if it is one folder name under reports/ (letters, digits, ``.``, ``_``, ``-``; not ``.`` or
    ``..``), else a ValueError naming the rule: ``--name ../x`` or ``a/b`` would write outside its run folder."""
    if not RUN_NAME.fullmatch(name or "") or name in (".", ".."):
        raise ValueError(f"run name {name!r} is not allowed: a run name is one folder name made of letters, digits, "
                         "'.', '_' and '-' (not '.' or '..'); pass --name NAME")
    return name


def check_dataset(cfg: dict):
    """Load the configured dataset once, so a wrong root or missing file fails before any notebook."""
    return load_dataset(cfg["dataset"], cfg.get("data_root"), **(cfg.get("dataset_options") or {}))


def execute(p: RunPlan, log=print, reuse: list | None = None, dataset=None) -> Path:
    """Write ``params.yaml`` and run the planned stages in order, holding the run folder's lock (its
    stage kernels inherit it); raises :class:`StageFailed`, :class:`StageInterrupted` (Ctrl-C, once the
    stage's kernel is shut down), or :class:`RunBusyError` at once.

    Each finished stage is recorded in ``stages.json`` (:mod:`workbench.reuse`). With ``reuse`` (run
    folders, or folders of them such as a sweep; ``[]``: this run's own folder only), a stage whose
    key one of them holds, this run's own folder first, is taken from there instead of run. ``dataset``:
    the configured dataset when the caller has loaded it already (:func:`check_dataset`)."""
    pool = None if reuse is None else list(reuse)
    with run_lock(p.run_dir), _Interrupts() as ctrl_c:
        header = (f"# Resolved configuration of run {p.name!r}: workbench {__version__}, "
                  f"commit {_git_commit()}, {_dt.datetime.now().isoformat(timespec='seconds')}\n")
        atomic_write_text(p.run_dir / PARAMS, header + C.dump(p.config))
        data_sha = table_sha256((dataset or check_dataset(p.config)).table)
        for stage, nb in p.stages.items():
            try:
                _run_stage(p, stage, nb, log, pool, data_sha)
            except (Exception, KeyboardInterrupt):
                if ctrl_c.count:  # the cell stopped by the interrupt, a kernel killed by a second one or
                    raise StageInterrupted(stage) from None  # interrupted while it started
                raise
            if ctrl_c.count:  # the notebook caught the KeyboardInterrupt: stop before the next stage
                raise StageInterrupted(stage)
    return p.run_dir


def dataset_sha(cfg: dict) -> str:
    """The digest of the configured dataset's table (:func:`identity.table_sha256`), a stage key's input."""
    return table_sha256(check_dataset(cfg).table)


def stage_key(p: RunPlan, stage: str, nb: Path, data_sha: str) -> tuple[dict, dict, str]:
    """``(notebook parameters, key inputs, key)`` of ``stage`` in the run folder as it is now."""
    params = {"run_dir": str(p.run_dir), **C.stage_parameters(p.config, stage, p.schema)}
    inputs = reuse_mod.stage_inputs(p.run_dir, stage, nb, params, list(p.schema), data_sha)
    return params, inputs, reuse_mod.stage_key(inputs)


def _run_stage(p: RunPlan, stage: str, nb: Path, log, pool: list | None, data_sha: str) -> None:
    t0 = time.perf_counter()
    params, inputs, key = stage_key(p, stage, nb, data_sha)
    found = None if pool is None else _adopt(p, stage, key, pool, log)
    if pool is None:
        _compute_stage(p, stage, nb, params, key, inputs, log)
    elif found is None:
        with reuse_mod.key_lock(key):  # a run computing the same stage right now finishes it first
            found = _adopt(p, stage, key, pool, log)
            if found is None:
                for f in reuse_mod.prime(p.run_dir, stage, inputs, reuse_mod.candidate_dirs(pool)):
                    log(f"[{stage}] paid answers copied from {f} (the same settings, other code)")
                _compute_stage(p, stage, nb, params, key, inputs, log)
    if found is None:
        dt = time.perf_counter() - t0
        update_metrics(p.run_dir, "timing", {f"{stage}_s": round(dt, 2)})
        log(f"[{stage}] done in {dt:.1f} s")
    elif found != "kept":  # a reused stage's timing is the computation's, in the folder it came from
        update_metrics(p.run_dir, "timing", {f"{stage}_s": found})


def _adopt(p: RunPlan, stage: str, key: str, pool: list, log) -> str | float | None:
    """Take ``stage`` from a donor: "kept" (this run's own, unchanged), the donor's seconds, or None."""
    found = reuse_mod.find_donor(key, p.run_dir, stage, reuse_mod.candidate_dirs(pool))
    if found is None:
        return None
    donor, record = found
    if donor == p.run_dir.resolve():
        log(f"[{stage}] unchanged (key {key}): kept from this run's last computation")
        reuse_mod.note(p.run_dir, stage, "unchanged")
        return "kept"
    reuse_mod.adopt(p.run_dir, stage, donor, record, key)
    log(f"[{stage}] reused from {donor} (key {key}: same settings and inputs)")
    return float(record.get("seconds") or 0.0)


def _compute_stage(p: RunPlan, stage: str, nb: Path, params: dict, key: str, inputs: dict, log) -> None:
    log(f"[{stage}] {nb.name} -> {p.run_dir / nb.name}")
    reuse_mod.forget(p.run_dir, stage)  # until it finishes, its old record is no donor
    recorder = reuse_mod.StageRecorder(p.run_dir, stage, key, inputs)
    with relay(prefix=f"[{stage}] "):  # the kernel's progress bars, on this terminal instead of in the notebook
        run_notebook(nb, p.run_dir / nb.name, params, cwd=p.run_dir, stage=stage)
    recorder.finish()
