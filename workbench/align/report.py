"""What notebook 05_align calls: find the fine-tuned checkpoint, pick captions, compute the maps of one
image-caption pair, run the pointing game for pretrained vs fine-tuned and store it in metrics.json."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from ..clip import load_clip
from ..runs import INDEX, MATCHES, read_index, read_matches, update_metrics
from . import maps as map_methods
from . import plots
from .attention import image_rollout, pair_relevance
from .features import argmax_token_map, find_phrase, similarity_maps, word_maps
from .pointing import METHODS, pointing_game, versus
from .regions import part_attributes


def finetuned_checkpoint(run_dir: str | Path, method: str = "gist", shots="full", seed: int | None = None) -> dict | None:
    """The ``checkpoints/index.json`` row of the ``method``/``shots`` run (best ``val_top1``; ``seed`` if given),
    with ``path`` absolute; None when fine-tuning has not run or has no such row."""
    rows = [r for r in read_index(run_dir, required=False) or []
            if r["method"] == method and str(r["shots"]) == str(shots) and (seed is None or r["seed"] == seed)]
    if not rows:
        return None
    row = dict(max(rows, key=lambda r: (r.get("val_top1") or 0.0, -int(r.get("seed") or 0))))
    row["path"] = row["abspath"]
    return row


def load_models(run_dir, model: str, pretrained: str | None, device="auto", method: str = "gist",
                shots="full") -> tuple[dict, str, dict | None]:
    """``{"pretrained": bundle[, "finetuned": bundle]}``, a note saying what was (not) found, and the
    fine-tuned checkpoint's index row (None without one): the ``method``/``shots`` run of best validation
    accuracy."""
    bundles = {"pretrained": load_clip(model, pretrained, device=device)}
    row = finetuned_checkpoint(run_dir, method, shots)
    if row is None:
        what = "full-shot" if str(shots) == "full" else f"{shots}-shot"
        return bundles, f"no {method!r} {what} checkpoint in {Path(run_dir) / INDEX}: pretrained only", None
    bundles["finetuned"] = load_clip(row.get("model") or model, row["path"], device=device)
    note = f"fine-tuned: {row['method']} shots={row['shots']} seed={row.get('seed')} epoch={row.get('epoch')} ({row['path']})"
    return bundles, note, row


def attribute_caption(row, classname: str | None = None, parts: list[str] = (), attribute_part: dict | None = None) -> str:
    """"<class>: red crown, blue wing, ..." from a table row's attribute columns (see ``part_attributes``)."""
    descs = [" ".join(v + [p]) for p in parts if (v := part_attributes(p, row, attribute_part))]
    desc = ", ".join(descs) or "a bird"
    return f"{classname}: {desc}" if classname else desc


def captions_for(matches: dict[str, list[str]], filename: str, classname: str, row=None, parts: list[str] = (),
                 attribute_part: dict | None = None) -> list[str]:
    """Captions for an image: its matched captions (``matches``: filename -> captions, from
    ``matches.jsonl``) when it has some, else one built from the table's attribute columns."""
    if matches.get(filename):
        return list(matches[filename])
    return [attribute_caption(row if row is not None else {}, classname, parts, attribute_part)]


def matched_captions(run_dir) -> dict[str, list[str]]:
    """Filename -> matched captions of the run (empty when the match stage has not run)."""
    if not (Path(run_dir) / MATCHES).exists():
        return {}
    return {r["image"]: r["captions"] for r in read_matches(run_dir) if r.get("captions")}


def pair_maps(bundle, image: torch.Tensor, caption: str, classname: str | None = None) -> dict:
    """Everything the figures show for one image-caption pair under one model.

    ``words``: word -> similarity map; ``argmax``/``pieces``/``highlight``: the argmax-token map, the
    caption's pieces, the class-name positions; ``rollout``, ``relevance``: image maps; ``text_relevance``;
    ``default``: the caption's map by :data:`~workbench.align.maps.DEFAULT` (sentence query).
    """
    model, _, tok = bundle
    sim, tt = similarity_maps(model, tok, image[None], caption)
    ids = tt.ids
    rel, trel, score = pair_relevance(model, image[None], ids)
    return {
        "words": word_maps(sim[0], tt.words[0]),
        "sim": sim[0],
        "tokens": tt,
        "argmax": argmax_token_map(sim[0], tt.mask[0], tt.special[0]),
        "pieces": tt.pieces[0],
        "highlight": find_phrase(tok, ids[0], classname) if classname else [],
        "rollout": image_rollout(model, image[None])[0],
        "relevance": rel[0],
        "default": map_methods.maps(model, tok, image[None], [caption], method=map_methods.DEFAULT)[0],
        "text_relevance": trel[0, : int(tt.eot[0]) + 1],
        "similarity": score.item(),
    }


def run_pointing(
    run_dir,
    bundles: dict,
    images: torch.Tensor,
    items,
    methods=METHODS,
    note: str = "",
    extra: dict | None = None,
    batch_size: int = 32,
    progress: bool = False,
    baselines: dict | None = None,
    objects: torch.Tensor | None = None,
    variants: dict | None = None,
) -> dict:
    """Pointing game for each model in ``bundles``; stored as ``metrics.json["alignment"]``:
    ``{"pointing_game": {method: {"pretrained": {score, chance, area, n, per_part, vs_prior}, "finetuned":
    {..., change}}}, ...}`` (``change``: :func:`pointing_change`). ``baselines``
    (:func:`~workbench.align.pointing.baseline_scores`) are stored beside the methods under the model key
    ``"baseline"`` (``pointing_game["prior"]["baseline"]``), and every method's entry gets ``vs_prior``:
    its hits minus the prior's, paired over the same queries (points)."""
    results: dict[str, dict] = {m: {} for m in methods}
    for name, b in bundles.items():
        model, _, tok = b
        for method, r in pointing_game(model, tok, images, items, methods, batch_size, progress=progress,
                                       objects=objects).items():
            results[method][name] = r
    prior = (baselines or {}).get("prior")
    for by_model in results.values():
        if {"pretrained", "finetuned"} <= set(by_model):
            by_model["finetuned"]["change"] = pointing_change(by_model["pretrained"], by_model["finetuned"])
        if prior is not None:
            for r in by_model.values():
                r["vs_prior"] = versus(r, prior)
    for name, entry in (baselines or {}).items():
        results[name] = {"baseline": entry}
    section = {"pointing_game": results, "note": note,
               "models": {k: {"model": b.name, "weights": b.pretrained} for k, b in bundles.items()},
               "default_method": map_methods.DEFAULT}
    section.update(extra or {})
    if variants:
        named = results.get(map_methods.DEFAULT)  # the default's own hits, when it is one of the methods
        section["word_specificity"] = word_specificity(bundles, images, items, variants, batch_size=batch_size,
                                                       named=named)
    update_metrics(run_dir, "alignment", section)
    return results


def word_specificity(bundles: dict, images: torch.Tensor, items, variants: dict, method: str = map_methods.DEFAULT,
                     batch_size: int = 32, named: dict | None = None) -> dict:
    """Does ``method``'s map follow the words? Per model, the pointing game of the named queries and of each
    control of :func:`~workbench.align.regions.query_variants` (the bare part noun, a wrong attribute value):
    ``{"method", model: {"named": {score, n}, variant: {score, n, vs_named: {diff, ci95, p}}}}``, the
    difference paired over the same queries (points). A map read from the part noun scores the same bare;
    one read from the attribute value drops, and drops further with a wrong value. ``named``: ``{model:
    entry}`` of ``method`` on ``items`` when already computed (:func:`run_pointing`'s results)."""
    out: dict = {"method": method}
    for name, (model, _, tok) in bundles.items():
        own = (named or {}).get(name) or pointing_game(model, tok, images, items, [method], batch_size)[method]
        by = {"named": {"score": own["score"], "n": own["n"]}}
        for variant, pairs in variants.items():
            if not pairs:
                continue
            keep = [k for k, _ in pairs]
            r = pointing_game(model, tok, images, [it for _, it in pairs], [method], batch_size)[method]
            vs = versus(r, {"_hit": own["_hit"][keep]})
            by[variant] = {"score": r["score"], "n": r["n"], "named_score": float(own["_hit"][keep].mean()),
                           "vs_named": vs}
        out[name] = by
    return out


def specificity_table(spec: dict) -> pd.DataFrame:
    """One row per model and query kind of :func:`word_specificity`."""
    rows = []
    for model, by in spec.items():
        if model == "method":
            continue
        for kind, r in by.items():
            vs = r.get("vs_named") or {}
            rows.append({"method": spec["method"], "model": model, "query": kind, "score": r["score"], "n": r["n"],
                         "named, same queries": r.get("named_score", r["score"]), "vs named": vs.get("diff"),
                         "vs named 95%": vs.get("ci95")})
    return pd.DataFrame(rows)


def pointing_change(before: dict, after: dict) -> dict:
    """How fine-tuning moved a method's score, paired over the same queries: ``{diff, ci95, p}`` in points
    (:func:`~workbench.align.pointing.versus`: bootstrap interval, sign-flip p-value)."""
    return versus(after, before)


def pointing_table(results: dict) -> pd.DataFrame:
    """Long table: method, model, score with its 95% interval, chance, the other-parts control (None for
    caption-independent methods), area, n, for the fine-tuned model the paired change in points, and each
    method's paired difference from the part-location prior (``vs_prior``, points)."""
    rows = []
    for method, by_model in results.items():
        for model, r in by_model.items():
            lo, hi = r.get("score_ci95") or (None, None)
            rows.append({"method": method, "model": model, "score": r["score"], "score_lo": lo, "score_hi": hi,
                         "chance": r["chance"], "other_parts": r.get("other_parts"),
                         "word_specific": r.get("word_specific"), "on_object": r.get("on_object"),
                         "area": r.get("area"), "n": r["n"],
                         "change": (r.get("change") or {}).get("diff"),
                         "change_ci95": (r.get("change") or {}).get("ci95"),
                         "vs_prior": (r.get("vs_prior") or {}).get("diff"),
                         "vs_prior_ci95": (r.get("vs_prior") or {}).get("ci95")})
    return pd.DataFrame(rows)


def per_part_table(results: dict) -> pd.DataFrame:
    """Score per part, method and model (chance in brackets in the column pairs)."""
    rows = []
    for method, by_model in results.items():
        for model, r in by_model.items():
            for part, p in r["per_part"].items():
                rows.append({"method": method, "model": model, "part": part, "score": p["score"], "chance": p["chance"], "n": p["n"]})
    df = pd.DataFrame(rows)
    return df.pivot_table(index="part", columns=["method", "model"], values="score") if len(df) else df


def example_figures(run_dir, bundles: dict, image: torch.Tensor, caption: str, classname: str | None, tag: str,
                    argmax: bool = False) -> dict:
    """The figures of one image-caption pair, saved as ``figures/align_<kind>_<tag>.png``:
    per-word maps (pretrained), the methods side by side (last model), pretrained vs fine-tuned when both
    are given, and with ``argmax`` (a FILIP-trained checkpoint: its token-wise loss is what gives this
    map a meaning) FILIP's most-similar-token-per-patch map of the last model. Returns ``{kind: path}``; the
    figures are closed (show the PNGs: rendering each figure once is what costs time)."""
    maps = {name: pair_maps(b, image, caption, classname) for name, b in bundles.items()}
    for m in maps.values():  # punctuation pieces have maps too, but nobody asks where ":" is
        m["words"] = {w: v for w, v in m["words"].items() if any(c.isalnum() for c in w.split("#")[0])}
    last = list(maps)[-1]
    figs = {
        "words": plots.plot_word_maps(image, maps["pretrained"]["words"], title=f"pretrained: {caption}"),
        "methods": plots.plot_method_maps(
            image,
            {f"{map_methods.DEFAULT} (sentence)": maps[last]["default"],
             "similarity (word mean)": torch.stack(list(maps[last]["words"].values())).mean(0),
             "rollout": maps[last]["rollout"], "relevance": maps[last]["relevance"]},
            title=f"{last}, image-caption cosine {maps[last]['similarity']:.2f}"),
    }
    if argmax:
        figs["argmax"] = plots.plot_argmax_tokens(image, maps[last]["argmax"], maps[last]["pieces"], maps[last]["highlight"],
                                                  title=f"FILIP's map: most similar token per patch ({last}, FILIP loss)")
    if "finetuned" in maps:
        figs["before_after"] = plots.plot_before_after(image, maps["pretrained"]["words"], maps["finetuned"]["words"],
                                                       title=caption)
    paths = {}
    for kind, fig in figs.items():
        paths[kind] = plots.save(fig, run_dir, f"{kind}_{tag}")
        plt.close(fig)
    return paths

