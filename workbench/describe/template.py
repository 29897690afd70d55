"""Template descriptions for the synthetic benchmark, in the style of GIST's bird descriptions.

Each species gets descriptions true of one variant only (they mention the crown or breast
colour, which differs between males and females) and descriptions true of every image of the
species (shared attributes only, ``variant=None``). Texts name their own species and no other.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from ..data import synthetic as syn

PROMPT_ID = "synthetic-template-v1"
BACKEND = "template"

_PATTERN = {"plain": "plain", "streaked": "streaked", "spotted": "spotted"}
_BEAK = {"short": "a short, conical beak", "long": "a long, thin beak", "hooked": "a hooked beak"}
_TAIL = {"short": "a short tail", "long": "a long tail"}


def _breast(color: str | None, pattern: str) -> str:
    if color is None:
        return f"a {_PATTERN[pattern]} breast"
    if pattern == "plain":
        return f"a plain {color} breast"
    return f"a {color} breast with dark {'streaks' if pattern == 'streaked' else 'spots'}"


def _phrases(a: dict, with_variant: bool) -> dict[str, str]:
    """Attribute -> noun phrase; the variant-dependent ones only when ``with_variant``."""
    p = {
        "wing_color": f"{a['wing_color']} wings",
        "beak_shape": _BEAK[a["beak_shape"]],
        "tail_size": _TAIL[a["tail_size"]],
    }
    if with_variant:
        p["crown_color"] = f"a {a['crown_color']} crown"
        p["breast"] = _breast(a["breast_color"], a["breast_pattern"])
    else:
        p["breast"] = _breast(None, a["breast_pattern"])
    return p


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _variant_text(name: str, variant: str, a: dict, rng) -> str:
    p = _phrases(a, with_variant=True)
    # At least one variant-dependent phrase, so the text is false of the other variant.
    key = [k for k in ("crown_color", "breast") if rng.random() < 0.7] or [str(rng.choice(["crown_color", "breast"]))]
    rest = [k for k in ("wing_color", "beak_shape", "tail_size") if k not in key]
    extra = list(rng.choice(rest, size=int(rng.integers(1, len(rest) + 1)), replace=False))
    first = [p[k] for k in rng.permutation(key + extra[:1])]
    second = [p[k] for k in extra[1:]]
    text = f"The {variant} {name} has {_join(first)}."
    if second:
        text += str(rng.choice([f" It also has {_join(second)}.", f" Look for {_join(second)}.",
                                f" Note {_join(second)}."]))
    if rng.random() < 0.4:
        text += " Its body is greyish brown."
    return text


def _shared_text(name: str, a: dict, rng) -> str:
    p = _phrases(a, with_variant=False)
    keys = list(rng.choice(["wing_color", "beak_shape", "tail_size", "breast"], size=int(rng.integers(2, 5)), replace=False))
    opener = str(rng.choice([f"The {name} has", f"Both sexes of the {name} have", f"Adults of the {name} have"]))
    return f"{opener} {_join([p[k] for k in keys])}."


def _species_table(spec) -> pd.DataFrame:
    if hasattr(spec, "extras") and "species_table" in getattr(spec, "extras", {}):
        return spec.extras["species_table"]
    table = spec if isinstance(spec, pd.DataFrame) else pd.DataFrame(list(spec))
    missing = [c for c in ["species", *syn.ATTRIBUTES] if c not in table.columns]
    if missing:
        raise ValueError(f"species spec lacks columns {missing}; pass the synthetic Dataset or its species table")
    return table


def synthetic_descriptions(dataset_or_species_spec, per_variant: int = 3, shared: int = 2, seed: int = 0) -> list[dict]:
    """Description records (``descriptions.jsonl`` contract) for every species of the synthetic benchmark.

    ``per_variant`` texts per species and variant (``variant`` set: true of that variant only) and
    ``shared`` texts per species true of both (``variant=None``). Deterministic in ``seed`` except
    for ``time``; ``id`` depends only on class, variant and text.
    """
    if per_variant < 0 or shared < 0 or per_variant + shared == 0:
        raise ValueError(f"need at least one description per species (per_variant={per_variant}, shared={shared})")
    table = _species_table(dataset_or_species_spec)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    params = {"per_variant": per_variant, "shared": shared, "seed": seed}
    out = []
    for i, row in enumerate(table.itertuples(index=False)):
        row = row._asdict()
        name = row["species"]
        rng = np.random.default_rng([seed, 404, i])
        items = []
        for variant in syn.VARIANTS:
            a = syn.variant_attributes(row, variant)
            texts: list[str] = []
            for _ in range(50 * per_variant):  # distinct texts; templates give far more than needed
                if len(texts) == per_variant:
                    break
                t = _variant_text(name, variant, a, rng)
                if t not in texts:
                    texts.append(t)
            items += [(variant, t) for t in texts]
        texts = []
        for _ in range(50 * shared):
            if len(texts) == shared:
                break
            t = _shared_text(name, row, rng)
            if t not in texts:
                texts.append(t)
        items += [(None, t) for t in texts]
        for variant, text in items:
            h = hashlib.sha1(f"{name}\0{variant}\0{text}".encode()).hexdigest()[:12]
            out.append({
                "id": f"tpl-{h}", "class": name, "text": text, "backend": BACKEND, "model": None,
                "prompt_id": PROMPT_ID, "params": dict(params), "time": now, "variant": variant,
            })
    return out
