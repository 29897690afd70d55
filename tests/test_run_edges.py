"""`workbench run` stopped from outside: killed with SIGKILL (its stage kernel, in a session of its own,
stops too and a rerun resumes) and Ctrl-C (one message naming the stage, exit 130, kernel down, lock free)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from workbench.finetune.checkpoint import state_step
from workbench.io import read_jsonl, write_jsonl
from workbench.runlock import _alive
from workbench.runs import LOCK, LOCK_ENV, lock_holder

ROOT = Path(__file__).resolve().parents[1]
RUN = "finetune-classname-full-s0"  # the one fine-tuning run planned below: 6 steps an epoch
STEPS_PER_EPOCH = 6


def _cmd(reports: Path, epochs: int) -> list[str]:
    """Only the fine-tuning stage, on class-name captions (no earlier stage needed), a few seconds long."""
    sets = ["model=tiny", "progress=false", "dataset_options={n_species: 4, n_train: 6, n_val: 3, n_test: 4}",
            f"finetune.epochs={epochs}", "finetune.seeds=[0]", "finetune.shots=[full]",
            "finetune.methods=[finetune-classname]", "finetune.batch_size=4", "finetune.steps=0",
            "finetune.validate_every=0"]
    return [sys.executable, "-m", "workbench.cli", "run", "demo", "--name", "edge", "--reports", str(reports),
            "--stages", "finetune", *sum((["--set", s] for s in sets), [])]


def _env(**extra) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}
    env.pop(LOCK_ENV, None)
    return env


def _no_parent_poller(tmp: Path) -> dict:
    """Environment whose kernels have no parent poller. ipykernel's own (JPY_PARENT_PID) also ends a kernel
    whose launcher died, about a second later; switched off, the test shows the run lock's watchdog, which
    covers what that poller does not: writers started otherwise (a stage's own subprocesses, other launchers)."""
    profile = tmp / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_kernel_config.py").write_text("c.IPKernelApp.parent_handle = 0\n")
    return _env(IPYTHONDIR=str(tmp / "ipython"))


def _start(cmd: list[str], tmp: Path, tag: str, env: dict | None = None) -> subprocess.Popen:
    """The run in a process group (and session) of its own, as a terminal starts a job; output to files."""
    out, err = (open(tmp / f"{tag}.{s}", "w") for s in ("out", "err"))
    with out, err:
        return subprocess.Popen(cmd, env=env or _env(), stdout=out, stderr=err, start_new_session=True)


def _wait_until(ready, proc: subprocess.Popen, tmp: Path, tag: str, seconds: float = 120):
    end = time.time() + seconds
    while not (got := ready()):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {(tmp / f'{tag}.err').read_text()}")
        assert time.time() < end, f"timed out; stderr: {(tmp / f'{tag}.err').read_text()}"
        time.sleep(0.1)
    return got


def _kernel_writers(run_dir: Path) -> list[dict] | None:
    """The run's writers (its stage kernel) once one has registered in the lock."""
    h = lock_holder(run_dir)
    return (h or {}).get("writers") or None


def _with_token(token: str) -> list[int]:
    """PIDs of the processes started with the run's lock token in their environment (its kernels)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and token.encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def _gone(writers: list[dict], token: str, seconds: float) -> bool:
    end = time.time() + seconds
    while any(_alive(w) for w in writers) or _with_token(token):
        if time.time() > end:
            return False
        time.sleep(0.1)
    return True


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_killed_run_takes_its_kernel_with_it_and_a_rerun_resumes(tmp_path):
    """SIGKILL to `workbench run`'s process group leaves its kernel alive (jupyter_client starts kernels in
    a session of their own): the kernel, a registered writer of the run, sees the holder gone and exits,
    so nothing writes into the folder any more; the rerun takes the lock over and resumes the training."""
    cmd, run_dir = _cmd(tmp_path / "r", epochs=16), tmp_path / "r" / "edge"
    state = run_dir / "checkpoints" / RUN / "resume.safetensors"
    env = _no_parent_poller(tmp_path)
    proc = _start(cmd, tmp_path, "first", env)
    try:
        writers = _wait_until(lambda: state.exists() and _kernel_writers(run_dir), proc, tmp_path, "first")
        token = lock_holder(run_dir)["token"]
        assert {w["pid"] for w in writers} == set(_with_token(token))  # the kernel registered itself
        for w in writers:  # out of the group's reach: only the watchdog can stop it
            assert os.getsid(w["pid"]) != os.getsid(proc.pid) and os.getpgid(w["pid"]) != proc.pid
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _gone(writers, token, seconds=10), f"the kernel outlived its run: {_with_token(token)}"
    assert f"the run holding {run_dir}" in (tmp_path / "first.err").read_text()  # it said why it stopped
    before = _snapshot(run_dir)
    time.sleep(2)
    assert _snapshot(run_dir) == before, "something still writes into the run folder"
    assert lock_holder(run_dir)["pid"] == proc.pid  # the dead run's lock, left behind

    step0 = state_step(state)
    assert 0 < step0 < 16 * STEPS_PER_EPOCH
    log = run_dir / "train_log.jsonl"
    # mark what the killed run logged up to its checkpoint: a resumed run keeps those rows, a restart drops them
    write_jsonl(log, [{**r, "before_kill": True} if r["step"] <= step0 else r for r in read_jsonl(log)])
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "took over the lock" in again.stderr and "process is gone" in again.stderr
    losses = [r for r in read_jsonl(log) if r["run"] == RUN and "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, 16 * STEPS_PER_EPOCH + 1))  # each step logged once
    assert [r["step"] for r in losses if r.get("before_kill")] == list(range(1, step0 + 1))  # continued from step0
    assert not (run_dir / LOCK).exists()


def test_ctrl_c_stops_the_stage_says_how_to_resume_and_frees_the_folder(tmp_path):
    """SIGINT to the process group (a terminal's Ctrl-C) during the fine-tuning stage: one message naming
    the stage and the rerun, exit 130, no traceback, its kernel shut down, the lock released."""
    cmd, run_dir = _cmd(tmp_path / "r", epochs=8), tmp_path / "r" / "edge"
    proc = _start(cmd, tmp_path, "first")
    try:
        writers = _wait_until(lambda: (run_dir / "train_log.jsonl").exists() and _kernel_writers(run_dir),
                              proc, tmp_path, "first")
        token = lock_holder(run_dir)["token"]
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = (tmp_path / "first.err").read_text()
    assert rc == 130, err
    assert ("workbench run: interrupted during stage 'finetune'; rerun the same command "
            "(workbench run demo ... --name edge) and it resumes") in err
    assert err.count("interrupted") == 1 and "Traceback" not in err, err
    assert _gone(writers, token, seconds=5), f"a kernel survived: {_with_token(token)}"
    assert not (run_dir / LOCK).exists()
    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "took over" not in again.stderr  # the lock had been released, not left behind
