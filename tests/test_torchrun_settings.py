"""`torchrun -m workbench.finetune --run-dir DIR` trains what DIR/params.yaml says (the configuration
`workbench run` resolved), `--set` on top, recorded in params.yaml; a folder with no settings is refused."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench import cli
from workbench.config import load_yaml
from workbench.finetune import __main__ as entry
from workbench.io import read_json

ROOT = Path(__file__).resolve().parents[1]
RUN = "finetune-classname-full-s0"
# Non-default settings (03_finetune: lr 3e-4, 3 epochs, batch 128, shots full/1/3/5, both methods, 3 seeds).
SETS = ["model=tiny", "progress=false", "device=cpu", "dataset_options={n_species: 4, n_train: 6, n_val: 3, n_test: 4}",
        "finetune.methods=[finetune-classname]", "finetune.shots=[full]", "finetune.seeds=[0]",
        "finetune.lr=1e-3", "finetune.epochs=2", "finetune.batch_size=8", "finetune.steps=0", "finetune.validate_every=0"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    """A run folder `workbench run` made: its params.yaml, and the checkpoint one process trained."""
    reports = tmp_path_factory.mktemp("reports")
    os.environ["WORKBENCH_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    assert cli.main(["run", "demo", "--name", "one", "--reports", str(reports), "--stages", "finetune",
                     *sum((["--set", s] for s in SETS), [])]) == 0
    return reports / "one"


def _copy_settings(run: Path, to: Path) -> Path:
    to.mkdir()
    shutil.copy(run / "params.yaml", to / "params.yaml")
    return to


def test_torchrun_trains_the_run_folders_settings(preset_run, tmp_path):
    """A preset's run, trained again by 2 gloo ranks from a copy of its params.yaml alone, gives the same
    checkpoint: the ranks used the run's settings (not 03_finetune's defaults); a `--set` on top that
    leaves the weights as they are (resume off in a fresh folder) is recorded in params.yaml."""
    two = _copy_settings(preset_run, tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "workbench.finetune", "--run-dir", str(two), "--set", "finetune.resume=false"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    config = read_json(two / "metrics.json")["finetune"]["config"]
    assert (config["lr"], config["epochs"], config["batch_size"]) == (1e-3, 2, 8)
    w1 = load_file(preset_run / "checkpoints" / RUN / "best.safetensors")
    w2 = load_file(two / "checkpoints" / RUN / "best.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k
    text = (two / "params.yaml").read_text().splitlines()
    assert text[0] == (preset_run / "params.yaml").read_text().splitlines()[0]  # `workbench run`'s header kept
    assert text[1].startswith("# torchrun -m workbench.finetune --set changed finetune.resume on ")
    cfg = load_yaml(two / "params.yaml")
    assert cfg["finetune"]["resume"] is False and cfg["finetune"]["lr"] == 1e-3
    assert out.stderr.count("recording what trains in it") == 1  # rank 0 says it, once


def test_set_on_top_is_recorded_and_checked(preset_run, tmp_path, monkeypatch, capsys):
    """Bare and dotted `--set` keys change the run's settings and params.yaml says so; unknown keys, other
    stages' keys and wrong types stop before any work (exit 2, named); no change leaves the file alone."""
    trained = []
    monkeypatch.setattr(entry, "run", lambda p: trained.append(p) or [])
    run = _copy_settings(preset_run, tmp_path / "run")
    before = (run / "params.yaml").read_text()
    assert entry.main(["--run-dir", str(run), "--set", "finetune.lr=1e-3"]) == 0  # the value it has
    assert (run / "params.yaml").read_text() == before and trained[-1].lr == 1e-3 and trained[-1].batch_size == 8
    assert entry.main(["--run-dir", str(run), "--set", "epochs=5", "--set", "finetune.batch_size=4",
                       "--set", "seed=7"]) == 0
    p = trained[-1]
    assert (p.epochs, p.batch_size, p.seed, p.lr, p.shots, p.run_dir) == (5, 4, 7, 1e-3, ["full"], str(run))
    cfg = load_yaml(run / "params.yaml")
    assert (cfg["finetune"]["epochs"], cfg["finetune"]["batch_size"], cfg["seed"]) == (5, 4, 7)
    lines = (run / "params.yaml").read_text().splitlines()
    assert lines[0] == before.splitlines()[0]
    note = lines[1].removeprefix("# torchrun -m workbench.finetune --set changed ")
    assert set(note.partition(" on ")[0].split(", ")) == {"finetune.epochs", "finetune.batch_size", "seed"}
    for bad, named in [("finetune.nope=1", "finetune.nope"), ("epochs=many", "finetune.epochs='many'"),
                       ("match.k=3", "match.k"), ("stages=[finetune]", "stages")]:
        capsys.readouterr()
        assert entry.main(["--run-dir", str(run), "--set", bad]) == 2, bad
        assert named in capsys.readouterr().err, bad
    assert len(trained) == 2


def test_a_folder_without_settings_is_refused_unless_asked(tmp_path, monkeypatch, capsys):
    """No params.yaml and no --set: exit 2, saying how to make settings; --defaults or --set train on
    03_finetune's notebook defaults and say so."""
    trained = []
    monkeypatch.setattr(entry, "run", lambda p: trained.append(p) or [])
    run = tmp_path / "bare"
    assert entry.main(["--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run} has no settings" in err and "workbench run <preset>" in err and "--defaults" in err
    assert not trained and not run.exists()
    assert entry.main(["--run-dir", str(run), "--defaults"]) == 0
    assert trained[-1].epochs == 3 and "notebook DEFAULTS" in capsys.readouterr().err
    assert entry.main(["--run-dir", str(run), "--set", "epochs=1"]) == 0
    assert trained[-1].epochs == 1 and "notebook DEFAULTS and --set epochs=1" in capsys.readouterr().err
    assert not (run / "params.yaml").exists()
