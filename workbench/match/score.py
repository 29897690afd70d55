"""Label-preserving image-description matching: every training image keeps the top-k descriptions
of its OWN class (never another class's text), scored by CLIP cosine similarity.

GIST's reference loops one image at a time (PIL preprocess, batch-1 encode). Here all images are
decoded once into a uint8 cache, encoded in large batches, and their features cached on disk keyed by
model weights + files + preprocessing (:mod:`workbench.clip.features`), so a warm re-run encodes
nothing. Scoring is one matmul per class (in float64, so ranks do not depend on matmul blocking);
ties go to the earlier description.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..clip import image_features, image_size, model_device, text_features
from ..data.images import BadImagesError, check_images
from ..io import write_jsonl
from ..runs import check_descriptions, read_descriptions, write_matches
from .captions import check_summarize, summarize_texts

TEMPERATURE = 100.0  # GIST: softmax(100 * cos) over the class's descriptions


@torch.no_grad()
def topk_within_class(img_feats: torch.Tensor, img_labels, txt_feats: torch.Tensor, txt_labels, k: int = 5,
                      temperature: float = TEMPERATURE, device: str | torch.device | None = None,
                      center: bool = False):
    """For each image, the ``k`` best descriptions among those with the image's own label.

    Returns ``(indices, scores, probs)``, each ``N x k``: global description indices (-1 where a class
    has fewer than ``k``), cosine scores, and softmax(temperature * cos) over the class's descriptions.
    One float64 matmul per class; ties go to the lower description index (stable sort).

    ``center=True`` ranks by cosine minus the description's mean cosine over the class's images: a
    description that scores high on every image (a "hub") no longer wins everywhere, so the pick says
    what is specific to this image. Scores and probs stay the raw ones (GIST ranks raw: False).
    """
    device = torch.device(device) if device is not None else img_feats.device
    img_labels = torch.as_tensor(np.asarray(img_labels), dtype=torch.long)
    txt_labels = torch.as_tensor(np.asarray(txt_labels), dtype=torch.long)
    n = len(img_feats)
    indices = torch.full((n, k), -1, dtype=torch.long)
    scores = torch.full((n, k), float("nan"), dtype=torch.float64)
    probs = torch.full((n, k), float("nan"), dtype=torch.float64)
    F_ = img_feats.to(device, torch.float64)
    T_ = txt_feats.to(device, torch.float64)
    for c in torch.unique(img_labels).tolist():
        rows = torch.nonzero(img_labels == c).squeeze(1)
        cols = torch.nonzero(txt_labels == c).squeeze(1)
        if len(cols) == 0:
            raise ValueError(f"label {c} has images but no descriptions")
        s = F_[rows.to(device)] @ T_[cols.to(device)].T  # n_c x d_c cosines
        p = torch.softmax(temperature * s, dim=1)
        kk = min(k, len(cols))
        rank = s - s.mean(0, keepdim=True) if center else s
        order = torch.sort(rank, dim=1, descending=True, stable=True).indices[:, :kk]
        indices[rows, :kk] = cols[order.cpu()]
        scores[rows, :kk] = torch.gather(s, 1, order).cpu()
        probs[rows, :kk] = torch.gather(p, 1, order).cpu()
    return indices, scores, probs


# ----------------------------------------------------------------------------------------------
# the stage


@dataclass
class MatchResult:
    records: list[dict]  # matches.jsonl rows, in dataset-table order (bad images dropped)
    descriptions: list[dict]  # description records, index = global description index
    indices: torch.Tensor  # N x k global description indices (-1 pad)
    scores: torch.Tensor  # N x k cosine
    probs: torch.Tensor  # N x k softmax(100 cos) over the class's descriptions
    table: object  # the dataset rows that were matched (pandas DataFrame)
    root: Path
    bad_images: list[dict] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    summaries: dict = field(default_factory=dict)  # extractive/LLM summaries: how many fell back, and why


def match_dataset(ds, descriptions, bundle, k: int = 5, batch_size: int | None = None, summarize=None,
                  summarize_options: dict | None = None, split: str | None = "train", center: bool = False,
                  skip_bad_images: bool = False, run_dir: str | Path | None = None, progress: bool = False,
                  use_cache: bool = True) -> MatchResult:
    """Match every image of ``ds`` (its ``split``; None = all rows) to its own class's descriptions.

    ``descriptions``: records, a ``descriptions.jsonl`` path or a run directory. With ``run_dir``,
    writes ``matches.jsonl`` (and ``bad_images.jsonl`` when images were skipped). Bad inputs raise
    before any embedding: unknown / description-less classes (ValueError), unreadable images
    (:class:`BadImagesError`, unless ``skip_bad_images``). ``center``: see :func:`topk_within_class`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    check_summarize(summarize, summarize_options)
    t0 = time.perf_counter()
    part = ds.split(split) if split else ds
    table = part.table
    if len(table) == 0:
        raise ValueError(f"dataset {ds.name!r} has no {split!r} images to match")
    descs = read_descriptions(descriptions) if isinstance(descriptions, (str, Path)) else list(descriptions)
    needed = list(dict.fromkeys(table["species"]))
    check_descriptions(descs, ds.classnames, needed)  # raises, listing every problem

    paths = [str(part.root / f) for f in table["filename"]]
    bad = check_images(paths, image_size(bundle.model), keep_partial=skip_bad_images)
    bad_records = []
    if bad:
        if not skip_bad_images:
            raise BadImagesError(bad)
        reason = dict(bad)
        keep = [p not in reason for p in paths]
        bad_records = [{"image": f, "path": p, "reason": reason[p]} for f, p in zip(table["filename"], paths) if p in reason]
        table = table[keep].reset_index(drop=True)
        paths = [p for p, kp in zip(paths, keep) if kp]
        if run_dir is not None:
            write_jsonl(Path(run_dir) / "bad_images.jsonl", bad_records)
        if len(table) == 0:
            raise ValueError("every image is unreadable; nothing to match")
    elif run_dir is not None:
        (Path(run_dir) / "bad_images.jsonl").unlink(missing_ok=True)  # stale list from an earlier run
    t_check = time.perf_counter()

    cls_index = {c: i for i, c in enumerate(ds.classnames)}
    txt_labels = np.array([cls_index[r["class"]] for r in descs])
    img_labels = np.array([cls_index[c] for c in table["species"]])
    tf = text_features(bundle, [r["text"] for r in descs], progress=progress, use_cache=use_cache)
    t_text = time.perf_counter()
    imf = image_features(bundle, paths, batch_size=batch_size, normalize=True, progress=progress, use_cache=use_cache)
    t_img = time.perf_counter()
    dev = model_device(bundle.model)
    indices, scores, probs = topk_within_class(imf, img_labels, tf, txt_labels, k=k, device=dev, center=center)
    t_match = time.perf_counter()

    used = sorted(set(indices[indices >= 0].tolist()))  # summarize each matched description once
    summaries: dict = {}
    caps = summarize_texts([descs[j]["class"] for j in used], [descs[j]["text"] for j in used], summarize,
                           bundle.tokenizer, options=summarize_options, progress=progress, stats=summaries)
    caption_of = dict(zip(used, caps))
    t_sum = time.perf_counter()

    records = []
    idx_l, sc_l, pr_l = indices.tolist(), scores.tolist(), probs.tolist()
    for i, row in enumerate(table.itertuples(index=False)):
        js = [j for j in idx_l[i] if j >= 0]
        records.append({
            "image": row.filename, "label": int(row.label), "class": row.species,
            "description_ids": [descs[j]["id"] for j in js],
            "descriptions": [descs[j]["text"] for j in js],
            "captions": [caption_of[j] for j in js],
            "scores": sc_l[i][: len(js)], "probs": pr_l[i][: len(js)],
            "model": bundle.name, "pretrained": bundle.pretrained,
        })
    timing = {"check_s": t_check - t0, "text_s": t_text - t_check, "images_s": t_img - t_text,
              "match_s": t_match - t_img, "summarize_s": t_sum - t_match, "n_images": len(records)}
    if run_dir is not None:
        write_matches(run_dir, records)
    return MatchResult(records, descs, indices, scores, probs, table, Path(part.root), bad_records, timing, summaries)


