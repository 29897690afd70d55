"""Pretraining captions: generic attribute phrases ("a bird with a red crown and blue wings") that never
name a species, and the truth table saying which images each caption is true of."""
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

def _phrase(attr: str, value: str) -> str:
    return _PHRASE[attr].format(value)


def attribute_caption(attrs: dict, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A caption naming a random subset (1–4) of the image's attributes, and which ones."""
    k = int(rng.integers(1, 5))
    keys = [str(a) for a in rng.choice(syn.ATTRIBUTES, size=k, replace=False)]
    parts = []
    for a in keys:
        if a == "breast_color" and "breast_pattern" in keys:  # one phrase: "a streaked yellow breast"
            continue
        if a == "breast_pattern" and "breast_color" in keys:
            parts.append(f"a {attrs['breast_pattern']} {attrs['breast_color']} breast")
        else:
            parts.append(_phrase(a, attrs[a]))
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return str(rng.choice(_OPENERS)).format(text), keys


def caption_vocabulary() -> set[str]:
    """Every word the pretraining captions can contain."""
    words = set()
    for o in _OPENERS:
        words |= set(o.replace("{}", " ").replace(".", " ").split())
    for a, vals in syn.ATTRIBUTE_VALUES.items():
        for v in vals:
            words |= set(_phrase(a, v).split())
    return words | {"and"}


def attribute_prompts(attr: str) -> list[str]:
    """Zero-shot prompts for one attribute, one per value (``ATTRIBUTE_VALUES[attr]`` order)."""
    return [f"a bird with {_phrase(attr, v)}." for v in syn.ATTRIBUTE_VALUES[attr]]


def truth_table(codes: np.ndarray, owner: np.ndarray, keys: list[list[str]]) -> torch.Tensor:
    """``pos[i, j]``: caption ``j`` (naming the attributes ``keys[j]`` of image ``owner[j]``) is true of
    image ``i``; ``codes`` holds each image's attribute value indices (``N x len(ATTRIBUTES)``)."""
    pos = np.zeros((len(codes), len(keys)), bool)
    for j, names in enumerate(keys):
        cols = [syn.ATTRIBUTES.index(k) for k in names]
        pos[:, j] = (codes[:, cols] == codes[owner[j], cols]).all(1)
    return torch.from_numpy(pos)
