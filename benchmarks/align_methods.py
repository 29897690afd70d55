"""The pointing game of every map method on one draw of the synthetic benchmark: prints one JSON object.

    WORKBENCH_CACHE=/tmp/maps/cache python benchmarks/align_methods.py --split val --n-val 40

This is how the default map method (``workbench.align.maps.DEFAULT``) was chosen: on the validation
split, never on test. The weights are the shipped tiny CLIP (or ``--pretrained``). Parts are split into
those whose words the weights' pretraining taught (a part with an attribute outside the recipe's
``withhold``) and those it never named; each method's paired difference from the part-location prior
(points, 95% bootstrap interval) and from the best method are reported. ``--contrast`` adds each
caption-specific method with ``+contrast`` (the map minus the mean map of the image's other part queries).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--n-val", type=int, default=40, help="synthetic validation images per class")
    ap.add_argument("--max-images", type=int, default=1000)
    ap.add_argument("--pretrained", default="synthetic")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contrast", action="store_true", help="also every caption-specific method with +contrast")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from workbench.align import maps, pointing, stage
    from workbench.config import stage_params
    from workbench.data import synthetic as syn
    from workbench.finetune.sources import recorded_withhold

    p = stage_params("align", run_dir="/tmp/align_methods_run", progress=False, max_images=args.max_images,
                     split=args.split, methods=[maps.DEFAULT], pretrained=args.pretrained,
                     dataset_options={"n_val": args.n_val})
    s = stage.prepare(p)
    model, _, tok = s.bundles["pretrained"]
    withheld = set(recorded_withhold("tiny", args.pretrained))
    taught_parts = {syn.ATTRIBUTE_PART[a] for a in syn.ATTRIBUTES if a not in withheld}
    taught = torch.tensor([it.part in taught_parts for it in s.items]).numpy()
    prior = s.baselines["prior"]

    def row(r, seconds=None):
        vp = pointing.versus(r, prior)
        return {"score": round(r["score"], 4), "other_parts": r["other_parts"] and round(r["other_parts"], 4),
                "taught": round(float(r["_hit"][taught].mean()), 4),
                "untaught": round(float(r["_hit"][~taught].mean()), 4) if (~taught).any() else None,
                "vs_prior": {"diff": round(vp["diff"], 2), "ci95": [round(v, 2) for v in vp["ci95"]]},
                "per_part": {k: round(v["score"], 3) for k, v in r["per_part"].items()},
                **({"seconds": round(seconds, 2)} if seconds is not None else {})}

    results, out = {}, {"split": args.split, "n_images": len(s.files), "n_queries": len(s.items),
                        "taught_parts": sorted(taught_parts & set(s.parts)), "withheld": sorted(withheld),
                        "baselines": {k: row(v) for k, v in s.baselines.items()}, "methods": {}}
    names = [(n, m.query_specific) for n, m in maps.METHODS.items()]
    if args.contrast:
        names += [(n + pointing.CONTRAST, True) for n, m in maps.METHODS.items() if m.query_specific]
    for name, specific in names:
        t = time.perf_counter()
        results[name] = pointing.pointing_game(model, tok, s.images, s.items, [name])[name]
        out["methods"][name] = {"query_specific": specific, **row(results[name], time.perf_counter() - t)}
    specific = [n for n, q in names if q]
    best = max(specific, key=lambda n: results[n]["score"])
    out["best"] = best
    out["prior_over_best"] = round(prior["score"] / results[best]["score"], 3)
    out["vs_best"] = {n: {k: (round(v, 2) if k == "diff" else [round(x, 2) for x in v]) for k, v in
                          pointing.versus(results[n], results[best]).items() if k in ("diff", "ci95")}
                      for n in specific if n != best}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
