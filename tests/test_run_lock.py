"""One writer per run folder: `workbench run`, `torchrun -m workbench.finetune` and stage notebooks run by
hand share one lock; a folder that two runs wrote at once (duplicate description ids) heals on disk."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from nbutil import MINIMAL, make_notebook

from workbench import cli, config, describe, runlock
from workbench.describe import ChatBackend, generate_descriptions
from workbench.io import read_jsonl, write_jsonl
from workbench.runs import LOCK, LOCK_ENV, RunBusyError, check_descriptions, lock_holder, read_descriptions, run_lock

ROOT = Path(__file__).resolve().parents[1]
PARAMS = 'run_dir: str = "x"  # run directory\n'
# A stage that holds its run until the test lets it go; inside, its own run's lock must let it pass.
HOLD = ("import pathlib, time\n"
        "from workbench.runs import run_lock\n"
        "with run_lock(run_dir):  # the kernel of a `workbench run` passes its run's lock\n"
        "    pathlib.Path('started').write_text('yes')\n"
        "end = time.time() + 180\n"
        "while not pathlib.Path('release').exists() and time.time() < end:\n"
        "    time.sleep(0.2)\n")
QUICK = "import pathlib\npathlib.Path('ran').write_text('yes')\n"
# Another process holding a run folder until its stdin closes.
HOLDER = ("import sys\nfrom workbench.runs import run_lock\n"
          "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n")
# A process started with a run's token (as its stage kernels are), writing on after its block.
WRITER = ("import sys\nfrom workbench.runs import run_lock\n"
          "with run_lock(sys.argv[1]):\n    print('in', flush=True)\n"
          "print('out', flush=True)\nsys.stdin.read()\n")


def _env(**extra) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}
    env.pop(LOCK_ENV, None)
    return env


@contextmanager
def held_by_another_process(run_dir: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    end = time.time() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early ({proc.returncode}): {proc.communicate()}")
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.2)


def test_a_second_run_on_a_busy_name_refuses_at_once_naming_the_holder(tmp_path):
    """Two `workbench run --name same` processes: the second exits 2 before any stage, naming the first
    (PID, host, start time); the first, whose own stage kernel passes the lock, finishes and frees it."""
    nbs = make_notebook(tmp_path / "notebooks" / "01_hold.ipynb", PARAMS, HOLD).parent
    env = _env(WORKBENCH_NOTEBOOKS=str(nbs))
    cmd = [sys.executable, "-m", "workbench.cli", "run", MINIMAL, "--name", "same", "--reports", str(tmp_path / "r")]
    run_dir = tmp_path / "r" / "same"
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run_dir / "started", first)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        holder = lock_holder(run_dir)
        assert second.returncode == 2, second.stderr
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        for part in (f"PID {first.pid}", f"host {socket.gethostname()}", f"started {holder['started']}", str(run_dir)):
            assert part in second.stderr, (part, second.stderr)
        assert "[hold]" not in second.stdout  # it ran nothing
        (run_dir / "release").write_text("go")
        out, err = first.communicate(timeout=240)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert not (run_dir / LOCK).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host = socket.gethostname()
    for pid, start in ((int(dead.stdout), None), (os.getpid(), "0")):  # gone; and a PID now used by another process
        (run_dir / LOCK).write_text(json.dumps({"pid": pid, "host": host, "started": "2026-01-01T00:00:00+00:00",
                                                "command": "workbench run demo", "pid_start": start, "token": "old"}))
        with pytest.warns(UserWarning, match=f"took over the lock of PID {pid}.*process is gone"):
            with run_lock(run_dir):
                assert lock_holder(run_dir)["pid"] == os.getpid() and lock_holder(run_dir)["token"] != "old"
        assert not (run_dir / LOCK).exists()


def test_a_runs_child_registers_as_its_writer_and_stops_when_the_holder_is_gone(tmp_path):
    """A process started with the holder's token (a stage kernel) adds itself to the lock's ``writers``,
    the record otherwise unchanged, and exits (1, saying why) once the holder is gone, block left or not."""
    run_dir = tmp_path / "run"
    writer = None
    try:
        with held_by_another_process(run_dir) as holder:
            before = lock_holder(run_dir)
            env = {**_env(), LOCK_ENV: before["token"]}
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert [writer.stdout.readline().strip() for _ in range(2)] == ["in", "out"]
            after = lock_holder(run_dir)
            assert after.pop("writers") == [{"pid": writer.pid, "pid_start": runlock._proc_start(writer.pid)}]
            assert after == before and writer.poll() is None
        assert holder.returncode == 0
        assert writer.wait(timeout=10) == 1  # its stdin is still open: only its watchdog ends it
        err = writer.stderr.read()
        assert f"the run holding {run_dir} (PID {holder.pid}) is gone; this process (PID {writer.pid})" in err
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()


def test_a_process_given_the_token_later_is_a_writer_for_its_block_only(tmp_path, monkeypatch):
    """A token set in a running process (a notebook run by hand with it, this test) registers for the
    outermost block only and is then unwatched: the holder's exit does not end this process."""
    run_dir = tmp_path / "run"
    me = {"pid": os.getpid(), "pid_start": runlock._proc_start(os.getpid())}
    with held_by_another_process(run_dir):
        monkeypatch.setenv(LOCK_ENV, lock_holder(run_dir)["token"])
        with run_lock(run_dir):
            with run_lock(run_dir):
                assert lock_holder(run_dir)["writers"] == [me]
            assert lock_holder(run_dir)["writers"] == [me]
        assert lock_holder(run_dir)["writers"] == [] and not runlock._watched
    time.sleep(3 * runlock.WATCH_INTERVAL)  # still here


def test_taking_over_a_dead_holders_lock_first_kills_its_writers(tmp_path):
    """The writers a dead holder left running are killed (SIGKILL) before the lock is taken; a writer's
    PID now used by another process (another start time) is left alone."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    left, reused = subprocess.Popen(sleep), subprocess.Popen(sleep)
    try:
        writers = [{"pid": left.pid, "pid_start": runlock._proc_start(left.pid)}, {"pid": reused.pid, "pid_start": "0"}]
        (run_dir / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                "started": "2026-01-01T00:00:00+00:00", "command": "workbench run",
                                                "pid_start": None, "token": "old", "writers": writers}))
        with pytest.warns(UserWarning, match="process is gone; stopped 1 of its processes still writing there"):
            with run_lock(run_dir):
                assert left.poll() == -signal.SIGKILL and reused.poll() is None
                assert lock_holder(run_dir)["pid"] == os.getpid() and "writers" not in lock_holder(run_dir)
    finally:
        for p in (left, reused):
            p.kill()
            p.wait()


def test_lock_from_another_host_is_reported_and_force_breaks_it(tmp_path, monkeypatch, capsys):
    nbs = make_notebook(tmp_path / "notebooks" / "01_quick.ipynb", PARAMS, QUICK).parent
    monkeypatch.setenv("WORKBENCH_NOTEBOOKS", str(nbs))
    monkeypatch.delenv(LOCK_ENV, raising=False)
    run_dir = tmp_path / "r" / "shared"
    run_dir.mkdir(parents=True)
    holder = {"pid": 4242, "host": "gpu-node-7", "started": "2026-01-02T03:04:05+00:00",
              "command": "workbench run cub --name shared", "pid_start": "99", "token": "theirs"}
    (run_dir / LOCK).write_text(json.dumps(holder))
    args = ["run", MINIMAL, "--name", "shared", "--reports", str(tmp_path / "r")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    for part in ("PID 4242", "host gpu-node-7", "started 2026-01-02T03:04:05+00:00", "--force"):
        assert part in err, (part, err)
    assert not (run_dir / "ran").exists() and json.loads((run_dir / LOCK).read_text())["token"] == "theirs"
    with pytest.warns(UserWarning, match="took over the lock of PID 4242 on host gpu-node-7.*--force"):
        assert cli.main([*args, "--force"]) == 0
    assert (run_dir / "ran").exists() and not (run_dir / LOCK).exists()


def test_lock_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.delenv(LOCK_ENV, raising=False)
    with run_lock(tmp_path / "run"):
        assert lock_holder(tmp_path / "run")["pid"] == os.getpid()
        monkeypatch.delenv(LOCK_ENV)  # as another process of this host would see it
        with pytest.raises(RunBusyError, match=f"PID {os.getpid()}"):
            with run_lock(tmp_path / "run"):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock and no temporary file left


def test_a_live_holder_on_this_host_is_never_broken_even_with_force(tmp_path):
    with held_by_another_process(tmp_path / "run") as proc:
        with pytest.raises(RunBusyError, match=f"PID {proc.pid} .*this process is alive"):
            with run_lock(tmp_path / "run", force=True):
                pass


def test_stage_run_by_hand_refuses_a_busy_folder_and_a_runs_own_kernel_passes(tmp_path, monkeypatch):
    """A stage called as notebook 01_describe calls it (JupyterLab, papermill directly) writes nothing
    into a folder another process holds; with the holder's token (a `workbench run`'s kernel) it runs."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(LOCK_ENV, raising=False)
    run_dir = tmp_path / "run"
    p = config.stage_params("describe", run_dir=str(run_dir), per_class=2, progress=False,
                            dataset_options={"n_species": 3, "n_train": 2, "n_val": 1, "n_test": 1})
    with held_by_another_process(run_dir) as proc:
        with pytest.raises(RunBusyError, match=f"PID {proc.pid} on host {socket.gethostname()}"):
            describe.run(p)
        assert not (run_dir / "descriptions.jsonl").exists()
        monkeypatch.setenv(LOCK_ENV, lock_holder(run_dir)["token"])
        res = describe.run(p)
        assert len(res.records) == 6 and lock_holder(run_dir)["pid"] == proc.pid


def test_torchrun_ranks_all_stop_on_a_busy_folder(tmp_path):
    """`torchrun -m workbench.finetune`: rank 0 asks for the lock and tells the other ranks, so all stop
    at once (exit 2, the holder named) rather than wait at a barrier for a rank that left."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "workbench.finetune", "--run-dir", str(run_dir), "--set", "device=cpu"]
    with held_by_another_process(run_dir) as proc:
        out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode != 0
    assert f"workbench.finetune: run folder {run_dir} is in use: locked by PID {proc.pid}" in out.stderr
    assert out.stderr.count("is in use") == 1  # rank 0 says it; rank 1 leaves quietly
    assert not (run_dir / "checkpoints").exists()


class CountingBackend(ChatBackend):
    name = "counting"
    model = "m"

    def __init__(self):
        self.calls = 0

    def complete(self, requests):
        self.calls += len(requests)
        return [f"The {r.meta['class']} has bright wings, variant {r.params['seed']}." for r in requests]


def test_duplicate_description_ids_heal_on_disk_without_asking_again(tmp_path):
    """What two concurrent runs left (each description appended twice, the second copy worded
    differently) no longer breaks every later run: readers keep the first of each id, on disk too,
    and the next describe run asks the LLM nothing."""
    classes = ["Red Finch", "Blue Jay"]
    be = CountingBackend()
    first = generate_descriptions(classes, be, n_per_class=2, run_dir=tmp_path, progress=False).records
    assert be.calls == 4
    path = tmp_path / "descriptions.jsonl"
    doubled = read_jsonl(path) + [{**r, "text": r["text"] + " Again."} for r in read_jsonl(path)]
    write_jsonl(path, doubled)
    with pytest.warns(UserWarning, match="dropped 4 repeated record"):
        records = read_descriptions(tmp_path)
    check_descriptions(records, classes, classes)  # used to raise: duplicate description ids
    assert read_jsonl(path) == doubled[:4]
    assert {r["id"]: r["text"] for r in records} == {r["id"]: r["text"] for r in first}
    write_jsonl(path, doubled)
    with pytest.warns(UserWarning, match="dropped 4 repeated record"):
        again = generate_descriptions(classes, be, n_per_class=2, run_dir=tmp_path, progress=False)
    assert be.calls == 4  # nothing paid for twice
    assert read_jsonl(path) == doubled[:4] and [r["id"] for r in again.records] == [r["id"] for r in first]
