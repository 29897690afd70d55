"""Evaluation: probe vs scikit-learn, mean ± std over seeds, few-shot draws, zero-shot scoring,
and the comparison end to end on a tiny image dataset with fabricated fine-tuned checkpoints."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from workbench.data import Dataset, DrawSpec, few_shot
from workbench.evaluate import (
    accuracy_table,
    check_draws,
    classname_classifier,
    classname_scores,
    description_scores,
    finetuned_rows,
    linear_probe,
    load_descriptions,
    make_draw,
    probe_rows,
    runs_table,
    seed_summary,
    topk_correct,
    zero_shot_rows,
)
from workbench.evaluate.paired import PAIRS
from workbench.evaluate.zeroshot import classname_prompts
from workbench.runs import read_index as read_checkpoint_index


# ---------------------------------------------------------------- linear probe
def _gaussian_problem(n_per_class=(40, 20, 100), classes=5, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * 1.2
    scale = torch.rand(dim, generator=g) * 3 + 0.2  # uneven scales: standardisation matters
    out = []
    for n in n_per_class:
        y = torch.arange(classes).repeat_interleave(n)
        out.append(((means[y] + torch.randn(len(y), dim, generator=g)) * scale + 5.0, y))
    return out


def test_probe_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (Xtr, ytr), (Xva, yva), (Xte, yte) = _gaussian_problem()
    wd = 1e-2
    res = linear_probe(Xtr, ytr, Xva, yva, 5, weight_decays=[wd], device="cpu", tol=1e-7)
    ours = topk_correct(res.logits(Xte), yte, 1).float().mean().item() * 100

    sc = StandardScaler().fit(Xtr.numpy())
    clf = LogisticRegression(C=1 / (wd * len(Xtr)), max_iter=5000, tol=1e-8).fit(sc.transform(Xtr.numpy()), ytr.numpy())
    theirs = clf.score(sc.transform(Xte.numpy()), yte.numpy()) * 100
    assert abs(ours - theirs) <= 0.5, (ours, theirs)
    # Same objective, so the same model: probabilities agree closely.
    p_ours = res.logits(Xte).softmax(1).numpy()
    p_theirs = clf.predict_proba(sc.transform(Xte.numpy()))
    assert np.abs(p_ours - p_theirs).max() < 2e-3

    # With the sweep: same accuracy as scikit-learn with C picked on val over the same grid.
    grid = [1.0, 1e-1, 1e-2, 1e-3]
    res = linear_probe(Xtr, ytr, Xva, yva, 5, weight_decays=grid, device="cpu", patience=None)
    val = {w: LogisticRegression(C=1 / (w * len(Xtr)), max_iter=5000).fit(sc.transform(Xtr.numpy()), ytr.numpy())
           for w in grid}
    best = max(grid, key=lambda w: val[w].score(sc.transform(Xva.numpy()), yva.numpy()))
    theirs = val[best].score(sc.transform(Xte.numpy()), yte.numpy()) * 100
    ours = topk_correct(res.logits(Xte), yte, 1).float().mean().item() * 100
    assert abs(ours - theirs) <= 0.5, (ours, theirs, res.sweep)
    assert [s["weight_decay"] for s in res.sweep] == sorted(grid, reverse=True)


def test_probe_trainval_refit_and_bad_input():
    (Xtr, ytr), (Xva, yva), _ = _gaussian_problem(n_per_class=(10, 5, 1))
    res = linear_probe(Xtr, ytr, Xva, yva, 5, weight_decays=[1e-1, 1e-2], use_trainval=True, device="cpu")
    assert res.fit_on == "train+val"
    allx = torch.cat([Xtr, Xva])
    assert torch.allclose(res.mean, allx.mean(0), atol=1e-4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        linear_probe(Xtr, ytr, Xva, yva, 3, device="cpu")
    with pytest.raises(ValueError, match="differ in width"):
        linear_probe(Xtr, ytr, Xva[:, :4], yva, 5, device="cpu")


def test_topk_correct_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0], [0.9, 0.1, 0.3, 0.2], [0.0, 0.1, 0.2, 0.3]])
    y = torch.tensor([1, 2, 0])
    assert topk_correct(logits, y, 1).tolist() == [True, False, False]
    assert topk_correct(logits, y, 3).tolist() == [True, True, False]
    assert topk_correct(logits[:, :2], y.clamp(max=1), 3).all()  # k clipped to the class count


# ---------------------------------------------------------------- seeds
def test_seed_summary_mean_std():
    rows = [{"method": "gist", "shots": 1, "seed": s, "top1": v, "top3": v + 10, "ci95": [v - 1, v + 1]}
            for s, v in enumerate([50.0, 52.0, 57.0])]
    rows.append({"method": "gist", "shots": "full", "seed": 0, "top1": 80.0, "top3": 90.0, "ci95": [78.0, 82.0]})
    by = {str(s["shots"]): s for s in seed_summary(rows)}
    assert by["1"]["top1_mean"] == pytest.approx(53.0)
    assert by["1"]["top1_std"] == pytest.approx(np.std([50, 52, 57], ddof=1))
    assert by["full"]["n"] == 1 and by["full"]["ci95"] == [78.0, 82.0]


# ---------------------------------------------------------------- tiny image dataset
@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory) -> Dataset:
    """4 classes, 5 train / 2 val / 3 test each; each class a colour, images 32 px PNGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tinyds")
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    rng = np.random.default_rng(0)
    rows = []
    for c, col in enumerate(colours):
        for split, n in (("train", 5), ("val", 2), ("test", 3)):
            for i in range(n):
                arr = np.clip(rng.normal(col, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                name = f"c{c}/{split}_{i}.png"
                (root / f"c{c}").mkdir(exist_ok=True)
                Image.fromarray(arr).save(root / name)
                rows.append({"filename": name, "split": split, "label": c, "species": f"species {c}"})
    return Dataset("tiny", root, pd.DataFrame(rows), [f"species {c}" for c in range(4)])


def test_few_shot_draws_deterministic_and_split_files(tiny_ds, tmp_path):
    a, b, c = make_draw(tiny_ds, 3, seed=1), make_draw(tiny_ds, 3, seed=1), make_draw(tiny_ds, 3, seed=2)
    assert a.train.tolist() == b.train.tolist()
    assert a.train.tolist() != c.train.tolist()
    labels = tiny_ds.labels
    assert np.bincount(labels[a.train], minlength=4).tolist() == [3, 3, 3, 3]
    full = make_draw(tiny_ds, "full")
    assert a.val.tolist() == full.val.tolist() and a.test.tolist() == full.test.tolist()
    assert set(a.train) <= set(full.train)

    # A GIST k-shot file is a fixed draw: its train rows, whatever the seed.
    table = tiny_ds.table
    keep = table[table["split"] == "train"].groupby("label").head(1)
    csv = tmp_path / "metadata_1shot.csv"
    pd.concat([keep, table[table["split"] != "train"]]).to_csv(csv)
    spec = DrawSpec({1: str(csv)})
    d0, d5 = make_draw(tiny_ds, 1, seed=0, spec=spec), make_draw(tiny_ds, 1, seed=5, spec=spec)
    assert sorted(table["filename"][d0.train]) == sorted(keep["filename"])
    assert d0.train.tolist() == d5.train.tolist() and d0.source == str(csv)
    with pytest.raises(ValueError, match="exactly 3 training images per class; species 0 has 1"):
        few_shot(tiny_ds, 3, shot_file=csv)
    with pytest.raises(ValueError, match="these classes have fewer"):
        make_draw(tiny_ds, 6, seed=0)
    # Everything the evaluation will draw is checked up front.
    assert len(check_draws(tiny_ds, ["full", 1, 3], [0, 1], spec)) == 4  # the fixed 1-shot draw: one seed
    with pytest.raises(ValueError, match="these classes have fewer"):
        check_draws(tiny_ds, ["full", 6], [0])
    with pytest.raises(ValueError, match="k-shot draws, not 'full'"):
        DrawSpec({"full": str(csv)})


# ---------------------------------------------------------------- zero-shot
class _StubTokenizer:
    """Maps each distinct text to one id (so the stub model can return a known embedding per text)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts):
        return torch.tensor([[self.vocab.setdefault(t, len(self.vocab))] for t in texts])


class _StubModel(torch.nn.Module):
    """encode_text returns a fixed random vector per text id."""

    def __init__(self, dim=6, vocab=64):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, dim, generator=torch.Generator().manual_seed(0)))

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]


def test_classname_ensemble_by_hand():
    model, tok = _StubModel(), _StubTokenizer()
    classes, templates = ["a", "b", "c"], ["x {}", "y {}"]
    W = classname_classifier(model, tok, classes, templates)
    emb = {t: F.normalize(model.table[i].detach(), dim=0) for t, i in tok.vocab.items()}
    for ci, c in enumerate(classes):
        expect = F.normalize(sum(emb[t.format(c)] for t in templates) / 2, dim=0)
        assert torch.allclose(W[ci], expect, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        classname_prompts(classes, ["no slot"])


def test_zero_shot_rows_on_hand_built_case(tiny_ds):
    """Image features placed at known class embeddings: zero-shot accuracy is known exactly."""
    from workbench.clip import CLIPBundle

    model, tok = _StubModel(), _StubTokenizer()
    W = classname_classifier(model, tok, tiny_ds.classnames, ["{}"])
    feats = torch.zeros(len(tiny_ds), W.shape[1])
    labels = tiny_ds.labels
    test = make_draw(tiny_ds, "full").test
    # Each test image is its class's embedding, scaled (raw features are unnormalised) ...
    feats[test] = 3 * W[labels[test]]
    # ... except the first two test images, which look like class (label + 1).
    feats[test[:2]] = W[(labels[test[:2]] + 1) % 4]
    bundle = CLIPBundle(model, None, tok, "stub", None, "stub")
    rows = zero_shot_rows(bundle, tiny_ds, feats, ["full", 1, 3], templates=["{}"], bootstrap_n=50)
    assert [r["shots"] for r in rows] == ["full", 1, 3]
    assert all(r["zero_shot"] and r["method"] == "zero-shot" for r in rows)
    assert rows[0]["top1"] == pytest.approx(100 * (len(test) - 2) / len(test))
    assert rows[1]["top1"] == rows[0]["top1"]
    assert classname_scores(feats[test], W).argmax(1)[2:].tolist() == labels[test][2:].tolist()


def test_description_scores_against_manual(tmp_path):
    g = torch.Generator().manual_seed(1)
    img, desc = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    dl = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    got = description_scores(img, desc, dl, 3)
    expect = torch.zeros(5, 3)
    for n in range(5):
        for c in range(3):
            sims = [F.cosine_similarity(img[n], desc[m], dim=0) for m in range(7) if dl[m] == c]
            expect[n, c] = sum(sims) / len(sims)
    assert torch.allclose(got, expect, atol=1e-6)
    with pytest.raises(ValueError, match="no descriptions"):
        description_scores(img, desc, dl, 4)

    # descriptions.jsonl validation
    path = tmp_path / "descriptions.jsonl"
    recs = [{"id": "1", "class": "a", "text": "red"}, {"id": "2", "class": "zz", "text": "blue"}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(ValueError, match=r"1 class\(es\) not in the dataset: 'zz'"):
        load_descriptions(path, ["a", "b"])
    path.write_text(json.dumps(recs[0]) + "\n")
    with pytest.raises(ValueError, match=r"1 class\(es\) have no descriptions: 'b'"):
        load_descriptions(path, ["a", "b"])
    texts, labels = load_descriptions(path, ["a"])
    assert texts == ["red"] and labels.tolist() == [0]


# ---------------------------------------------------------------- end to end, tiny CLIP
def test_comparison_end_to_end(tiny_ds, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from workbench.clip import load_clip
    from workbench.evaluate import dataset_features as image_features
    from workbench.evaluate.plots import plot_accuracy
    from workbench.io import read_json
    from workbench.runs import update_metrics

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    bundle = load_clip("tiny", device="cpu")
    feats = image_features(bundle, tiny_ds, batch_size=16)
    assert feats.shape == (len(tiny_ds), 64)
    assert torch.equal(image_features(bundle, tiny_ds), feats)  # from the cache
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 1

    shots, seeds = ["full", 1, 3], [0, 1]
    wds = [1e-1, 1e-2]
    desc = tmp_path / "descriptions.jsonl"
    desc.write_text("".join(json.dumps({"id": f"{c}-{i}", "class": c, "text": f"a bird with {t} wings"}) + "\n"
                            for c in tiny_ds.classnames for i, t in enumerate(("red", "blue"))))
    rows = zero_shot_rows(bundle, tiny_ds, feats, shots, bootstrap_n=100, descriptions=desc)
    assert rows[0]["n_descriptions"] == 8 and 0 <= rows[0]["desc_top1"] <= rows[0]["desc_top3"] <= 100
    rows += probe_rows("linear-probe", feats, tiny_ds, shots, seeds, weight_decays=wds, device="cpu", bootstrap_n=100)
    assert [(r["shots"], r["seed"]) for r in rows if r["method"] == "linear-probe"] == [
        ("full", 0), (1, 0), (1, 1), (3, 0), (3, 1)]
    assert {r["n_train"] for r in rows if r["method"] == "linear-probe" and r["shots"] == 3} == {12}

    # No index yet: fine-tuned methods skipped, with a note.
    ft, notes = finetuned_rows(run, tiny_ds, shots, device="cpu")
    assert ft == [] and "index.json" in notes[0]

    # Fabricated index: checkpoints saved from tiny state dicts (different random inits).
    (run / "checkpoints").mkdir(parents=True)
    index = []
    for method, s, seed in [("gist", "full", 0), ("gist", 1, 0), ("gist", 1, 1), ("finetune-classname", 1, 0)]:
        torch.manual_seed(100 + seed)
        sd = load_clip("tiny", device="cpu").model.state_dict()
        rel = f"checkpoints/{method}-{s}-s{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(run / rel))
        train = few_shot(tiny_ds, s, seed).table if s != "full" else tiny_ds.table  # what fine-tuning trained on
        names = sorted(train.loc[train["split"] == "train", "filename"])
        index.append({"method": method, "shots": s, "seed": seed, "path": rel, "model": "tiny", "pretrained": None,
                      "epoch": 1, "val_top1": 50.0, "train_images": len(names),
                      "train_images_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()})
    (run / "checkpoints" / "index.json").write_text(json.dumps(index))
    ft, notes = finetuned_rows(run, tiny_ds, shots, seeds=seeds, device="cpu", weight_decays=wds, bootstrap_n=100)
    assert [(r["method"], r["shots"], r["seed"]) for r in ft] == [
        ("finetune-classname", 1, 0), ("gist", 1, 0), ("gist", 1, 1), ("gist", "full", 0)]
    assert "no checkpoint for finetune-classname at shots=full" in notes
    # A fine-tuned k-shot run is probed on its own seed's draw: the same training images as linear-probe's.
    lp = {(r["shots"], r["seed"]): r for r in rows if r["method"] == "linear-probe"}
    assert all(r["train_images_sha256"] == lp[(r["shots"], r["seed"])]["train_images_sha256"] for r in ft)
    assert lp[(1, 0)]["train_images_sha256"] != lp[(1, 1)]["train_images_sha256"]
    rows += ft

    for r in rows:
        assert set(r) >= {"method", "shots", "seed", "top1", "top3", "ci95"}
        lo, hi = r["ci95"]
        assert 0 <= lo <= r["top1"] <= hi <= 100 and r["top1"] <= r["top3"]
    update_metrics(run, "accuracy", rows)
    saved = read_json(run / "metrics.json")["accuracy"]
    assert len(saved) == len(rows)

    table = accuracy_table(rows)
    assert list(table.columns) == ["full", "1", "3"]
    assert list(table.index) == ["zero-shot", "linear-probe", "finetune-classname", "gist"]
    assert "(0-shot)" in table.loc["zero-shot", "1"] and "n=2" in table.loc["linear-probe", "1"]
    assert table.loc["finetune-classname", "full"] == "—"
    assert len(runs_table(rows)) == len(rows)
    fig = plot_accuracy(rows, run / "figures" / "evaluate_accuracy.png")
    assert (run / "figures" / "evaluate_accuracy.png").stat().st_size > 1000
    import matplotlib.pyplot as plt

    plt.close(fig)

    # A broken index names the problem.
    index[0]["path"] = "checkpoints/missing.safetensors"
    (run / "checkpoints" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="entry 0: checkpoint file not found"):
        read_checkpoint_index(run)


# ---------------------------------------------------------------- notebook
def test_notebook_runs_all_four_methods(tmp_path, monkeypatch):
    """04_evaluate through papermill on a tiny synthetic set with a fabricated checkpoint index:
    all four methods x shots land in metrics.json, figures are saved. (Without an index the
    fine-tuned methods are skipped with a note: covered in-process by test_comparison_end_to_end.)"""
    from safetensors.torch import save_file

    from workbench.clip import load_clip
    from workbench.io import read_json
    from workbench.pipeline import run_notebook

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "04_evaluate.ipynb"
    run = tmp_path / "run"
    run.mkdir()
    params = {"run_dir": str(run), "dataset_options": {"n_species": 4, "n_train": 5, "n_val": 2, "n_test": 3},
              "pretrained": None, "shots": ["full", 1], "seeds": [0, 1], "bootstrap_n": 100,
              "weight_decays": [0.1, 0.01], "progress": False, "device": "cpu"}
    (run / "checkpoints").mkdir()
    sd = load_clip("tiny", device="cpu").model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(run / "checkpoints" / "a.safetensors"))
    from workbench.data import DrawSpec, load_dataset, train_images_sha256

    ds = load_dataset("synthetic", **params["dataset_options"])
    index = [{"method": m, "shots": s, "seed": 0, "path": "checkpoints/a.safetensors", "model": "tiny",
              "pretrained": None, "epoch": 0 if (m, s) == ("gist", 1) else 1, "val_top1": 0.0,
              "train_images_sha256": train_images_sha256(DrawSpec().subset(ds, s, 0))}
             for m in ("gist", "finetune-classname") for s in ("full", 1)]
    (run / "checkpoints" / "index.json").write_text(json.dumps(index))
    run_notebook(nb, run / "04_evaluate.ipynb", params, cwd=run, html=False)
    rows = read_json(run / "metrics.json")["accuracy"]
    assert {(r["method"], str(r["shots"])) for r in rows} == {
        (m, s) for m in ("zero-shot", "linear-probe", "finetune-classname", "gist") for s in ("full", "1")}
    assert (run / "figures" / "evaluate_accuracy.png").exists()
    assert (run / "figures" / "evaluate_probe_sweep.png").exists()
    # both fine-tuned methods point at the same weights: their paired difference is exactly zero
    comps = read_json(run / "metrics.json")["comparisons"]
    ran = {"zero-shot", "linear-probe", "finetune-classname", "gist"}  # no control method ran here
    assert {(c["a"], c["b"], str(c["shots"])) for c in comps} == {
        (a, b, s) for a, b in PAIRS if {a, b} <= ran for s in ("full", "1")}
    same = [c for c in comps if (c["a"], c["b"]) == ("gist", "finetune-classname")]
    assert all(c["diff"] == 0 and c["ci95"] == [0, 0] and c["p"] == 1 for c in same)
    assert (run / "figures" / "evaluate_comparisons.png").exists()
    out = "".join("".join(o.get("text", "")) for c in json.loads((run / "04_evaluate.ipynb").read_text())["cells"]
                  for o in c.get("outputs", []))
    assert "GIST vs FLYP-style at full shot: +0.0 points [+0.0, +0.0], p = 1.00" in out
    assert "no difference can be claimed" in out
    # a checkpoint that is its starting weights (epoch 0) is flagged: the sentence, and † in the table
    gist1 = next(r for r in rows if (r["method"], str(r["shots"])) == ("gist", "1"))
    assert gist1["warning"].startswith("run gist-1-s0 unmoved:")
    assert all("warning" not in r for r in rows if r is not gist1)
    html = (run / "04_evaluate.ipynb").read_text(encoding="utf-8")
    assert "**Warning:** run gist-1-s0 unmoved" in html and "†1" in html


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_probe_and_features_match_cpu(tiny_ds, tmp_path, monkeypatch):
    """The GPU paths: the probe on CUDA agrees with the CPU fit; features encoded on CUDA (bf16
    autocast) are cached under their own key and are close to the fp32 CPU ones."""
    from workbench.clip import load_clip
    from workbench.evaluate import dataset_features as image_features

    (Xtr, ytr), (Xva, yva), (Xte, yte) = _gaussian_problem()
    cpu = linear_probe(Xtr, ytr, Xva, yva, 5, weight_decays=[1e-1, 1e-2], device="cpu")
    gpu = linear_probe(Xtr, ytr, Xva, yva, 5, weight_decays=[1e-1, 1e-2], device="cuda")
    assert gpu.W.device.type == "cuda" and gpu.weight_decay == cpu.weight_decay
    p_cpu, p_gpu = cpu.logits(Xte).softmax(1), gpu.logits(Xte).softmax(1).cpu()
    assert (p_cpu - p_gpu).abs().max() < 1e-3

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    sd = load_clip("tiny", device="cpu").model.state_dict()
    b_cpu, b_gpu = load_clip("tiny", device="cpu"), load_clip("tiny", device="cuda")
    b_cpu.model.load_state_dict(sd)
    b_gpu.model.load_state_dict(sd)
    f_cpu, f_gpu = image_features(b_cpu, tiny_ds), image_features(b_gpu, tiny_ds)
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 2
    cos = F.cosine_similarity(f_cpu, f_gpu, dim=1)
    assert cos.min() > 0.98, cos.min()


# ---------------------------------------------------------------- paired comparisons
def _correct(n, acc, seed):
    return np.random.default_rng(seed).random(n) < acc


def test_comparison_rows_and_findings():
    """Rows pair methods on the same draws; zero-shot (one prediction) pairs with every draw; the
    sentences are computed from the numbers."""
    from workbench.evaluate import comparisons, findings

    test = np.arange(500)
    rows = [{"method": "zero-shot", "shots": s, "seed": 0, "_test": {"rows": test, "correct": _correct(500, 0.1, 0)}}
            for s in ("full", 1)]
    for m, acc in (("linear-probe", 0.5), ("gist", 0.8), ("finetune-classname", 0.52)):
        rows.append({"method": m, "shots": "full", "seed": 0, "_test": {"rows": test, "correct": _correct(500, acc, 1)}})
        for s in (0, 1, 2):
            rows.append({"method": m, "shots": 1, "seed": s,
                         "_test": {"rows": test, "correct": _correct(500, acc - 0.2, 2 + s)}})
    comps = comparisons(rows, n_boot=500)
    assert len(comps) == 12 and {c["shots"] for c in comps} == {"full", 1}
    row = next(c for c in comps if (c["a"], c["b"], c["shots"]) == ("gist", "linear-probe", 1))
    assert set(row) == {"a", "b", "shots", "diff", "ci95", "p", "p_holm", "n_test", "seeds"}
    assert row["seeds"] == [0, 1, 2] and row["n_test"] == 500 and row["ci95"][0] > 0 and row["p"] < 0.01
    zs = next(c for c in comps if (c["a"], c["b"], c["shots"]) == ("linear-probe", "zero-shot", 1))
    assert zs["seeds"] == [0, 1, 2]  # zero-shot's single prediction paired with each draw
    full_zs = next(c for c in comps if (c["a"], c["b"], c["shots"]) == ("gist", "zero-shot", "full"))
    assert full_zs["p"] < 0.001 and "], p < 0.001 (500 test images, 1 draw): GIST is better." in " ".join(findings([full_zs]))
    text = findings(comps)
    assert len(text) == len(comps)
    g = next(t for t in text if t.startswith("GIST vs linear probe at 1 shot"))
    assert f"{row['diff']:+.1f} points [{row['ci95'][0]:+.1f}, {row['ci95'][1]:+.1f}]" in g and "GIST is better" in g
    flyp = next(c for c in comps if (c["a"], c["b"], c["shots"]) == ("finetune-classname", "linear-probe", "full"))
    sentence = next(t for t in text if t.startswith("FLYP-style vs linear probe at full shot"))
    assert ("no difference can be claimed" in sentence) == (flyp["ci95"][0] <= 0 <= flyp["ci95"][1])
    rows[-1]["_test"] = {"rows": test[::-1], "correct": rows[-1]["_test"]["correct"]}
    with pytest.raises(ValueError, match="different test images"):
        comparisons(rows)


def test_forest_plot_keeps_zero_shot_pairs_off_the_trained_methods_axis(tmp_path):
    """Differences against zero-shot (tens of points) get their own panel, so the axis of the trained
    methods' differences (a point or two) stays readable; without zero-shot rows there is one panel."""
    from workbench.evaluate.plots import plot_comparisons

    def row(a, b, diff):
        return {"a": a, "b": b, "shots": "full", "diff": diff, "ci95": [diff - 1, diff + 1], "p": 0.5,
                "n_test": 100, "seeds": [0]}

    comps = [row("gist", "linear-probe", 0.5), row("gist", "zero-shot", 80.0)]
    fig = plot_comparisons(comps, tmp_path / "f.png")
    trained, zs = fig.axes
    assert trained.get_xlim()[1] < 5 and zs.get_xlim()[1] > 80
    assert "between trained methods" in trained.get_title() and (tmp_path / "f.png").exists()
    assert len(plot_comparisons(comps[:1]).axes) == 1
    with pytest.raises(ValueError, match="no comparisons"):
        plot_comparisons([])
