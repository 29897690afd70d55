"""The pretrain stage (``00_pretrain``): the tiny CLIP the package ships for the synthetic benchmark,
measured (zero-shot figures in ``metrics.json["pretrain"]``, with how it was trained); for any other model
the stage records that it was skipped. ``workbench pretrain`` rebuilds the weights."""
from __future__ import annotations

from pathlib import Path

from ..clip import load_clip, resolve_name
from ..clip.weights import metadata, package_weights
from ..data import Dataset, load_dataset
from ..params import Params
from ..plots import save_figure
from ..runs import locked, update_metrics
from .evaluate import evaluate_pretrained
from .plots import plot_samples
from .recipe import ARCH


def active(p: Params) -> bool:
    """The stage pretrains only the tiny architecture with the ``synthetic`` tag."""
    return resolve_name(p.model) == ARCH and p.pretrained == "synthetic"


def benchmark(p: Params) -> Dataset:
    """The synthetic benchmark the stage shows (the run's dataset when it is the synthetic one)."""
    return load_dataset(p.dataset, p.data_root, **p.dataset_options) if p.dataset == "synthetic" else load_dataset("synthetic")


def samples_figure(p: Params, ds: Dataset):
    fig = plot_samples(ds, n_species=6, per_species=3)
    return save_figure(fig, Path(p.run_dir) / "figures" / "pretrain_samples.png", dpi=150)


@locked
def run(p: Params, ds: Dataset) -> dict | None:
    """Measure the shipped weights; None when the stage is skipped."""
    if not active(p):
        update_metrics(p.run_dir, "pretrain", {"skipped": True, "model": p.model, "pretrained": p.pretrained})
        return None
    bundle = load_clip(p.model, p.pretrained, device=p.device)
    results = evaluate_pretrained(bundle, dataset=ds, n_heldout=p.n_heldout)
    path = package_weights(ARCH, "synthetic")
    meta = metadata(path)
    results["checkpoint"] = str(path)
    results["recipe"] = meta.get("recipe")
    results["training"] = {**(meta.get("training") or {}),
                           **{k: meta.get(k) for k in ("created", "workbench_version", "torch_version")}}
    update_metrics(p.run_dir, "pretrain", results)
    return results
