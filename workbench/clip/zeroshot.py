"""Zero-shot classification from class names, one way for every stage: each class's prompts are
embedded, L2-normalised and averaged into one class embedding (the CLIP prompt ensemble); an image's
scores are its cosines to them. The templates are a parameter: evaluation's ensemble, fine-tuning's
validation prompts and pretraining's species check each pass their own."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .encode import encode_texts

# A small ensemble that suits fine-grained photos; pass your own (e.g. "a photo of a {}, a type of bird.").
TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a bright photo of a {}.",
    "a blurry photo of a {}.",
    "itap of a {}.",
)


def classname_prompts(classnames: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[str]:
    """All prompts, class-major: ``C x T`` strings flattened."""
    if not templates:
        raise ValueError("templates is empty")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name; these do not: {bad}")
    return [t.format(c) for c in classnames for t in templates]


def classname_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str] = TEMPLATES,
                         batch_size: int = 1024, precision: str = "auto") -> torch.Tensor:
    """``C x D`` unit class embeddings: the mean of each class's normalised prompt embeddings."""
    emb = encode_texts(model, tokenizer, classname_prompts(classnames, templates), batch_size=batch_size,
                       normalize=True, precision=precision)
    return F.normalize(emb.view(len(classnames), len(templates), -1).mean(1), dim=-1)


def classname_scores(image_features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """``N x C`` cosine similarities (features are normalised here; raw features are fine)."""
    return F.normalize(image_features.float(), dim=-1) @ class_embeddings.to(image_features.device).float().T
