"""Ground truth of the synthetic benchmark: masks, determinism, neighbours, loader schema."""
import filecmp
import hashlib
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from workbench.data import load_dataset
from workbench.data import synthetic as syn

SMALL = dict(n_species=6, seed=3, n_train=4, n_val=2, n_test=2)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load_dataset("synthetic", tmp_path_factory.mktemp("syn") / "data", **SMALL)


def test_table_schema(ds):
    t = ds.table
    for c in ["filename", "split", "label", "species", "variant", "mask", *syn.ATTRIBUTES]:
        assert c in t.columns, c
    assert len(ds.classnames) == SMALL["n_species"] == t["label"].nunique()
    assert t.groupby(["split", "label"]).size().unstack().to_dict("index") == {
        s: {i: SMALL[f"n_{s}"] for i in range(SMALL["n_species"])} for s in ("train", "val", "test")
    }
    assert all(ds.classnames[l] == s for l, s in zip(t["label"], t["species"]))
    assert set(t["variant"]) == {"male", "female"}
    assert t["filename"].is_unique and all((ds.root / f).exists() for f in t["filename"])
    for a, values in ds.extras["attributes"].items():
        assert set(t[a]) <= set(values)
    # metadata.csv keeps GIST's layout: filename, split, label, species (+ extras)
    meta = pd.read_csv(ds.root / "metadata.csv")
    assert list(meta.columns[:6]) == ["ID", "CLASS", "filename", "split", "label", "species"]
    with Image.open(ds.root / t["filename"][0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_variant_attributes_follow_the_species(ds):
    sp = ds.extras["species_table"].set_index("species")
    for r in ds.table.itertuples():
        expect = syn.variant_attributes(sp.loc[r.species], r.variant)
        assert {a: getattr(r, a) for a in syn.ATTRIBUTES} == expect
    fem = ds.table[ds.table["variant"] == "female"]
    assert set(fem["crown_color"]) == {"brown"} and set(fem["breast_color"]) == {"buff"}


def test_crown_and_wing_pixels_have_the_metadata_colour(ds):
    checked = 0
    for r in ds.table.head(30).itertuples():
        rgb = np.asarray(Image.open(ds.root / r.filename)).astype(float)
        for part, attr in (("crown", "crown_color"), ("wing", "wing_color")):
            m = ds.extras["part_mask"](r.filename, part)
            if m.sum() < 5:  # occluded
                continue
            mean = rgb[m].mean(0)
            assert np.abs(mean - syn.COLORS[getattr(r, attr)]).max() < 12, (r.filename, part, mean)
            checked += 1
    assert checked > 30


def test_masks_sit_where_the_metadata_says(ds):
    boxes = ds.extras["part_boxes"]
    for r in ds.table.head(20).itertuples():
        lab = ds.extras["part_mask"](r.filename)
        assert lab.shape == (64, 64) and lab.max() < len(syn.PARTS)
        for b in boxes[boxes["filename"] == r.filename].itertuples():
            m = lab == syn.PART_ID[b.part]
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (b.x0, b.y0, b.x1, b.y1)
            assert m.sum() == b.pixels
        # The crown sits on the head: above the bird's centre and on the side it faces.
        crown = lab == syn.PART_ID["crown"]
        if crown.sum() >= 5:
            ys, xs = np.nonzero(crown)
            cx, cy = r.x * 64, r.y * 64
            assert ys.mean() < cy
            assert (xs.mean() < cx) if r.flip else (xs.mean() > cx)
        # A long tail reaches farther from the body than a short one would (independent geometry).
        tail = lab == syn.PART_ID["tail"]
        ys, xs = np.nonzero(tail)
        if len(xs) and not r.occluded and xs.min() > 0 and xs.max() < 63:  # whole tail in frame
            far = np.abs(xs + 0.5 - r.x * 64).max() / (r.scale * 64)
            assert far > 0.9 if r.tail_size == "long" else far < 0.8


def test_same_seed_same_bytes(tmp_path):
    opts = dict(n_species=3, seed=7, n_train=2, n_val=1, n_test=1)
    a, b = syn.generate(tmp_path / "a", **opts), syn.generate(tmp_path / "b", **opts)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) > 2 * 12
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    c = syn.generate(tmp_path / "c", **{**opts, "seed": 8})
    assert (a / files[0]).read_bytes() != (c / files[0]).read_bytes() or any(
        (a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".png"
    )


def _sha256_of_tree(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_generated_bytes_are_pinned(ds, tmp_path):
    """Images, masks and metadata of a small draw, and pretraining's random birds, are the bytes they were
    before synthetic.py was split into species design and rendering (synthetic_render.py); at ``pose=0``
    a draw is generator version 2's, byte for byte (the default ``pose=1`` has its own pin)."""
    flat = load_dataset("synthetic", tmp_path / "flat", **SMALL, pose=0.0)
    assert _sha256_of_tree(flat.root) == "b5c6eefd7e4997c53586a05b99aca6846abe9a9081e9e1bacb6f1c3b6f83af28"
    assert _sha256_of_tree(ds.root) == "a18b0ed57439f278decb54666706c5eb0a74f3eae0c02cc2a541869395cd520c"
    images, attrs = syn.random_birds(5, seed=1)
    h = hashlib.sha256(images.tobytes())
    h.update(repr(attrs).encode())
    assert h.hexdigest() == "1fd3931ba8a543ed7c1b7f4bbb86fc8d0f8d1e01943f5e1a7910156954dc8263"


def test_plot_samples_draws_every_part(ds):
    from workbench.pretrain.plots import plot_samples

    fig = plot_samples(ds, n_species=2, per_species=2)
    assert len(fig.axes) == 2 * 4 and fig.legends[0].get_texts()[0].get_text() == syn.PARTS[1]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_neighbours_differ_only_in_declared_attributes():
    sp = syn.make_species(20, seed=1)
    attrs = sp.set_index("species")[syn.ATTRIBUTES]
    for r in sp.itertuples():
        declared = set(r.differs_in.split(";"))
        a, b = attrs.loc[r.species], attrs.loc[r.neighbour]
        assert {c for c in syn.ATTRIBUTES if a[c] != b[c]} == declared
        assert 1 <= len(declared) <= 2 and declared & set(syn.SHARED)
        # nearest neighbour overall is at most 2 attributes away
        dists = [(attrs.loc[o] != a).sum() for o in sp["species"] if o != r.species]
        assert 1 <= min(dists) <= 2
    # females stay distinguishable: shared attributes are unique per species
    assert not sp[syn.SHARED].duplicated().any()
    assert sp["species"].is_unique


def test_neighbour_images_differ_only_in_declared_parts():
    sp = syn.make_species(12, seed=0).set_index("species")
    rng = np.random.default_rng(0)
    for name, row in itertools.islice(sp.iterrows(), 12):
        other = sp.loc[row["neighbour"]]
        parts = {syn.PART_ID[syn.ATTRIBUTE_PART[a]] for a in row["differs_in"].split(";")}
        for variant in syn.VARIANTS:
            nz = syn.sample_nuisance(rng, 64)
            x, lx = syn.render_bird(syn.variant_attributes(row, variant), nz, 64)
            y, ly = syn.render_bird(syn.variant_attributes(other, variant), nz, 64)
            diff = (x != y).any(-1)
            allowed = np.isin(lx, list(parts)) | np.isin(ly, list(parts))
            assert not (diff & ~allowed).any(), (name, row["neighbour"])
            shared_diff = set(row["differs_in"].split(";")) & set(syn.SHARED)
            if variant == "female" and shared_diff and nz["occluder"] is None:
                assert diff.any()  # a shared attribute differs: the images do too


def test_species_names_avoid_caption_words():
    sp = syn.make_species(syn.MAX_SPECIES, seed=0)
    caption_words = set(syn.PARTS) | {w for vs in syn.ATTRIBUTE_VALUES.values() for w in vs} | {
        "bird", "wings", "head", "streaks", "spots"}
    for name in sp["species"]:
        assert not set(name.replace("-", " ").split()) & caption_words, name


def test_load_errors_and_reuse(tmp_path, ds):
    with pytest.raises(ValueError, match="unknown synthetic dataset option"):
        load_dataset("synthetic", tmp_path / "x", n_classes=3)
    with pytest.raises(ValueError, match="other options"):
        load_dataset("synthetic", ds.root, n_species=7)
    again = load_dataset("synthetic", ds.root)  # no options: read what is there
    assert again.table.equals(ds.table)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no synthetic dataset"):
        load_dataset("synthetic", tmp_path / "junk")
    with pytest.raises(ValueError, match="n_species"):
        syn.make_species(1)


def test_default_root_is_keyed_by_options(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    a = syn.default_root(n_species=3)
    assert a == syn.default_root(n_species=3) != syn.default_root(n_species=4)
    assert Path(a).parent == tmp_path / "synthetic"


def test_template_descriptions_contract_and_truth(ds):
    import re

    from workbench.describe.template import synthetic_descriptions

    recs = synthetic_descriptions(ds, per_variant=3, shared=2, seed=0)
    assert len(recs) == ds.num_classes * (2 * 3 + 2)
    keys = {"id", "class", "text", "backend", "model", "prompt_id", "params", "time", "variant"}
    assert all(set(r) == keys for r in recs)
    assert len({r["id"] for r in recs}) == len(recs)
    assert [r["id"] for r in synthetic_descriptions(ds, per_variant=3, shared=2, seed=0)] == [r["id"] for r in recs]
    sp = ds.extras["species_table"].set_index("species")
    for r in recs:
        assert r["class"] in ds.classnames and r["variant"] in ("male", "female", None)
        others = [c for c in ds.classnames if c != r["class"]]
        assert r["class"] in r["text"] and not any(o in r["text"] for o in others)
        row = sp.loc[r["class"]]
        crown = re.findall(r"a (\w+) crown", r["text"])
        breast = re.findall(r"(\w+) breast", r["text"])
        wings = re.findall(r"(\w+) wings", r["text"])
        assert all(w == row["wing_color"] for w in wings)
        if r["variant"] is None:  # true of both variants: no variant-dependent colour
            assert not crown and all(b in ("plain", "streaked", "spotted") for b in breast)
        else:
            truth = syn.variant_attributes(row, r["variant"])
            other = syn.variant_attributes(row, "female" if r["variant"] == "male" else "male")
            assert all(c == truth["crown_color"] for c in crown)
            colours = [b for b in re.findall(r"(\w+) breast", r["text"].replace("plain ", "")) if b in syn.COLORS]
            assert all(c == truth["breast_color"] for c in colours)
            # false of the other variant: names a crown or breast colour the other one lacks
            assert any(c != other["crown_color"] for c in crown) or any(c != other["breast_color"] for c in colours)
    assert r["backend"] == "template" and r["model"] is None
