"""Matching: exactness against a one-image-at-a-time reference, caching, bad input, GIST interop."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from workbench.clip import count_tokens, encode_images, encode_texts, image_size, load_clip
from workbench.data import Dataset
from workbench.data.images import BadImagesError
from workbench.io import read_json, read_jsonl
from workbench.match import export_captions_top5, import_captions_top5, match_dataset, topk_within_class, truncate_caption
from workbench.match.diagnostics import class_table, matching_metrics, usage_table, variant_precision, weakest

CLASSES = ["red finch", "blue jay", "green warbler"]
COLORS = {"red finch": (200, 40, 40), "blue jay": (40, 60, 200), "green warbler": (40, 170, 60)}
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "gist-format-sample"
SAMPLE = SAMPLE if SAMPLE.exists() else Path("/work/shared/reference/gist-format-sample")


def make_toy(root: Path, per_variant: int = 3) -> Dataset:
    """Tiny PNGs: class = body colour, variant = stripe (male) or plain (female); plus 1 val image per class."""
    rng = np.random.default_rng(0)
    rows = []
    for label, c in enumerate(CLASSES):
        for variant in ("male", "female"):
            for i in range(per_variant):
                a = np.full((24, 20, 3), 230, np.uint8)
                a[4:20, 3:17] = COLORS[c]
                if variant == "male":
                    a[6:9, 3:17] = (250, 220, 0)
                a = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
                f = f"{c.replace(' ', '_')}/{variant}_{i}.png"
                (root / f).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(a).save(root / f)
                rows.append({"filename": f, "split": "train", "label": label, "species": c, "variant": variant})
        f = f"{c.replace(' ', '_')}/val.png"
        Image.fromarray(np.full((24, 20, 3), 128, np.uint8)).save(root / f)
        rows.append({"filename": f, "split": "val", "label": label, "species": c, "variant": "male"})
    return Dataset("toy", root, pd.DataFrame(rows), list(CLASSES))


def make_descriptions() -> list[dict]:
    recs = []
    for c in CLASSES:
        texts = [
            (f"The male {c} has a bright yellow stripe across its back.", "male"),
            (f"The male {c} shows a yellow band over the wings and a dark beak.", "male"),
            (f"The male {c} is striped in yellow, with a short tail.", "male"),
            (f"The female {c} is plain coloured with no markings.", "female"),
            (f"The female {c} has uniform plumage and a pale belly.", "female"),
            (f"The {c} is a small bird with a rounded head.", None),
        ]
        for i, (t, v) in enumerate(texts):
            recs.append({"id": f"{c.replace(' ', '-')}-{i}", "class": c, "text": t, "backend": "test", "model": None,
                         "prompt_id": "test", "params": {}, "time": "2024-01-01T00:00:00", "variant": v})
    return recs


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_clip("tiny", pretrained=None, device="cpu")


@pytest.fixture
def toy(tmp_path):
    return make_toy(tmp_path / "data")


def count_encodes(monkeypatch, model) -> list:
    calls = []
    orig = model.encode_image

    def wrapped(x, *a, **kw):
        calls.append(len(x))
        return orig(x, *a, **kw)

    monkeypatch.setattr(model, "encode_image", wrapped)
    return calls


def test_matches_equal_one_at_a_time_reference(bundle, toy, tmp_path):
    k = 3
    descs = make_descriptions()
    res = match_dataset(toy, descs, bundle, k=k, batch_size=4, run_dir=tmp_path)
    train = toy.split("train")
    assert [r["image"] for r in res.records] == list(train.table["filename"])
    # Reference: every image alone (batch 1), against its own class's descriptions encoded on their own.
    model, _, tok = bundle
    from workbench.data.images import decode_images

    for r, path in zip(res.records, train.paths()):
        x = decode_images([path], image_size(model))
        f = encode_images(model, x, batch_size=1)[0].double().numpy()
        own = [d for d in descs if d["class"] == r["class"]]
        t = encode_texts(model, tok, [d["text"] for d in own]).double().numpy()
        s = t @ f
        order = np.argsort(-s, kind="stable")[:k]
        assert r["description_ids"] == [own[j]["id"] for j in order]
        assert all(d["class"] == r["class"] for d in descs if d["id"] in r["description_ids"])
        np.testing.assert_allclose(r["scores"], s[order], atol=1e-5)
        p = np.exp(100 * (s - s.max()))
        np.testing.assert_allclose(r["probs"], (p / p.sum())[order], atol=1e-3)
        assert r["descriptions"] == [own[j]["text"] for j in order]
        assert all(c.startswith(r["class"] + ": ") for c in r["captions"])
    # the file on disk is the same records, with every contract field
    on_disk = read_jsonl(tmp_path / "matches.jsonl")
    assert on_disk == json.loads(json.dumps(res.records))
    assert set(on_disk[0]) >= {"image", "label", "class", "description_ids", "descriptions", "captions", "scores",
                               "probs", "model", "pretrained"}


def test_topk_within_class_never_crosses_classes_and_pads():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(23, 8, generator=g), dim=1)
    il = torch.randint(0, 4, (50,), generator=g)
    tl = torch.tensor([0] * 7 + [1] * 2 + [2] * 9 + [3] * 5)[torch.randperm(23, generator=g)]
    idx, sc, pr = topk_within_class(img, il, txt, tl, k=4)
    for i in range(50):
        cols = torch.nonzero(tl == il[i]).squeeze(1)
        s = (txt[cols].double() @ img[i].double()).numpy()
        ref = cols[np.argsort(-s, kind="stable")[:4]].tolist()
        got = [j for j in idx[i].tolist() if j >= 0]
        assert got == ref  # label 1 has 2 descriptions: padded with -1
        assert (idx[i] >= 0).sum() == min(4, len(cols))
        p = torch.softmax(100 * torch.from_numpy(s), 0)
        np.testing.assert_allclose(pr[i][: len(got)], p[np.argsort(-s, kind="stable")[: len(got)]], atol=1e-12)


def test_centered_ranking_against_hand_computation():
    g = torch.Generator().manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(12, 6, generator=g), dim=1)
    hub = torch.nn.functional.normalize(img.mean(0), dim=0)  # close to every image: wins raw ranking everywhere
    txt = torch.cat([hub[None], torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=1)])
    il, tl = [0] * 12, [0] * 5
    raw, _, _ = topk_within_class(img, il, txt, tl, k=2)
    idx, sc, pr = topk_within_class(img, il, txt, tl, k=2, center=True)
    s = img.double() @ txt.double().T
    c = s - s.mean(0)
    for i in range(12):
        order = np.argsort(-c[i].numpy(), kind="stable")[:2]
        assert idx[i].tolist() == order.tolist()
        np.testing.assert_allclose(sc[i], s[i, order])  # reported scores stay raw cosines
        np.testing.assert_allclose(pr[i], torch.softmax(100 * s[i], 0)[order])
    assert (raw[:, 0] == 0).float().mean() > (idx[:, 0] == 0).float().mean()


def test_topk_ties_go_to_first_description():
    img = torch.tensor([[1.0, 0.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    idx, _, _ = topk_within_class(img, [0], txt, [0, 0, 0, 0], k=3)
    assert idx[0].tolist() == [1, 2, 3]


def test_warm_rerun_encodes_no_image(bundle, toy, tmp_path, monkeypatch):
    calls = count_encodes(monkeypatch, bundle.model)
    descs = make_descriptions()
    first = match_dataset(toy, descs, bundle, k=2, batch_size=5)
    n_train = len(toy.split("train"))
    assert sum(calls) == n_train and len(calls) == -(-n_train // 5)
    calls.clear()
    second = match_dataset(toy, descs, bundle, k=2, batch_size=5, run_dir=tmp_path)
    assert calls == []
    assert second.records == first.records
    # A different (random-init) model with the same name must not reuse those features.
    torch.manual_seed(123)
    other = load_clip("tiny", pretrained=None, device="cpu")
    assert other.model_id == bundle.model_id
    calls2 = count_encodes(monkeypatch, other.model)
    match_dataset(toy, descs, other, k=2)
    assert sum(calls2) == n_train


def _break_images(ds: Dataset) -> dict[str, str]:
    fs = list(ds.split("train").table["filename"])
    truncated, garbage, empty = ds.root / fs[0], ds.root / fs[4], ds.root / fs[7]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 5)
    empty.write_bytes(b"")
    return {fs[0]: "", fs[4]: "", fs[7]: "empty file"}


def test_bad_images_stop_before_embedding(bundle, toy, tmp_path, monkeypatch):
    bad = _break_images(toy)
    calls = count_encodes(monkeypatch, bundle.model)
    with pytest.raises(BadImagesError) as e:
        match_dataset(toy, make_descriptions(), bundle, k=2, run_dir=tmp_path)
    assert calls == []
    assert sorted(Path(p).relative_to(toy.root).as_posix() for p, _ in e.value.bad) == sorted(bad)
    assert all(r for _, r in e.value.bad)
    msg = str(e.value)
    assert all(f in msg for f in bad) and "empty file" in msg and "skip_bad_images" in msg
    assert not (tmp_path / "matches.jsonl").exists()
    assert list((tmp_path / "cache" / "image_checks").glob("*.json"))  # the check's verdict is kept...
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # ...but no image cache of a set about to be fixed


def test_missing_image_is_listed_before_embedding(bundle, toy, monkeypatch):
    gone = toy.split("train").table["filename"].iloc[2]
    (toy.root / gone).unlink()
    calls = count_encodes(monkeypatch, bundle.model)
    with pytest.raises(BadImagesError) as e:
        match_dataset(toy, make_descriptions(), bundle, k=2)
    assert e.value.bad == [(str(toy.root / gone), "missing")] and calls == []


def test_bad_images_skipped_and_recorded(bundle, toy, tmp_path):
    bad = _break_images(toy)
    res = match_dataset(toy, make_descriptions(), bundle, k=2, run_dir=tmp_path, skip_bad_images=True)
    rec = read_jsonl(tmp_path / "bad_images.jsonl")
    assert sorted(r["image"] for r in rec) == sorted(bad) and all(r["reason"] for r in rec)
    got = [r["image"] for r in read_jsonl(tmp_path / "matches.jsonl")]
    assert got == [f for f in toy.split("train").table["filename"] if f not in bad]
    assert matching_metrics(res)["n_bad_images"] == 3


def count_opens(monkeypatch) -> list:
    """Paths opened by PIL in workbench.data.images (checks and decodes alike)."""
    import workbench.data.images as images

    calls, pil = [], images.Image
    orig = pil.open

    class Counting:
        def __getattr__(self, name):
            return getattr(pil, name)

        @staticmethod
        def open(path, *a, **kw):
            calls.append(str(path))
            return orig(path, *a, **kw)

    monkeypatch.setattr(images, "Image", Counting())
    return calls


def test_cold_run_decodes_each_file_once(bundle, toy, tmp_path, monkeypatch):
    """The bad-image check and the image cache share one decode per file; bad files are skipped."""
    bad = _break_images(toy)
    decodes = count_opens(monkeypatch)
    res = match_dataset(toy, make_descriptions(), bundle, k=2, skip_bad_images=True)
    train = [str(toy.root / f) for f in toy.split("train").table["filename"]]
    readable = [p for f, p in zip(toy.split("train").table["filename"], train) if f not in bad]
    assert sorted(decodes) == sorted(p for p in train if Path(p).stat().st_size > 0)  # once each; empty: unopened
    assert len(res.records) == len(readable)
    # the features equal those of the images decoded on their own
    from workbench.data.images import decode_images

    ref = encode_images(bundle.model, decode_images(readable, image_size(bundle.model)))
    from workbench.clip import image_features

    torch.testing.assert_close(image_features(bundle, readable, normalize=True), ref)
    decodes.clear()
    match_dataset(toy, make_descriptions(), bundle, k=2, skip_bad_images=True)
    assert decodes == []


def test_missing_and_unknown_classes_are_listed(bundle, toy, monkeypatch):
    calls = count_encodes(monkeypatch, bundle.model)
    descs = [d for d in make_descriptions() if d["class"] not in ("blue jay", "green warbler")]
    with pytest.raises(ValueError, match="no descriptions") as e:
        match_dataset(toy, descs, bundle)
    assert "'blue jay'" in str(e.value) and "'green warbler'" in str(e.value)
    descs = make_descriptions() + [dict(make_descriptions()[0], id="x1", **{"class": "Red Finch"}),
                                   dict(make_descriptions()[0], id="x2", **{"class": "albatross"})]
    with pytest.raises(ValueError, match="not in the dataset") as e:
        match_dataset(toy, descs, bundle)
    assert "'Red Finch'" in str(e.value) and "did you mean 'red finch'" in str(e.value) and "'albatross'" in str(e.value)
    assert calls == []


def test_gist_captions_top5_round_trip(bundle, toy, tmp_path):
    res = match_dataset(toy, make_descriptions(), bundle, k=5, run_dir=tmp_path)
    out = export_captions_top5(res.records, tmp_path / "captions_top5.json")
    data = read_json(out)
    assert list(data) == [r["image"] for r in res.records]
    assert all(isinstance(v, list) and len(v) == 5 for v in data.values())
    back = import_captions_top5(out, toy, run_dir=tmp_path / "imported")
    assert [(r["image"], r["label"], r["class"], r["captions"]) for r in back] == \
           [(r["image"], r["label"], r["class"], r["captions"]) for r in res.records]
    assert read_jsonl(tmp_path / "imported" / "matches.jsonl") == back
    # the form GIST's trainer reads (it prepends "species: " itself) comes back the same
    bare = read_json(export_captions_top5(res.records, tmp_path / "bare.json", strip_class=True))
    first = res.records[0]
    assert bare[first["image"]][0] == first["captions"][0].split(": ", 1)[1]
    assert [r["captions"] for r in import_captions_top5(tmp_path / "bare.json", toy)] == [r["captions"] for r in res.records]
    # unknown images are listed, or dropped when not strict
    data["nowhere/x.jpg"] = ["a: b"]
    (tmp_path / "extra.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="nowhere/x.jpg"):
        import_captions_top5(tmp_path / "extra.json", toy)
    assert len(import_captions_top5(tmp_path / "extra.json", toy, strict=False)) == len(res.records)


@pytest.mark.skipif(not (SAMPLE / "cub_captions_top5_sample.json").exists(), reason="GIST format sample absent")
def test_import_real_gist_sample(tmp_path):
    meta = pd.read_csv(SAMPLE / "cub_metadata_sample.csv")
    classes = list(dict.fromkeys(meta.sort_values("label")["species"]))
    ds = Dataset("cub-sample", tmp_path, meta[["filename", "split", "label", "species"]], classes)
    recs = import_captions_top5(SAMPLE / "cub_captions_top5_sample.json", ds, strict=False)
    src = json.loads((SAMPLE / "cub_captions_top5_sample.json").read_text())
    assert recs and all(r["descriptions"] == src[r["image"]] for r in recs)
    assert all(r["class"] == ds.classnames[r["label"]] for r in recs)
    # "black-footed albatross: dark …" becomes "Black footed Albatross: dark …"
    r0 = next(r for r in recs if r["class"] == "Black footed Albatross")
    assert r0["captions"][0] == "Black footed Albatross: " + src[r0["image"]][0].split(": ", 1)[1]
    export_captions_top5(recs, tmp_path / "again.json", strip_class=True)
    assert read_json(tmp_path / "again.json") == {r["image"]: [c.split(": ", 1)[1] for c in src[r["image"]]] for r in recs}


def test_truncate_caption_fits_and_cuts_at_words(bundle):
    tok = bundle.tokenizer
    long = " ".join(f"feather{i}," for i in range(120))
    cap = truncate_caption("red finch", long, tok)
    assert count_tokens(tok, cap) <= 77 and cap.startswith("red finch: feather0,")
    body = cap.split(": ", 1)[1]
    assert long.startswith(body) and long[len(body)] in ", "  # cut at a word boundary
    assert count_tokens(tok, truncate_caption("red finch", long, tok)) == len(tok.encode(cap)) + 2
    assert truncate_caption("blue jay", "short text", tok) == "blue jay: short text"
    assert (tok([cap])[0] != 0).sum().item() == count_tokens(tok, cap)


def test_summarize_callable_is_used_and_kept_within_context(bundle, toy, monkeypatch):
    seen = []

    def summ(c, t):
        seen.append(t)
        return f"{c}: " + ("very " * 200) + "short"

    res = match_dataset(toy, make_descriptions(), bundle, k=2, summarize=summ)
    used = {d for r in res.records for d in r["description_ids"]}
    assert len(seen) == len(used)  # each matched description summarized once
    assert all(count_tokens(bundle.tokenizer, c) <= 77 for r in res.records for c in r["captions"])
    calls = count_encodes(monkeypatch, bundle.model)
    with pytest.raises(ValueError, match="truncate"):  # fails before any embedding
        match_dataset(toy, make_descriptions(), bundle, k=2, summarize="no-such-method-anywhere")
    with pytest.raises(ValueError, match="backend"):
        match_dataset(toy, make_descriptions(), bundle, k=2, summarize="llm")
    assert calls == []


def test_extractive_summaries_from_the_describe_stage(bundle, toy):
    res = match_dataset(toy, make_descriptions(), bundle, k=2, summarize="extractive")
    for r in res.records:
        assert all(c.startswith(r["class"] + ": ") and count_tokens(bundle.tokenizer, c) <= 77 for c in r["captions"])


def test_match_stage_records_how_many_summaries_fell_back(toy, tmp_path):
    """summarize="extractive" in the match stage: its counts go to metrics.json["matching"]["summaries"]
    (the captions it trains on; the describe stage records its own under "describe")."""
    from workbench import config, match

    descs = make_descriptions()
    descs[5]["text"] = "Red finches."  # nothing but the subject: the summary falls back
    p = config.stage_params("match", run_dir=str(tmp_path), pretrained=None, device="cpu", k=6,
                            summarize="extractive", progress=False, export_captions=False)
    m = match.run(p, toy, descs)
    got = read_json(tmp_path / "metrics.json")["matching"]["summaries"]
    assert got == m.metrics["summaries"] == m.result.summaries
    assert got["method"] == "extractive" and got["summaries"] == len(descs)  # k=6: every description is used
    assert got["fallback"] == 1 and got["reasons"] == {"no_clause": 1}


def test_variant_precision_against_hand_count():
    table = pd.DataFrame({"filename": ["a", "b", "c", "d"], "variant": ["male", "female", "male", None]})
    descs = [{"id": "m1", "class": "X", "text": "", "variant": "male"},
             {"id": "m2", "class": "X", "text": "", "variant": "male"},
             {"id": "f1", "class": "X", "text": "", "variant": "female"},
             {"id": "g", "class": "X", "text": "", "variant": None}]
    recs = [{"image": "a", "class": "X", "description_ids": ["m1", "f1"]},   # top1 right
            {"image": "b", "class": "X", "description_ids": ["m2", "g"]},    # top1 wrong
            {"image": "c", "class": "X", "description_ids": ["g", "m2"]},    # top1 generic
            {"image": "d", "class": "X", "description_ids": ["f1"]}]         # no truth: ignored
    vp = variant_precision(recs, descs, table)
    assert vp["variant_precision"] == 1 / 2
    lo, hi = vp["variant_precision_ci95"]
    assert lo < 0.5 < hi and 0 <= lo and hi <= 1
    assert vp["variant_precision_topk"] == 2 / 4  # m1 ok, f1 wrong, m2 wrong, m2 ok
    assert vp["random_precision"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)
    assert vp["true_rate_top1"] == pytest.approx(2 / 3)
    assert vp["random_true_rate"] == pytest.approx((3 / 4 + 2 / 4 + 3 / 4) / 3)
    assert variant_precision(recs, descs, table.drop(columns="variant")) is None


def test_diagnostics_plots_and_browser(bundle, toy, tmp_path):
    descs = make_descriptions()
    res = match_dataset(toy, descs, bundle, k=3, run_dir=tmp_path)
    ct = class_table(res.records, descs)
    assert list(ct["n_descriptions"]) == [6, 6, 6] and list(ct["n_images"]) == [6, 6, 6]
    assert (ct["distinct_top1"] <= ct["distinct_topk"]).all()
    use = usage_table(res.records, descs)
    assert use["n_top1"].sum() == len(res.records) and use["n_topk"].sum() == 3 * len(res.records)
    w = weakest(res.records, 2)
    assert list(w["top1_score"]) == sorted(r["scores"][0] for r in res.records)[:2]
    m = matching_metrics(res)
    for key in ("variant_precision", "random_precision", "mean_margin", "share_descriptions_used_topk", "timing"):
        assert key in m
    import matplotlib

    matplotlib.use("Agg")
    from workbench.match.plots import plot_match_diagnostics, plot_match_examples

    plot_match_diagnostics(res.records, descs, m, path=tmp_path / "figures" / "match_diagnostics.png")
    plot_match_examples(res.records, toy.root, n=5, path=tmp_path / "figures" / "match_examples.png")
    assert (tmp_path / "figures" / "match_diagnostics.png").stat().st_size > 0
    assert (tmp_path / "figures" / "match_examples.png").stat().st_size > 0
    from workbench.match.widgets import match_browser

    box = match_browser(res.records, toy.root)
    box.class_dropdown.value = "green warbler"
    rec = next(r for r in res.records if r["image"] == box.image_dropdown.value)
    assert rec["class"] == "green warbler"
    assert rec["captions"][0].split(": ")[1][:20] in box.table.value and box.picture.value[:4] == b"\x89PNG"


def test_notebook_runs_on_small_synthetic_data(tmp_path):
    """02_match end to end through the pipeline's runner: files, metrics, figures, widget cell."""
    from workbench.data import load_dataset
    from workbench.io import write_jsonl as write
    from workbench.pipeline import run_notebook

    opts = {"n_species": 3, "n_train": 4, "n_val": 1, "n_test": 1}
    ds = load_dataset("synthetic", None, **opts)
    try:
        from workbench.describe.template import synthetic_descriptions

        descs = synthetic_descriptions(ds, per_variant=2, shared=1)
    except ImportError:  # the template backend lands with the describe stage
        descs = [{"id": f"{c}-{v}-{i}", "class": c, "text": f"The {v or 'adult'} {c} has feature {i}.", "variant": v}
                 for c in ds.classnames for v in ("male", "female", None) for i in range(2)]
    run = tmp_path / "run"
    write(run / "descriptions.jsonl", descs)
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "02_match.ipynb"
    params = {"run_dir": str(run), "dataset_options": opts, "pretrained": None, "k": 3, "progress": False,
              "interactive": True, "n_examples": 4}
    run_notebook(nb, run / "02_match.ipynb", params, cwd=run, html=False)
    recs = read_jsonl(run / "matches.jsonl")
    assert len(recs) == len(ds.split("train")) and all(len(r["captions"]) == 3 for r in recs)
    m = read_json(run / "metrics.json")["matching"]
    assert m["n_images"] == len(recs) and m["variant_precision"] is not None and m["random_precision"] is not None
    assert (run / "figures" / "match_diagnostics.png").exists() and (run / "figures" / "match_examples.png").exists()
    assert set(read_json(run / "captions_top5.json")) == {r["image"] for r in recs}


def test_encode_uint8_chunks_equal_one_pass(bundle):
    x = torch.randint(0, 256, (11, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from workbench.clip import encode_uint8

    torch.testing.assert_close(encode_uint8(bundle.model, x, batch_size=3, chunk=4),
                               encode_images(bundle.model, x, batch_size=11), atol=1e-5, rtol=1e-4)


def test_benchmark_script_smoke(tmp_path, capsys):
    """The benchmark runs end to end at toy sizes and prints one JSON object with the headline keys."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_match.py"
    spec = importlib.util.spec_from_file_location("bench_match", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--n-images", "6", "--n-cache", "12", "--n-ref", "4", "--classes", "3", "--per-class", "2",
                "--image-wh", "80", "60", "--batch-size", "4", "--time-limit", "30", "--json-out", str(tmp_path / "b.json")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == read_json(tmp_path / "b.json")
    for key in ("workbench_images_per_s", "reference_images_per_s", "speedup", "device", "model", "n_images"):
        assert key in out
    assert set(out["jpeg_breakdown"]["share"]) == {"decode", "transfer", "encode", "match"}
    assert "errors" not in out


def test_diagnostics_plot_without_variant_specific_picks(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from workbench.match.plots import plot_match_diagnostics

    recs = [{"image": "a", "class": "X", "description_ids": ["g"], "descriptions": ["t"], "captions": ["X: t"],
             "scores": [0.3], "probs": [1.0]}]
    m = {"variant_precision": None, "variant_precision_topk": None, "random_precision": 0.5}
    plot_match_diagnostics(recs, None, m, path=tmp_path / "d.png")
    assert (tmp_path / "d.png").exists()


def test_variant_precision_responds_to_features_that_see_the_variant():
    """Features that encode the variant give precision ~1 against random 0.5; shuffled ones ~random."""
    g = torch.Generator().manual_seed(0)
    n_cls, per = 4, 30
    descs, txt, tl = [], [], []
    basis = torch.eye(8)
    for c in range(n_cls):
        for i, v in enumerate(["male"] * 3 + ["female"] * 3 + [None] * 2):
            axis = {"male": 0, "female": 1, None: 2}[v]
            descs.append({"id": f"{c}-{i}", "class": f"c{c}", "text": "", "variant": v})
            txt.append(basis[axis] + 0.05 * torch.randn(8, generator=g) + 0.3 * basis[3 + c])
            tl.append(c)
    variants = ["male", "female"] * (n_cls * per // 2)
    il = np.repeat(np.arange(n_cls), per)
    img = torch.stack([basis[0 if v == "male" else 1] + 0.2 * basis[2] + 0.3 * basis[3 + c]
                       + 0.05 * torch.randn(8, generator=g) for v, c in zip(variants, il)])
    norm = torch.nn.functional.normalize
    table = pd.DataFrame({"filename": [f"i{i}" for i in range(len(il))], "variant": variants})

    def precision(features):
        idx, _, _ = topk_within_class(norm(features, dim=1), il, norm(torch.stack(txt), dim=1), tl, k=3)
        recs = [{"image": f"i{i}", "class": f"c{il[i]}", "description_ids": [descs[j]["id"] for j in row]}
                for i, row in enumerate(idx.tolist())]
        return variant_precision(recs, descs, table)

    good = precision(img)
    assert good["variant_precision"] == 1.0 and good["random_precision"] == 0.5
    shuffled = precision(img[torch.randperm(len(img), generator=g)])
    assert abs(shuffled["variant_precision"] - 0.5) < 0.2


def test_decode_images_lists_every_unreadable_file(toy):
    from workbench.data.images import decode_checked, decode_images

    bad = _break_images(toy)
    paths = [str(toy.root / f) for f in toy.split("train").table["filename"]]
    with pytest.raises(BadImagesError) as e:
        decode_images(paths, 32)
    assert sorted(Path(p).relative_to(toy.root).as_posix() for p, _ in e.value.bad) == sorted(bad)
    images, listed = decode_checked(paths, 32)
    assert images.shape == (len(paths) - len(bad), 3, 32, 32) and images.dtype == torch.uint8
    assert [p for p, _ in listed] == [p for p in paths if Path(p).relative_to(toy.root).as_posix() in bad]
    good = [p for p in paths if p not in dict(listed)]
    torch.testing.assert_close(images, decode_images(good, 32))
