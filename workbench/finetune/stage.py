"""The fine-tuning stage (``03_finetune``): GIST (matched captions) and FLYP-style class-name
fine-tuning, every (method, shots, seed) run, each checkpoint chosen on validation.

Run directory outputs: ``checkpoints/<run>/best.safetensors`` (+ ``resume.safetensors`` to resume),
``checkpoints/index.json``, ``train_log.jsonl``, ``metrics.json["finetune"]``. Multi-GPU:
``torchrun --nproc_per_node N -m workbench.finetune --run-dir DIR [...]`` (see ``__main__``).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..clip import auto_device, image_size, load_clip
from ..data import Dataset, few_shot, load_dataset, parse_shots
from ..data.images import image_cache
from ..params import Params
from ..runs import FINETUNE_METHODS as METHODS
from ..runs import MATCHES, TRAIN_LOG, read_matches, run_lock, update_index, update_metrics
from .config import FinetuneConfig
from .health import run_warnings
from .plots import run_name
from .trainer import rank_world, train_run
from .validate import validate

CLASSNAME_TEMPLATE = "a photo of a {}."


def build_pairs(train, method: str, captions_per_image: int, matches: list[dict] | None = None):
    """(image row, text, label) pairs for the training split ``train`` (a Dataset, maybe few-shot).

    GIST: the first ``captions_per_image`` captions of each image's match record, each its own pair.
    Class-name baseline: one "a photo of a <class>." pair per image.
    """
    files = train.table["filename"].tolist()
    labels = train.labels
    rows, texts, ys = [], [], []
    if method == "finetune-classname":
        for i, y in enumerate(labels):
            rows.append(i), texts.append(CLASSNAME_TEMPLATE.format(train.classnames[y])), ys.append(int(y))
        return torch.tensor(rows), texts, torch.tensor(ys)
    if matches is None:
        raise ValueError("method 'gist' needs matches.jsonl (run the 02_match stage first)")
    by_file = {m["image"]: m for m in matches}
    missing = [f for f in files if f not in by_file or not by_file[f].get("captions")]
    if missing:
        raise ValueError(
            f"{len(missing)} training image(s) have no matched captions in matches.jsonl, e.g. {missing[:5]}; "
            "re-run the match stage for this dataset"
        )
    for i, (f, y) in enumerate(zip(files, labels)):
        m = by_file[f]
        if m.get("class") is not None and m["class"] != train.classnames[y]:
            raise ValueError(f"matches.jsonl gives class {m['class']!r} for {f}, the dataset says {train.classnames[y]!r}")
        for c in m["captions"][:captions_per_image]:
            rows.append(i), texts.append(c), ys.append(int(y))
    return torch.tensor(rows), texts, torch.tensor(ys)


def plan_runs(methods, shots, seeds) -> list[tuple[str, str | int, int]]:
    """(method, shots, seed) of every run, in training order; "full" runs use the first seed only."""
    shots = parse_shots(shots)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    methods = [methods] if isinstance(methods, str) else list(methods)
    return [(m, k, sd) for m in methods for k in shots for sd in (seeds[:1] if k == "full" else seeds)]


def _check(methods, seeds, train_options) -> None:
    """Everything that can be wrong with the plan, before any heavy work."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected {list(METHODS)}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    names = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(train_options) - names | ({"method", "seed"} & set(train_options)))
    if unknown:
        raise ValueError(f"unknown fine-tuning option(s) {unknown}; see FinetuneConfig")
    FinetuneConfig(**train_options)


def _device(device: str | None, world: int) -> torch.device:
    if device in ("auto", None):
        dev = auto_device("auto")
        if world > 1 and dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return dev
    return torch.device(device)


def _image_caches(model: str, pretrained, train_all: Dataset, val_ds: Dataset, progress: bool):
    """The uint8 caches of the train and val images. Under DDP rank 0 goes first: it may pretrain or
    download the weights and decodes the images; the other ranks then read both."""
    rank, world = rank_world()
    for turn in ([0, 1] if world > 1 else [0]):
        if (rank == 0) == (turn == 0):
            size = image_size(load_clip(model, pretrained, "cpu").model)
            train_cache = image_cache(train_all.paths(), size, progress=progress and rank == 0)
            val_cache = image_cache(val_ds.paths(), size, progress=progress and rank == 0)
        if world > 1:
            dist.barrier()
    return train_cache, val_cache


def _train_one(run_dir: Path, ds: Dataset, method: str, k, seed: int, caches, matches, model, pretrained, dev,
               resume: bool, progress: bool, train_options: dict) -> dict:
    """One (method, shots, seed) run: its pairs, fresh weights, :func:`train_run`; returns its summary."""
    train_cache, val_cache = caches
    name = run_name(method, k, seed)
    cfg = FinetuneConfig(method=method, seed=seed, **train_options)
    train_all, val_ds = ds.split("train"), ds.split("val")
    row_of = {f: i for i, f in enumerate(train_all.table["filename"])}
    sub = few_shot(ds, k, seed).split("train")
    images = train_cache[torch.tensor([row_of[f] for f in sub.table["filename"]])]
    pair_rows, texts, pair_labels = build_pairs(sub, method, cfg.captions_per_image, matches)
    torch.manual_seed(seed)  # random-init models (pretrained=None) depend on it
    bundle = load_clip(model, pretrained, "cpu")
    labels_sub, labels_val = torch.tensor(sub.labels), torch.tensor(val_ds.labels)

    def val_fn(clip):
        return validate(clip, bundle.tokenizer, ds.classnames, images, labels_sub, val_cache, labels_val,
                        precision=cfg.precision)

    meta = {"model": model, "pretrained": pretrained, "method": method, "shots": k, "seed": seed}
    r = train_run(bundle.model, bundle.tokenizer, cfg, images, pair_rows, texts, pair_labels, validate=val_fn,
                  out_dir=run_dir / "checkpoints" / name, log_path=run_dir / TRAIN_LOG, run=name, device=dev,
                  resume=resume, progress=progress, meta=meta)
    r.update(method=method, shots=k, seed=seed)
    return r


def _record(run_dir: Path, results: list[dict], model, pretrained, dev, train_options: dict) -> None:
    """``metrics.json["finetune"]``: the configuration and one summary per run (merged by run name)."""
    summary = []
    for r in results:
        s = {k: v for k, v in r.items() if k != "history"}
        s["start_val_top1"] = r["history"][0]["val_top1"] if r["history"] else None
        warning = run_warnings(s)
        if warning:  # a collapsed or unmoved run must not pass as a result
            s["warning"] = warning
        summary.append(s)
    update_metrics(run_dir, "finetune", {
        "model": model, "pretrained": pretrained, "device": str(dev), "world_size": rank_world()[1],
        "config": {k: v for k, v in asdict(FinetuneConfig(**train_options)).items() if k not in ("method", "seed")},
        "runs": summary,
    })


def finetune_all(run_dir: str | Path, dataset="synthetic", data_root: str | None = None,
                 dataset_options: dict | None = None, model: str = "tiny", pretrained: str | None = "synthetic",
                 methods=("gist", "finetune-classname"), shots=("full", 1, 3, 5), seeds=(0, 1, 2),
                 device: str = "auto", resume: bool = True, progress: bool = True, **train_options) -> list[dict]:
    """Train every (method, shots, seed) run and record them in ``run_dir``.

    ``dataset``: a name for :func:`workbench.data.load_dataset` or a Dataset. Few-shot runs keep
    ``workbench.data.few_shot(ds, k, seed)`` training images (and only their matches); ``"full"``
    uses one seed (the first). ``train_options`` are :class:`FinetuneConfig` fields. Returns the
    ``checkpoints/index.json`` rows of these runs.
    """
    run_dir = Path(run_dir)
    lead = rank_world()[0] == 0
    with run_lock(run_dir) if lead else nullcontext():  # rank 0 holds the folder for all ranks
        methods = [methods] if isinstance(methods, str) else list(methods)
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        _check(methods, seeds, train_options)
        shots = parse_shots(shots)
        ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_root, **(dataset_options or {}))
        if "gist" in methods and not (run_dir / MATCHES).exists():
            raise FileNotFoundError(f"{run_dir / MATCHES} not found: method 'gist' trains on matched captions; "
                                    "run the match stage first")
        matches = read_matches(run_dir) if "gist" in methods else None
        for k in shots:
            if k != "full":
                few_shot(ds, k, seeds[0])  # raises early when a class has fewer than k images
        dev = _device(device, rank_world()[1])
        caches = _image_caches(model, pretrained, ds.split("train"), ds.split("val"), progress)
        results, index_rows = [], []
        for method, k, seed in tqdm(plan_runs(methods, shots, seeds), desc="runs", disable=not (progress and lead)):
            r = _train_one(run_dir, ds, method, k, seed, caches, matches, model, pretrained, dev, resume, progress,
                           train_options)
            results.append(r)
            row = {"method": method, "shots": k, "seed": seed, "path": str(Path(r["path"]).relative_to(run_dir)),
                   "model": model, "pretrained": pretrained, "epoch": r["best_epoch"], "val_top1": r["val_top1"]}
            index_rows.append(row)
            if lead:
                update_index(run_dir, [row])  # after every run: an interrupted stage keeps what finished
        if lead:
            _record(run_dir, results, model, pretrained, dev, train_options)
        return index_rows


def train_options(p: Params) -> dict:
    """The :class:`FinetuneConfig` settings in a parameter section (all but per-run method and seed)."""
    return {f.name: p[f.name] for f in fields(FinetuneConfig) if f.name in p and f.name not in ("method", "seed")}


def run(p: Params) -> list[dict]:
    """Train every run the ``03_finetune`` parameters plan; returns their index rows."""
    return finetune_all(p.run_dir, p.dataset, p.data_root, p.dataset_options, p.model, p.pretrained,
                        methods=p.methods, shots=p.shots, seeds=p.seeds, device=p.device, resume=p.resume,
                        progress=p.progress, **train_options(p))
