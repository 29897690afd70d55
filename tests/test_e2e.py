"""End to end: `workbench run` through every stage notebook, on the synthetic demo and a mini CUB.

These are the slowest tests (each runs the whole pipeline with tiny sizes); they assert the
run-directory contract and the shape of every metrics section, not model quality.
"""
import json

import yaml
from fixtures_datasets import make_mini_cub
from toydata import QUICK_DEMO

from workbench import cli
from workbench.io import read_jsonl

# Tiny sizes shared by both runs: one epoch, one few-shot setting, one seed.
SMALL = [*QUICK_DEMO, "model=tiny", "progress=false", "epochs=1", "shots=[full, 1]", "seeds=[0]", "bootstrap_n=200",
         "align.max_images=6", "align.n_examples=1", "match.n_examples=4"]
METHODS = {"zero-shot", "linear-probe", "finetune-classname", "gist"}


def _check_run(run_dir, stages):
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert set(stages) <= set(params)
    for nb in run_dir.glob("0*.ipynb"):
        assert nb.with_suffix(".html").exists()
    assert len(list(run_dir.glob("0*.ipynb"))) == len(stages)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for section in ("describe", "matching", "finetune", "accuracy", "comparisons", "alignment", "timing"):
        assert section in metrics, section
    for c in metrics["comparisons"]:
        assert set(c) == {"a", "b", "shots", "diff", "ci95", "p", "p_holm", "n_test", "seeds"} and 0 < c["p"] <= 1
        assert c["p"] <= c["p_holm"] <= 1
        assert c["ci95"][0] <= c["diff"] <= c["ci95"][1]
    assert {(c["a"], c["b"]) for c in metrics["comparisons"] if c["shots"] == 1} >= {
        ("gist", "finetune-classname"), ("gist", "linear-probe"), ("finetune-classname", "linear-probe")}
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
    assert pg and all({"pretrained", "finetuned"} <= set(v) for k, v in pg.items() if k not in ("prior", "random_bird_patch"))
    assert set(pg["prior"]) == {"baseline"} and set(pg["random_bird_patch"]) == {"baseline"}
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


def test_every_loss_and_option_runs_through_workbench_run(tmp_path):
    """Each loss and each training switch through `workbench run`: FILIP with gradient checkpointing
    and few-shot runs, then the class-aware loss with a frozen text tower (the CLIP loss is the demo's).
    FILIP used to crash at the first validation: the vision tower kept returning its tokens."""
    base = ["run", "demo", "--name", "opts", "--reports", str(tmp_path),
            "--set", "dataset_options={n_species: 4, n_train: 4, n_val: 2, n_test: 2}", "--set", "model=tiny",
            "--set", "progress=false", "--set", "describe.per_class=4", "--set", "finetune.epochs=2",
            "--set", "finetune.seeds=[0]", "--set", "finetune.batch_size=16", *sum((["--set", s] for s in QUICK_DEMO), [])]
    run_dir = tmp_path / "opts"
    settings = [
        (["describe", "match", "finetune"], {"loss": "filip", "grad_checkpointing": True, "shots": ["full", 1]}),
        (["finetune"], {"loss": "class-aware", "freeze_text": True, "shots": [3], "resume": False}),
    ]
    for stages, opts in settings:
        sets = sum((["--set", f"finetune.{k}={json.dumps(v)}"] for k, v in opts.items()), [])
        assert cli.main([*base, "--stages", ",".join(stages), *sets]) == 0, opts
        ft = json.loads((run_dir / "metrics.json").read_text())["finetune"]
        for k, v in opts.items():
            if k not in ("shots", "resume"):
                assert ft["config"][k] == v
        runs = {r["run"]: r for r in ft["runs"]}
        for shots in opts["shots"]:
            for method in ("gist", "finetune-classname"):
                r = runs[f"{method}-{shots}-s0"]
                assert r["status"] == "done" and r["steps"] == r["total_steps"] > 0
                assert r["val_top1"] is not None and 0 <= r["val_top1"] <= 100
        log = read_jsonl(run_dir / "train_log.jsonl")
        losses = [r["loss"] for r in log if "loss" in r and r["run"].startswith("gist-")]
        assert losses and all(0 < x < 20 for x in losses)
    # the index holds the last configuration's runs; the first one's moved aside, files kept
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())
    assert {(r["method"], str(r["shots"])) for r in index} == {(m, "3") for m in ("gist", "finetune-classname")}
    stale = json.loads((run_dir / "checkpoints" / "index.stale.json").read_text())
    assert {(r["method"], str(r["shots"])) for r in stale} == {(m, s) for m in ("gist", "finetune-classname")
                                                                for s in ("full", "1")}
    assert all((run_dir / r["path"]).exists() for r in stale)
