"""The fine-tuning stage (``03_finetune``): GIST (matched captions), FLYP-style class-name fine-tuning
and the controls that bracket GIST (``oracle``, ``random-own-class``, ``waffle``: caption sources of
:mod:`.sources`), every (method, shots, seed) run, each checkpoint chosen on validation.

Run directory outputs: ``checkpoints/<run>/best.safetensors`` (+ ``resume.safetensors`` to resume),
``checkpoints/index.json``, ``train_log.jsonl``, ``metrics.json["finetune"]``. Multi-GPU:
``torchrun --nproc_per_node N -m workbench.finetune --run-dir DIR [...]`` (see ``__main__``).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from ..clip import image_size, load_clip
from ..clip.device import auto_device
from ..data import Dataset, DrawSpec, draw_seed, load_dataset, parse_shots, train_images_sha256
from ..data.images import image_cache, whole_image_cache
from ..identity import (
    dataset_identity,
    descriptions_sha256,
    digest,
    mismatch,
    texts_sha256,
    weights_identity,
    with_version,
)
from ..params import Params
from ..progress import progress_bar
from ..runs import (
    CHECKPOINTS,
    DESCRIPTIONS,
    MATCHES,
    TRAIN_LOG,
    read_descriptions,
    read_matches,
    read_metrics,
    retire_index,
    run_lock,
    run_name,
    run_warnings,
    update_index,
    update_metrics,
)
from ..runs import FINETUNE_METHODS as METHODS
from . import sources
from .config import FinetuneConfig
from .trainer import rank_world, train_run
from .validate import validate

CLASSNAME_TEMPLATE = "a photo of a {}."


def build_pairs(train, method: str, captions_per_image: int, matches: list[dict] | None = None, *,
                descriptions: list[dict] | None = None, tokenizer=None, seed: int = 0):
    """(image row, text, label) pairs for the training split ``train`` (a Dataset, maybe few-shot).

    GIST: the first ``captions_per_image`` captions of each image's match record, each its own pair.
    Class-name baseline: one "a photo of a <class>." pair per image. The caption sources of
    :data:`sources.SOURCES` (``oracle``, ``random-own-class``, ``waffle``): their ``captions_per_image``
    captions per image (:func:`sources.caption_records`, with ``descriptions``, ``tokenizer``, ``seed``).
    """
    files = train.table["filename"].tolist()
    labels = train.labels
    rows, texts, ys = [], [], []
    if method == "finetune-classname":
        for i, y in enumerate(labels):
            rows.append(i), texts.append(CLASSNAME_TEMPLATE.format(train.classnames[y])), ys.append(int(y))
        return torch.tensor(rows), texts, torch.tensor(ys)
    if method in sources.SOURCES:
        if tokenizer is None:
            raise ValueError(f"method {method!r} needs the model's tokenizer (its captions fit the text context)")
        matches, _ = sources.caption_records(method, train, captions_per_image, seed, tokenizer, matches, descriptions)
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


def plan_runs(methods, shots, seeds, spec: DrawSpec | None = None) -> list[tuple[str, str | int, int]]:
    """(method, shots, seed) of every run, in training order; a draw that no seed changes ("full", a shot
    file of ``spec``) uses the first seed only."""
    shots = parse_shots(shots)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    methods = [methods] if isinstance(methods, str) else list(methods)
    spec = spec or DrawSpec()
    return [(m, k, sd) for m in methods for k in shots for sd in spec.seeds_for(k, seeds)]


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


def _image_caches(model: str, pretrained, train_all: Dataset, val_ds: Dataset, progress: bool):
    """The uint8 caches: the train images whole (training's crops sample all of each image), and centre
    crops of the train images (validation's probe) and of the val images. Under DDP rank 0 goes first: it
    may pretrain or download the weights and decodes the images; the other ranks then read them."""
    rank, world = rank_world()
    for turn in ([0, 1] if world > 1 else [0]):
        if (rank == 0) == (turn == 0):
            size = image_size(load_clip(model, pretrained, "cpu").model)
            show = progress and rank == 0
            train_whole = whole_image_cache(train_all.paths(), size, progress=show)  # stores the centre crops too
            train_centre = image_cache(train_all.paths(), size, progress=show)
            val_cache = image_cache(val_ds.paths(), size, progress=show)
        if world > 1:
            dist.barrier()
    return train_whole, train_centre, val_cache


@dataclass
class Context:
    """What every run of one stage invocation shares: the data, its draws, the weights, the caches."""

    run_dir: Path
    ds: Dataset
    spec: DrawSpec
    caches: tuple
    matches: list[dict] | None
    descriptions: list[dict] | None  # the run's descriptions.jsonl, for the caption sources that draw from it
    model: str
    pretrained: str | None
    device: torch.device
    resume: bool
    progress: bool
    train_options: dict
    identity: dict  # of the weights and the dataset, shared by every run
    oracle_attributes: list | None = None  # what the oracle's captions name (sources.oracle_attributes)


def run_identity(ctx: Context, cfg: FinetuneConfig, k, seed: int, sub: Dataset, texts: list[str],
                 caption_source: dict | None = None) -> dict:
    """Everything a (method, shots, seed) run's checkpoint depends on (``workbench.identity``). The
    control methods add ``caption_source``: the inputs their captions are written from
    (:func:`sources.caption_records`); GIST's and FLYP's identities are as they were."""
    val_names = sorted(sub.table.loc[sub.table["split"] == "val", "filename"].astype(str))
    return with_version({
        **ctx.identity, **ctx.spec.identity(ctx.ds, k), "method": cfg.method, "shots": k, "seed": seed,
        "train_images": int((sub.table["split"] == "train").sum()), "train_images_sha256": train_images_sha256(sub),
        "val_images_sha256": texts_sha256(val_names), "captions_sha256": texts_sha256(texts),
        "settings": cfg.settings(), **({"caption_source": caption_source} if caption_source else {}),
    })


def _train_one(ctx: Context, method: str, k, seed: int) -> dict:
    """One (method, shots, seed) run: its draw and pairs, fresh weights, :func:`train_run`; returns its
    summary with its identity."""
    train_whole, train_cache, val_cache = ctx.caches
    ds, name = ctx.ds, run_name(method, k, seed)
    cfg = FinetuneConfig(method=method, seed=draw_seed(ctx.spec.base_seed, seed), **ctx.train_options)
    train_all, val_all = ds.split("train"), ds.split("val")
    drawn = ctx.spec.subset(ds, k, seed)
    sub, val_ds = drawn.split("train"), drawn.split("val")
    train_rows = torch.tensor(_rows(train_all, sub))
    images, whole = train_cache[train_rows], train_whole[train_rows]  # centre crops for the probe, whole to train
    val_images = val_cache if len(val_ds.table) == len(val_all.table) else val_cache[torch.tensor(_rows(val_all, val_ds))]
    torch.manual_seed(cfg.seed)  # random-init models (pretrained=None) depend on it
    bundle = load_clip(ctx.model, ctx.pretrained, "cpu")
    matches, source = ctx.matches, None
    if method in sources.SOURCES:  # the controls' captions, written here (their seed: the run's)
        matches, source = sources.caption_records(method, sub, cfg.captions_per_image, cfg.seed, bundle.tokenizer,
                                                  ctx.matches, ctx.descriptions, ctx.oracle_attributes)
    pair_rows, texts, pair_labels = build_pairs(sub, "gist" if source else method, cfg.captions_per_image, matches)
    identity = run_identity(ctx, cfg, k, seed, drawn, texts, source)
    labels_sub, labels_val = torch.tensor(sub.labels), torch.tensor(val_ds.labels)

    def val_fn(clip):
        return validate(clip, bundle.tokenizer, ds.classnames, images, labels_sub, val_images, labels_val,
                        precision=cfg.precision)

    meta = {"model": ctx.model, "pretrained": ctx.pretrained, "method": method, "shots": k, "seed": seed,
            "identity": digest(identity)}
    r = train_run(bundle.model, bundle.tokenizer, cfg, whole, pair_rows, texts, pair_labels, validate=val_fn,
                  out_dir=ctx.run_dir / CHECKPOINTS / name, log_path=ctx.run_dir / TRAIN_LOG, run=name,
                  device=ctx.device, resume=ctx.resume, progress=ctx.progress, meta=meta, identity=identity)
    r.update(method=method, shots=k, seed=seed, identity=identity)
    return r


def _rows(full: Dataset, part: Dataset) -> list[int]:
    """Positions in ``full.table`` of ``part``'s rows (by filename)."""
    row_of = {f: i for i, f in enumerate(full.table["filename"])}
    return [row_of[f] for f in part.table["filename"]]


def _record(ctx: Context, results: list[dict]) -> None:
    """``metrics.json["finetune"]``: the configuration and one summary per run of this configuration (runs
    of earlier configurations move to ``metrics["stale"]``)."""
    summary = []
    for r in results:
        s = {k: v for k, v in r.items() if k not in ("history", "identity")}
        s["identity"] = digest(r["identity"])
        s["start_val_top1"] = r["history"][0]["val_top1"] if r["history"] else None
        warning = run_warnings(s)
        if warning:  # a collapsed or unmoved run must not pass as a result
            s["warning"] = warning
        summary.append(s)
    config = {k: v for k, v in asdict(FinetuneConfig(**ctx.train_options)).items() if k not in ("method", "seed")}
    update_metrics(ctx.run_dir, "finetune", {
        "model": ctx.model, "pretrained": ctx.pretrained, "device": str(ctx.device), "world_size": rank_world()[1],
        "config": config, "draws": {"shot_files": ctx.spec.shot_files, "val_policy": ctx.spec.val_policy,
                                    "seed": ctx.spec.base_seed},
        "runs": summary,
    })


def _index_row(ctx: Context, r: dict) -> dict:
    ident = r["identity"]
    return {"method": r["method"], "shots": r["shots"], "seed": r["seed"],
            "path": str(Path(r["path"]).relative_to(ctx.run_dir)), "model": ctx.model, "pretrained": ctx.pretrained,
            "epoch": r["best_epoch"], "val_top1": r["val_top1"], "loss": ctx.train_options.get("loss", "clip"),
            "train_images": ident["train_images"], "train_images_sha256": ident["train_images_sha256"],
            "val_policy": ident["val_policy"], "identity_digest": digest(ident), "identity": ident}


def _context(run_dir: Path, dataset, data_root, dataset_options, model, pretrained, spec, device, resume, progress,
             methods, train_options, oracle_attributes="untaught") -> Context:
    """Load and check everything the runs share, before any heavy work."""
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_root, **(dataset_options or {}))
    if "gist" in methods and not (run_dir / MATCHES).exists():
        raise FileNotFoundError(f"{run_dir / MATCHES} not found: method 'gist' trains on matched captions; "
                                "run the match stage first")
    named = sources.oracle_attributes(oracle_attributes, model, pretrained)  # a bad value fails even when unused
    if "oracle" in methods:
        sources.check_oracle(ds)
    if "random-own-class" in methods and not (run_dir / DESCRIPTIONS).exists():
        raise FileNotFoundError(f"{run_dir / DESCRIPTIONS} not found: method 'random-own-class' trains on the "
                                "run's descriptions; run the describe stage first")
    # waffle copies the matched captions' token counts when there are matches, else the descriptions'
    want_matches = "gist" in methods or ("waffle" in methods and (run_dir / MATCHES).exists())
    matches = read_matches(run_dir) if want_matches else None
    if matches is not None:
        check_matches(run_dir)
    want_descriptions = {"random-own-class", "waffle"} & set(methods) and (run_dir / DESCRIPTIONS).exists()
    descriptions = read_descriptions(run_dir) if want_descriptions else None
    identity = {**weights_identity(model, pretrained), **dataset_identity(ds, dataset, data_root, dataset_options)}
    dev = auto_device(device, distributed=rank_world()[1] > 1)
    caches = _image_caches(model, pretrained, ds.split("train"), ds.split("val"), progress)
    return Context(run_dir, ds, spec, caches, matches, descriptions, model, pretrained, dev, resume, progress,
                   train_options, identity, named)


def check_matches(run_dir: Path) -> None:
    """``matches.jsonl`` must have been made from the run's current ``descriptions.jsonl``: descriptions
    regenerated since the match stage ran would otherwise train GIST on captions of the old ones."""
    made = read_metrics(run_dir).get("matching", {}).get("identity") or {}
    if not made.get("descriptions_sha256") or not (run_dir / DESCRIPTIONS).exists():
        return  # imported captions, or matches from before identities were recorded
    now = descriptions_sha256(read_descriptions(run_dir))
    if now != made["descriptions_sha256"]:
        raise mismatch(f"{run_dir / MATCHES}", [("descriptions_sha256", made["descriptions_sha256"], now)],
                       f"{run_dir / DESCRIPTIONS} changed after the match stage ran: rerun the match stage "
                       "(`--stages match,finetune`) so GIST trains on captions of the current descriptions.")


def finetune_all(run_dir: str | Path, dataset="synthetic", data_root: str | None = None,
                 dataset_options: dict | None = None, model: str = "tiny", pretrained: str | None = "synthetic",
                 methods=("gist", "finetune-classname"), shots=("full", 1, 3, 5), seeds=(0, 1, 2),
                 device: str = "auto", resume: bool = True, progress: bool = True, shot_files: dict | None = None,
                 val_policy: str = "full", seed: int = 0, oracle_attributes="untaught", **train_options) -> list[dict]:
    """Train every (method, shots, seed) run and record them in ``run_dir``.

    ``dataset``: a name for :func:`workbench.data.load_dataset` or a Dataset. Few-shot runs train on the
    draws of :class:`workbench.data.DrawSpec` (``shot_files``, ``val_policy``, the base ``seed``), the
    same the evaluate stage probes on, and only their matches; ``"full"`` uses one seed (the first).
    ``oracle_attributes``: what the ``oracle`` control names (:func:`sources.oracle_attributes`; default
    the attributes the starting weights were never taught in words).
    ``train_options`` are :class:`FinetuneConfig` fields. Every run records its identity; a finished or
    interrupted run of another identity is refused, naming what differs. Returns the
    ``checkpoints/index.json`` rows of these runs.
    """
    run_dir = Path(run_dir)
    lead = rank_world()[0] == 0
    with run_lock(run_dir) if lead else nullcontext():  # rank 0 holds the folder for all ranks
        methods = [methods] if isinstance(methods, str) else list(methods)
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        _check(methods, seeds, train_options)
        spec, shots = DrawSpec(shot_files or {}, val_policy, seed), parse_shots(shots)
        plan = plan_runs(methods, shots, seeds, spec)
        ctx = _context(run_dir, dataset, data_root, dataset_options, model, pretrained, spec, device, resume,
                       progress, methods, train_options, oracle_attributes)
        for k in shots:
            if k != "full":
                spec.subset(ctx.ds, k, seeds[0])  # raises early when a class has fewer than k images
        results, index_rows = [], []
        for method, k, sd in progress_bar(plan, desc="runs", unit="run", disable=not (progress and lead)):
            r = _train_one(ctx, method, k, sd)
            results.append(r)
            index_rows.append(_index_row(ctx, r))
            if lead:
                update_index(run_dir, index_rows[-1:])  # after every run: an interrupted stage keeps what finished
        if lead:
            retire_index(run_dir, plan)  # runs of earlier configurations: never probed as this one's
            _record(ctx, results)
        return index_rows


def train_options(p: Params) -> dict:
    """The :class:`FinetuneConfig` settings in a parameter section (all but per-run method and seed)."""
    return {f.name: p[f.name] for f in fields(FinetuneConfig) if f.name in p and f.name not in ("method", "seed")}


def planned_runs(p: Params) -> list[str]:
    """The names of the runs the ``03_finetune`` parameters plan, in training order."""
    return [run_name(*r) for r in plan_runs(p.methods, p.shots, p.seeds, DrawSpec.from_params(p))]


def run(p: Params) -> list[dict]:
    """Train every run the ``03_finetune`` parameters plan; returns their index rows."""
    return finetune_all(p.run_dir, p.dataset, p.data_root, p.dataset_options, p.model, p.pretrained,
                        methods=p.methods, shots=p.shots, seeds=p.seeds, device=p.device, resume=p.resume,
                        progress=p.progress, shot_files=p.shot_files, val_policy=p.val_policy, seed=p.seed,
                        oracle_attributes=p.get("oracle_attributes", "untaught"), **train_options(p))
