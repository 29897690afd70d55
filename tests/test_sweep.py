"""`workbench sweep` and stage reuse, on small stage notebooks built here (each stage says in a file how often
it ran), and once on the real notebooks with reduced settings."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from nbutil import MINIMAL, make_notebook

from workbench import cli, pipeline
from workbench import reuse as R
from workbench import sweep as S

PARAMS = '''run_dir: str = "x"  # run directory
dataset: str = "synthetic"  # dataset name
seed: int = 0  # random seed
progress: bool = True  # progress bars
'''
COUNT = ("import json, os, pathlib, time\n"
         "c = pathlib.Path(os.environ['SWEEP_TEST_COUNTS']) / ('{stage}-' + str(os.getpid()))\n"
         "c.write_text(run_dir)\n")


@pytest.fixture
def nb_dir(tmp_path, monkeypatch):
    """prep (seed -> prep.json), train (lr, fail, sleep -> model.safetensors + metrics), report (-> metrics)."""
    d = tmp_path / "notebooks"
    make_notebook(d / "01_prep.ipynb", PARAMS + "size: int = 3  # items\n",
                  COUNT.format(stage="prep") +
                  "paid = pathlib.Path('describe_responses.jsonl')  # as describe's LLM answers\n"
                  "pathlib.Path('prep_had_answers.txt').write_text(str(paid.exists()))\n"
                  "with paid.open('a') as f:\n    f.write('{\"paid\": 1}\\n')\n"
                  "pathlib.Path('prep.json').write_text(json.dumps({'items': [seed * 10 + i for i in range(size)]}))")
    make_notebook(d / "02_train.ipynb", PARAMS + "lr: float = 0.1  # rate\nfail: bool = False  # raise\n"
                  "sleep: float = 0.0  # seconds\n",
                  COUNT.format(stage="train") +
                  "items = json.loads(pathlib.Path('prep.json').read_text())['items']\n"
                  "time.sleep(sleep)\n"
                  "assert not fail, 'asked to fail'\n"
                  "pathlib.Path('model.safetensors').write_bytes(json.dumps([x * lr for x in items]).encode())\n"
                  "from workbench.runs import update_metrics\n"
                  "update_metrics(run_dir, 'train', {'lr': lr, 'sum': sum(items) * lr})")
    make_notebook(d / "03_report.ipynb", PARAMS,
                  COUNT.format(stage="report") +
                  "w = json.loads(pathlib.Path('model.safetensors').read_bytes())\n"
                  "from workbench.runs import update_metrics\n"
                  "update_metrics(run_dir, 'report', {'score': round(sum(w), 6), 'seed': seed})")
    monkeypatch.setenv("WORKBENCH_NOTEBOOKS", str(d))
    counts = tmp_path / "counts"
    counts.mkdir()
    monkeypatch.setenv("SWEEP_TEST_COUNTS", str(counts))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    return d


def ran(tmp_path, stage: str) -> list[str]:
    """The run folders (``sweep/member`` or ``run``, under reports/) in which ``stage`` was computed, once each."""
    return sorted(Path(c.read_text()).relative_to(tmp_path / "reports").as_posix()
                  for c in (tmp_path / "counts").glob(f"{stage}-*"))


def sweep(tmp_path, *extra, name="sw") -> int:
    return cli.main(["sweep", MINIMAL, "--name", name, "--reports", str(tmp_path / "reports"),
                     "--grid", "train.lr=0.5,0.25", "--grid", "seed=1,2", *extra])


def metrics(tmp_path, name="sw") -> dict:
    root = tmp_path / "reports" / name
    return {m: json.loads((root / m / "metrics.json").read_text())["report"]
            for m in sorted(p.name for p in root.iterdir() if (p / "stages.json").is_file())}


def test_sweep_expands_runs_each_stage_once_and_a_rerun_recomputes_nothing(nb_dir, tmp_path, capsys):
    assert sweep(tmp_path, "--jobs", "2") == 0
    root = tmp_path / "reports" / "sw"
    state = json.loads((root / "sweep.json").read_text())
    names = [m["name"] for m in state["members"]]
    assert names == ["lr0.5_seed1", "lr0.5_seed2", "lr0.25_seed1", "lr0.25_seed2"]
    assert all(m["state"] == "done" for m in state["members"])
    # prep depends on the seed only: computed once per seed, shared by both learning rates
    assert len(ran(tmp_path, "prep")) == 2 and len(ran(tmp_path, "train")) == 4 and len(ran(tmp_path, "report")) == 4
    for m in state["members"]:
        run_dir = root / m["name"]
        params = yaml.safe_load((run_dir / "params.yaml").read_text())  # an ordinary run folder
        assert params["train"]["lr"] == m["settings"]["train.lr"] and params["seed"] == m["settings"]["seed"]
        items = json.loads((run_dir / "prep.json").read_text())["items"]
        assert items == [m["settings"]["seed"] * 10 + i for i in range(3)]
        assert metrics(tmp_path)[m["name"]]["score"] == pytest.approx(sum(items) * m["settings"]["train.lr"])
    how = {m["name"]: m["stages"]["prep"] for m in state["members"]}
    assert sorted(how.values()).count("computed") == 2
    assert {h for h in how.values() if h != "computed"} <= {"reused from lr0.5_seed1", "reused from lr0.5_seed2",
                                                            "reused from lr0.25_seed1", "reused from lr0.25_seed2"}
    # the member that reused prep says where from, and stays valid when that member is deleted
    taker = next(n for n, h in how.items() if h != "computed")
    giver = how[taker].removeprefix("reused from ")
    rec = R.read_records(root / taker)["prep"]
    assert Path(rec["reused_from"]).name == giver and rec["key"] == R.read_records(root / giver)["prep"]["key"]
    assert (root / taker / "prep.json").stat().st_ino != (root / giver / "prep.json").stat().st_ino  # copied
    assert (root / taker / "01_prep.ipynb").is_file()
    before = metrics(tmp_path)
    capsys.readouterr()
    t0 = time.time()
    assert sweep(tmp_path, "--jobs", "2") == 0  # the second invocation: nothing to run
    assert "4 members, 0 to run" in capsys.readouterr().out and time.time() - t0 < 30
    assert len(ran(tmp_path, "train")) == 4 and metrics(tmp_path) == before


def test_a_changed_setting_reruns_only_what_depends_on_it(nb_dir, tmp_path):
    assert sweep(tmp_path) == 0
    assert sweep(tmp_path, "--set", "prep.size=4") == 0  # every member's prep changes, and all after it
    assert len(ran(tmp_path, "prep")) == 4 and len(ran(tmp_path, "train")) == 8
    assert cli.main(["run", MINIMAL, "--name", "lr0.5_seed1", "--reports", str(tmp_path / "reports" / "sw"),
                     "--set", "train.lr=0.5", "--set", "seed=1", "--set", "prep.size=4",
                     "--reuse", str(tmp_path / "reports" / "sw" / "lr0.5_seed1")]) == 0
    assert len(ran(tmp_path, "report")) == 8  # the member's own rerun with --reuse of itself: nothing computed
    # an earlier run named with --reuse gives its stages to a new sweep
    assert cli.main(["run", MINIMAL, "--name", "solo", "--reports", str(tmp_path / "reports"), "--set", "seed=7"]) == 0
    assert cli.main(["sweep", MINIMAL, "--name", "sw2", "--reports", str(tmp_path / "reports"), "--set", "seed=7",
                     "--grid", "train.lr=0.1,0.2", "--reuse", str(tmp_path / "reports" / "solo")]) == 0
    assert ran(tmp_path, "prep").count("solo") == 1 and not [r for r in ran(tmp_path, "prep") if r.startswith("sw2/")]
    assert "sw2/lr0.1" not in ran(tmp_path, "train") and "sw2/lr0.2" in ran(tmp_path, "train")  # lr 0.1: solo's
    assert metrics(tmp_path, "sw2")["lr0.1"]["score"] == json.loads(
        (tmp_path / "reports" / "solo" / "metrics.json").read_text())["report"]["score"]


def test_failed_member_is_recorded_others_go_on_and_retry_failed_reruns_it(nb_dir, tmp_path, capsys):
    rc = cli.main(["sweep", MINIMAL, "--name", "f", "--reports", str(tmp_path / "reports"),
                   "--grid", "train.fail=false,true", "--grid", "train.lr=0.5"])
    assert rc == 1
    state = json.loads((tmp_path / "reports" / "f" / "sweep.json").read_text())
    by = {m["name"]: m for m in state["members"]}
    assert by["failfalse_lr0.5"]["state"] == "done"
    assert by["failtrue_lr0.5"]["state"] == "failed" and "asked to fail" in by["failtrue_lr0.5"]["error"]
    assert "--retry-failed" in capsys.readouterr().out
    n = len(ran(tmp_path, "train"))
    assert cli.main(["sweep", MINIMAL, "--name", "f", "--reports", str(tmp_path / "reports"),
                     "--grid", "train.fail=false,true", "--grid", "train.lr=0.5"]) == 1  # failed: not retried
    assert len(ran(tmp_path, "train")) == n
    assert cli.main(["sweep", MINIMAL, "--name", "f", "--reports", str(tmp_path / "reports"),
                     "--grid", "train.fail=false,true", "--grid", "train.lr=0.5", "--retry-failed"]) == 1
    assert len(ran(tmp_path, "train")) == n + 1  # only the failed one ran again (and failed again)


def test_kill_9_mid_sweep_then_rerun_equals_an_uninterrupted_sweep(nb_dir, tmp_path):
    assert sweep(tmp_path, name="whole") == 0
    cmd = [sys.executable, "-m", "workbench.cli", "sweep", MINIMAL, "--name", "cut", "--reports",
           str(tmp_path / "reports"), "--grid", "train.lr=0.5,0.25", "--grid", "seed=1,2", "--set", "train.sleep=3"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = tmp_path / "reports" / "cut" / "sweep.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it once the first member is training
        if any(Path(c.read_text()).parent.name == "cut" for c in (tmp_path / "counts").glob("train-*")):
            break
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(3)  # the member got SIGINT as its parent died: let it stop
    states = [m["state"] for m in json.loads(state.read_text())["members"]]
    assert "done" not in states and "running" in states  # killed: nobody was left to record the end
    with pytest.warns(UserWarning, match="took over the lock of PID .* its process is gone"):  # the killed sweep's
        assert cli.main(["sweep", MINIMAL, "--name", "cut", "--reports", str(tmp_path / "reports"),
                         "--grid", "train.lr=0.5,0.25", "--grid", "seed=1,2", "--set", "train.sleep=3"]) == 0
    got = metrics(tmp_path, "cut")
    assert got == metrics(tmp_path, "whole")


def test_slurm_executor_through_submitit_gives_the_same_metrics(nb_dir, tmp_path):
    pytest.importorskip("submitit")
    assert sweep(tmp_path, name="loc") == 0
    assert sweep(tmp_path, "--executor", "slurm", "--slurm-local", "--slurm-time", "30", "--gpus-per-job", "0",
                 "--slurm-partition", "gpu", "--slurm-option", "qos=high", name="sl") == 0
    assert metrics(tmp_path, "sl") == metrics(tmp_path, "loc")
    state = json.loads((tmp_path / "reports" / "sl" / "sweep.json").read_text())
    for m in state["members"]:
        job = m["job"]
        assert job["cluster"] == "local" and job["job_id"]
        assert job["command"][1:5] == ["-m", "workbench.cli", "run", str(tmp_path / "reports" / "sl" / S.BASE)]
        assert job["command"][job["command"].index("--name") + 1] == m["name"]
        assert job["resources"]["timeout_min"] == 30 and job["resources"]["gpus_per_node"] == 0
    assert list((tmp_path / "reports" / "sl" / "logs" / "submitit").iterdir())


def test_slurm_resources_reach_sbatch_options(tmp_path, monkeypatch):
    """The options of `workbench sweep --executor slurm` as the sbatch script submitit would submit."""
    submitit = pytest.importorskip("submitit")
    ex = S.SubmititExecutor(tmp_path, partition="gpu", time_min=90, gpus_per_job=2, cpus=16, mem_gb=100,
                            account="lab", options={"qos": "high"})
    assert ex.resources["slurm_partition"] == "gpu" and ex.resources["gpus_per_node"] == 2
    assert ex.resources["slurm_additional_parameters"] == {"qos": "high", "account": "lab"}
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # no srun here
    sx = submitit.AutoExecutor(folder=str(tmp_path / "x"), cluster="slurm")
    sx.update_parameters(**ex.resources)
    script = sx._executor._make_submission_file_text("python -m x", "%j")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --mem=100GB", "#SBATCH --qos=high", "#SBATCH --account=lab"):
        assert line in script, (line, script)


@pytest.mark.parametrize("args, message", [
    (["--grid", "train.lrr=1,2"], "--grid train.lrr=1: unknown configuration key(s): train.lrr"),
    (["--grid", "train.lr="], "--grid train.lr: no values"),
    (["--grid", "train.lr=abc,0.1"], "--grid train.lr=\"abc\": invalid configuration value(s): train.lr='abc'"),
    (["--grid", "train.lr=0.1", "--grid", "train.lr=0.2"], "--grid train.lr is given twice"),
    (["--grid", "lr=0.1", "--grid", "train.lr=0.2"], "--grid train.lr and --grid lr both set train.lr"),
    (["--grid", "train.lr=0.1", "--set", "train.lr=0.3"], "--grid train.lr sets train.lr, which --set train.lr=0.3 fixes"),
    ([], "a sweep needs a grid"),
    (["--grid", "train.lr=0.1", "--jobs", "0"], "--jobs 0: must be at least 1"),
    (["--grid", "train.lr=0.1", "--reuse", "/nonexistent/run"], "--reuse /nonexistent/run: no such run folder"),
])
def test_bad_sweeps_fail_before_anything_runs(nb_dir, tmp_path, capsys, args, message):
    rc = cli.main(["sweep", MINIMAL, "--name", "bad", "--reports", str(tmp_path / "reports"), *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "reports" / "bad").exists() and not list((tmp_path / "counts").iterdir())


def test_a_sweep_file_with_a_grid_section(nb_dir, tmp_path):
    f = tmp_path / "study.yaml"
    f.write_text("dataset: synthetic\ntrain:\n  sleep: 0.0\ngrid:\n  train.lr: [0.5, 0.25]\n  prep.size: 2\n")
    assert cli.main(["sweep", str(f), "--name", "fs", "--reports", str(tmp_path / "reports"), "--grid", "seed=0,1"]) == 0
    got = metrics(tmp_path, "fs")
    assert sorted(got) == ["lr0.25_size2_seed0", "lr0.25_size2_seed1", "lr0.5_size2_seed0", "lr0.5_size2_seed1"]
    assert got["lr0.5_size2_seed1"]["score"] == pytest.approx((10 + 11) * 0.5)
    base = yaml.safe_load((tmp_path / "reports" / "fs" / S.BASE).read_text())
    assert "grid" not in base and base["train"] == {"sleep": 0.0}


def test_split_values_keeps_lists_whole():
    assert S.split_values("[1,3],[5]") == ["[1,3]", "[5]"]
    assert S.split_values("1e-5,3e-5") == ["1e-5", "3e-5"]
    assert S.split_values("'a,b',c") == ["'a,b'", "c"]
    assert S.parse_grid(["finetune.shots=[1,3],[5]"]) == {"finetune.shots": [[1, 3], [5]]}


def test_stage_key_follows_inputs_not_neutral_settings(nb_dir, tmp_path):
    p = pipeline.plan(MINIMAL, ["seed=3"], name="k", reports=tmp_path / "r")
    pipeline.execute(p, log=lambda *_: None)
    rec = R.read_records(p.run_dir)
    assert set(rec) == {"prep", "train", "report"}
    assert set(rec["train"]["inputs"]["upstream"]) == {"prep.json", "prep_had_answers.txt", "describe_responses.jsonl"}  # not its notebook
    assert "progress" not in rec["train"]["inputs"]["params"] and rec["train"]["inputs"]["params"]["lr"] == 0.1
    params = {"run_dir": "x", "dataset": "synthetic", "seed": 3, "progress": False, "lr": 0.1, "fail": False, "sleep": 0.0}

    def key():
        return R.stage_key(R.stage_inputs(p.run_dir, "train", nb_dir / "02_train.ipynb", params, list(p.schema),
                                          pipeline.dataset_sha(p.config)))

    assert key() == rec["train"]["key"]  # progress and run_dir are not inputs
    params["lr"] = 0.2
    assert key() != rec["train"]["key"]
    params["lr"] = 0.1
    (p.run_dir / "prep.json").write_text('{"items": [1]}')  # an upstream output changed by hand
    assert key() != rec["train"]["key"]
    assert not R.intact(p.run_dir, rec["prep"])  # and prep's record no longer matches its file: no donor


# ----------------------------------------------------------------------------- workbench compare
def _fake_run(root: Path, name: str, lr: float, correct: dict, val: dict, test=("a.jpg", "b.jpg", "c.jpg", "d.jpg"),
              identity: dict | None = None):
    """A run folder as the evaluate stage leaves it: params.yaml, accuracy rows, test_outcomes.json."""
    from workbench.io import write_json

    d = root / name
    d.mkdir(parents=True)
    (d / "params.yaml").write_text(yaml.safe_dump({"dataset": "synthetic", "seed": 0, "progress": True,
                                                   "finetune": {"lr": lr, "epochs": 3}}))
    rows, outs = [], []
    for (method, seed), c in correct.items():
        rows.append({"method": method, "shots": 1, "seed": seed, "top1": 100 * sum(c) / len(c), "ci95": [0, 100],
                     "val_top1": val[method], "n_test": len(c)})
        outs.append({"method": method, "shots": 1, "seed": seed, "correct": "".join(map(str, c)),
                     "identity": (identity or {}).get(method, f"{name}-{method}-{seed}")})
    write_json(d / "metrics.json", {"accuracy": rows})
    write_json(d / "test_outcomes.json", {"version": 1, "test": list(test), "rows": outs})
    return d


def test_compare_tables_against_hand_computation(tmp_path):
    from workbench import compare

    sw = tmp_path / "sw"
    zs = {("zero-shot", 0): [1, 0, 0, 0]}  # the same computation in both runs (same identity): never paired
    _fake_run(sw, "lr1", 1e-5, {("gist", 0): [1, 1, 0, 0], ("gist", 1): [1, 0, 0, 0], **zs}, {"gist": 60.0, "zero-shot": None},
              identity={"zero-shot": "zs"})
    _fake_run(sw, "lr3", 3e-5, {("gist", 0): [1, 1, 1, 0], ("gist", 1): [1, 1, 0, 1], **zs}, {"gist": 50.0, "zero-shot": None},
              identity={"zero-shot": "zs"})
    runs = compare.load_runs([sw])
    assert [r.name for r in runs] == ["lr1", "lr3"]
    assert compare.differing_settings(runs) == ["finetune.lr"]  # epochs, seed, progress are the same
    table = compare.accuracy_table(runs)
    assert list(table.columns[:2]) == ["run", "finetune.lr"] and len(table) == 6
    best = compare.best_on_validation(table).set_index("method")
    # lr1 has the better validation score though lr3 is better on test: the choice is validation's
    assert best.loc["gist", "best_run"] == "lr1" and best.loc["gist", "test_top1"] == pytest.approx((50 + 25) / 2)
    assert pd.isna(best.loc["zero-shot", "best_run"]) and "nothing to choose" in best.loc["zero-shot", "note"]
    pairs = compare.paired_runs(runs, n_boot=500)
    assert len(pairs) == 1 and pairs.loc[0, "a"] == "lr1" and pairs.loc[0, "seeds"] == 2
    assert pairs.loc[0, "diff"] == pytest.approx((50 + 25) / 2 - (75 + 75) / 2)
    assert pairs.loc[0, "p_holm"] == pytest.approx(pairs.loc[0, "p"])  # one comparison: Holm changes nothing
    by = compare.accuracy_by_setting(runs, "finetune.lr")
    assert by[by.method == "gist"].set_index("run").loc["lr3", "top1"] == pytest.approx(75.0)


def test_compare_refuses_pairs_on_different_test_images(tmp_path, capsys):
    from workbench import compare

    a = _fake_run(tmp_path, "a", 1e-5, {("gist", 0): [1, 0, 1, 0]}, {"gist": 1.0})
    b = _fake_run(tmp_path, "b", 3e-5, {("gist", 0): [1, 0, 1, 0]}, {"gist": 1.0}, test=("a.jpg", "b.jpg", "x.jpg", "d.jpg"))
    with pytest.raises(compare.CompareError, match="runs a and b were scored on different test images .*position 2"):
        compare.paired_runs(compare.load_runs([a, b]))
    with pytest.raises(compare.CompareError, match="not a run folder"):
        compare.load_runs([tmp_path / "nothing"])
    assert cli.main(["compare", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_demo_sweep_then_compare(tmp_path, monkeypatch, capsys):
    """The demo's notebooks at reduced sizes: a sweep over the learning rate runs describe and match once;
    `workbench compare` on it writes 06_compare.html with the table, the lr column, pairs and the plot."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    small = ["finetune.methods=[gist]", "finetune.steps=0", "finetune.validate_every=0", "progress=false", "epochs=1",
             "shots=[full]", "seeds=[0]", "bootstrap_n=200", "match.n_examples=2", "describe.per_class=3",
             "dataset_options={n_species: 4, n_train: 4, n_val: 2, n_test: 3}", "evaluate.weight_decays=[0.1]"]
    args = ["sweep", "demo", "--name", "sw", "--reports", str(tmp_path / "reports"), "--grid", "finetune.lr=1e-4,1e-3",
            "--stages", "describe,match,finetune,evaluate", *sum((["--set", s] for s in small), [])]
    assert cli.main(args) == 0
    root = tmp_path / "reports" / "sw"
    state = json.loads((root / "sweep.json").read_text())
    how = [m["stages"] for m in state["members"]]
    assert [h["describe"] for h in how] == ["computed", "reused from lr0.0001"]
    assert [h["match"] for h in how] == ["computed", "reused from lr0.0001"]
    assert [h["finetune"] for h in how] == ["computed", "computed"]
    for m in state["members"]:
        idx = json.loads((root / m["name"] / "checkpoints" / "index.json").read_text())
        assert {r["method"] for r in idx} == {"gist"}
        assert R.read_records(root / m["name"])["describe"]["key"] == R.read_records(root / "lr0.0001")["describe"]["key"]
    capsys.readouterr()
    assert cli.main(args) == 0 and "2 members, 0 to run" in capsys.readouterr().out
    assert cli.main(["compare", str(root)]) == 0
    html = (root / "06_compare.html").read_text()
    assert "finetune.lr" in html and "Paired comparisons" in html and "best_run" in html
    assert (root / "figures" / "compare_settings.png").stat().st_size > 1000
    assert "refused" not in html  # the members share their test images


def test_track_mlflow_logs_each_member(nb_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert cli.main(["sweep", MINIMAL, "--name", "tr", "--reports", str(tmp_path / "reports"),
                     "--grid", "train.lr=0.5,0.25", "--track", "mlflow"]) == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tr")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == ["lr0.25", "lr0.5"]
    r = runs["lr0.25"]
    assert r.data.params["grid.train.lr"] == "0.25" and r.data.params["train.lr"] == "0.25"
    assert r.data.tags["workbench.sweep"] == "tr" and r.info.status == "FINISHED"
    assert "timing/train_s" in r.data.metrics
    assert "metrics.json" in {a.path for a in client.list_artifacts(r.info.run_id)}
    state = json.loads((tmp_path / "reports" / "tr" / "sweep.json").read_text())
    assert {m["tracking"]["run_id"] for m in state["members"]} == {r.info.run_id for r in runs.values()}


def test_track_without_mlflow_says_how_to_install_it(nb_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    rc = cli.main(["sweep", MINIMAL, "--name", "t", "--reports", str(tmp_path / "reports"), "--grid", "train.lr=1",
                   "--track", "mlflow"])
    assert rc == 2 and "pip install 'gist-workbench[track]'" in capsys.readouterr().err
    assert not (tmp_path / "reports" / "t").exists()


def test_the_run_seed_does_not_reach_describe_or_match():
    """A seed grid shares one describe and one match: those stages have seeds of their own."""
    from workbench import config as C

    schema = C.load_schema()
    a, b = (C.resolve(schema, [C.load_source("demo")], [f"seed={s}"]) for s in (0, 1))
    for stage in ("describe", "match"):
        assert C.stage_parameters(a, stage, schema) == C.stage_parameters(b, stage, schema)
    for stage in ("finetune", "evaluate", "align"):
        assert C.stage_parameters(a, stage, schema) != C.stage_parameters(b, stage, schema)


def test_a_stage_recomputed_for_new_code_keeps_the_paid_answers(nb_dir, tmp_path):
    """Other code (here: an edited notebook) computes prep again, but the answers it paid for come along."""
    reports = tmp_path / "reports"
    assert cli.main(["run", MINIMAL, "--name", "old", "--reports", str(reports)]) == 0
    nb = nbformat.read(nb_dir / "01_prep.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("an edit"))
    nbformat.write(nb, nb_dir / "01_prep.ipynb")
    assert cli.main(["run", MINIMAL, "--name", "new", "--reports", str(reports), "--reuse", str(reports / "old")]) == 0
    assert ran(tmp_path, "prep") == ["new", "old"]  # computed again: the notebook changed
    assert (reports / "new" / "prep_had_answers.txt").read_text() == "True"
    assert len((reports / "new" / "describe_responses.jsonl").read_text().splitlines()) == 2
    assert len((reports / "old" / "describe_responses.jsonl").read_text().splitlines()) == 1  # a copy, not a link
