"""Template backends (no LLM): the synthetic benchmark's descriptions, and CUB-style attribute tables."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .backend import RecordBackend
from .cache import hash_key
from .validate import norm_name


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
        try:
            from .template import synthetic_descriptions
        except ImportError as e:
            raise ImportError("the template backend needs workbench.describe.template (the synthetic benchmark)") from e
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


def read_cub_attributes(root: str | Path):
    """CUB_200_2011 attribute tables -> (class names from classes.txt, attribute names, per-class presence frequency).

    ``freq[c, a]``: fraction of the class's images where attribute ``a`` is marked present with
    certainty "probably" or "definitely" (certainty ids 3, 4).
    """
    root = Path(root)
    need = {"attributes/image_attribute_labels.txt": None, "image_class_labels.txt": None, "classes.txt": None}
    for rel in need:
        if not (root / rel).exists():
            raise FileNotFoundError(f"attribute backend: {root / rel} not found (expects a CUB_200_2011 folder)")
    names_file = next((p for p in (root / "attributes" / "attributes.txt", root / "attributes.txt",
                                   root.parent / "attributes.txt") if p.exists()), None)
    if names_file is None:
        raise FileNotFoundError(f"attribute names (attributes.txt) not found in {root}/attributes, {root} or {root.parent}")
    attrs = [ln.split(" ", 1)[1].strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    classes = [ln.split(" ", 1)[1].strip() for ln in (root / "classes.txt").read_text().splitlines() if ln.strip()]
    img_class = {}
    for ln in (root / "image_class_labels.txt").read_text().splitlines():
        if ln.strip():
            i, c = ln.split()
            img_class[int(i)] = int(c) - 1
    present = np.zeros((len(classes), len(attrs)))
    counts = np.zeros(len(classes))
    seen_images = set()
    for ln in (root / "attributes/image_attribute_labels.txt").read_text().splitlines():
        parts = ln.split()
        if len(parts) < 4:
            continue
        img, a, is_present, certainty = int(parts[0]), int(parts[1]) - 1, int(parts[2]), int(parts[3])
        c = img_class.get(img)
        if c is None:
            continue
        if img not in seen_images:
            seen_images.add(img)
            counts[c] += 1
        if is_present and certainty >= 3:
            present[c, a] += 1
    freq = present / np.maximum(counts, 1)[:, None]
    return classes, attrs, freq


class AttributeTableBackend(RecordBackend):
    """Descriptions composed from per-class attribute frequencies (CUB's ``image_attribute_labels.txt``).

    For each description, every attribute group (``has_wing_color``, ...) whose most frequent value
    reaches ``min_freq`` contributes one value drawn in proportion to frequency among values above
    ``min_freq``; ``max_phrases`` of these groups are picked at random, giving
    "The <class> has grey wings, a hooked bill, ...". ``root``: the CUB_200_2011 folder (default:
    the dataset's root).
    """

    name = "attributes"
    model = None

    def __init__(self, root: str | Path | None = None, min_freq: float = 0.3, max_phrases: int = 6):
        self.root, self.min_freq, self.max_phrases = root, float(min_freq), int(max_phrases)
        self.report: dict = {}

    def records(self, dataset, classnames, n_per_class, seed):
        root = self.root or getattr(dataset, "root", None)
        if root is None:
            raise ValueError("the attributes backend needs root= (a CUB_200_2011 folder) or a Dataset")
        table_classes, attrs, freq = read_cub_attributes(root)
        wanted = {norm_name(c): c for c in classnames}
        mapping = {i: wanted.get(norm_name(c)) for i, c in enumerate(table_classes)}
        unmatched = [table_classes[i] for i, c in mapping.items() if c is None]
        self.report = {"unmatched_table_classes": unmatched}
        groups: dict[str, list[int]] = defaultdict(list)
        for a, name in enumerate(attrs):
            g, _, v = name.partition("::")
            groups[g].append(a)
        n = n_per_class or 5
        params = {"min_freq": self.min_freq, "max_phrases": self.max_phrases, "seed": seed}
        out = []
        for ci, cname in mapping.items():
            if cname is None:
                continue
            rng = np.random.default_rng([seed, ci])
            options = []
            for g, idx in groups.items():
                f = freq[ci, idx]
                ok = [(i, fi) for i, fi in zip(idx, f) if fi >= self.min_freq]
                if ok:
                    options.append((g, ok))
            if not options:
                continue
            seen = set()
            for _ in range(5 * n):  # draws until n distinct descriptions
                if len(seen) >= n:
                    break
                pick = rng.permutation(len(options))[: self.max_phrases]
                phrases = []
                for k in sorted(pick):
                    g, ok = options[k]
                    p = np.array([fi for _, fi in ok])
                    a = ok[rng.choice(len(ok), p=p / p.sum())][0]
                    phrases.append(_phrase(g, attrs[a].partition("::")[2]))
                text = f"The {cname} has " + (", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0]) + "."
                if text in seen:
                    continue
                seen.add(text)
                out.append({"id": hash_key("attributes", cname, text)[:16], "class": cname, "text": text,
                            "prompt_id": "cub-attributes-v1", "params": params, "variant": None})
        return out
