"""`pip install .` without -e: the wheel carries the stage notebooks and the tiny CLIP's weights, and
the installed `workbench` runs from any directory, its stages in a kernel of the running Python."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
TINY = ["--set", "model=tiny", "--set", "progress=false", "--set", "describe.per_class=2",
        "--set", "dataset_options={n_species: 3, n_train: 2, n_val: 1, n_test: 1}"]


def _no_isolation() -> list[str]:
    """Build with the environment's setuptools when it can make wheels by itself (fast, no download)."""
    if importlib.util.find_spec("setuptools") is None:
        return []
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return ["--no-build-isolation"] if (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") else []


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installed_without_editable_runs_a_stage(tmp_path):
    # build from a copy of the sources, so the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
    for name in ("workbench", "notebooks"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORKBENCH_NOTEBOOKS")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *_no_isolation(), "-w", str(tmp_path / "dist"),
          str(src)], tmp_path, env)
    wheel = next((tmp_path / "dist").glob("gist_workbench-*.whl"))
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path, env)
    shutil.rmtree(src)  # nothing may come from the sources now
    shipped = Path("workbench", "clip", "weights", "wb-tiny-synthetic.safetensors")
    assert (site / shipped).read_bytes() == (REPO / shipped).read_bytes()  # the demo's tiny CLIP ships too
    assert sorted(p.name for p in (site / "workbench" / "notebooks").glob("*.ipynb"))[0] == "00_pretrain.ipynb"

    env = {**env, "PYTHONPATH": str(site), "PATH": f"{site / 'bin'}{os.pathsep}{env.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([sys.executable, "-c", "import workbench; print(workbench.__file__)"], elsewhere, env).stdout
    assert where.strip().startswith(str(site))  # the installed copy, not the checkout
    workbench = str(site / "bin" / "workbench")
    assert "demo" in _run([workbench, "run", "--list"], elsewhere, env).stdout
    out = _run([workbench, "params", "match"], elsewhere, env).stdout
    assert "Parameters of stage 'match' (02_match.ipynb)" in out and "k: int (default 5)" in out

    _run([workbench, "run", "demo", "--stages", "describe", "--name", "installed", "--reports",
          str(tmp_path / "reports"), *TINY], elsewhere, env, timeout=600)
    run_dir = tmp_path / "reports" / "installed"
    executed = nbformat.read(run_dir / "01_describe.ipynb", as_version=4)
    assert executed.metadata.papermill.input_path == str(site / "workbench" / "notebooks" / "01_describe.ipynb")
    assert len((run_dir / "descriptions.jsonl").read_text().splitlines()) == 3 * 2
    assert json.loads((run_dir / "metrics.json").read_text())["describe"]["descriptions"] == 6
