"""The fine-tuning stage: GIST (matched captions) and FLYP-style class-name fine-tuning, every
(method, shots, seed) run, checkpoint selection on validation, and the ``torchrun`` entry point.

The loop itself is :mod:`workbench.trainer`. Run directory outputs: ``checkpoints/<run>/best.safetensors``
(+ ``last.pt`` to resume), ``checkpoints/index.json``, ``train_log.jsonl``, ``metrics.json["finetune"]``.
Multi-GPU: ``torchrun --nproc_per_node N -m workbench.finetune --run-dir DIR [...]``.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .io import read_json, read_jsonl, stage_file, update_metrics, write_json
from .plots import save_figure
from .trainer import (  # noqa: F401  (re-exported: the stage's public API)
    METHODS,
    FinetuneConfig,
    NonFiniteLossError,
    Trainer,
    _rank_world,
    compute_loss,
    encode_text,
    lr_at,
    train_run,
)

CLASSNAME_TEMPLATE = "a photo of a {}."
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "{}.")


def run_name(method: str, shots, seed: int) -> str:
    return f"{method}-{shots}-s{seed}"


# ----------------------------------------------------------------------------- data
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


# ----------------------------------------------------------------------------- validation
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
def validate(clip, tokenizer, classnames, train_images, train_labels, val_images, val_labels, batch_size=256) -> dict:
    """Zero-shot (class-name prompts) and quick-probe top-1 on the validation split, in percent
    (as every accuracy in metrics.json)."""
    from .models import encode_images, encode_texts

    was_training = clip.training
    fva = encode_images(clip, val_images, batch_size)
    prompts = [t.format(c) for c in classnames for t in ZEROSHOT_TEMPLATES]
    ft = encode_texts(clip, tokenizer, prompts, batch_size).view(len(classnames), len(ZEROSHOT_TEMPLATES), -1)
    cls = F.normalize(ft.mean(1), dim=-1)
    zs = 100 * float(((fva @ cls.T).argmax(1) == val_labels).float().mean())
    ftr = encode_images(clip, train_images, batch_size)
    probe = _ridge_probe_top1(ftr, train_labels, fva, val_labels)
    clip.train(was_training)
    return {"val_top1": probe, "val_probe_top1": probe, "val_zeroshot_top1": zs}


# ----------------------------------------------------------------------------- a whole stage
def _shots_list(shots):
    out = []
    for s in [shots] if isinstance(shots, (str, int)) else shots:
        if s in ("full", None):
            out.append("full")
        elif str(s).isdigit() and int(s) >= 1:
            out.append(int(s))
        else:
            raise ValueError(f"shots must be 'full' or a positive integer, got {s!r}")
    return out


def plan_runs(methods, shots, seeds) -> list[tuple[str, str | int, int]]:
    """(method, shots, seed) of every run, in training order; "full" runs use the first seed only."""
    shots = _shots_list(shots)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    methods = [methods] if isinstance(methods, str) else list(methods)
    return [(m, k, sd) for m in methods for k in shots for sd in (seeds[:1] if k == "full" else seeds)]


def finetune_all(
    run_dir: str | Path,
    dataset="synthetic",
    data_root: str | None = None,
    dataset_options: dict | None = None,
    model: str = "tiny",
    pretrained: str | None = "synthetic",
    methods=("gist", "finetune-classname"),
    shots=("full", 1, 3, 5),
    seeds=(0, 1, 2),
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
    **train_options,
) -> list[dict]:
    """Train every (method, shots, seed) run and record them in ``run_dir``.

    ``dataset``: a name for :func:`workbench.data.load_dataset` or a Dataset. Few-shot runs keep
    ``workbench.data.few_shot(ds, k, seed)`` training images (and only their matches); ``"full"``
    uses one seed (the first). ``train_options`` are :class:`FinetuneConfig` fields. Writes
    ``checkpoints/<run>/best.safetensors`` (+ ``last.pt``), ``checkpoints/index.json``,
    ``train_log.jsonl`` and ``metrics.json["finetune"]``; returns the index rows of these runs.
    """
    from tqdm.auto import tqdm

    from .data import Dataset, few_shot, load_dataset
    from .data.images import image_cache
    from .models import auto_device, image_size, load_clip

    run_dir = Path(run_dir)
    rank, world = _rank_world()
    lead = rank == 0
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected {list(METHODS)}")
    shots = _shots_list(shots)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    unknown = sorted(set(train_options) - {f.name for f in fields(FinetuneConfig)} | ({"method", "seed"} & set(train_options)))
    if unknown:
        raise ValueError(f"unknown fine-tuning option(s) {unknown}; see FinetuneConfig")
    FinetuneConfig(**train_options)  # validate before any heavy work
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_root, **(dataset_options or {}))
    matches = None
    if "gist" in methods:
        mpath = run_dir / "matches.jsonl"
        if not mpath.exists():
            raise FileNotFoundError(f"{mpath} not found: method 'gist' trains on matched captions; run the match stage first")
        matches = read_jsonl(mpath)
    for k in shots:
        if k != "full":
            few_shot(ds, k, seeds[0])  # raises early when a class has fewer than k images
    if device == "auto" or device is None:
        dev = auto_device("auto")
        if world > 1 and dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        dev = torch.device(device)

    train_all, val_ds = ds.split("train"), ds.split("val")
    # rank 0 first: it may pretrain/download weights and decodes the image cache; the others then read both
    for turn in ([0, 1] if world > 1 else [0]):
        if (rank == 0) == (turn == 0):
            size = image_size(load_clip(model, pretrained, "cpu").model)
            train_cache = image_cache(train_all.paths(), size, progress=progress and lead)
            val_cache = image_cache(val_ds.paths(), size, progress=progress and lead)
        if world > 1:
            dist.barrier()
    row_of = {f: i for i, f in enumerate(train_all.table["filename"])}

    log_path = run_dir / "train_log.jsonl"
    plan = plan_runs(methods, shots, seeds)
    results, index_rows = [], []
    for method, k, seed in tqdm(plan, desc="runs", disable=not (progress and lead)):
        name = run_name(method, k, seed)
        cfg = FinetuneConfig(method=method, seed=seed, **train_options)
        sub = few_shot(ds, k, seed).split("train")
        rows_sub = torch.tensor([row_of[f] for f in sub.table["filename"]])
        images = train_cache[rows_sub]
        pair_rows, texts, pair_labels = build_pairs(sub, method, cfg.captions_per_image, matches)
        torch.manual_seed(seed)  # random-init models (pretrained=None) depend on it
        bundle = load_clip(model, pretrained, "cpu")
        labels_sub, labels_val = torch.tensor(sub.labels), torch.tensor(val_ds.labels)
        tok = bundle.tokenizer

        def val_fn(clip, images=images, labels_sub=labels_sub, labels_val=labels_val, tok=tok):
            return validate(clip, tok, ds.classnames, images, labels_sub, val_cache, labels_val)

        meta = {"model": model, "pretrained": pretrained, "method": method, "shots": k, "seed": seed}
        r = train_run(
            bundle.model, bundle.tokenizer, cfg, images, pair_rows, texts, pair_labels, validate=val_fn,
            out_dir=run_dir / "checkpoints" / name, log_path=log_path, run=name, device=dev,
            resume=resume, progress=progress, meta=meta,
        )
        r.update(method=method, shots=k, seed=seed)
        results.append(r)
        row = {
            "method": method, "shots": k, "seed": seed,
            "path": str(Path(r["path"]).relative_to(run_dir)),
            "model": model, "pretrained": pretrained,
            "epoch": r["best_epoch"], "val_top1": r["val_top1"],
        }
        index_rows.append(row)
        if lead:
            _write_index(run_dir, [row])  # after every run: an interrupted stage keeps what finished
        del bundle
    if lead:
        summary = []
        for r in results:
            s = {k: v for k, v in r.items() if k != "history"}
            s["start_val_top1"] = r["history"][0]["val_top1"] if r["history"] else None
            summary.append(s)
        old = read_json(run_dir / "metrics.json").get("finetune", {}) if (run_dir / "metrics.json").exists() else {}
        names = {s["run"] for s in summary}
        update_metrics(run_dir, "finetune", {
            "model": model, "pretrained": pretrained, "device": str(dev), "world_size": world,
            "config": {k: v for k, v in asdict(FinetuneConfig(**train_options)).items() if k not in ("method", "seed")},
            "runs": [s for s in old.get("runs", []) if s.get("run") not in names] + summary,
        })
    return index_rows


def _write_index(run_dir: Path, rows: list[dict]) -> None:
    """Merge into ``checkpoints/index.json``: rows of the same (method, shots, seed) are replaced."""
    path = run_dir / "checkpoints" / "index.json"
    old = read_json(path) if path.exists() else []
    key = lambda r: (r["method"], str(r["shots"]), r["seed"])  # noqa: E731
    new = {key(r) for r in rows}
    write_json(path, [r for r in old if key(r) not in new] + rows)


def read_index(run_dir: str | Path) -> list[dict]:
    return read_json(stage_file(Path(run_dir) / "checkpoints" / "index.json", "index.json", "fine-tuning stage"))


# ----------------------------------------------------------------------------- figures
def summary_table(run_dir: str | Path):
    """One row per run: the chosen epoch, its validation top-1 and the starting weights' (epoch 0)."""
    import pandas as pd

    index = read_index(run_dir)
    log = read_jsonl(Path(run_dir) / "train_log.jsonl")
    start = {r["run"]: r for r in log if r.get("epoch") == 0 and "val_top1" in r}
    rows = []
    for r in index:
        name = run_name(r["method"], r["shots"], r["seed"])
        s0 = start.get(name, {})
        rows.append({"run": name, "method": r["method"], "shots": str(r["shots"]), "seed": r["seed"],
                     "epoch": r["epoch"], "val_top1": r["val_top1"], "start_val_top1": s0.get("val_top1"),
                     "val_zeroshot_top1": next((x.get("val_zeroshot_top1") for x in log if x["run"] == name
                                                and x.get("epoch") == r["epoch"] and "val_top1" in x), None),
                     "start_val_zeroshot_top1": s0.get("val_zeroshot_top1"), "path": r["path"]})
    df = pd.DataFrame(rows)
    if len(df):
        df["gain"] = df["val_top1"] - df["start_val_top1"]
    return df


def plot_training(run_dir: str | Path, runs: list[str] | None = None, path: str | Path | None = None):
    """Training loss per step and validation top-1 per epoch (0 = before fine-tuning), one line per
    run: colour by method, full-shot runs bold. Saved to ``path`` when given; returns the figure."""
    import matplotlib.pyplot as plt

    rows = read_jsonl(Path(run_dir) / "train_log.jsonl")
    names = runs or list(dict.fromkeys(r["run"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        method = next((m for m in METHODS if name.startswith(m + "-")), None)
        full = "-full-" in name
        style = dict(color=colors.get(method, "k"), lw=1.8 if full else 0.7, alpha=1.0 if full else 0.6)
        tr = [r for r in rows if r["run"] == name and "loss" in r]
        va = [r for r in rows if r["run"] == name and "val_top1" in r]
        if tr:
            ax1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name if full else None, **style)
        if va:
            ax2.plot([r["epoch"] for r in va], [r["val_top1"] for r in va], marker="o", ms=3,
                     label=name if full else None, **style)
    ax1.set(xlabel="step", ylabel="training loss", title="training loss (bold: full-shot)")
    ax2.set(xlabel="epoch (0 = before fine-tuning)", ylabel="val top-1 % (ridge probe)", title="validation")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- torchrun entry point
def main(argv=None):
    """``torchrun --nproc_per_node N -m workbench.finetune --run-dir DIR [...]``: DDP over N processes
    (NCCL on GPUs, gloo on CPU); each batch is split across ranks, features are gathered for the loss."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--dataset-options", default="{}", help="JSON dict")
    p.add_argument("--model", default="tiny")
    p.add_argument("--pretrained", default="synthetic")
    p.add_argument("--methods", default="gist,finetune-classname")
    p.add_argument("--shots", default="full,1,3,5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--options", default="{}", help="JSON dict of FinetuneConfig fields, e.g. '{\"epochs\": 5}'")
    a = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        use_cuda = torch.cuda.is_available() and a.device != "cpu"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rows = finetune_all(
            a.run_dir, a.dataset, a.data_root, json.loads(a.dataset_options), a.model,
            None if a.pretrained in ("", "none", "None") else a.pretrained,
            methods=a.methods.split(","), shots=a.shots.split(","), seeds=[int(s) for s in a.seeds.split(",")],
            device=a.device, resume=not a.no_resume, progress=True, **json.loads(a.options),
        )
        if _rank_world()[0] == 0:
            print(json.dumps(rows, indent=1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
