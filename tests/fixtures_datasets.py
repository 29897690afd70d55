"""Miniature copies of each dataset's published layout, built in a temporary folder.

Every builder takes a folder and returns the dataset root to pass as ``data_root``. Images are
tiny JPEGs whose colour depends on the class (plus noise), so a model can learn something
from them. Use from a test (pytest puts ``tests/`` on ``sys.path``)::

    from fixtures_datasets import make_mini_cub
    root = make_mini_cub(tmp_path)          # tmp_path/CUB_200_2011
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
               "004.Groove_billed_Ani", "005.Crested_Auklet", "006.Least_Auklet"]
CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
             "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat"]
CUB_ATTRIBUTES = ["has_bill_shape::curved_(up_or_down)", "has_bill_shape::dagger", "has_wing_color::blue",
                  "has_wing_color::brown", "has_crown_color::red", "has_crown_color::black"]
FLOWER_CLASSES = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
AIRCRAFT = [("707-320", "Boeing 707", "Boeing"), ("A300B4", "A300", "Airbus"), ("Cessna 172", "Cessna 172", "Cessna")]
SKIN = ["psoriasis", "acne vulgaris", "lichen planus", "melanoma"]


def _palette(n: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(1234)
    return [tuple(int(v) for v in rng.integers(30, 226, 3)) for _ in range(n)]


def write_image(path: Path, color, size=(32, 32), seed: int = 0, marks=()) -> None:
    """A JPEG of ``color`` plus noise; ``marks`` are ``(x, y, rgb)`` squares (e.g. a red crown)."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = np.clip(np.array(color, dtype=np.int16) + rng.integers(-25, 26, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    for x, y, rgb in marks:
        d.rectangle([x - 2, y - 2, x + 2, y + 2], fill=rgb)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=90)


def _split_list(n_train, n_val, n_test):
    return ["train"] * n_train + ["val"] * n_val + ["test"] * n_test


def write_gist_metadata(path: Path, rows, shots=(1, 3, 5)) -> None:
    """GIST-format metadata CSV (with its leftover index columns) plus k-shot files.

    ``rows``: ``[(filename, split, label, species), ...]``; k-shot files keep the first k
    training rows of each label.
    """
    def write(p, rs):
        lines = [",Unnamed: 0.1,Unnamed: 0,ID,CLASS,filename,split,label,species"]
        for i, (f, s, l, sp) in enumerate(rs):
            lines.append(f"{i},{i},{i},{i + 1},{l + 1},{f},{s},{l},{sp}")
        p.write_text("\n".join(lines) + "\n")

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, rows)
    for k in shots:
        seen: dict[int, int] = {}
        keep = []
        for r in rows:
            if r[1] == "train":
                seen[r[2]] = seen.get(r[2], 0) + 1
                if seen[r[2]] > k:
                    continue
            keep.append(r)
        write(path.with_name(f"{path.stem}_{k}shot{path.suffix}"), keep)


def make_mini_cub(tmp_path, n_classes=4, n_train=8, n_val=2, n_test=2, size=32, metadata=True,
                  attributes=True, parts=True) -> Path:
    """``tmp_path/CUB_200_2011`` with ``n_classes`` x (train + val + test) images, GIST metadata,
    attributes (``attributes.txt`` one level up, as in the tarball) and part locations.

    The official ``train_test_split.txt`` marks train+val as training images; ``metadata.csv``
    gives the train/val/test split. Each image has a red "crown" and a yellow "beak" mark at
    the locations written to ``parts/part_locs.txt``. Images are ``size+8`` x ``size`` px.
    """
    root = Path(tmp_path) / "CUB_200_2011"
    colors = _palette(n_classes)
    rng = np.random.default_rng(0)
    images, labels, split_lines, meta, boxes, locs, attr = [], [], [], [], [], [], []
    iid = 0
    w, h = size + 8, size
    for c, folder in enumerate(CUB_CLASSES[:n_classes]):
        stem = folder.split(".", 1)[1].replace("_f", "_F")
        species = folder.split(".", 1)[1].replace("_", " ")
        for j, split in enumerate(_split_list(n_train, n_val, n_test)):
            iid += 1
            fname = f"{folder}/{stem}_{j + 1:04d}_{iid}.jpg"
            crown = (int(rng.integers(6, w - 6)), int(rng.integers(4, h // 2)))
            beak = (min(crown[0] + 5, w - 3), crown[1] + 3)
            write_image(root / "images" / fname, colors[c], (w, h), seed=iid,
                        marks=[(*crown, (220, 20, 20)), (*beak, (230, 210, 30))])
            images.append(f"{iid} {fname}")
            labels.append(f"{iid} {c + 1}")
            split_lines.append(f"{iid} {0 if split == 'test' else 1}")
            meta.append((fname, split, c, species))
            boxes.append(f"{iid} 1.0 1.0 {w - 2}.0 {h - 2}.0")
            for p, name in enumerate(CUB_PARTS, 1):
                xy = {"crown": crown, "beak": beak}.get(name)
                if xy is None and p % 3 == 0:  # some parts not visible: written as 0 0 0
                    locs.append(f"{iid} {p} 0.0 0.0 0")
                else:
                    xy = xy or (int(rng.integers(0, w)), int(rng.integers(0, h)))
                    locs.append(f"{iid} {p} {float(xy[0])} {float(xy[1])} 1")
            for a in range(1, len(CUB_ATTRIBUTES) + 1):
                present = int((a + c) % 3 == 0)
                attr.append(f"{iid} {a} {present} {int(rng.integers(1, 5))} {rng.uniform(1, 9):.3f}")
    attr[1] += " 0"  # the released file has a few rows with an extra field
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "classes.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(CUB_CLASSES[:n_classes])))
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split_lines) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    if parts:
        (root / "parts").mkdir(exist_ok=True)
        (root / "parts" / "parts.txt").write_text("".join(f"{i} {p}\n" for i, p in enumerate(CUB_PARTS, 1)))
        (root / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    if attributes:
        (root / "attributes").mkdir(exist_ok=True)
        (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(attr) + "\n")
        (root.parent / "attributes.txt").write_text("".join(f"{i} {a}\n" for i, a in enumerate(CUB_ATTRIBUTES, 1)))
        cont = np.round(rng.uniform(0, 100, (n_classes, len(CUB_ATTRIBUTES))), 4)
        np.savetxt(root / "attributes" / "class_attribute_labels_continuous.txt", cont, fmt="%.4f")
    if metadata:
        write_gist_metadata(root / "metadata.csv", meta)
    return root


def make_mini_flowers(tmp_path, n_classes=3, per_split=(2, 1, 2), size=32, metadata=True) -> Path:
    """``tmp_path/flowers-102`` with ``jpg/``, ``imagelabels.mat``, ``setid.mat`` (labels 1..n_classes).

    ``metadata.csv`` gives a different split: each class's first val image becomes train.
    """
    from scipy.io import savemat

    root = Path(tmp_path) / "flowers-102"
    colors = _palette(n_classes)
    labels, ids = [], {"trnid": [], "valid": [], "tstid": []}
    meta = []
    i = 0
    for c in range(n_classes):
        for key, n in zip(ids, per_split):
            for j in range(n):
                i += 1
                write_image(root / "jpg" / f"image_{i:05d}.jpg", colors[c], (size, size), seed=i)
                labels.append(c + 1)
                ids[key].append(i)
                split = {"trnid": "train", "valid": "val", "tstid": "test"}[key]
                if key == "valid" and j == 0:
                    split = "train"
                meta.append((f"jpg/image_{i:05d}.jpg", split, c, FLOWER_CLASSES[c % 3].title()))
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(root / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    if metadata:
        write_gist_metadata(root / "metadata.csv", meta)
    return root


def make_mini_aircraft(tmp_path, per_split=(2, 1, 1), size=32) -> Path:
    """``tmp_path/fgvc-aircraft-2013b`` with 3 variants, family and manufacturer files."""
    root = Path(tmp_path) / "fgvc-aircraft-2013b"
    data = root / "data"
    colors = _palette(len(AIRCRAFT))
    lines = {(lvl, s): [] for lvl in ("variant", "family", "manufacturer") for s in ("train", "val", "test")}
    n = 1000000
    for c, (variant, family, maker) in enumerate(AIRCRAFT):
        for split, k in zip(("train", "val", "test"), per_split):
            for _ in range(k):
                n += 7
                image_id = f"{n:07d}"
                write_image(data / "images" / f"{image_id}.jpg", colors[c], (size, size + 6), seed=n)
                for lvl, name in (("variant", variant), ("family", family), ("manufacturer", maker)):
                    lines[(lvl, split)].append(f"{image_id} {name}")
    for (lvl, split), ls in lines.items():
        (data / f"images_{lvl}_{split}.txt").write_text("\n".join(ls) + "\n")
    (data / "variants.txt").write_text("".join(f"{v}\n" for v, _, _ in AIRCRAFT))
    (data / "families.txt").write_text("".join(f"{f}\n" for _, f, _ in AIRCRAFT))
    (data / "manufacturers.txt").write_text("".join(f"{m}\n" for m in dict.fromkeys(m for _, _, m in AIRCRAFT)))
    return root


def make_mini_fitzpatrick(tmp_path, per_class=5, size=32) -> Path:
    """``tmp_path/fitzpatrick17k``: 4 conditions x ``per_class`` images in the CSV; GIST-style
    ``metadata.csv`` selects the first 3 conditions, 4 images each (2 train, 1 val, 1 test)."""
    root = Path(tmp_path) / "fitzpatrick17k"
    colors = _palette(len(SKIN))
    rows, meta = [], []
    for c, cond in enumerate(SKIN):
        for j in range(per_class):
            md5 = f"{c:02d}{j:02d}" + "ab" * 14
            write_image(root / "images" / f"{md5}.jpg", colors[c], (size, size), seed=100 * c + j)
            scale = 1 + (c + j) % 6
            rows.append(f"{md5},{scale},{scale},{cond},inflammatory,non-neoplastic,,https://example.org/{md5}.jpg,{md5}")
            if c < 3 and j < 4:
                meta.append((f"{md5}.jpg", ("train", "train", "val", "test")[j], c, cond))
    header = "md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,qc,url,url_alphanum"
    (root / "fitzpatrick17k.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    write_gist_metadata(root / "metadata.csv", meta)
    return root


def make_mini_imagefolder(tmp_path, n_classes=3, per_class=10, splits=False, size=32) -> Path:
    """``tmp_path/folder`` with ``n_classes`` class folders; with ``splits``, train/val/test folders
    holding 6/2/2 images per class (``per_class`` ignored)."""
    root = Path(tmp_path) / "folder"
    colors = _palette(n_classes)
    names = [f"class_{chr(97 + c)}" for c in range(n_classes)]
    i = 0
    for c, name in enumerate(names):
        if splits:
            for split, k in (("train", 6), ("val", 2), ("test", 2)):
                for _ in range(k):
                    i += 1
                    write_image(root / split / name / f"img{i}.jpg", colors[c], (size, size), seed=i)
        else:
            for _ in range(per_class):
                i += 1
                write_image(root / name / f"img{i}.png", colors[c], (size, size), seed=i)
    return root


def make_mini_gist(tmp_path, n_classes=3, size=32) -> Path:
    """``tmp_path/gist``: ``images/<class>/<file>.jpg`` and a GIST ``metadata.csv`` (4/1/1 per class)."""
    root = Path(tmp_path) / "gist"
    colors = _palette(n_classes)
    meta = []
    for c in range(n_classes):
        for j, split in enumerate(_split_list(4, 1, 1)):
            f = f"{c:03d}.Class_{c}/img_{j}.jpg"
            write_image(root / "images" / f, colors[c], (size, size), seed=10 * c + j)
            meta.append((f, split, c, f"Class {c}"))
    write_gist_metadata(root / "metadata.csv", meta)
    return root
