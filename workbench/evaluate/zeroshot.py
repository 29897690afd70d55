"""Zero-shot classification: class-name prompt ensembles (:mod:`workbench.clip.zeroshot`, the one
classifier every stage uses), and scoring by descriptions.

Descriptions: a class's score is the
mean of the image's cosine similarities to that class's descriptions, as in classification by
description (Menon & Vondrick, 2022); descriptions come from ``descriptions.jsonl``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..clip.zeroshot import TEMPLATES, classname_classifier, classname_prompts, classname_scores
from ..runs import check_descriptions, read_descriptions

__all__ = ["TEMPLATES", "classname_classifier", "classname_prompts", "classname_scores", "description_scores",
           "description_texts", "load_descriptions"]

def load_descriptions(path: str | Path, classnames: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """``descriptions.jsonl`` as ``(texts, class indices)``, checked against the dataset: every class
    needs a description (a class without one cannot be scored)."""
    records = read_descriptions(path)
    check_descriptions(records, classnames, needed=classnames)
    index = {c: i for i, c in enumerate(classnames)}
    return [r["text"] for r in records], torch.tensor([index[r["class"]] for r in records])


def description_texts(texts: Sequence[str], labels, classnames: Sequence[str], template: str = "{text}") -> list[str]:
    """Format each description; ``template`` may use ``{text}`` and ``{classname}``."""
    return [template.format(text=t, classname=classnames[int(c)]) for t, c in zip(texts, labels)]


def description_scores(
    image_features: torch.Tensor, description_features: torch.Tensor, description_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``N x C``: for each class, the mean cosine similarity of the image to that class's descriptions.

    One matmul for all pairs, then one more with the ``M x C`` averaging matrix
    (``A[m, c] = 1 / n_c`` when description ``m`` belongs to class ``c``).
    """
    labels = torch.as_tensor(description_labels, device=image_features.device).long()
    if len(labels) != len(description_features):
        raise ValueError(f"{len(description_features)} description features but {len(labels)} labels")
    counts = torch.bincount(labels, minlength=num_classes).float()
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes with no descriptions cannot be scored: indices {missing[:10]}")
    A = F.one_hot(labels, num_classes).float() / counts
    sims = F.normalize(image_features.float(), dim=-1) @ F.normalize(description_features.float(), dim=-1).to(image_features.device).T
    return sims @ A
