"""Template backends (no LLM): the synthetic benchmark's descriptions, and CUB-style attribute tables."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..data.names import norm_name
from ..io import hash_key
from .backend import RecordBackend
from .template import synthetic_descriptions


def _balanced(records: list[dict], n: int | None) -> list[dict]:
    """Keep up to ``n`` records per class, taking variants in turn (all if ``n`` is None)."""
    if n is None:
        return records
    by_class: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_class[r["class"]][r.get("variant")].append(r)
    out = []
    for groups in by_class.values():
        lists = list(groups.values())  # variants in the generator's order
        taken, i = 0, 0
        while taken < n and any(i < len(lst) for lst in lists):
            for lst in lists:
                if i < len(lst) and taken < n:
                    out.append(lst[i])
                    taken += 1
            i += 1
    return out


class SyntheticTemplateBackend(RecordBackend):
    """Descriptions of the synthetic benchmark from its generator's templates (ground-truth ``variant`` set).

    Wraps ``workbench.describe.template.synthetic_descriptions(dataset, per_variant, shared, seed)``:
    ``per_variant`` texts per species and variant (true of that variant only) and ``shared`` texts
    true of both (generator defaults when None). ``n_per_class`` then caps each class, taking
    variants in turn.
    """

    name = "template"
    model = None

    def __init__(self, per_variant: int | None = None, shared: int | None = None):
        self.per_variant, self.shared = per_variant, shared

    def records(self, dataset, classnames, n_per_class, seed):
        if dataset is None or not hasattr(dataset, "table"):
            raise ValueError("the template backend needs the synthetic Dataset (workbench.data.load_dataset('synthetic'))")
        kw = {k: v for k, v in (("per_variant", self.per_variant), ("shared", self.shared)) if v is not None}
        recs = [dict(r) for r in synthetic_descriptions(dataset, seed=seed, **kw)]
        return _balanced(recs, n_per_class)


# --- CUB attribute tables -------------------------------------------------------------------------

def _phrase(group: str, value: str) -> str:
    """``has_wing_color`` + ``grey`` -> "grey wings"; ``has_bill_length`` + ``shorter_than_head`` -> "bill shorter than head"."""
    value = re.sub(r"\s*\(.*?\)", "", value).replace("_", " ").replace("-wings", " wings").strip()
    words = group.removeprefix("has_").split("_")
    kind, part = words[-1], " ".join(words[:-1])
    plural = {"wing": "wings", "leg": "legs", "eye": "eyes"}
    part = plural.get(part, part)
    if group == "has_primary_color":
        return f"mostly {value}"
    if group == "has_size":
        return f"{value} size"
    if group == "has_shape":
        return f"{value} body shape"
    if kind == "length":
        return f"{part} {value}"
    if kind == "pattern":
        return f"{value} {part}" if value != "solid" else f"plain {part}"
    if kind in ("color", "shape"):
        # values like "rounded-wings" or "notched_tail" already name the part
        return value if value.split()[-1].rstrip("s") == part.rstrip("s") else f"{value} {part}"
    return f"{value} {' '.join(words)}"


def class_frequencies(present, certainty, labels, n_classes: int, min_certainty: int = 3) -> np.ndarray:
    """``freq[c, a]``: fraction of class ``c``'s images with attribute ``a`` marked present with
    certainty at least ``min_certainty`` (CUB: 3 "probably", 4 "definitely")."""
    present = np.asarray(present) > 0
    sure = present & (np.asarray(certainty) >= min_certainty)
    labels = np.asarray(labels)
    freq = np.zeros((n_classes, present.shape[1]))
    counts = np.bincount(labels, minlength=n_classes)
    np.add.at(freq, labels, sure.astype(float))
    return freq / np.maximum(counts, 1)[:, None]


def _ints(path: Path, ncols: int) -> np.ndarray:
    rows = [ln.split()[:ncols] for ln in path.read_text().splitlines() if len(ln.split()) >= ncols]
    return np.array(rows, dtype=np.int64).reshape(-1, ncols)


def read_cub_attributes(root: str | Path, train_only: bool = True):
    """CUB_200_2011 files -> (class names from classes.txt, attribute names, class x attribute frequency).

    Frequencies come from training images only (``train_test_split.txt``) when ``train_only`` and
    that file exists: descriptions must not be built from test labels.
    """
    root = Path(root)
    for rel in ("attributes/image_attribute_labels.txt", "image_class_labels.txt", "classes.txt"):
        if not (root / rel).exists():
            raise FileNotFoundError(f"attribute backend: {root / rel} not found (expects a CUB_200_2011 folder)")
    names_file = next((p for p in (root / "attributes" / "attributes.txt", root / "attributes.txt",
                                   root.parent / "attributes.txt") if p.exists()), None)
    if names_file is None:
        raise FileNotFoundError(f"attribute names (attributes.txt) not found in {root}/attributes, {root} or {root.parent}")
    attrs = [ln.split(" ", 1)[1].strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    classes = [ln.split(" ", 1)[1].strip() for ln in (root / "classes.txt").read_text().splitlines() if ln.strip()]
    img_class = dict(_ints(root / "image_class_labels.txt", 2).tolist())
    keep = set(img_class)
    split = root / "train_test_split.txt"
    if train_only and split.exists():
        keep = {i for i, t in _ints(split, 2).tolist() if t == 1}
    rows = _ints(root / "attributes/image_attribute_labels.txt", 4)  # image, attribute, present, certainty
    rows = rows[np.isin(rows[:, 0], sorted(keep & set(img_class)))]
    images = np.unique(rows[:, 0])
    r = np.searchsorted(images, rows[:, 0])
    present = np.zeros((len(images), len(attrs)), dtype=np.int8)
    certainty = np.zeros_like(present)
    present[r, rows[:, 1] - 1] = rows[:, 2]
    certainty[r, rows[:, 1] - 1] = rows[:, 3]
    labels = np.array([img_class[i] - 1 for i in images], dtype=np.int64)
    return classes, attrs, class_frequencies(present, certainty, labels, len(classes))


class AttributeTableBackend(RecordBackend):
    """Descriptions composed from per-class attribute frequencies (CUB's ``image_attribute_labels.txt``).

    For each description, every attribute group (``has_wing_color``, ...) with a value of
    frequency >= ``min_freq`` contributes one such value, drawn in proportion to frequency;
    ``max_phrases`` groups are picked at random: "The <class> has grey wings, hooked seabird bill ...".
    Frequencies count training images only. Source: the Dataset's ``attributes`` extras (the CUB
    loader's), else the files under ``root`` (a CUB_200_2011 folder; default the dataset's).
    """

    name = "attributes"
    model = None

    def __init__(self, root: str | Path | None = None, min_freq: float = 0.3, max_phrases: int = 6):
        self.root, self.min_freq, self.max_phrases = root, float(min_freq), int(max_phrases)
        self.report: dict = {}

    def _frequencies(self, dataset):
        ex = getattr(dataset, "extras", {}) or {}
        if self.root is None and "attributes" in ex and "image_id" in dataset.table.columns:
            train = dataset.table[dataset.table["split"] == "train"]
            pres = ex["attributes"].reindex(train["image_id"])
            cert = ex.get("attribute_certainty")
            cert = cert.reindex(train["image_id"]).to_numpy() if cert is not None else np.full(pres.shape, 4)
            freq = class_frequencies(pres.fillna(0).to_numpy(), np.nan_to_num(cert), train["label"].to_numpy(),
                                     len(dataset.classnames))
            return list(dataset.classnames), list(pres.columns), freq
        root = self.root or ex.get("dataset_root")
        if root is None:
            raise ValueError("the attributes backend needs root= (a CUB_200_2011 folder) or the CUB Dataset")
        return read_cub_attributes(root)

    def records(self, dataset, classnames, n_per_class, seed):
        table_classes, attrs, freq = self._frequencies(dataset)
        wanted = {norm_name(c): c for c in classnames}
        mapping = {i: wanted.get(norm_name(c)) for i, c in enumerate(table_classes)}
        self.report = {"unmatched_table_classes": [table_classes[i] for i, c in mapping.items() if c is None]}
        groups: dict[str, list[int]] = defaultdict(list)
        for a, name in enumerate(attrs):
            groups[name.partition("::")[0]].append(a)
        n = n_per_class or 5
        params = {"min_freq": self.min_freq, "max_phrases": self.max_phrases, "seed": seed}
        out = []
        for ci, cname in mapping.items():
            if cname is None:
                continue
            rng = np.random.default_rng([seed, ci])
            options = [(g, [(a, freq[ci, a]) for a in idx if freq[ci, a] >= self.min_freq]) for g, idx in groups.items()]
            options = [(g, ok) for g, ok in options if ok]
            seen = set()
            for _ in range(5 * n if options else 0):  # draws until n distinct descriptions
                if len(seen) >= n:
                    break
                phrases = []
                for k in sorted(rng.permutation(len(options))[: self.max_phrases]):
                    g, ok = options[k]
                    p = np.array([f for _, f in ok])
                    a = ok[rng.choice(len(ok), p=p / p.sum())][0]
                    phrases.append(_phrase(g, attrs[a].partition("::")[2]))
                body = ", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0]
                text = f"The {cname} has {body}."
                if text in seen:
                    continue
                seen.add(text)
                out.append({"id": hash_key("attributes", cname, text)[:16], "class": cname, "text": text,
                            "prompt_id": "cub-attributes-v1", "params": params, "variant": None})
        return out
