"""Where sweep members run (:mod:`workbench.sweep`): child processes on this machine, ``jobs`` at a time
with one GPU set each, or one SLURM job each through submitit. Both run a member's same ``workbench run``
command, so its result does not depend on the executor."""
from __future__ import annotations

import datetime as _dt
import os
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .runlock import LOCK_ENV

LOGS = "logs"  # the sweep folder's log folder (members' logs, submitit's files)


class SweepError(ValueError):
    """A sweep that cannot start: bad grid, bad value, busy folder; the message names the problem."""


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _die_with_parent() -> None:
    """In the child: SIGINT when the sweep process dies (kill -9 included), so a member stops as after
    Ctrl-C (its stage kernel shut down, its lock released) instead of running on unwatched (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    os.setpgrp()  # Ctrl-C at the terminal reaches the sweep, which passes it on once


class _Executor:
    """What both executors share: members run by :meth:`run` on worker threads, ``jobs_at_once`` at a time."""

    jobs_at_once = 1

    def run(self, cmd: list[str], log_path: Path, on_start=None) -> int:
        raise NotImplementedError

    def interrupt(self) -> None:
        raise NotImplementedError

    def map(self, fn, items) -> None:
        """``fn`` on each item, ``jobs_at_once`` at a time; Ctrl-C starts no more and passes it to the running ones."""
        pool = ThreadPoolExecutor(max_workers=self.jobs_at_once)
        futures = [pool.submit(fn, it) for it in items]
        try:
            for f in futures:
                f.result()
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            self.interrupt()
            pool.shutdown(wait=True)
            raise
        pool.shutdown(wait=True)


class LocalExecutor(_Executor):
    """Members as child processes, ``jobs`` at a time; with GPUs, each child sees ``gpus_per_job`` of them."""

    def __init__(self, jobs: int = 1, gpus_per_job: int = 0, gpus: list[str] | None = None):
        if jobs < 1:
            raise SweepError(f"--jobs {jobs}: must be at least 1")
        self.jobs_at_once, self.gpus_per_job = jobs, gpus_per_job
        self.gpus = gpus if gpus is not None else _visible_gpus()
        if gpus_per_job and len(self.gpus) < gpus_per_job:
            raise SweepError(f"--gpus-per-job {gpus_per_job}: this machine shows {len(self.gpus)} GPU(s)")
        self.procs: set[subprocess.Popen] = set()
        self.free = list(self.gpus)
        self.cv = threading.Condition()

    def _take(self) -> list[str] | None:
        per = self.gpus_per_job or (1 if self.gpus and self.jobs_at_once > 1 else 0)
        if not per:
            return None
        with self.cv:
            self.cv.wait_for(lambda: len(self.free) >= per)
            got, self.free = self.free[:per], self.free[per:]
            return got

    def _give(self, got: list[str] | None) -> None:
        if got:
            with self.cv:
                self.free += got
                self.cv.notify_all()

    def run(self, cmd: list[str], log_path: Path, on_start=None) -> int:
        got = self._take()
        env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
        if got is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(got)
        try:
            with open(log_path, "ab") as log:
                log.write(f"\n=== {_now()} {' '.join(cmd)}\n".encode())
                log.flush()
                p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
                self.procs.add(p)
                if on_start:
                    on_start({"pid": p.pid, "command": cmd, "gpus": got})
                try:
                    return p.wait()
                finally:
                    self.procs.discard(p)
        finally:
            self._give(got)

    def interrupt(self) -> None:
        for p in list(self.procs):
            try:
                os.killpg(p.pid, signal.SIGINT)
            except OSError:
                pass

def _run_member(cmd: list[str], log_path: str) -> int:
    """A member's command in a submitit job (SLURM or submitit's local executor): the same child process
    the local executor starts, so a member's result does not depend on the executor."""
    env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
    with open(log_path, "ab") as log:
        log.write(f"\n=== {_now()} job {os.environ.get('SLURM_JOB_ID') or os.getpid()}: {' '.join(cmd)}\n".encode())
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


class SubmititExecutor(_Executor):
    """One SLURM job per member through submitit (``cluster="local"``: submitit's local executor, which runs
    the same jobs as local processes; the tests use it). Job logs go to ``<sweep>/logs/submitit/``; each
    member's job id, command and resources are recorded in ``sweep.json``."""

    def __init__(self, folder: Path, partition: str | None = None, time_min: int = 240, gpus_per_job: int = 0,
                 cpus: int = 8, mem_gb: int = 64, account: str | None = None, options: dict | None = None,
                 cluster: str = "slurm"):
        try:
            import submitit
        except ImportError:
            raise SweepError("--executor slurm needs submitit: pip install 'gist-workbench[slurm]' "
                             "(or pip install submitit)") from None
        self.submitit = submitit
        self.folder, self.cluster = Path(folder) / LOGS / "submitit", cluster
        self.resources = {"timeout_min": time_min, "gpus_per_node": gpus_per_job, "cpus_per_task": cpus,
                          "mem_gb": mem_gb, "tasks_per_node": 1, "nodes": 1}
        if cluster == "slurm":
            extra = dict(options or {})
            if account:
                extra["account"] = account
            self.resources |= {"slurm_partition": partition, "slurm_additional_parameters": extra} if partition \
                else {"slurm_additional_parameters": extra}
        self.jobs: dict[str, Any] = {}
        self.lock = threading.Lock()

    def run(self, cmd: list[str], log_path: Path, on_start=None) -> int:
        ex = self.submitit.AutoExecutor(folder=str(self.folder), cluster=self.cluster)
        name = Path(log_path).stem
        ex.update_parameters(name=f"wb-{name}", **{k: v for k, v in self.resources.items()
                                                    if self.cluster == "slurm" or not k.startswith("slurm_")})
        job = ex.submit(_run_member, cmd, str(log_path))
        with self.lock:
            self.jobs[name] = job
        if on_start:
            on_start({"job_id": str(job.job_id), "command": cmd, "resources": self.resources, "cluster": self.cluster})
        try:
            return int(job.result())
        except self.submitit.core.utils.UncompletedJobError as e:  # killed, timed out, preempted
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"workbench run: job {job.job_id} did not complete: {e}\n")
            return 1
        finally:
            with self.lock:
                self.jobs.pop(name, None)

    def interrupt(self) -> None:
        for job in list(self.jobs.values()):
            try:
                job.cancel()
            except Exception:  # already finished or gone: nothing to cancel
                pass

    jobs_at_once = 256  # the cluster queues them


def make_executor(args) -> LocalExecutor | SubmititExecutor:
    """The executor ``workbench sweep``'s options ask for."""
    if args.executor == "local":
        return LocalExecutor(args.jobs, args.gpus_per_job)
    options = {}
    for item in args.slurm_option or []:
        k, _, v = item.partition("=")
        if not k or not _:
            raise SweepError(f"--slurm-option {item!r}: expected KEY=VALUE (an sbatch option without its dashes)")
        options[k.strip().lstrip("-")] = v
    folder = Path(args.reports).resolve() / (args.name or "")
    return SubmititExecutor(folder, args.slurm_partition, args.slurm_time, args.gpus_per_job, args.slurm_cpus,
                            args.slurm_mem_gb, args.slurm_account, options,
                            cluster="local" if args.slurm_local else "slurm")


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, ln in enumerate(out.splitlines()) if ln.startswith("GPU ")]
