"""The align stage (``05_align``): its parameter section in; example maps, the pointing game in
``metrics.json["alignment"]`` and ``figures/align_*.png`` out."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..clip import image_size
from ..data import Dataset, load_dataset
from ..data.images import image_cache
from ..params import Params
from ..runs import locked, read_metrics
from . import maps, plots, report
from .pointing import PartItem, baseline_scores, check_methods, part_prior, queries_by_image
from .regions import object_regions, part_items, part_regions, query_variants

PRIOR_IMAGES = 1000  # training images the part-location prior averages (a seeded draw when there are more)


@dataclass
class Setup:
    ds: Dataset
    bundles: dict  # {"pretrained": bundle[, "finetuned": bundle]}
    note: str  # which fine-tuned checkpoint was found, or why none
    items: list[PartItem]  # pointing-game queries
    files: list[str]  # the images they are on (item.index indexes this)
    images: torch.Tensor  # those images, uint8 at the model's input size
    matches: dict[str, list[str]]  # filename -> matched captions of the run
    baselines: dict  # pointing-game scores of the prior and a random bird patch (pointing.baseline_scores)
    finetuned_loss: str | None = None  # the fine-tuned checkpoint's loss (checkpoints/index.json), None without one
    objects: torch.Tensor | None = None  # n_images x S x S bool: where the bird is (object vs background)

    @property
    def parts(self) -> list[str]:
        return list(dict.fromkeys(it.part for it in self.items))

    def row(self, i: int):
        return self.ds.table.set_index("filename").loc[self.files[i]]


def prepare(p: Params) -> Setup:
    """Models (pretrained and, when the run has one, the fine-tuned checkpoint), the annotated images
    and their part queries. Bad methods or parts fail before any model loads."""
    methods = check_methods(p.methods)
    ds = load_dataset(p.dataset, p.data_root, **p.dataset_options)
    bundles, note, row = report.load_models(p.run_dir, p.model, p.pretrained, p.device, p.finetuned_method,
                                       p.get("finetuned_shots", "full"))
    size = image_size(bundles["pretrained"].model)
    items, files = part_items(ds.split(p.split), size, parts=p.parts, max_images=p.max_images, radius=p.radius,
                              template=p.caption_template, seed=p.seed, part_nouns=p.part_nouns)
    images = image_cache([ds.root / f for f in files], size, progress=p.progress)
    p["methods"] = methods
    grid = tuple(bundles["pretrained"].model.visual.grid_size)
    objects = object_regions(ds, size, files, p.radius)
    baselines = baseline_scores(items, grid, training_prior(ds, size, grid, p.radius, p.seed), objects)
    return Setup(ds, bundles, note, items, files, images, report.matched_captions(p.run_dir), baselines,
                 (row or {}).get("loss"), objects)


def training_prior(ds: Dataset, size: int, grid: tuple[int, int], radius=None, seed: int = 0) -> dict | None:
    """:func:`part_prior` over (up to :data:`PRIOR_IMAGES` of) the training split's annotated images;
    None when the training split has no part annotations (the prior is then not reported)."""
    train = ds.split("train")
    if len(train.table) > PRIOR_IMAGES:
        keep = sorted(np.random.default_rng(seed).choice(len(train.table), PRIOR_IMAGES, replace=False))
        train = replace(train, table=train.table.iloc[keep])
    try:
        regions = part_regions(train, size, radius)
    except ValueError:
        return None
    return part_prior(regions, grid) if regions else None


def captions(s: Setup, i: int, with_parts: bool = False) -> list[str]:
    """Captions of image ``i``: its matched captions (or one from its attributes), then, with
    ``with_parts``, its pointing-game captions."""
    row = s.row(i)
    caps = report.captions_for(s.matches, s.files[i], row["species"], row, parts=s.parts,
                               attribute_part=s.ds.extras.get("attribute_part"))
    return caps + (sorted({it.text for it in s.items if it.index == i}) if with_parts else [])


def examples(p: Params, s: Setup) -> list[Path]:
    """The default method's maps of three birds, three part queries each (``figures/align_default.png``),
    then the example figures of the first ``n_examples`` images (saved; paths returned)."""
    paths = [default_view(p, s)] if s.items else []
    for k in range(min(p.n_examples, len(s.files))):
        row = s.row(k)
        figs = report.example_figures(p.run_dir, s.bundles, s.images[k], captions(s, k)[0], row["species"], tag=str(k),
                                      argmax=s.finetuned_loss == "filip")
        paths += list(figs.values())
    return paths


def default_view(p: Params, s: Setup, n_images: int = 3, n_queries: int = 3) -> Path:
    """``figures/align_default.png``: :data:`maps.DEFAULT` on the first ``n_images`` pointing-game images,
    ``n_queries`` part queries each, under the fine-tuned model when there is one."""
    name = "finetuned" if "finetuned" in s.bundles else "pretrained"
    model, _, tok = s.bundles[name]
    rows = []
    for i, ks in list(queries_by_image(s.items).items())[:n_images]:
        its = [s.items[k] for k in ks[:n_queries]]
        m = maps.maps(model, tok, s.images[i], [it.text for it in its], [it.word for it in its], method=maps.DEFAULT)
        rows.append((s.images[i], [(it.text, it.word, mp, it.region) for it, mp in zip(its, m)]))
    fig = plots.plot_query_grid(rows, maps.DEFAULT, title=f"{maps.DEFAULT} ({name} weights): the named part outlined")
    path = plots.save(fig, p.run_dir, "default")
    plt.close(fig)
    return path


@locked
def pointing(p: Params, s: Setup) -> tuple[dict, Path]:
    """The pointing game for every model, stored in ``metrics.json["alignment"]``; returns the results
    and the saved figure."""
    extra = {"dataset": p.dataset, "split": p.split, "n_images": len(s.files), "caption_template": p.caption_template}
    variants = (query_variants(s.items, s.ds.split(p.split), s.files, p.caption_template, p.part_nouns, p.seed)
                if p.word_specificity else None)
    results = report.run_pointing(p.run_dir, s.bundles, s.images, s.items, p.methods, note=s.note,
                                  batch_size=p.batch_size, progress=p.progress, baselines=s.baselines, extra=extra,
                                  objects=s.objects, variants=variants)
    fig = plots.plot_pointing(results, title=f"pointing game, {p.dataset} {p.split} ({len(s.items)} part queries)")
    path = plots.save(fig, p.run_dir, "pointing")
    plt.close(fig)
    return results, path


def explorer(s: Setup):
    """The interactive explorer over the pointing-game images (05_align: by default in JupyterLab, ``params.interactive_view``)."""
    from .widgets import explorer as build  # ipywidgets: loaded only when a widget is built

    caps = [captions(s, i, with_parts=True) for i in range(len(s.files))]
    names = [Path(f).name for f in s.files]
    return build(s.bundles, s.images, caps, names=names, classnames=[s.row(i)["species"] for i in range(len(s.files))])


def specificity(p: Params):
    """The word-specificity table of the run (:func:`report.specificity_table`), None when not scored."""
    spec = (read_metrics(p.run_dir).get("alignment") or {}).get("word_specificity")
    return report.specificity_table(spec) if spec else None
