"""The papermill runner and the CLI, on small notebooks built here."""
import json
from pathlib import Path

import nbformat
import pytest
import yaml
from nbutil import MINIMAL, make_notebook

from workbench import cli, pipeline
from workbench import config as C

PARAMS = '''from typing import Optional

run_dir: str = "../reports/lab"  # run directory
dataset: str = "synthetic"  # dataset name
seed: int = 0  # random seed
k: int = 5  # top-k
tag: Optional[str] = None  # a tag
'''


@pytest.fixture
def nb_dir(tmp_path, monkeypatch):
    d = tmp_path / "notebooks"
    make_notebook(d / "01_first.ipynb", PARAMS,
                  "import json, os, pathlib\n"
                  "pathlib.Path('first.json').write_text(json.dumps("
                  "{'cwd': os.getcwd(), 'k': k, 'tag': tag, 'seed': seed, 'k_type': type(k).__name__}))")
    make_notebook(d / "02_second.ipynb", 'run_dir: str = "x"  # run directory\nscale: float = 1.0  # factor',
                  "import json, pathlib\nd = json.loads(pathlib.Path('first.json').read_text())\n"
                  "pathlib.Path('second.json').write_text(json.dumps({'v': d['k'] * scale}))")
    monkeypatch.setenv("WORKBENCH_NOTEBOOKS", str(d))
    return d


def test_run_writes_run_directory(nb_dir, tmp_path):
    p = pipeline.plan(MINIMAL, ["k=7", "seed=3", "second.scale=0.5"], name="t1", reports=tmp_path / "reports")
    run_dir = pipeline.execute(p, log=lambda *_: None)
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert params["first"] == {"k": 7, "tag": None} and params["second"] == {"scale": 0.5}
    assert params["seed"] == 3
    first = json.loads((run_dir / "first.json").read_text())
    assert first == {"cwd": str(run_dir), "k": 7, "tag": None, "seed": 3, "k_type": "int"}
    assert json.loads((run_dir / "second.json").read_text()) == {"v": 3.5}
    for stem in ("01_first", "02_second"):
        assert (run_dir / f"{stem}.ipynb").exists()
        assert "<html" in (run_dir / f"{stem}.html").read_text()[:500].lower()
    timing = json.loads((run_dir / "metrics.json").read_text())["timing"]
    assert set(timing) == {"first_s", "second_s"}


def test_stage_subset(nb_dir, tmp_path):
    p = pipeline.plan(MINIMAL, stages=["first"], name="t2", reports=tmp_path / "r")
    assert list(p.stages) == ["first"]
    pipeline.execute(p, log=lambda *_: None)
    assert not (p.run_dir / "02_second.ipynb").exists()


def test_failing_stage_keeps_partial_notebook(nb_dir, tmp_path, capsys):
    make_notebook(nb_dir / "02_second.ipynb", 'run_dir: str = "x"  # run directory',
                  "ok = 1", "raise RuntimeError('boom in stage two')", "never = 1")
    rc = cli.main(["run", MINIMAL, "--name", "bad", "--reports", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "stage 'second' failed in cell" in err and "RuntimeError: boom in stage two" in err
    run_dir = tmp_path / "r" / "bad"
    partial = json.loads((run_dir / "02_second.ipynb").read_text())
    outputs = [o for c in partial["cells"] for o in c.get("outputs", [])]
    assert any(o.get("ename") == "RuntimeError" for o in outputs)
    assert (run_dir / "02_second.html").exists()
    assert (run_dir / "first.json").exists()  # earlier stage's work is kept


def test_unknown_key_fails_before_running(nb_dir, tmp_path, capsys):
    rc = cli.main(["run", MINIMAL, "--set", "nonexistent=1", "--reports", str(tmp_path / "r")])
    assert rc == 2
    assert "nonexistent" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_params_and_list(nb_dir, capsys):
    assert cli.main(["params", "first"]) == 0
    out = capsys.readouterr().out
    assert "k: int (default 5)" in out and "top-k" in out and "tag: Optional[str]" in out
    assert cli.main(["run", "--list"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["params", "nope"]) == 2


def test_notebook_without_run_dir_is_rejected(tmp_path):
    nb = make_notebook(tmp_path / "01_x.ipynb", "k: int = 1  # k")
    with pytest.raises(ValueError, match="must declare `run_dir"):
        C.notebook_parameters(nb)


def test_relative_data_root_made_absolute(nb_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = pipeline.plan(MINIMAL, ["data_root=some/where"], name="t3", reports=tmp_path / "r")
    assert p.config["data_root"] == str(tmp_path / "some" / "where")


def test_relative_shot_files_made_absolute(nb_dir, tmp_path, monkeypatch):
    """A shot file named relative to where `workbench run` starts is the same file inside the run folder."""
    monkeypatch.chdir(tmp_path)
    p = pipeline.plan(MINIMAL, ["shot_files={1: meta/metadata_1shot.csv, 3: ~/m3.csv}"], name="t4", reports=tmp_path / "r")
    assert p.config["shot_files"] == {1: str(tmp_path / "meta" / "metadata_1shot.csv"),
                                      3: str(Path("~/m3.csv").expanduser())}


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", ".", "with space", "x;rm"])
def test_a_run_name_must_be_one_folder_name(nb_dir, tmp_path, capsys, bad):
    rc = cli.main(["run", MINIMAL, "--name", bad, "--reports", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"run name {bad!r} is not allowed" in err and "letters, digits" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*"))  # nothing written anywhere
    assert not (tmp_path / "escape").exists()


def test_a_run_name_of_dots_and_dashes_is_fine(nb_dir, tmp_path):
    assert pipeline.plan(MINIMAL, [], name="gist-v1.2_a", reports=tmp_path).name == "gist-v1.2_a"


def test_wrong_data_root_fails_before_any_stage(nb_dir, tmp_path, capsys):
    rc = cli.main(["run", MINIMAL, "--set", "dataset=cub", "--set", f"data_root={tmp_path}/nope",
                   "--reports", str(tmp_path / "r")])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_kernels_use_private_unix_sockets(tmp_path, monkeypatch, capfd):
    """Stages run in kernels reached over Unix sockets in a per-kernel 0700 folder, removed afterwards:
    no TCP port on localhost (and no ipykernel warning about one)."""
    import os

    nb = tmp_path / "nb.ipynb"
    make_notebook(nb, 'run_dir: str = "x"  # run directory',
                  "import json, os, pathlib\nfrom ipykernel.kernelapp import IPKernelApp\napp = IPKernelApp.instance()\n"
                  "d = os.path.dirname(app.ip)\n"
                  "pathlib.Path('kernel.json').write_text(json.dumps({'transport': app.transport, 'ip': app.ip,"
                  " 'mode': oct(os.stat(d).st_mode & 0o777), 'sockets': sorted(os.listdir(d))}))")
    pipeline.run_notebook(nb, tmp_path / "out.ipynb", {"run_dir": str(tmp_path)}, cwd=tmp_path, html=False)
    info = json.loads((tmp_path / "kernel.json").read_text())
    assert info["transport"] == "ipc" and info["mode"] == "0o700" and len(info["sockets"]) == 5
    assert not os.path.exists(os.path.dirname(info["ip"]))  # cleaned up with the kernel
    assert "without encryption" not in capfd.readouterr().err


def test_cache_command_lists_and_clears(tmp_path, monkeypatch, capsys):
    root = tmp_path / "cache"
    monkeypatch.setenv("WORKBENCH_CACHE", str(root))
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.safetensors").write_bytes(b"x" * 3 * 2**20)
    (root / "features" / "sub").mkdir(parents=True)
    (root / "features" / "sub" / "b.safetensors").write_bytes(b"y" * 2**20)
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert str(root) in out[0]
    assert out[1].split()[:4] == ["images", "3.0", "MiB", "1"] and out[2].split()[:4] == ["features", "1.0", "MiB", "1"]
    assert out[-1].split()[:2] == ["total", "4.0"]
    # an unknown kind deletes nothing and names what is there
    assert cli.main(["cache", "--clear", "images", "imgaes"]) == 2
    err = capsys.readouterr().err
    assert "'imgaes'" in err and "features" in err and (root / "images" / "a.safetensors").exists()
    assert cli.main(["cache", "--clear", "images"]) == 0
    assert "freed 3.0 MiB" in capsys.readouterr().out
    assert not (root / "images").exists() and (root / "features" / "sub" / "b.safetensors").exists()
    assert cli.main(["cache", "--clear", "all"]) == 0
    assert not any(root.iterdir())


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`workbench params match | head`: the reader leaves before the output is written; the command
    stops with SIGPIPE's status and no BrokenPipeError traceback."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", "params", "match"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    proc.stdout.close()  # like `head` exiting: every write the command makes now fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_dead_kernel_names_stage_and_cell_and_keeps_partial_notebook(nb_dir, tmp_path, capsys, monkeypatch):
    """A kernel killed mid-cell (kill -9, the OOM killer) ends the run like a failing cell: status 1, the
    stage and the cell it was running named, the partial notebook and its HTML kept; no traceback."""
    import tempfile

    make_notebook(nb_dir / "02_second.ipynb", 'run_dir: str = "x"  # run directory',
                  "print('before the kill')", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "never = 1")
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))  # where the kernels' socket folders go
    rc = cli.main(["run", MINIMAL, "--name", "dead", "--reports", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "stage 'second' failed in cell 3: DeadKernelError: the kernel died while running this cell" in err
    assert "'import os, signal'" in err and "Traceback" not in err
    run_dir = tmp_path / "r" / "dead"
    cells = nbformat.read(run_dir / "02_second.ipynb", as_version=4).cells
    assert cells[2].outputs[0].text == "before the kill\n"
    assert [o.ename for o in cells[3].outputs if o.output_type == "error"] == ["DeadKernelError"]
    assert cells[3].metadata.papermill.status == "failed" and cells[4].metadata.papermill.status == "pending"
    assert "DeadKernelError" in (run_dir / "02_second.html").read_text()
    assert not list((tmp_path / "t").iterdir())  # the killed kernel's private socket folder is removed too


def test_kernel_falls_back_to_this_python_with_a_note(tmp_path, monkeypatch, capsys):
    """Where the notebooks' kernel is not registered for this Python and cannot be (a read-only
    environment), the name is lent to this interpreter through a private kernel spec, with a note."""
    import sys

    monkeypatch.setattr(pipeline, "KERNEL_NAME", "wb-test-unregistered-kernel")
    monkeypatch.setenv("JUPYTER_PATH", "")  # restored after the test; ensure_kernel prepends its folder

    def read_only(**kw):
        raise PermissionError(13, "Permission denied", kw.get("prefix"))

    monkeypatch.setattr(pipeline, "install_kernel", read_only)
    assert pipeline.ensure_kernel() == "wb-test-unregistered-kernel"
    err = capsys.readouterr().err
    assert "note: the Jupyter kernel 'wb-test-unregistered-kernel' does not run this Python" in err
    assert "cannot be registered" in err and "Permission denied" in err
    assert pipeline.ensure_kernel() == "wb-test-unregistered-kernel" and not capsys.readouterr().err  # noted once
    nb = make_notebook(tmp_path / "nb.ipynb", 'run_dir: str = "x"  # run directory',
                       "import pathlib, sys\npathlib.Path('python.txt').write_text(sys.executable)")
    pipeline.run_notebook(nb, tmp_path / "out.ipynb", {"run_dir": str(tmp_path)}, cwd=tmp_path, html=False)
    assert (tmp_path / "python.txt").read_text() == sys.executable
