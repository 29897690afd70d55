"""Pretraining captions: one attribute of a bird in words ("a bird with a red crown."), never a species
name, each paired with a hard negative that names another value of the same attribute ("a bird with a
blue crown."), and the truth table saying which images each caption is true of.

Why one attribute per caption, with a negative: a caption naming several attributes is matched by its
easiest one (a colour), so the shape words in it get no signal; the negative makes the value word the
only thing that tells the two captions apart. Shape attributes are named more often (weights below):
with six equal tasks the colour gradients dominate and the tail stays on a plateau for thousands of steps.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data import synthetic as syn

# How each attribute is phrased in captions and zero-shot prompts.
_PHRASE = {
    "crown_color": "a {} crown",
    "wing_color": "{} wings",
    "breast_color": "a {} breast",
    "breast_pattern": "a {} breast",
    "beak_shape": "a {} beak",
    "tail_size": "a {} tail",
}
_OPENERS = ["a bird with {}.", "a photo of a bird with {}.", "a small bird with {}.", "this bird has {}."]
# How often each attribute (syn.ATTRIBUTES order) is the one a caption names.
WEIGHTS = {"crown_color": 1, "wing_color": 1, "breast_color": 1, "breast_pattern": 2, "beak_shape": 2, "tail_size": 3}


def _phrase(attr: str, value: str) -> str:
    return _PHRASE[attr].format(value)


def training_captions(attrs: dict, rng: np.random.Generator, k: int, weights: dict | None = None) -> list[tuple[str, dict]]:
    """``2k`` captions for an image with attributes ``attrs``: ``k`` naming one attribute each (drawn by
    ``weights``), each followed by its hard negative. Each comes with what it describes: ``{attribute: value}``."""
    w = np.array([(weights or WEIGHTS)[a] for a in syn.ATTRIBUTES], dtype=float)
    out = []
    for _ in range(k):
        a = str(rng.choice(syn.ATTRIBUTES, p=w / w.sum()))
        opener = str(rng.choice(_OPENERS))
        other = str(rng.choice([v for v in syn.ATTRIBUTE_VALUES[a] if v != attrs[a]]))
        out += [(opener.format(_phrase(a, attrs[a])), {a: attrs[a]}), (opener.format(_phrase(a, other)), {a: other})]
    return out


def bird_phrases(attrs: dict, only=None) -> list[str]:
    """The attributes ``only`` (default every one) of ``attrs`` in the captions' words, :data:`syn.ATTRIBUTES`
    order, breast pattern and colour in one phrase when both are named (``["a red crown", "blue wings",
    "a streaked yellow breast", "a short beak", ...]``); a pattern named alone is "a streaked breast"."""
    only = set(syn.ATTRIBUTES if only is None else only)
    out = []
    for a in syn.ATTRIBUTES:
        if a not in only or (a == "breast_pattern" and "breast_color" in only):
            continue
        value = f"{attrs['breast_pattern']} {attrs[a]}" if a == "breast_color" and "breast_pattern" in only else attrs[a]
        out.append(_phrase(a, value))
    return out


def bird_caption(attrs: dict, rng: np.random.Generator, only=None) -> str:
    """One sentence naming the attributes ``only`` (default every one) of ``attrs`` (:func:`bird_phrases` in
    a random order, a random opener of the pretraining captions): "this bird has blue wings, a long tail,
    ... and a red crown."."""
    parts = bird_phrases(attrs, only)
    parts = [parts[i] for i in rng.permutation(len(parts))]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return str(rng.choice(_OPENERS)).format(body)


def caption_vocabulary() -> set[str]:
    """Every word the pretraining captions can contain."""
    words = set()
    for o in _OPENERS:
        words |= set(o.replace("{}", " ").replace(".", " ").split())
    for a, vals in syn.ATTRIBUTE_VALUES.items():
        for v in vals:
            words |= set(_phrase(a, v).split())
    return words


def attribute_prompts(attr: str) -> list[str]:
    """Zero-shot prompts for one attribute, one per value (``ATTRIBUTE_VALUES[attr]`` order)."""
    return [f"a bird with {_phrase(attr, v)}." for v in syn.ATTRIBUTE_VALUES[attr]]


def truth_table(codes: np.ndarray, described: list[dict]) -> torch.Tensor:
    """``pos[i, j]``: caption ``j``, which describes ``described[j]`` (``{attribute: value}``), is true of
    image ``i``; ``codes`` holds each image's attribute value indices (``N x len(ATTRIBUTES)``)."""
    pos = np.ones((len(codes), len(described)), bool)
    for j, d in enumerate(described):
        for a, v in d.items():
            pos[:, j] &= codes[:, syn.ATTRIBUTES.index(a)] == syn.ATTRIBUTE_VALUES[a].index(v)
    return torch.from_numpy(pos)
