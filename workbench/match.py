"""Label-preserving image-description matching: every training image keeps the top-k descriptions
of its OWN class (never another class's text), scored by CLIP cosine similarity.

GIST's reference loops one image at a time (PIL preprocess, batch-1 encode). Here all images are
decoded once into a uint8 cache, encoded in large batches, and their features cached on disk keyed by
model weights + files + preprocessing, so a warm re-run encodes nothing. Scoring is one matmul per
class (in float64, so ranks do not depend on matmul blocking); ties go to the earlier description.
"""
from __future__ import annotations

import difflib
import hashlib
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .cache import cached_tensors, file_fingerprint, hash_key
from .match_captions import (  # noqa: F401  (re-exported: one import for the notebook)
    check_summarize, count_tokens, export_captions_top5, import_captions_top5, summarize_texts, truncate_caption,
)
from .data.images import BadImagesError, decode_checked, image_cache, image_cache_exists
from .io import cache_root, read_json, read_jsonl, stage_file, write_json, write_jsonl
from .models import encode_images, encode_texts, image_size

TEMPERATURE = 100.0  # GIST: softmax(100 * cos) over the class's descriptions


# ----------------------------------------------------------------------------------------------
# descriptions: read and validate against the dataset before any heavy work


def load_descriptions(path_or_records) -> list[dict]:
    """``descriptions.jsonl`` (path or run directory) or a list of records -> list of records."""
    if isinstance(path_or_records, (str, Path)):
        return read_jsonl(stage_file(path_or_records, "descriptions.jsonl", "describe stage (01_describe)"))
    return list(path_or_records)


def group_descriptions(records: Sequence[dict], classnames: Sequence[str], needed: Sequence[str]) -> dict[str, list[int]]:
    """Record indices per class. Raises (listing every offender) on unknown classes, missing or
    duplicate ids, empty texts, and classes in ``needed`` that have no description."""
    known = set(classnames)
    problems = []
    unknown = sorted({r.get("class") for r in records} - known, key=str)
    if unknown:
        hints = []
        for c in unknown:
            close = difflib.get_close_matches(str(c), classnames, n=1)
            hints.append(f"{c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        problems.append(f"descriptions name {len(unknown)} class(es) not in the dataset: " + ", ".join(hints))
    counts = Counter(r.get("id") for r in records)
    dup = sorted((i for i, n in counts.items() if n > 1 or i is None), key=str)
    if dup:
        problems.append(f"missing or duplicate description ids: {dup[:20]}")
    empty = [r.get("id") for r in records if not str(r.get("text") or "").strip()]
    if empty:
        problems.append(f"{len(empty)} description(s) with empty text: {empty[:20]}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.get("class")].append(i)
    missing = [c for c in needed if not groups.get(c)]
    if missing:
        problems.append(f"{len(missing)} class(es) have images but no descriptions: " + ", ".join(map(repr, missing)))
    if problems:
        raise ValueError("cannot match images to descriptions:\n- " + "\n- ".join(problems))
    return dict(groups)


# ----------------------------------------------------------------------------------------------
# features


def weights_digest(model) -> str:
    """Cheap fingerprint of the weights (per-tensor sum and sum of squares): random-init models share
    a ``model_id`` but not their weights, and features must never be reused across them."""
    with torch.no_grad():
        stats = torch.stack([torch.stack([p.float().sum(), p.float().pow(2).sum()]) for p in model.parameters()])
    return hashlib.sha256(stats.cpu().numpy().tobytes()).hexdigest()[:16]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _feature_key(bundle, *parts) -> list:
    model = bundle.model
    dev = _model_device(model)
    # CPU runs fp32, CUDA bf16 autocast: different features, different keys.
    return [bundle.model_id, weights_digest(model), dev.type, *parts]


def encode_uint8(model, images: torch.Tensor, batch_size: int | None = None, progress: bool = False, chunk: int = 2048) -> torch.Tensor:
    """Encode a host uint8 image cache (N x 3 x S x S). On CUDA, chunks are pinned in a background
    thread while the previous chunk encodes, so host-to-device copies hide behind compute; chunks
    are small (2048 images, ~300 MB at 224 px) so the first, unhidden pin is short."""
    from tqdm.auto import tqdm

    device = _model_device(model)
    stage = (lambda t: t.pin_memory()) if device.type == "cuda" else (lambda t: t)
    n = len(images)
    out = []
    bar = tqdm(total=n, disable=not progress, desc="encode images", unit="img")
    with ThreadPoolExecutor(1) as ex:
        nxt = ex.submit(stage, images[0:chunk])
        for s in range(0, n, chunk):
            x = nxt.result()
            if s + chunk < n:
                nxt = ex.submit(stage, images[s + chunk : s + 2 * chunk])
            out.append(encode_images(model, x.to(device, non_blocking=True), batch_size=batch_size))
            bar.update(len(x))
    bar.close()
    return torch.cat(out) if out else encode_images(model, images, batch_size=batch_size)


def image_features(bundle, paths: Sequence[str | Path], batch_size: int | None = None, progress: bool = False,
                   use_cache: bool = True) -> torch.Tensor:
    """L2-normalised features (float32, CPU) of image files, via the uint8 image cache; cached on disk."""
    paths = [str(p) for p in paths]
    model = bundle.model
    size = image_size(model)
    import open_clip

    pre = {k: v for k, v in open_clip.get_model_preprocess_cfg(model).items() if k != "size"}
    key = hash_key("match-image-features-v1", *_feature_key(bundle, size, pre, "shortest-bicubic-centercrop"),
                   file_fingerprint(paths))

    def compute():
        images = image_cache(paths, size, progress=progress)
        return {"features": encode_uint8(model, images, batch_size=batch_size, progress=progress)}

    return cached_tensors("features", key, compute)["features"] if use_cache else compute()["features"]


def text_features(bundle, texts: Sequence[str], batch_size: int = 1024, progress: bool = False,
                  use_cache: bool = True) -> torch.Tensor:
    """L2-normalised text features (float32, CPU); cached on disk keyed by model and texts."""
    texts = list(texts)
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:24]
    key = hash_key("match-text-features-v1", *_feature_key(bundle), digest, len(texts))

    def compute():
        f = encode_texts(bundle.model, bundle.tokenizer, texts, batch_size=batch_size, progress=progress)
        return {"features": f}

    return cached_tensors("features", key, compute)["features"] if use_cache else compute()["features"]


# ----------------------------------------------------------------------------------------------
# scoring


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
    descs = load_descriptions(descriptions)
    needed = list(dict.fromkeys(table["species"]))
    group_descriptions(descs, ds.classnames, needed)  # raises, listing every problem

    paths = [str(part.root / f) for f in table["filename"]]
    bad = _check_images_cached(paths, image_size(bundle.model), keep_partial=skip_bad_images)
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
    imf = image_features(bundle, paths, batch_size=batch_size, progress=progress, use_cache=use_cache)
    t_img = time.perf_counter()
    dev = _model_device(bundle.model)
    indices, scores, probs = topk_within_class(imf, img_labels, tf, txt_labels, k=k, device=dev, center=center)
    t_match = time.perf_counter()

    used = sorted(set(indices[indices >= 0].tolist()))  # summarize each matched description once
    caps = summarize_texts([descs[j]["class"] for j in used], [descs[j]["text"] for j in used], summarize,
                           bundle.tokenizer, options=summarize_options, progress=progress)
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
        write_jsonl(Path(run_dir) / "matches.jsonl", records)
    return MatchResult(records, descs, indices, scores, probs, table, Path(part.root), bad_records, timing)


def _check_images_cached(paths: list[str], size: int, keep_partial: bool = True) -> list[tuple[str, str]]:
    """Unreadable images as ``(path, reason)``; remembered per file fingerprint so a warm re-run decodes
    nothing. The check decodes each file once and keeps the result as the image cache of the readable
    files, so the encoding step that follows decodes nothing either. ``keep_partial=False``: when some
    files are bad, do not store the others' images (the run stops; the files will likely be fixed)."""
    if not all(Path(p).is_file() for p in paths):  # fingerprints need stat(); missing files are rare
        return decode_checked(paths, size)[1]  # names the missing ones; nothing to key a cache on
    key = hash_key("image-check-v1", file_fingerprint(paths))
    path = cache_root() / "image_checks" / f"{key}.json"
    if path.exists():
        return [tuple(x) for x in read_json(path)]
    if image_cache_exists(paths, size):  # decoded before without an error: all readable
        bad = []
    else:
        images, bad = decode_checked(paths, size)
        if keep_partial or not bad:
            reason = dict(bad)
            image_cache([p for p in paths if p not in reason], size, images=images)
    write_json(path, [list(b) for b in bad])
    return bad


def read_matches(run_dir_or_path) -> list[dict]:
    return read_jsonl(stage_file(run_dir_or_path, "matches.jsonl", "match stage (02_match)"))


__all__ = [
    "load_descriptions", "group_descriptions", "truncate_caption", "summarize_texts", "count_tokens",
    "image_features", "text_features", "encode_uint8", "topk_within_class", "match_dataset", "MatchResult",
    "read_matches", "export_captions_top5", "import_captions_top5", "weights_digest",
]
