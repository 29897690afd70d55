"""Pointing game: does the hottest patch of a map for a part word fall inside that part's region?

A map is a ``gh x gw`` grid over the model input (``S x S`` pixels, ``S = gh * patch``). A part
region is an ``S x S`` boolean mask in the same pixels. The hottest patch *hits* when it covers at
least one region pixel (more than ``min_cover`` of its area). The chance level is what a patch drawn
uniformly at random scores under the same rule (the fraction of patches touching the region); the
raw pixel area fraction of the region is reported beside it as ``area``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..progress import progress_bar
from ..stats import bootstrap_ci, paired_difference, wilson_interval
from . import maps as map_methods

METHODS = tuple(map_methods.METHODS)
# Rollout is computed from the image tower alone: the same map for every caption, so it cannot point at
# the part a caption names; its score says where the model looks, and a word-specificity control is moot.
WORD_SPECIFIC = {name: m.query_specific for name, m in map_methods.METHODS.items()}


@dataclass
class PartItem:
    """One pointing-game query: image ``index``, the ``part``, a caption ``text`` naming it with ``word``."""

    index: int
    part: str
    text: str
    word: str
    region: torch.Tensor  # S x S bool, model-input pixels


def patch_cover(regions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each patch covered by the region: ``B x S x S`` bool -> ``B x gh x gw`` float."""
    if regions.ndim == 2:
        regions = regions[None]
    S_h, S_w = regions.shape[-2:]
    gh, gw = grid
    if S_h % gh or S_w % gw:
        raise ValueError(f"region size {S_h}x{S_w} is not a multiple of the patch grid {gh}x{gw}")
    return F.avg_pool2d(regions[:, None].float(), (S_h // gh, S_w // gw))[:, 0]


def point_hits(maps: torch.Tensor, regions: torch.Tensor, min_cover: float = 0.0) -> dict[str, torch.Tensor]:
    """Score maps ``B x gh x gw`` against regions ``B x S x S``: per item ``hit``, ``chance``, ``area``, ``argmax``."""
    if maps.ndim == 2:
        maps, regions = maps[None], regions[None]
    if len(maps) != len(regions):
        raise ValueError(f"{len(maps)} maps vs {len(regions)} regions")
    B, gh, gw = maps.shape
    cover = patch_cover(regions, (gh, gw)) > min_cover
    m = maps.float().reshape(B, -1).nan_to_num(nan=float("-inf"))
    top = m.argmax(-1)
    hit = cover.reshape(B, -1)[torch.arange(B), top]
    return {
        "hit": hit.float(),
        "chance": cover.reshape(B, -1).float().mean(-1),
        "area": regions.reshape(B, -1).float().mean(-1),
        "argmax": top,
    }


def queries_by_image(items: list[PartItem]) -> dict[int, list[int]]:
    """Image index -> the positions in ``items`` of its queries, in order."""
    out: dict[int, list[int]] = {}
    for k, it in enumerate(items):
        out.setdefault(it.index, []).append(k)
    return out


def other_part_hits(items: list[PartItem], top: torch.Tensor, cover: torch.Tensor) -> float | None:
    """Mean over items (with other parts annotated on the same image) of the fraction of those other
    parts whose region the item's hottest patch ``top`` touches; ``cover``: ``N x gh x gw`` bool."""
    by_image = queries_by_image(items)
    flat = cover.reshape(len(items), -1)
    vals = []
    for k, it in enumerate(items):
        others = [j for j in by_image[it.index] if j != k]
        if others:
            vals.append(flat[others, top[k]].float().mean().item())
    return sum(vals) / len(vals) if vals else None


def method_maps(model, tokenizer, images: torch.Tensor, texts: list[str], words: list[str], method: str) -> torch.Tensor:
    """Maps ``B x gh x gw`` for image-caption pairs (row i with row i) by one method of
    :data:`workbench.align.maps.METHODS` (``words``: the part word each caption names)."""
    return map_methods.maps(model, tokenizer, images, texts, words, method)


def item_maps(model, tokenizer, images: torch.Tensor, items: list[PartItem], method: str, batch_size: int = 32,
              progress: bool = False) -> torch.Tensor:
    """``method_maps`` for every item, ``N x gh x gw``, computing each image and each query once where
    the method allows (dense methods: patch features per image, a query per caption; rollout: per image)."""
    m = map_methods.get(method)
    bar = lambda n: progress_bar(range(0, n, batch_size), disable=not progress, desc=f"pointing ({method})", unit="batch")  # noqa: E731
    uniq = sorted({it.index for it in items})
    where = {u: k for k, u in enumerate(uniq)}
    if m.pair is not None:  # the gradient depends on the pair: one pass per pair
        out = []
        for i in bar(len(items)):
            b = items[i : i + batch_size]
            out.append(m.pair(model, tokenizer, images[[it.index for it in b]], [it.text for it in b]))
        return torch.cat(out)
    if m.image is not None:
        per_image = torch.cat([m.image(model, images[uniq[i : i + batch_size]]) for i in bar(len(uniq))])
        return per_image[[where[it.index] for it in items]]
    with torch.no_grad():
        patches = torch.cat([m.dense(model, images[uniq[i : i + batch_size]]).float().cpu() for i in bar(len(uniq))])
        keys = list(dict.fromkeys((it.text, it.word) for it in items))
        q = torch.cat([map_methods.queries(model, tokenizer, [t for t, _ in keys[i : i + batch_size]],
                                           [w for _, w in keys[i : i + batch_size]], m.query).float().cpu()
                       for i in range(0, len(keys), batch_size)])
    qpos = {key: k for k, key in enumerate(keys)}
    grid = tuple(model.visual.grid_size)
    return map_methods.score(patches[[where[it.index] for it in items]], q[[qpos[(it.text, it.word)] for it in items]], grid)


def _per_part(parts: list[str], hit: torch.Tensor, chance: torch.Tensor) -> dict[str, dict]:
    """``{part: {score, chance, n}}`` over the queries of each part (in first-seen order)."""
    out = {}
    for p in dict.fromkeys(parts):
        sel = torch.tensor([q == p for q in parts])
        out[p] = {"score": hit[sel].mean().item(), "chance": chance[sel].mean().item(), "n": int(sel.sum())}
    return out


CONTRAST = "+contrast"  # method-name suffix: the map minus the mean map of the image's other part queries


def split_method(name: str) -> tuple[str, bool]:
    """``"surgery-qqkk+contrast"`` -> ``("surgery-qqkk", True)``."""
    return (name[: -len(CONTRAST)], True) if name.endswith(CONTRAST) else (name, False)


def check_methods(methods) -> list[str]:
    """The methods, validated (call before loading models: a typo should not cost a run). A caption-specific
    method may carry the suffix ``+contrast`` (:func:`contrast_maps`)."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if not isinstance(m, str) or split_method(m)[0] not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown pointing-game methods {bad or methods}; expected some of {list(METHODS)}, "
                         f"a caption-specific one optionally with {CONTRAST!r}")
    flat = [m for m in methods if split_method(m)[1] and not WORD_SPECIFIC[split_method(m)[0]]]
    if flat:
        raise ValueError(f"{flat}: {CONTRAST!r} needs a caption-specific method (a caption-independent map "
                         "minus itself is zero)")
    return methods


def on_object(top: torch.Tensor, items: list[PartItem], objects: torch.Tensor, grid, min_cover: float = 0.0) -> float:
    """Share of queries whose hottest patch (``top``, flat index) touches the object of its image."""
    cover = (patch_cover(objects, tuple(grid)) > min_cover).reshape(len(objects), -1)
    return cover[[it.index for it in items], top].float().mean().item()


def contrast_maps(maps: torch.Tensor, items: list[PartItem]) -> torch.Tensor:
    """Each query's map minus the mean map of the other part queries on its image (unchanged when it is the
    image's only query): what is specific to the named part, not to the bird."""
    by_image = queries_by_image(items)
    out = maps.clone()
    for ks in by_image.values():
        if len(ks) < 2:
            continue
        m = maps[ks].float()
        others = (m.sum(0, keepdim=True) - m) / (len(ks) - 1)
        out[ks] = (m - others).to(out.dtype)
    return out


def pointing_game(
    model,
    tokenizer,
    images: torch.Tensor,
    items: list[PartItem],
    methods=METHODS,
    batch_size: int = 32,
    min_cover: float = 0.0,
    progress: bool = False,
    objects: torch.Tensor | None = None,
) -> dict[str, dict]:
    """Run the pointing game; ``images[item.index]`` is the (uint8, model-size) image of each item.
    With ``objects`` (``n_images x S x S`` bool: where the bird is), each entry also has ``on_object``:
    how often the hottest patch touches the bird at all (object vs background; the one score a
    caption-independent map such as rollout can be judged by).

    Returns ``{method: {score, score_ci95, chance, area, other_parts, word_specific, n, per_part: {part:
    {score, chance, n}}, _hit}}`` (``_hit``: per-query hits, in memory only). ``other_parts`` is a control: how often the same hottest patch lands in one
    of the image's *other* parts (averaged over them). A map that finds the bird but not the part scores
    as high there as on ``score``; a part-specific map scores lower. Caption-independent methods
    (rollout, :data:`WORD_SPECIFIC`) get ``other_parts = None``: they cannot be word-specific.
    ``score_ci95``: 95% Wilson interval over the queries.
    """
    methods = check_methods(methods)
    if not items:
        raise ValueError("no pointing-game items: the dataset has no part annotations for the chosen images/parts")
    S = images.shape[-1]
    if any(it.region.shape[-2:] != images.shape[-2:] for it in items):
        raise ValueError(f"part regions must be {S}x{S} like the images (see workbench.align.regions)")
    regions = torch.stack([it.region for it in items])
    parts = [it.part for it in items]
    out = {}
    for method in methods:
        base, contrast = split_method(method)
        maps = item_maps(model, tokenizer, images, items, base, batch_size, progress)
        if contrast:
            maps = contrast_maps(maps, items)
        res = point_hits(maps, regions, min_cover)
        other = None
        if WORD_SPECIFIC[base]:
            other = other_part_hits(items, res["argmax"], patch_cover(regions, maps.shape[-2:]) > min_cover)
        per_part = _per_part(parts, res["hit"], res["chance"])
        out[method] = {
            "score": res["hit"].mean().item(),
            "score_ci95": wilson_interval(int(res["hit"].sum().item()), len(items)),
            "chance": res["chance"].mean().item(),
            "area": res["area"].mean().item(),
            "other_parts": other,
            "word_specific": WORD_SPECIFIC[base],
            **({"on_object": on_object(res["argmax"], items, objects, maps.shape[-2:], min_cover)}
               if objects is not None else {}),
            "n": len(items),
            "per_part": per_part,
            "_hit": res["hit"].bool().numpy(),  # per query, for paired comparisons; never written to metrics.json
        }
    return out


# ---------------------------------------------------------------- baselines without alignment
def part_prior(regions: dict[str, dict[str, torch.Tensor]], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The image-agnostic part-location prior: ``{part: gh x gw}``, the mean over images (e.g. the
    training split's, from :func:`workbench.align.regions.part_regions`) of the fraction of each patch
    the part covers. The same map for every image: where the part usually is."""
    acc: dict[str, list[torch.Tensor]] = {}
    for by_part in regions.values():
        for part, region in by_part.items():
            acc.setdefault(part, []).append(patch_cover(region, grid)[0])
    if not acc:
        raise ValueError("no part regions to build the part-location prior from")
    return {p: torch.stack(v).mean(0) for p, v in acc.items()}


def _baseline_entry(items: list[PartItem], hit: torch.Tensor, chance: torch.Tensor, area: torch.Tensor,
                    other: float | None, binary: bool) -> dict:
    per_part = _per_part([it.part for it in items], hit, chance)
    n = len(items)
    ci = (wilson_interval(int(hit.sum().item()), n) if binary
          else [v / 100 for v in bootstrap_ci(hit.numpy())["ci95"]])
    return {"score": hit.mean().item(), "score_ci95": ci, "chance": chance.mean().item(), "area": area.mean().item(),
            "other_parts": other, "word_specific": False, "image_agnostic": True, "n": n, "per_part": per_part,
            "_hit": hit.numpy() if not binary else hit.bool().numpy()}


def baseline_scores(items: list[PartItem], grid: tuple[int, int], prior: dict[str, torch.Tensor] | None = None,
                    objects: torch.Tensor | None = None, min_cover: float = 0.0) -> dict[str, dict]:
    """The pointing game of the two baselines that read no image-text alignment, scored like a method.

    - ``prior``: the hottest patch of :func:`part_prior`'s map of the queried part (needs ``prior``);
    - ``random_bird_patch``: a patch drawn uniformly from those touching the bird (``objects``:
      ``n_images x S x S`` bool, indexed by ``item.index``); its per-query hit is the expected one.
    ``other_parts`` is the same control as the methods'. Returns ``{name: entry}`` for those it can build.
    """
    if not items:
        raise ValueError("no pointing-game items")
    regions = torch.stack([it.region for it in items])
    cover = patch_cover(regions, grid) > min_cover  # N x gh x gw
    flat = cover.reshape(len(items), -1).float()
    chance, area = flat.mean(-1), regions.reshape(len(items), -1).float().mean(-1)
    out = {}
    if prior is not None:
        missing = sorted({it.part for it in items} - set(prior))
        if missing:
            raise ValueError(f"the part-location prior has no map for parts {missing}; it has {sorted(prior)}")
        res = point_hits(torch.stack([prior[it.part] for it in items]), regions, min_cover)
        other = other_part_hits(items, res["argmax"], cover)
        out["prior"] = _baseline_entry(items, res["hit"], chance, area, other, binary=True)
    if objects is not None:
        obj = (patch_cover(objects, grid) > min_cover).reshape(len(objects), -1).float()[[it.index for it in items]]
        if (obj.sum(-1) == 0).any():
            raise ValueError("an image with pointing-game items has an empty object (bird) region")
        expect = (flat * obj).sum(-1) / obj.sum(-1)  # of the bird's patches, the share touching the part
        by_image = queries_by_image(items)
        vals = [(flat[[j for j in by_image[it.index] if j != k]] * obj[k]).sum(-1).mean().item() / obj[k].sum().item()
                for k, it in enumerate(items) if len(by_image[it.index]) > 1]
        out["random_bird_patch"] = _baseline_entry(items, expect, chance, area,
                                                   sum(vals) / len(vals) if vals else None, binary=False)
    return out


def versus(entry: dict, baseline: dict) -> dict:
    """A method's hits minus a baseline's, paired over the same queries: ``{diff, ci95, p}`` in points."""
    r = paired_difference(entry["_hit"], baseline["_hit"])
    return {"diff": r["diff"], "ci95": r["ci95"], "p": r["p"]}
