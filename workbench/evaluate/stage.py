"""The evaluate stage (``04_evaluate``): its parameter section in, ``metrics.json["accuracy"]`` and the
accuracy figures out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..clip import load_clip
from ..data import Dataset, DrawSpec, load_dataset, parse_shots
from ..identity import dataset_identity, descriptions_sha256, digest, weights_identity, with_version
from ..params import Params
from ..runs import (
    DESCRIPTIONS,
    locked,
    read_descriptions,
    read_index,
    read_metrics,
    run_name,
    run_warnings,
    update_metrics,
    write_outcomes,
)
from .compare import finetuned_rows, probe_rows, zero_shot_rows
from .draws import check_draws, dataset_features
from .paired import comparisons
from .plots import plot_accuracy, plot_comparisons, plot_sweep
from .zeroshot import TEMPLATES


@dataclass
class Setup:
    """What the stage evaluates, checked before any model loads."""

    ds: Dataset
    shots: list
    seeds: list[int]
    templates: list[str]
    descriptions: Path | None  # the run's descriptions.jsonl, when zero-shot is also scored by descriptions
    index: list[dict] | None  # checkpoints/index.json (None: fine-tuning has not run here)
    spec: DrawSpec  # how k-shot sets are drawn: the rule fine-tuning drew by


def prepare(p: Params) -> Setup:
    """Parse and check everything first: a k larger than a class has, bad split files or a broken
    checkpoint index fail before any model loads."""
    shots, seeds, spec = parse_shots(p.shots), [int(s) for s in p.seeds], DrawSpec.from_params(p)
    if p.use_trainval and any(k != "full" for k in shots):
        raise ValueError("use_trainval=True refits each probe on train + val, so a k-shot probe would train on the "
                         "validation images as well (more than k labelled images per class): set use_trainval=false, "
                         f"or evaluate full shot only (shots=[full]); shots are {shots}")
    ds = load_dataset(p.dataset, p.data_root, **p.dataset_options)
    check_draws(ds, shots, seeds, spec)
    descriptions = Path(p.run_dir) / DESCRIPTIONS
    descriptions = descriptions if p.use_descriptions and descriptions.exists() else None
    templates = list(p.templates) if p.templates else list(TEMPLATES)
    return Setup(ds, shots, seeds, templates, descriptions, read_index(p.run_dir, required=False), spec)


def frozen_rows(p: Params, s: Setup) -> list[dict]:
    """Zero-shot (class names, and descriptions when there are some) and linear probes on the frozen CLIP."""
    bundle = load_clip(p.model, pretrained=p.pretrained, device=p.device)
    features = dataset_features(bundle, s.ds, batch_size=p.batch_size, progress=p.progress)
    rows = zero_shot_rows(bundle, s.ds, features, s.shots, seed=s.seeds[0], templates=s.templates,
                          descriptions=s.descriptions, description_template=p.description_template,
                          bootstrap_n=p.bootstrap_n, bootstrap_seed=p.seed)
    rows += probe_rows("linear-probe", features, s.ds, s.shots, s.seeds, spec=s.spec,
                       weight_decays=p.weight_decays, use_trainval=p.use_trainval, device=p.device,
                       bootstrap_n=p.bootstrap_n, bootstrap_seed=p.seed,
                       extra={"model": bundle.name, "pretrained": bundle.pretrained}, progress=p.progress)
    return stamp(p, s, rows, weights_identity(p.model, p.pretrained))


def stamp(p: Params, s: Setup, rows: list[dict], made_by: dict | str) -> list[dict]:
    """Each row's ``identity``: a digest of the weights (or the checkpoint's identity), the dataset, the
    row's draw and the evaluation settings, so a row is traceable to exactly what produced it."""
    base = with_version({
        **dataset_identity(s.ds, p.dataset, p.data_root, p.dataset_options),
        "shot_files": s.spec.shot_files, "base_seed": s.spec.base_seed, "weight_decays": list(p.weight_decays),
        "use_trainval": p.use_trainval, "bootstrap_n": p.bootstrap_n, "templates": s.templates,
        # their content, not their path: a row made from the same descriptions in another run folder is the same row
        "descriptions": descriptions_sha256(read_descriptions(s.descriptions)) if s.descriptions else None,
    })
    for r in rows:
        weights = r.get("checkpoint_identity") or made_by
        r["identity"] = digest({**base, "weights": weights, "method": r["method"], "shots": r["shots"],
                                "seed": r["seed"], "val_policy": r.get("val_policy"),
                                "train_images_sha256": r.get("train_images_sha256")})
    return rows


def tuned_rows(p: Params, s: Setup) -> tuple[list[dict], list[str]]:
    """Linear probes on every fine-tuned encoder of the index: ``(rows, notes on what is missing)``. A row
    whose run collapsed or kept its starting weights carries the fine-tuning stage's ``warning``."""
    rows, notes = finetuned_rows(p.run_dir, s.ds, s.shots, seeds=s.seeds, index=s.index, spec=s.spec,
                                 weight_decays=p.weight_decays, use_trainval=p.use_trainval, device=p.device,
                                 bootstrap_n=p.bootstrap_n, bootstrap_seed=p.seed, batch_size=p.batch_size,
                                 progress=p.progress)
    summaries = {r["run"]: r for r in read_metrics(p.run_dir).get("finetune", {}).get("runs", [])}
    for r in rows:
        r["run"] = run_name(r["method"], r["shots"], r["seed"])
        summary = summaries.get(r["run"]) or {"run": r["run"], "best_epoch": r.get("checkpoint_epoch"), "steps": 1}
        warning = run_warnings(summary)
        if warning:
            r["warning"] = warning
    return stamp(p, s, rows, {}), notes


@locked
def record(p: Params, rows: list[dict]):
    """Store the rows in ``metrics.json["accuracy"]``, their per-image outcomes in ``test_outcomes.json``
    (for comparisons across runs, `workbench compare`) and the figures; return the figures."""
    update_metrics(p.run_dir, "accuracy", rows)
    ds = load_dataset(p.dataset, p.data_root, **(p.dataset_options or {}))
    write_outcomes(p.run_dir, rows, ds.table["filename"].tolist())
    figures = Path(p.run_dir) / "figures"
    return plot_accuracy(rows, figures / "evaluate_accuracy.png"), plot_sweep(rows, figures / "evaluate_probe_sweep.png")


@locked
def compare(p: Params, rows: list[dict]) -> tuple[list[dict], object]:
    """Paired comparisons of the methods at every shots setting, in ``metrics.json["comparisons"]``;
    returns them and their forest plot (saved)."""
    comps = comparisons(rows, n_boot=max(p.bootstrap_n, 1000), seed=p.seed)
    update_metrics(p.run_dir, "comparisons", comps)
    fig = plot_comparisons(comps, Path(p.run_dir) / "figures" / "evaluate_comparisons.png") if comps else None
    return comps, fig
