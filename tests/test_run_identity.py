"""Run identity (issue 21): a result is never computed from stale weights, the wrong images, or settings
other than the run's own. Each test here failed on the code before run identities were recorded."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from workbench import evaluate, finetune
from workbench.config import ConfigError, resolve, stage_params
from workbench.data import DrawSpec, draw_seed, load_dataset
from workbench.identity import IdentityMismatch
from workbench.io import read_json, read_jsonl, write_jsonl
from workbench.runs import INDEX, read_metrics

OPTS = {"n_species": 4, "n_train": 6, "n_val": 3, "n_test": 4}
FAST = dict(epochs=1, batch_size=8, progress=False, dataset_options=OPTS)


def _ft(run_dir, **kw):
    p = stage_params("finetune", run_dir=str(run_dir), **{"methods": ["finetune-classname"], "shots": ["full"],
                                                            "seeds": [0], **FAST, **kw})
    return finetune.run(p)


def _ev(run_dir, **kw):
    p = stage_params("evaluate", run_dir=str(run_dir), **{"shots": ["full"], "seeds": [0], "bootstrap_n": 50,
                                                            "progress": False, "dataset_options": OPTS, **kw})
    s = evaluate.prepare(p)
    rows = evaluate.frozen_rows(p, s)
    tuned, _ = evaluate.tuned_rows(p, s)
    evaluate.record(p, rows + tuned)
    evaluate.compare(p, rows + tuned)
    return rows + tuned


def _write_matches(run_dir, suffix=""):
    ds = load_dataset("synthetic", **OPTS)
    train = ds.table[ds.table["split"] == "train"]
    write_jsonl(run_dir / "matches.jsonl", [
        {"image": f, "class": c, "captions": [f"{c}: a bird{suffix}", f"{c}: a small bird"]}
        for f, c in zip(train["filename"], train["species"])])


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shot_file(path, ds, pick: int) -> None:
    """A GIST k-shot CSV (k = 1) that keeps the ``pick``-th training image of each class."""
    train = ds.table[ds.table["split"] == "train"].sort_values("filename")
    rows = pd.concat([train[train["label"] == y].iloc[[pick]] for y in range(ds.num_classes)])
    others = ds.table[ds.table["split"] != "train"]
    pd.concat([rows, others])[["filename", "split", "label", "species"]].to_csv(path, index=False)


@pytest.mark.parametrize("change", [
    {"pretrained": None},
    {"model": "wb-tiny"},
    {"dataset_options": {**OPTS, "n_test": 5}},
    {"lr": 1e-3},
])
def test_a_rerun_under_another_identity_stops_naming_the_setting(tmp_path, change):
    _ft(tmp_path)
    ckpt = tmp_path / "checkpoints" / "finetune-classname-full-s0" / "best.safetensors"
    before = _sha(ckpt)
    with pytest.raises(IdentityMismatch) as e:
        _ft(tmp_path, **change)
    key = next(iter(change))
    named = {"dataset_options": "dataset_options", "lr": "settings"}.get(key, key)
    assert f"  {named}: made with" in str(e.value) and "resume=False" in str(e.value)
    assert _sha(ckpt) == before  # nothing paid for is lost
    _ft(tmp_path, **change, resume=False)  # the way out the message gives retrains
    assert _sha(ckpt) != before or key == "dataset_options"


def test_a_rerun_after_the_captions_changed_stops(tmp_path):
    _write_matches(tmp_path)
    _ft(tmp_path, methods=["gist"])
    _write_matches(tmp_path, suffix=" with a red crown")
    with pytest.raises(IdentityMismatch, match="captions_sha256"):
        _ft(tmp_path, methods=["gist"])


def test_the_same_configuration_reuses_its_finished_runs(tmp_path):
    _ft(tmp_path)
    ckpt = tmp_path / "checkpoints" / "finetune-classname-full-s0" / "best.safetensors"
    before, mtime = _sha(ckpt), ckpt.stat().st_mtime_ns
    _ft(tmp_path)
    assert _sha(ckpt) == before and ckpt.stat().st_mtime_ns == mtime


def test_shot_files_decide_what_fine_tuning_trains_on_and_evaluate_checks_it(tmp_path):
    ds = load_dataset("synthetic", **OPTS)
    shot = tmp_path / "metadata_1shot.csv"
    _shot_file(shot, ds, pick=5)  # not what the seeded draw picks
    listed = pd.read_csv(shot)
    expected = hashlib.sha256("\n".join(sorted(listed.loc[listed["split"] == "train", "filename"])).encode()).hexdigest()
    seeded = DrawSpec().subset(ds, 1, 0)
    assert set(seeded.table.loc[seeded.table["split"] == "train", "filename"]) != set(listed["filename"])
    rows = _ft(tmp_path, shots=[1], seeds=[0, 1], shot_files={1: str(shot)})
    assert len(rows) == 1  # a fixed draw: one run, not one per seed
    (row,) = read_json(tmp_path / INDEX)
    assert row["train_images"] == ds.num_classes and row["train_images_sha256"] == expected
    ok = _ev(tmp_path, shots=[1], shot_files={1: str(shot)})
    assert {r["method"] for r in ok} >= {"finetune-classname"}
    with pytest.raises(ValueError, match="other images than this evaluation's draw"):
        _ev(tmp_path, shots=[1])  # the seeded draw: not the images the checkpoint saw
    _shot_file(shot, ds, pick=2)  # the file changes under the same name: the run is not reused
    with pytest.raises(IdentityMismatch, match="shot_file_sha256"):
        _ft(tmp_path, shots=[1], shot_files={1: str(shot)})


def test_the_test_split_never_influences_selection(tmp_path):
    ds = load_dataset("synthetic", **OPTS)
    poisoned = ds.subset(np.ones(len(ds.table), bool))
    test = poisoned.table["split"] == "test"
    poisoned.table.loc[test, "label"] = np.random.default_rng(0).permutation(poisoned.table.loc[test, "label"].to_numpy())
    out = {}
    for name, d in (("clean", ds), ("poisoned", poisoned)):
        run = tmp_path / name
        idx = finetune.finetune_all(run, d, methods=["finetune-classname"], shots=["full", 1], seeds=[0],
                                    epochs=2, batch_size=8, progress=False, lr=1e-3)
        vals = [(r["run"], r["epoch"], r["val_top1"]) for r in read_jsonl(run / "train_log.jsonl") if "val_top1" in r]
        feats = evaluate.dataset_features(__import__("workbench").clip.load_clip("tiny", "synthetic"), d)
        probe = evaluate.probe_rows("linear-probe", feats, d, ["full", 1], [0], bootstrap_n=20)
        out[name] = ([(r["epoch"], r["val_top1"]) for r in idx], vals,
                     [(r["weight_decay"], r["val_top1"]) for r in probe])
    assert out["clean"] == out["poisoned"]


def test_removing_a_method_removes_its_rows_from_the_report(tmp_path):
    _write_matches(tmp_path)
    _ft(tmp_path, methods=["gist", "finetune-classname"])
    first = _ev(tmp_path)
    assert {r["method"] for r in first} >= {"gist", "finetune-classname"}
    assert "gist" in {c["a"] for c in read_metrics(tmp_path)["comparisons"]}
    _ft(tmp_path, methods=["finetune-classname"])
    assert {e["method"] for e in read_json(tmp_path / INDEX)} == {"finetune-classname"}
    assert {e["method"] for e in read_json(tmp_path / "checkpoints" / "index.stale.json")} == {"gist"}
    second = _ev(tmp_path)
    metrics = read_metrics(tmp_path)
    assert "gist" not in {r["method"] for r in second}
    assert "gist" not in {r["method"] for r in metrics["accuracy"]}
    assert "gist" not in {c["a"] for c in metrics["comparisons"]} | {c["b"] for c in metrics["comparisons"]}
    assert [r["run"] for r in metrics["finetune"]["runs"]] == ["finetune-classname-full-s0"]
    assert {r["method"] for r in metrics["stale"]["accuracy"]} == {"gist"}
    assert all(r["stale_since"] for r in metrics["stale"]["accuracy"])
    assert all(len(r["identity"]) == 16 for r in metrics["accuracy"])  # every row carries its identity digest


def test_the_top_level_seed_reaches_fine_tuning_and_evaluation_alike(tmp_path):
    assert [draw_seed(0, s) for s in (0, 1, 2)] == [0, 1, 2]  # seed 0: the draws every earlier run made
    cfg = resolve({"finetune": {"seed": {"default": "0", "inferred_type_name": "int", "help": "x"}},
                   "evaluate": {"seed": {"default": "0", "inferred_type_name": "int", "help": "x"}}}, [], ["seed=3"])
    assert cfg["seed"] == 3
    a = _ft(tmp_path / "a", shots=[1], seed=0)
    b = _ft(tmp_path / "b", shots=[1], seed=3)
    assert a[0]["train_images_sha256"] != b[0]["train_images_sha256"]
    rows = _ev(tmp_path / "b", shots=[1], seed=3)  # evaluate draws the same set under the same seed
    assert next(r for r in rows if r["method"] == "finetune-classname")["train_images_sha256"] == b[0]["train_images_sha256"]


def test_val_policy_k_shot_keeps_at_most_k_validation_images_per_class(tmp_path):
    rows = _ft(tmp_path, shots=[1], val_policy="k_shot")
    assert rows[0]["val_policy"] == "k_shot"
    ev = _ev(tmp_path, shots=[1], val_policy="k_shot")
    probe = next(r for r in ev if r["method"] == "linear-probe")
    assert probe["n_val"] == OPTS["n_species"] and probe["val_policy"] == "k_shot"
    assert "val_policy=k_shot" in evaluate.val_note(ev)
    with pytest.raises(ValueError, match="val_policy must be one of"):
        DrawSpec(val_policy="half")


def test_use_trainval_with_k_shot_is_refused(tmp_path):
    with pytest.raises(ValueError, match="more than k labelled images"):
        _ev(tmp_path, shots=["full", 1], use_trainval=True)


def test_val_policy_is_checked_before_any_notebook_runs():
    with pytest.raises(ConfigError, match="val_policy"):
        resolve({"evaluate": {}}, [], ["val_policy=strict"])


def test_metrics_rows_of_a_configuration_are_its_own(tmp_path):
    from workbench.runs import update_metrics

    update_metrics(tmp_path, "accuracy", [{"method": "a", "shots": 1, "seed": 0}, {"method": "b", "shots": 1, "seed": 0}])
    update_metrics(tmp_path, "accuracy", [{"method": "a", "shots": 1, "seed": 0, "top1": 5}])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["accuracy"] == [{"method": "a", "shots": 1, "seed": 0, "top1": 5}]
    assert [r["method"] for r in m["stale"]["accuracy"]] == ["b"]
    update_metrics(tmp_path, "accuracy", [{"method": "b", "shots": 1, "seed": 0}])  # b is back: no longer stale
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["method"] for r in m["stale"]["accuracy"]] == ["a"]


def test_matches_of_other_descriptions_are_not_trained_on(tmp_path):
    from workbench import describe, match

    common = dict(run_dir=str(tmp_path), dataset_options=OPTS, progress=False)
    describe.run(stage_params("describe", **common, per_class=3))
    match.run(stage_params("match", **common, n_examples=2))
    _ft(tmp_path, methods=["gist"])
    recs = read_jsonl(tmp_path / "descriptions.jsonl")
    recs[0]["text"] = "a bird with a blue crown and a hooked beak"
    write_jsonl(tmp_path / "descriptions.jsonl", recs)
    with pytest.raises(IdentityMismatch, match="rerun the match stage"):
        _ft(tmp_path, methods=["gist"])
