"""The step budget of a fine-tuning run (``FinetuneConfig.steps``), validation every N steps
(``validate_every``), resume with both, and the "unmoved" accounting (``workbench.runs.unmoved_counts``)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toydata import make_matches, make_toy_dataset  # noqa: E402

from workbench import finetune as ft  # noqa: E402
from workbench.finetune import trainer  # noqa: E402
from workbench.finetune.checkpoint import load_state  # noqa: E402
from workbench.io import read_jsonl  # noqa: E402
from workbench.runs import run_warnings, unmoved, unmoved_counts  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """24 (image, caption) pairs of 12 images: batch 8 gives 3 steps per epoch, batch 24 one."""
    from workbench.data.images import image_cache

    toy = make_toy_dataset(tmp_path_factory.mktemp("toy"), n_classes=3, n_train=4, n_val=1, n_test=1)
    tr = toy.split("train")
    rows, texts, labels = ft.build_pairs(tr, "gist", 2, make_matches(toy, 3))
    return image_cache(tr.paths(), 64), rows, texts, labels


def _tiny(seed=0):
    from workbench.clip import load_clip

    torch.manual_seed(seed)
    return load_clip("tiny", None, "cpu")


def _score(clip) -> dict:
    """A validation that depends on the weights only (deterministic, cheap)."""
    return {"val_top1": float(clip.visual.proj.detach().double().abs().sum() * 1000 % 100)}


def _train(inputs, cfg: dict, out=None, log=None, run="r", validate=_score, seed=0):
    m = _tiny(seed)
    r = ft.train_run(m.model, m.tokenizer, ft.FinetuneConfig(**{"lr": 1e-3, "log_every": 1, **cfg}), *inputs,
                     validate=validate, out_dir=out, log_path=log, run=run)
    return r, m.model


@pytest.fixture
def count_steps(monkeypatch):
    """The optimizer steps taken, counted where they happen (TrainStep.step)."""
    n = {"steps": 0}
    real = trainer.TrainStep.step

    def counted(self, *a, **k):
        n["steps"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(trainer.TrainStep, "step", counted)
    return n


# ------------------------------------------------------------------ the budget
@pytest.mark.parametrize("batch,epochs,steps,expect", [
    (24, 1, 5, 5),  # 1 step per epoch (a few-shot run in one batch): exactly `steps`
    (24, 3, 2, 3),  # epochs already give more: unchanged
    (8, 1, 7, 9),  # 3 steps per epoch: whole epochs, ceil(7 / 3) = 3
    (8, 2, 0, 6),  # off: epochs decide
])
def test_the_budget_takes_the_steps_it_promises(inputs, tmp_path, count_steps, batch, epochs, steps, expect):
    cfg = ft.FinetuneConfig(epochs=epochs, steps=steps, batch_size=batch)
    spe = 24 // batch
    assert cfg.epochs_for(spe) * spe == expect == max(epochs * spe, -(-steps // spe) * spe)
    r, _ = _train(inputs, dict(epochs=epochs, steps=steps, batch_size=batch, validate=False), log=tmp_path / "l.jsonl")
    assert count_steps["steps"] == r["steps"] == r["total_steps"] == expect
    assert [x["step"] for x in read_jsonl(tmp_path / "l.jsonl") if "loss" in x] == list(range(1, expect + 1))
    assert r["status"] == "done"


def test_each_epoch_of_a_budget_uses_every_pair(inputs):
    m = _tiny()
    tr = trainer.Trainer(m.model, m.tokenizer, ft.FinetuneConfig(epochs=1, steps=7, batch_size=8), *inputs)
    assert tr.total == 9 and tr.epochs == 3
    for e in range(tr.epochs):
        seen = torch.cat([tr._pairs(s) for s in range(e * 3, e * 3 + 3)])
        assert sorted(seen.tolist()) == list(range(24))


# ------------------------------------------------------------------ validation every N steps
@pytest.mark.parametrize("batch,cfg,steps", [
    (24, dict(epochs=1, steps=5, validate_every=2), [0, 2, 4, 5]),  # and after the last step
    (8, dict(epochs=2, validate_every=4), [0, 4, 6]),  # between epoch ends, not at them
    (8, dict(epochs=2, validate_every=3), [0, 3, 6]),
    (8, dict(epochs=2), [0, 3, 6]),  # off: at epoch ends
])
def test_validation_happens_at_the_promised_steps(inputs, tmp_path, batch, cfg, steps):
    calls = []

    def val(clip):
        calls.append(1)
        return _score(clip)

    r, _ = _train(inputs, dict(batch_size=batch, **cfg), log=tmp_path / "l.jsonl", validate=val)
    assert [h["step"] for h in r["history"]] == steps and len(calls) == len(steps)
    spe = 24 // batch
    assert [h["epoch"] for h in r["history"]] == [s // spe if s % spe == 0 else s / spe for s in steps]
    assert [x["step"] for x in read_jsonl(tmp_path / "l.jsonl") if "val_top1" in x] == steps
    best = max(r["history"], key=lambda h: h["val_top1"])  # the first of equals is kept
    assert (r["best_step"], r["best_epoch"], r["val_top1"]) == (best["step"], best["epoch"], best["val_top1"])


def test_the_starting_weights_stay_a_candidate(inputs, tmp_path):
    """A run whose validation never beats step 0 keeps the starting weights and is called unmoved."""
    scores = iter([90.0, 50.0, 60.0, 70.0])

    def val(clip):
        return {"val_top1": next(scores)}

    init = {k: v.clone() for k, v in _tiny().model.state_dict().items()}
    r, model = _train(inputs, dict(batch_size=24, epochs=1, steps=3, validate_every=1), out=tmp_path / "o",
                      validate=val)
    assert [h["step"] for h in r["history"]] == [0, 1, 2, 3]
    assert r["best_step"] == 0 and r["best_epoch"] == 0 and r["val_top1"] == 90.0
    from safetensors.torch import load_file

    best = load_file(tmp_path / "o" / "best.safetensors")
    assert all(torch.equal(best[k], init[k]) for k in best)
    assert not torch.equal(model.visual.proj, init["visual.proj"])  # it trained; the checkpoint is the start
    assert unmoved(r) and "unmoved:" in run_warnings(r)
    moved = {**r, "best_step": 2, "best_epoch": 2.0}
    assert not unmoved(moved) and "unmoved" not in (run_warnings(moved) or "")


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("stop", [4, 5])  # at a validation between epoch ends; one step after it
def test_a_resumed_budget_run_equals_an_uninterrupted_one(inputs, tmp_path, stop):
    """3 steps per epoch, steps=7 -> 9 steps; validation every 2 steps: 0, 2, 4, 6, 8, 9. Killed at ``stop``
    (max_steps), resumed from another process's weights, it ends as the run that was never stopped."""
    cfg = dict(batch_size=8, epochs=1, steps=7, validate_every=2)
    full, model_a = _train(inputs, cfg, out=tmp_path / "a", log=tmp_path / "log.jsonl", run="a")
    part, _ = _train(inputs, {**cfg, "max_steps": stop}, out=tmp_path / "b", log=tmp_path / "log.jsonl", run="b")
    assert part["status"] == "interrupted" and part["steps"] == stop
    state = load_state(tmp_path / "b" / trainer.STATE_FILE)
    assert state["step"] == 4  # written with the validation at step 4: its history is the state's
    rest, model_b = _train(inputs, cfg, out=tmp_path / "b", log=tmp_path / "log.jsonl", run="b", seed=123)
    assert rest["status"] == "done" and rest["steps"] == full["steps"] == 9
    assert [h["step"] for h in full["history"]] == [0, 2, 4, 6, 8, 9]
    strip = [{k: v for k, v in h.items() if k != "run"} for h in full["history"]]
    assert [{k: v for k, v in h.items() if k != "run"} for h in rest["history"]] == strip
    for k in ("best_step", "best_epoch", "val_top1", "loss_first_epoch", "loss_last_epoch"):
        assert rest[k] == full[k], k
    log = read_jsonl(tmp_path / "log.jsonl")

    def rows(run):
        return [{k: v for k, v in x.items() if k != "run"} for x in log if x["run"] == run]

    assert rows("a") == rows("b")  # every loss and validation row, bit for bit, each once
    assert [x["step"] for x in log if x["run"] == "b" and "loss" in x] == list(range(1, 10))
    for k, v in model_a.state_dict().items():
        assert torch.equal(v, model_b.state_dict()[k]), k
    from safetensors.torch import load_file

    ba, bb = load_file(tmp_path / "a" / "best.safetensors"), load_file(tmp_path / "b" / "best.safetensors")
    assert all(torch.equal(ba[k], bb[k]) for k in ba)


def test_a_resume_state_of_another_budget_is_refused(inputs, tmp_path):
    cfg = dict(batch_size=24, epochs=1, steps=4, validate=False)
    _train(inputs, {**cfg, "max_steps": 2}, out=tmp_path / "b")
    with pytest.raises(ValueError, match="other settings"):
        _train(inputs, {**cfg, "steps": 5}, out=tmp_path / "b")


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("field,value", [("steps", -1), ("validate_every", -3), ("steps", 2.5),
                                         ("validate_every", True)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be an integer >= 0.*got {value!r}"):
        ft.FinetuneConfig(**{field: value})


def test_off_values_leave_the_identity_as_before():
    """steps=0 and validate_every=0 are today's runs: the same settings, identity and resume fingerprint."""
    base = ft.FinetuneConfig()
    assert "steps" not in base.settings() and "validate_every" not in base.settings()
    assert ft.FinetuneConfig(steps=0, validate_every=0).fingerprint() == base.fingerprint()
    assert ft.FinetuneConfig(steps=10).fingerprint() != base.fingerprint()
    assert ft.FinetuneConfig(validate_every=10).settings()["validate_every"] == 10


# ------------------------------------------------------------------ unmoved accounting
def test_unmoved_counts_by_method_and_shots():
    def s(run, method, shots, best_step, status="done", steps=5, **kw):
        return {"run": run, "method": method, "shots": shots, "best_step": best_step, "best_epoch": best_step,
                "status": status, "steps": steps, **kw}

    runs = [
        s("gist-1-s0", "gist", 1, 0), s("gist-1-s1", "gist", 1, 3), s("gist-1-s2", "gist", 1, 0),
        s("gist-full-s0", "gist", "full", 4),
        s("finetune-classname-1-s0", "finetune-classname", 1, 0),
        s("finetune-classname-1-s1", "finetune-classname", 1, 0, status="interrupted"),  # not a result yet
        # an evaluate-stage summary: no best_step, best_epoch 0
        {"run": "finetune-classname-1-s2", "method": "finetune-classname", "shots": 1, "best_epoch": 0, "steps": 1},
        # a fraction of an epoch is not the start
        {"run": "gist-full-s1", "method": "gist", "shots": "full", "best_epoch": 0.5, "best_step": 1, "steps": 2},
    ]
    got = unmoved_counts(runs)
    assert [(g["method"], g["shots"], g["unmoved"], g["runs"]) for g in got] == [
        ("gist", "1", 2, 3), ("gist", "full", 0, 2), ("finetune-classname", "1", 2, 2)]
    assert got[0]["unmoved_runs"] == ["gist-1-s0", "gist-1-s2"] and got[0]["fraction"] == pytest.approx(2 / 3)
    assert unmoved_counts([]) == []
    # a stored warning counts too (a summary read back whose best fields were left out)
    assert unmoved_counts([{"run": "x", "method": "gist", "shots": 1, "warning": "run x unmoved: ..."}])[0]["unmoved"] == 1
