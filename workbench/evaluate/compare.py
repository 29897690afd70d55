"""The comparison: zero-shot, frozen-encoder linear probe, and linear probes on fine-tuned encoders
(``checkpoints/index.json``), over shots and seeds, as ``metrics.json["accuracy"]`` rows.

Row: ``{method, shots, seed, top1, top3, ci95, ...}``; accuracies in percent, ``ci95`` the 95%
bootstrap interval of top-1 over the test predictions (``top3_ci95`` likewise). Every row uses the
same bootstrap resamples of the test set (seed ``bootstrap_seed``), so rows are compared on paired
resamples. Conventions:

- ``zero-shot`` uses no training image: one number, repeated under every requested shots value and
  flagged ``zero_shot: true`` (the table prints it as "0-shot").
- Rows without a random draw (zero-shot, full-shot probes, fixed split files) carry the first seed.
- A fine-tuned checkpoint trained on the k-shot draw of seed s is probed on that same draw.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..clip import encode_texts, load_clip
from ..data import Dataset, DrawSpec, parse_shots
from ..identity import table_sha256
from ..progress import progress_bar
from ..runs import FINETUNE_METHODS, INDEX, read_index
from ..stats import bootstrap_ci
from .draws import Draw, dataset_features, make_draw
from .probe import DEFAULT_WEIGHT_DECAYS, ProbeResult, linear_probe, topk_correct
from .zeroshot import (
    TEMPLATES,
    classname_classifier,
    classname_scores,
    description_scores,
    description_texts,
    load_descriptions,
)

# the order of tables and figures: the frozen baselines, then the fine-tuned methods from the least
# informative captions to the most (the controls bracketing GIST: workbench.finetune.sources)
METHODS = ("zero-shot", "linear-probe", "finetune-classname", "waffle", "random-own-class", "gist", "oracle")
FINETUNED = tuple(m for m in METHODS if m in FINETUNE_METHODS)
CONTROLS = ("waffle", "random-own-class", "oracle")  # noted as missing only when the index holds some of them
ZERO_SHOT_NOTE = "0-shot: uses no training images; the same number is listed under every shots value"


def _shots_value(s):
    return "full" if s == "full" else int(s)


def _score_rows(correct1: torch.Tensor, correct3: torch.Tensor, bootstrap_n: int, bootstrap_seed: int,
                test: np.ndarray | None = None) -> dict:
    """Top-1/top-3 with bootstrap intervals; with ``test`` (the test rows' positions in the dataset
    table) the row also keeps its per-image top-1 correctness under ``_test``, for paired comparisons
    (keys starting with "_" stay in memory: they are not written to metrics.json)."""
    c1 = correct1.cpu().numpy()
    bs = bootstrap_ci(np.stack([c1, correct3.cpu().numpy()]), bootstrap_n, bootstrap_seed)
    out = {
        "top1": float(bs["mean"][0]), "top3": float(bs["mean"][1]),
        "ci95": [float(x) for x in bs["ci95"][0]], "top3_ci95": [float(x) for x in bs["ci95"][1]],
        "n_test": int(len(correct1)),
    }
    if test is not None:
        out["_test"] = {"rows": np.asarray(test), "correct": c1.astype(bool)}
    return out


def probe_draw(
    features: torch.Tensor, labels, draw: Draw, num_classes: int, *, weight_decays=DEFAULT_WEIGHT_DECAYS,
    use_trainval: bool = False, device="auto", bootstrap_n: int = 1000, bootstrap_seed: int = 0,
) -> tuple[dict, ProbeResult]:
    """Fit the probe on one draw, score the test split: ``(metrics, fitted probe)``."""
    y = torch.tensor(np.array(labels), dtype=torch.long)
    X = features.float()
    res = linear_probe(
        X[draw.train], y[draw.train], X[draw.val], y[draw.val], num_classes,
        weight_decays=weight_decays, use_trainval=use_trainval, device=device,
    )
    logits = res.logits(X[draw.test])
    yt = y[draw.test].to(logits.device)
    m = _score_rows(topk_correct(logits, yt, 1), topk_correct(logits, yt, 3), bootstrap_n, bootstrap_seed, draw.test)
    m.update(n_train=int(len(draw.train)), n_val=int(len(draw.val)), val_policy=draw.val_policy,
             weight_decay=res.weight_decay, val_top1=res.val_top1, fit_on=res.fit_on,
             draw=draw.source, train_images_sha256=draw.train_sha256, sweep=[{"weight_decay": w["weight_decay"], "val_top1": round(w["val_top1"], 3),
                                       "val_loss": round(w["val_loss"], 5)} for w in res.sweep])
    return m, res


def probe_rows(
    method: str, features: torch.Tensor, ds: Dataset, shots, seeds, *, spec: DrawSpec | None = None,
    weight_decays=DEFAULT_WEIGHT_DECAYS, use_trainval: bool = False, device="auto", bootstrap_n: int = 1000,
    bootstrap_seed: int = 0, extra: dict | None = None, progress: bool = False,
) -> list[dict]:
    """Linear-probe rows for one encoder's features over ``shots`` x ``seeds``, drawn by ``spec``.

    Full shot and split-file draws are deterministic: one row each (first seed).
    """
    shots, seeds, spec = parse_shots(shots), [int(s) for s in seeds], spec or DrawSpec()
    if not seeds:
        raise ValueError("seeds is empty")
    jobs = [(s, seed) for s in shots for seed in spec.seeds_for(s, seeds)]
    rows = []
    for s, seed in progress_bar(jobs, disable=not progress, desc=f"{method} probes", unit="probe"):
        draw = make_draw(ds, s, seed, spec)
        m, _ = probe_draw(features, ds.labels, draw, ds.num_classes, weight_decays=weight_decays,
                          use_trainval=use_trainval, device=device, bootstrap_n=bootstrap_n, bootstrap_seed=bootstrap_seed)
        rows.append({"method": method, "shots": s, "seed": seed, **m, **(extra or {})})
    return rows


def zero_shot_rows(
    bundle, ds: Dataset, features: torch.Tensor, shots, *, seed: int = 0, templates=TEMPLATES,
    descriptions: str | Path | None = None, description_template: str = "{text}", bootstrap_n: int = 1000,
    bootstrap_seed: int = 0, batch_size: int = 1024,
) -> list[dict]:
    """Zero-shot rows (class-name template ensemble) on the test split, repeated per shots value.

    With ``descriptions`` (a ``descriptions.jsonl``), each row also carries description-based scores:
    ``desc_top1``, ``desc_top3``, ``desc_ci95``.
    """
    shots = parse_shots(shots)
    model, _, tokenizer = bundle
    texts = labels = None
    if descriptions is not None:  # validate before encoding anything
        texts, labels = load_descriptions(descriptions, ds.classnames)
    test = make_draw(ds, "full").test
    feats = features[test].float()
    y = torch.as_tensor(ds.labels[test])
    W = classname_classifier(model, tokenizer, ds.classnames, templates, batch_size=batch_size)
    logits = classname_scores(feats, W)
    m = _score_rows(topk_correct(logits, y, 1), topk_correct(logits, y, 3), bootstrap_n, bootstrap_seed, test)
    m.update(templates=len(templates))
    if texts is not None:
        D = encode_texts(model, tokenizer, description_texts(texts, labels, ds.classnames, description_template),
                         batch_size=batch_size, normalize=True)
        dl = description_scores(feats, D, labels, ds.num_classes)
        d = _score_rows(topk_correct(dl, y, 1), topk_correct(dl, y, 3), bootstrap_n, bootstrap_seed)
        m.update(desc_top1=d["top1"], desc_top3=d["top3"], desc_ci95=d["ci95"], n_descriptions=len(texts))
    extra = {"zero_shot": True, "note": ZERO_SHOT_NOTE, "model": bundle.name, "pretrained": bundle.pretrained}
    return [{"method": "zero-shot", "shots": s, "seed": seed, **m, **extra} for s in shots]


def _chosen(index: list[dict], shots, seeds, spec: DrawSpec) -> dict[tuple, dict]:
    """The index entries this evaluation probes: requested shots, and the seeds it draws for them."""
    chosen: dict[tuple, dict] = {}
    for e in index:  # a later entry for the same run replaces an earlier one
        s = str(e["shots"])
        if s in map(str, shots) and int(e["seed"]) in spec.seeds_for(_shots_value(s), seeds):
            chosen[(e["method"], s, int(e["seed"]))] = e
    return chosen


def check_checkpoint(e: dict, ds: Dataset, draw: Draw, index_path) -> None:
    """Refuse to probe a checkpoint trained on other images than this evaluation's draw, or on another
    dataset: fine-tuning and evaluation must draw by the same rule (``shot_files``, ``seed``, options)."""
    run = f"{e['method']} shots={e['shots']} seed={e['seed']}"
    how = ("Fine-tuning and evaluation must use the same dataset, dataset_options, shot_files and seed: rerun "
           "the fine-tuning stage with this configuration (`--stages finetune,evaluate`).")
    ident = e.get("identity") or {}
    if ident.get("dataset_sha256") and ident["dataset_sha256"] != table_sha256(ds.table):
        raise ValueError(f"{index_path}: checkpoint {run} was trained on another dataset table (dataset "
                         f"{ident.get('dataset')!r}, options {ident.get('dataset_options')}) than this "
                         f"evaluation's. {how}")
    if "train_images_sha256" not in e:
        raise ValueError(f"{index_path}: checkpoint {run} does not record its training images "
                         "(train_images_sha256; written before run identities were recorded). Rerun the "
                         "fine-tuning stage with resume=false to retrain it.")
    if e["train_images_sha256"] != draw.train_sha256:
        raise ValueError(f"{index_path}: checkpoint {run} was trained on other images than this evaluation's draw "
                         f"({e.get('train_images')} images, train_images_sha256 {e['train_images_sha256'][:12]}...; "
                         f"the draw: {len(draw.train)} images, {draw.train_sha256[:12]}..., from {draw.source}). {how}")


def load_checkpoint(entry: dict, device="auto"):
    """The CLIP of one ``checkpoints/index.json`` entry (as :func:`workbench.runs.read_index` returns it):
    its architecture with the fine-tuned weights, as the probes encode with it."""
    return load_clip(entry["model"], pretrained=entry["abspath"], device=device)


def finetuned_rows(
    run_dir: str | Path, ds: Dataset, shots, *, seeds=(0,), index: list[dict] | None = None,
    spec: DrawSpec | None = None, weight_decays=DEFAULT_WEIGHT_DECAYS, use_trainval: bool = False, device="auto",
    bootstrap_n: int = 1000, bootstrap_seed: int = 0, batch_size: int | None = None, progress: bool = False,
) -> tuple[list[dict], list[str]]:
    """Probe every fine-tuned checkpoint of the index whose shots and seed are requested: ``(rows, notes)``.

    Each checkpoint (method, shots, seed) is probed on the draw of its own seed, which must be the draw it
    was trained on (:func:`check_checkpoint`, checked for all before any model loads). ``notes`` name the
    requested (method, shots) pairs that have no checkpoint (for a control of :data:`CONTROLS`, only when
    the index holds one of its runs: most run folders train none).
    """
    shots, spec = parse_shots(shots), spec or DrawSpec()
    index = read_index(run_dir, required=False) if index is None else index
    if index is None:
        return [], [f"no {Path(run_dir) / INDEX}: fine-tuned methods not evaluated"]
    chosen = _chosen(index, shots, [int(s) for s in seeds], spec)
    trained = {e["method"] for e in index}
    notes = [f"no checkpoint for {m} at shots={s}" for m in FINETUNED for s in shots
             if (m not in CONTROLS or m in trained) and not any(k[0] == m and k[1] == str(s) for k in chosen)]
    jobs = sorted(chosen.items(), key=lambda kv: (FINETUNED.index(kv[0][0]), kv[0][1], kv[0][2]))
    draws = {key: make_draw(ds, _shots_value(key[1]), key[2], spec) for key, _ in jobs}
    for key, e in jobs:
        check_checkpoint(e, ds, draws[key], Path(run_dir) / INDEX)
    rows = []
    for (method, s, seed), e in progress_bar(jobs, disable=not progress, desc="fine-tuned encoders", unit="ckpt"):
        bundle = load_checkpoint(e, device=device)
        feats = dataset_features(bundle, ds, batch_size=batch_size, progress=progress)
        del bundle
        m, _ = probe_draw(feats, ds.labels, draws[(method, s, seed)], ds.num_classes, weight_decays=weight_decays,
                          use_trainval=use_trainval, device=device, bootstrap_n=bootstrap_n, bootstrap_seed=bootstrap_seed)
        rows.append({"method": method, "shots": _shots_value(s), "seed": seed, **m, "model": e["model"],
                     "checkpoint": e["path"], "checkpoint_val_top1": e.get("val_top1"),
                     "checkpoint_epoch": e.get("epoch"), "checkpoint_identity": e.get("identity_digest")})
    return rows, notes
