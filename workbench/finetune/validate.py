"""Validation during fine-tuning (picks the checkpoint): zero-shot with class-name prompts and a quick
closed-form ridge probe, on the validation split only, never the test split."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..clip import encode_images
from ..clip.zeroshot import classname_classifier

ZEROSHOT_TEMPLATES = ("a photo of a {}.", "{}.")  # validation's prompts for the one zero-shot classifier


def _ridge_probe_top1(xtr, ytr, xva, yva, lams=(1e-3, 1e-2, 1e-1, 1.0)) -> float:
    """Quick closed-form probe for checkpoint selection: ridge regression onto one-hot labels,
    best ridge on val, top-1 in percent. (The full L-BFGS probe with proper sweeps is the evaluate
    stage's job.)"""
    xtr, xva = xtr.double(), xva.double()
    mu = xtr.mean(0)
    xtr, xva = xtr - mu, xva - mu
    k = int(max(ytr.max(), yva.max())) + 1
    y = F.one_hot(ytr, k).double()
    gram, xty = xtr.T @ xtr, xtr.T @ y
    scale = gram.diagonal().mean()
    best = 0.0
    for lam in lams:
        w = torch.linalg.solve(gram + lam * scale * torch.eye(len(gram), dtype=gram.dtype), xty)
        best = max(best, 100 * float(((xva @ w).argmax(1) == yva).double().mean()))
    return best


@torch.no_grad()
def validate(clip, tokenizer, classnames, train_images, train_labels, val_images, val_labels, batch_size=256,
             precision: str = "auto") -> dict:
    """Zero-shot (class-name prompts) and quick-probe top-1 on the validation split, in percent
    (as every accuracy in metrics.json), encoded at the run's ``precision`` (fp32 runs validate in fp32)."""
    was_training = clip.training
    fva = encode_images(clip, val_images, batch_size, precision=precision)
    cls = classname_classifier(clip, tokenizer, classnames, ZEROSHOT_TEMPLATES, batch_size, precision=precision)
    zs = 100 * float(((fva @ cls.T).argmax(1) == val_labels).float().mean())
    ftr = encode_images(clip, train_images, batch_size, precision=precision)
    probe = _ridge_probe_top1(ftr, train_labels, fva, val_labels)
    clip.train(was_training)
    return {"val_top1": probe, "val_probe_top1": probe, "val_zeroshot_top1": zs}
