"""End to end: `workbench run` through every stage notebook, on the synthetic demo and a mini CUB.

These are the slowest tests (each runs the whole pipeline with tiny sizes); they assert the
run-directory contract and the shape of every metrics section, not model quality.
"""
import json

import yaml
from fixtures_datasets import make_mini_cub

from workbench import cli
from workbench.io import read_jsonl

# Tiny sizes shared by both runs: one epoch, one few-shot setting, one seed.
SMALL = ["model=tiny", "progress=false", "epochs=1", "shots=[full, 1]", "seeds=[0]", "bootstrap_n=200",
         "align.max_images=6", "align.n_examples=1", "match.n_examples=4"]
METHODS = {"zero-shot", "linear-probe", "finetune-classname", "gist"}


def _check_run(run_dir, stages):
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert set(stages) <= set(params)
    for nb in run_dir.glob("0*.ipynb"):
        assert nb.with_suffix(".html").exists()
    assert len(list(run_dir.glob("0*.ipynb"))) == len(stages)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for section in ("describe", "matching", "finetune", "accuracy", "alignment", "timing"):
        assert section in metrics, section
    rows = metrics["accuracy"]
    assert {r["method"] for r in rows} == METHODS
    assert {(r["method"], str(r["shots"])) for r in rows} >= {(m, s) for m in METHODS for s in ("full", "1")}
    for r in rows:
        assert set(r) >= {"method", "shots", "seed", "top1", "top3", "ci95"}
        assert 0 <= r["top1"] <= r["top3"] <= 100  # percent
    matches = read_jsonl(run_dir / "matches.jsonl")
    assert matches and all(m["captions"] and m["captions"][0].startswith(m["class"]) for m in matches)
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
    assert {r["method"] for r in index} == {"gist", "finetune-classname"}
    assert all((run_dir / r["path"]).exists() for r in index)
    pg = metrics["alignment"]["pointing_game"]
    assert pg and all({"pretrained", "finetuned"} <= set(v) for v in pg.values())
    assert list((run_dir / "figures").glob("*.png"))
    return metrics


def test_demo_end_to_end(tmp_path):
    rc = cli.main(["run", "demo", "--name", "demo", "--reports", str(tmp_path),
                   "--set", "dataset_options={n_species: 6, n_train: 8, n_val: 4, n_test: 4}",
                   "--set", "pretrain.n_heldout=60", "--set", "describe.per_class=4", *sum((["--set", s] for s in SMALL), [])])
    assert rc == 0
    metrics = _check_run(tmp_path / "demo", ["pretrain", "describe", "match", "finetune", "evaluate", "align"])
    assert "variant_precision" in metrics["matching"] and "random_precision" in metrics["matching"]
    assert "pretrain" in metrics


def test_cub_end_to_end(tmp_path):
    root = make_mini_cub(tmp_path / "data")
    rc = cli.main(["run", "cub", "--name", "cub", "--reports", str(tmp_path / "reports"),
                   "--set", f"data_root={root}", "--set", "describe.backend=attributes",
                   "--set", "stages=[describe, match, finetune, evaluate, align]",
                   *sum((["--set", s] for s in SMALL), [])])
    assert rc == 0
    _check_run(tmp_path / "reports" / "cub", ["describe", "match", "finetune", "evaluate", "align"])

