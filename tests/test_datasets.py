"""Dataset loaders on miniature copies of each published layout (built by fixtures_datasets)."""
from __future__ import annotations

import inspect
import os
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fixtures_datasets import (
    AIRCRAFT,
    CUB_ATTRIBUTES,
    CUB_CLASSES,
    CUB_PARTS,
    make_mini_aircraft,
    make_mini_cub,
    make_mini_fitzpatrick,
    make_mini_flowers,
    make_mini_gist,
    make_mini_imagefolder,
)

from workbench.data import LOADERS, few_shot, load_dataset
from workbench.data.gist import apply_shot_file, match_filenames
from workbench.data.layout import DatasetLayoutError
from workbench.data.names import humanize
from workbench.data.splits import carve_val, fraction_split

CUB_TREE = """\
Expected layout:
CUB_200_2011/                    data_root: the folder extracted from CUB_200_2011.tgz
  images.txt                     <image_id> <class folder>/<file>.jpg
  classes.txt                    <class_id> <NNN.Class_name>
  image_class_labels.txt         <image_id> <class_id>
  train_test_split.txt           <image_id> <1 train | 0 test>
  images/<NNN.Class_name>/<file>.jpg
  bounding_boxes.txt             optional: <image_id> <x> <y> <width> <height>
  parts/parts.txt                optional: <part_id> <part name>
  parts/part_locs.txt            optional: <image_id> <part_id> <x> <y> <visible>
  attributes/image_attribute_labels.txt   optional: <image_id> <attribute_id> <is_present> <certainty_id> <time>
  attributes.txt                 optional, here or one level up: <attribute_id> <attribute name>"""


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory):
    return make_mini_cub(tmp_path_factory.mktemp("cub"))


def split_counts(ds):
    return {s: Counter(ds.table.loc[ds.table["split"] == s, "label"]) for s in ("train", "val", "test")}


def read_pairs(path):
    return [line.split() for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- CUB
def test_cub_official_split_with_carved_val(cub_root):
    ds = load_dataset("cub", cub_root)
    assert ds.num_classes == 4 and len(ds) == 48
    assert ds.classnames == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross", "Groove billed Ani"]
    assert ds.root == cub_root / "images" and all(p.is_file() for p in ds.paths())
    # 10 official training images per class: 3 go to val; the 2 official test images stay test.
    assert split_counts(ds) == {"train": Counter({c: 7 for c in range(4)}), "val": Counter({c: 3 for c in range(4)}),
                                "test": Counter({c: 2 for c in range(4)})}
    official = dict(read_pairs(cub_root / "train_test_split.txt"))
    for _, r in ds.table.iterrows():
        assert (official[str(r.image_id)] == "0") == (r.split == "test")
    assert list(ds.table["class_folder"].unique()) == CUB_CLASSES[:4]
    labels = {int(i): int(c) - 1 for i, c in read_pairs(cub_root / "image_class_labels.txt")}
    assert all(labels[i] == l for i, l in zip(ds.table["image_id"], ds.table["label"]))
    # Deterministic: the same val images every time; another split_seed picks others.
    again = load_dataset("cub", cub_root)
    assert again.table["split"].tolist() == ds.table["split"].tolist()
    other = load_dataset("cub", cub_root, split_seed=1)
    assert other.table["split"].tolist() != ds.table["split"].tolist()


def test_cub_gist_metadata_and_kshot_files(cub_root):
    ds = load_dataset("cub", cub_root, metadata="metadata.csv")
    assert split_counts(ds) == {"train": Counter({c: 8 for c in range(4)}), "val": Counter({c: 2 for c in range(4)}),
                                "test": Counter({c: 2 for c in range(4)})}
    meta = pd.read_csv(cub_root / "metadata.csv")
    expect = dict(zip(meta["filename"], meta["split"]))
    assert dict(zip(ds.table["filename"], ds.table["split"])) == expect
    assert ds.table["species"].tolist() == [ds.classnames[l] for l in ds.table["label"]]
    assert sorted(ds.extras["shot_files"]) == [1, 3, 5]
    one = load_dataset("cub", cub_root, metadata="metadata.csv", shots=1)
    assert split_counts(one)["train"] == Counter({c: 1 for c in range(4)})
    assert split_counts(one)["test"] == split_counts(ds)["test"]
    three = apply_shot_file(ds, 3)
    assert few_shot(ds, 3, seed=7, shot_file=3).table.equals(three.table)  # the one few-shot function takes it too
    assert split_counts(three)["train"] == Counter({c: 3 for c in range(4)})
    kshot = pd.read_csv(cub_root / "metadata_3shot.csv")
    assert set(three.split("train").table["filename"]) == set(kshot.loc[kshot["split"] == "train", "filename"])
    assert split_counts(few_shot(ds, 5, seed=0))["train"] == Counter({c: 5 for c in range(4)})


def test_cub_parts_and_attributes(cub_root):
    ds = load_dataset("cub", cub_root)
    parts = ds.extras["parts"]
    assert ds.extras["part_names"] == CUB_PARTS
    assert len(parts) == 48 * 15
    assert list(parts.columns) == ["image_id", "filename", "part_id", "part", "x", "y", "visible"]
    raw = read_pairs(cub_root / "parts" / "part_locs.txt")
    assert parts["x"].tolist() == [float(r[2]) for r in raw]
    assert parts["visible"].tolist() == [r[4] == "1" for r in raw]
    assert set(parts["part"]) == set(CUB_PARTS) and parts["filename"].isin(ds.table["filename"]).all()

    # Attributes: names from attributes.txt one level up; values as written (one row has an extra field).
    assert ds.extras["attribute_names"] == CUB_ATTRIBUTES
    att, cert = ds.extras["attributes"], ds.extras["attribute_certainty"]
    assert att.shape == (48, len(CUB_ATTRIBUTES))
    for r in read_pairs(cub_root / "attributes" / "image_attribute_labels.txt"):
        name = CUB_ATTRIBUTES[int(r[1]) - 1]
        assert att.loc[int(r[0]), name] == int(r[2]) and cert.loc[int(r[0]), name] == int(r[3])
    assert ds.extras["class_attributes"].shape == (4, len(CUB_ATTRIBUTES))
    assert list(ds.extras["bounding_boxes"].columns) == ["image_id", "x", "y", "width", "height"]


def test_cub_part_keypoints_follow_the_image_cache(cub_root):
    """CUB's keypoints mapped into the model-input frame as the pointing game maps them
    (data.geometry.map_points, used by align.regions.part_regions) land on the part in the decoded image."""
    from PIL import Image

    from workbench.data.geometry import map_points
    from workbench.data.images import decode_images

    ds = load_dataset("cub", cub_root)
    files = ds.table["filename"].tolist()[:6]
    size = 24
    parts = ds.extras["parts"]
    crowns = parts[parts["part"] == "crown"].set_index("filename")
    imgs = decode_images([ds.root / f for f in files], size)
    checked = 0
    for f, im in zip(files, imgs):
        with Image.open(ds.root / f) as pil:
            (x, y), = map_points(crowns.loc[[f], ["x", "y"]].to_numpy(), pil.size, size).tolist()
        if not (0 <= x < size and 0 <= y < size):
            continue
        r, g, b = im[:, int(y), int(x)].tolist()
        assert r > 150 and g < 110, (f, r, g, b)  # the red crown mark lands where the table says
        checked += 1
    assert checked >= 3


# ---------------------------------------------------------------------------- errors, word for word
def test_cub_wrong_root_errors(tmp_path, cub_root):
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("cub", tmp_path / "nowhere")
    assert str(e.value) == f"cub: dataset root {tmp_path / 'nowhere'} does not exist.\n" + CUB_TREE
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("cub", None)
    assert str(e.value) == "cub: no dataset root given; set data_root to the dataset folder.\n" + CUB_TREE
    # The folder above the dataset: everything is missing, and the right folder is suggested.
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("cub", cub_root.parent)
    assert str(e.value) == (
        f"cub: {cub_root.parent} is missing 5 required path(s):\n"
        "  images.txt\n  classes.txt\n  image_class_labels.txt\n  train_test_split.txt\n  images/\n"
        + CUB_TREE + f"\nDid you mean data_root={cub_root}?"
    )


def test_cub_missing_split_file_error(tmp_path):
    root = make_mini_cub(tmp_path, n_classes=2, n_train=2, n_val=0, n_test=1, attributes=False, parts=False)
    os.remove(root / "train_test_split.txt")
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("cub", root)
    assert str(e.value) == f"cub: {root} is missing 1 required path(s):\n  train_test_split.txt\n" + CUB_TREE


def test_missing_split_files_flowers_aircraft(tmp_path):
    root = make_mini_flowers(tmp_path, metadata=False)
    os.remove(root / "setid.mat")
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("flowers", root)
    assert str(e.value) == (
        f"flowers: {root} is missing 1 required path(s):\n  setid.mat\n"
        "Expected layout:\n"
        "flowers-102/                 data_root: the folder holding the three downloads\n"
        "  jpg/image_00001.jpg ...    from 102flowers.tgz\n"
        "  imagelabels.mat            'labels': class (1..102) of image i\n"
        "  setid.mat                  'trnid', 'valid', 'tstid': image numbers per split"
    )
    root = make_mini_aircraft(tmp_path)
    os.remove(root / "data" / "images_variant_val.txt")
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("aircraft", root)
    assert str(e.value).startswith(
        f"aircraft: {root} is missing 1 required path(s):\n  data/images_variant_val.txt\nExpected layout:\n"
        "fgvc-aircraft-2013b/           data_root: the folder extracted from fgvc-aircraft-2013b.tar.gz\n"
    )


def test_metadata_errors(tmp_path, cub_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("cub", cub_root, metadata="gist_split.csv")
    assert str(e.value) == (
        f"cub: metadata file gist_split.csv not found; looked in:\n  {cub_root / 'gist_split.csv'}\n"
        f"  {tmp_path / 'gist_split.csv'}"
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("filename,split,label,species\n001.Black_footed_Albatross/nope.jpg,train,0,Black footed Albatross\n")
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("cub", cub_root, metadata=str(bad))
    assert str(e.value) == (
        "cub: 1 of 1 filenames in bad.csv are not in the dataset, e.g.:\n  001.Black_footed_Albatross/nope.jpg\n"
        "The dataset's filenames look like '001.Black_footed_Albatross/Black_Footed_Albatross_0001_1.jpg' "
        f"(relative to {cub_root / 'images'})."
    )
    bad.write_text("filename,split\na.jpg,training\n")
    with pytest.raises(DatasetLayoutError, match=r"unknown split values \['training'\]"):
        load_dataset("cub", cub_root, metadata=str(bad))
    with pytest.raises(DatasetLayoutError, match="shots=3 reads GIST's k-shot file"):
        load_dataset("cub", cub_root, shots=3)


def test_missing_images_listed_or_skipped(tmp_path):
    root = make_mini_cub(tmp_path, n_classes=2, n_train=3, n_val=0, n_test=1, attributes=False, parts=False)
    gone = sorted((root / "images").rglob("*.jpg"))[:2]
    for p in gone:
        p.unlink()
    rel = [str(p.relative_to(root / "images")) for p in gone]
    with pytest.raises(DatasetLayoutError) as e:
        load_dataset("cub", root)
    assert str(e.value) == (
        f"cub: 2 image file(s) listed by the dataset are missing under {root / 'images'}:\n"
        f"  {rel[0]}\n  {rel[1]}\n"
        "Restore them, or pass dataset_options.skip_missing=true to drop them (recorded in extras['skipped'])."
    )
    ds = load_dataset("cub", root, skip_missing=True)
    assert len(ds) == 6 and ds.extras["skipped"] == [(r, "missing") for r in rel]


# ---------------------------------------------------------------------------- other loaders
def test_flowers_official_and_gist_split(tmp_path):
    root = make_mini_flowers(tmp_path)
    ds = load_dataset("flowers", root)
    assert ds.classnames == ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    assert split_counts(ds) == {"train": Counter({c: 2 for c in range(3)}), "val": Counter({c: 1 for c in range(3)}),
                                "test": Counter({c: 2 for c in range(3)})}
    from scipy.io import loadmat

    labels = loadmat(root / "imagelabels.mat", squeeze_me=True)["labels"]
    assert ds.table["label"].tolist() == [labels[i - 1] - 1 for i in ds.table["image_id"]]
    from workbench.data.flowers import CLASSNAMES_FILE, read_classnames

    names = read_classnames(CLASSNAMES_FILE)
    assert len(names) == 102 == len(set(names)) and names[-1] == "blackberry lily"
    # GIST's CSV says jpg/image_NNNNN.jpg; the dataset's filenames are image_NNNNN.jpg under jpg/.
    g = load_dataset("flowers", root, metadata="metadata.csv")
    assert g.classnames == ["Pink Primrose", "Hard-Leaved Pocket Orchid", "Canterbury Bells"]
    assert split_counts(g)["train"] == Counter({c: 3 for c in range(3)}) and "val" not in set(g.table["split"])
    assert (g.table["metadata_filename"] == "jpg/" + g.table["filename"]).all()


def test_aircraft_levels(tmp_path):
    root = make_mini_aircraft(tmp_path)
    ds = load_dataset("aircraft", root)
    assert ds.classnames == [v for v, _, _ in AIRCRAFT]
    assert split_counts(ds) == {"train": Counter({c: 2 for c in range(3)}), "val": Counter({c: 1 for c in range(3)}),
                                "test": Counter({c: 1 for c in range(3)})}
    assert ds.root == root / "data" / "images" and all(p.is_file() for p in ds.paths())
    assert ds.table.groupby("species")["aircraft_family"].first().to_dict() == {v: f for v, f, _ in AIRCRAFT}
    assert "variant" not in ds.table.columns
    fam = load_dataset("aircraft", root, level="manufacturer")
    assert fam.classnames == ["Boeing", "Airbus", "Cessna"] and "aircraft_variant" in fam.table.columns


def test_fitzpatrick40_selection(tmp_path):
    root = make_mini_fitzpatrick(tmp_path)
    ds = load_dataset("fitzpatrick40", root)
    assert ds.classnames == ["psoriasis", "acne vulgaris", "lichen planus"]
    assert split_counts(ds) == {"train": Counter({c: 2 for c in range(3)}), "val": Counter({c: 1 for c in range(3)}),
                                "test": Counter({c: 1 for c in range(3)})}
    full = pd.read_csv(root / "fitzpatrick17k.csv").set_index("md5hash")
    assert (ds.table["fitzpatrick_scale"].to_numpy() == full.loc[ds.table["md5hash"], "fitzpatrick_scale"].to_numpy()).all()
    with pytest.raises(DatasetLayoutError, match="the Fitzpatrick40 selection is a metadata file"):
        load_dataset("fitzpatrick40", root, metadata=None)


def test_imagefolder_flat_and_split_folders(tmp_path):
    flat = load_dataset("imagefolder", make_mini_imagefolder(tmp_path / "a"))
    assert flat.classnames == ["class a", "class b", "class c"]
    assert flat.table["class_folder"].unique().tolist() == ["class_a", "class_b", "class_c"]
    # 10 per class: round(0.2*10)=2 test, round(0.1*10)=1 val, 7 train.
    assert split_counts(flat) == {"train": Counter({c: 7 for c in range(3)}), "val": Counter({c: 1 for c in range(3)}),
                                  "test": Counter({c: 2 for c in range(3)})}
    assert load_dataset("imagefolder", flat.root).table.equals(flat.table)
    root = make_mini_imagefolder(tmp_path / "b", splits=True)
    sp = load_dataset("imagefolder", root, humanize=False)
    assert sp.classnames == ["class_a", "class_b", "class_c"]
    assert split_counts(sp) == {"train": Counter({c: 6 for c in range(3)}), "val": Counter({c: 2 for c in range(3)}),
                                "test": Counter({c: 2 for c in range(3)})}
    shutil.rmtree(root / "val")
    carved = load_dataset("imagefolder", root, val_fraction=0.5)
    assert split_counts(carved)["val"] == Counter({c: 3 for c in range(3)})
    with pytest.raises(DatasetLayoutError, match="has no class folders with images"):
        load_dataset("imagefolder", tmp_path / "b" / "folder" / "train" / "class_a")


def test_gist_loader(tmp_path):
    root = make_mini_gist(tmp_path)
    ds = load_dataset("gist", root)
    assert ds.root == root / "images" and ds.classnames == ["Class 0", "Class 1", "Class 2"]
    assert split_counts(ds) == {"train": Counter({c: 4 for c in range(3)}), "val": Counter({c: 1 for c in range(3)}),
                                "test": Counter({c: 1 for c in range(3)})}
    assert split_counts(load_dataset("gist", root, shots=1))["train"] == Counter({c: 1 for c in range(3)})


# ---------------------------------------------------------------------------- helpers
def test_helpers():
    assert humanize("001.Black_footed_Albatross") == "Black footed Albatross"
    assert humanize("Cessna 172") == "Cessna 172"
    names = ["a/x.jpg", "b/x.jpg", "b/y.jpg", "c/z.jpg"]
    # exact, suffix (CSV longer or shorter than the dataset's path), stem, and ambiguous -> -1
    got = match_filenames(names, ["a/x.jpg", "root/b/y.jpg", "z.jpg", "c/z.png", "x.jpg"])
    assert got.tolist() == [0, 2, 3, 3, -1]
    t = pd.DataFrame({"filename": [f"f{i:02d}" for i in range(20)], "label": [i % 2 for i in range(20)],
                      "split": ["train"] * 20, "species": ["a", "b"] * 10})
    v = carve_val(t, per_class=3, seed=0)
    assert Counter(v.loc[v.split == "val", "label"]) == Counter({0: 3, 1: 3})
    assert carve_val(t.sample(frac=1, random_state=1), per_class=3, seed=0).sort_index().equals(v)  # order-free
    f = fraction_split(t, val=0.2, test=0.3, seed=0)
    assert Counter(f.split) == Counter({"train": 10, "test": 6, "val": 4})
    assert Counter(carve_val(t.head(2), per_class=5).split) == Counter({"train": 2})  # keeps one train per class


def test_presets_have_paper_defaults_and_valid_options():
    pdir = Path(__file__).resolve().parents[1] / "workbench" / "presets"
    for name in ("cub", "flowers", "aircraft", "fitzpatrick40", "imagefolder"):
        cfg = yaml.safe_load((pdir / f"{name}.yaml").read_text())
        assert cfg["dataset"] in LOADERS
        module, fn = LOADERS[cfg["dataset"]].split(":")
        params = inspect.signature(getattr(__import__(module, fromlist=[fn]), fn)).parameters
        assert set(cfg["dataset_options"]) <= set(params), name
        assert (cfg["match"]["model"], cfg["match"]["pretrained"], cfg["match"]["k"]) == ("ViT-B-32", "laion2b_s34b_b79k", 5)
        ft = cfg["finetune"]
        assert (ft["model"], ft["pretrained"], ft["lr"], ft["batch_size"], ft["epochs"]) == ("ViT-L-14-336", "openai", 1e-6, 20, 200)
