"""Instrument study (issue 23, step 1): can oracle captions beat class-name fine-tuning on a benchmark design?

For one design of the synthetic benchmark (options below), this script

1. gets the tiny CLIP the design needs: the shipped weights when the design changes nothing of pretraining,
   else pretrained here (``workbench.pretrain.train``, a short schedule; cached under ``WORKBENCH_CACHE``);
   ``--withhold`` names attributes the pretraining captions never name (the images still show them);
2. builds the downstream benchmark (``workbench.data.synthetic``, dataset options: noise, occlusion, ...);
3. measures, on the VALIDATION split only (never test), at each shot count and seed:
   ``linear-probe`` (frozen features), ``finetune-classname`` (FLYP-style "a photo of a <class>."),
   ``oracle`` (each training image's caption written from its true attributes) and ``random-own-class``
   (template descriptions of the image's own class, drawn at random), each fine-tuned for a fixed number
   of optimizer steps (``--steps``; the final weights, no checkpoint selection) and scored by the workbench
   linear probe on the fine-tuned image encoder. The validation split is cut in two halves per class:
   the probe's weight decay is chosen on half A, accuracy is reported on half B (so nothing reported is
   selected on the images it is reported on), and paired differences (``workbench.stats.paired_difference``,
   bootstrap over images and seeds) compare methods on half B.

Prints one JSON object (also written to ``--out``). Example::

    WORKBENCH_CACHE=/tmp/cache nice -n 10 python benchmarks/instrument_study.py --design baseline
    ... --design withhold-shapes --withhold breast_pattern,beak_shape,tail_size --pretrain-steps 1000
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from workbench.clip import encode_images, image_size, load_clip
from workbench.clip.weights import metadata, package_weights
from workbench.data import synthetic as syn
from workbench.data.images import image_cache
from workbench.data.shots import few_shot
from workbench.describe.template import synthetic_descriptions
from workbench.evaluate.probe import linear_probe, topk_correct
from workbench.finetune import FinetuneConfig, build_pairs, train_run
from workbench.io import cache_root, hash_key
from workbench.match.captions import truncate_caption
from workbench.pretrain import evaluate as pre_eval
from workbench.pretrain import recipe
from workbench.pretrain.captions import _OPENERS, _phrase
from workbench.stats import bootstrap_ci, paired_difference

METHODS = ("linear-probe", "finetune-classname", "oracle", "random-own-class")
PAIRS = (("oracle", "finetune-classname"), ("oracle", "linear-probe"), ("finetune-classname", "linear-probe"),
         ("random-own-class", "finetune-classname"), ("oracle", "random-own-class"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--design", default="baseline", help="a name for the design (reported)")
    ap.add_argument("--withhold", default=None,
                    help="attributes the pretraining captions never name (comma list; '' none). With the shipped "
                         "weights it must be theirs (the default: read from their recipe)")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="pretrain here with this many steps (0: the shipped weights)")
    ap.add_argument("--text-freeze", type=int, default=None, help="pretraining text-freeze steps (default steps/5)")
    ap.add_argument("--noise", type=float, default=syn.DEFAULTS["noise"], help="downstream max pixel noise sigma")
    ap.add_argument("--occlusion", type=float, default=syn.DEFAULTS["occlusion"])
    ap.add_argument("--pretrain-pose", type=float, default=recipe.DEFAULTS["pose"],
                    help="pose spread of the pretraining birds (the shipped recipe's by default)")
    ap.add_argument("--pose", type=float, default=0.0,
                    help="downstream pose spread (0: centred and upright, as in every run recorded before the "
                         "benchmark's default became 1)")
    ap.add_argument("--n-species", type=int, default=syn.DEFAULTS["n_species"])
    ap.add_argument("--data-seed", type=int, default=0, help="the downstream dataset's seed")
    ap.add_argument("--n-val", type=int, default=40, help="validation images per class (halves A and B)")
    ap.add_argument("--shots", default="1,5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per fine-tuning run")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--captions-per-image", type=int, default=1)
    ap.add_argument("--oracle-style", default="all", choices=["all", "withheld", "one"],
                    help="oracle captions name every attribute, only the withheld ones, or one attribute each")
    ap.add_argument("--no-class-prefix", action="store_true", help="oracle captions without the '<class>: ' prefix")
    ap.add_argument("--loss", default="clip", choices=["clip", "class-aware"])
    ap.add_argument("--full-probe", action="store_true", help="also the frozen probe on all training images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    return ap.parse_args(argv)


# ---------------------------------------------------------------- weights
def pretrained_state(args) -> tuple[dict, dict]:
    """The design's starting weights and how they were made (seconds, zero-shot attribute figures)."""
    shipped_withheld = metadata(package_weights("wb-tiny", "synthetic"))["recipe"]["withhold"]
    withheld = shipped_withheld if args.withhold is None else [a for a in args.withhold.split(",") if a]
    args.withhold = ",".join(withheld)  # what the oracle's "withheld" style names
    bad = [a for a in withheld if a not in syn.ATTRIBUTES]
    if bad:
        raise SystemExit(f"unknown attribute(s) {bad}; expected {syn.ATTRIBUTES}")
    if not args.pretrain_steps:
        if withheld != shipped_withheld:
            raise SystemExit(f"--withhold {withheld} needs --pretrain-steps (the shipped weights withhold {shipped_withheld})")
        return load_clip("tiny", "synthetic", "cpu").model.state_dict(), {"weights": "shipped", "seconds": 0.0, "withheld": withheld}
    steps = args.pretrain_steps
    config = recipe.pretrain_config(steps=steps, text_freeze=args.text_freeze if args.text_freeze is not None else steps // 5,
                                    warmup=min(recipe.DEFAULTS["warmup"], max(1, steps // 20)), withhold=withheld,
                                    pose=args.pretrain_pose)
    key = hash_key("instrument-pretrain", syn.GENERATOR_VERSION, recipe.PRETRAIN_VERSION, config)
    path = cache_root() / "instrument" / f"{key}.safetensors"
    info = {"weights": str(path), "config": config, "caption_weights": recipe.caption_weights(config), "withheld": withheld}
    if path.exists():
        meta = json.loads((path.with_suffix(".json")).read_text())
        return load_file(str(path)), {**info, **meta, "cached": True}
    t0 = time.time()
    state, tinfo = recipe.train(config, threads=args.threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    meta = {"seconds": round(time.time() - t0, 1), "loss_first": tinfo["loss_first"], "loss_last": tinfo["loss_last"]}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return state, {**info, **meta, "cached": False}


def fresh_model(state: dict):
    bundle = load_clip("tiny", None, "cpu")
    bundle.model.load_state_dict(state)
    bundle.model.eval()
    return bundle


def attribute_zero_shot(bundle, ds) -> dict:
    """Zero-shot attribute retrieval of the starting weights on the downstream val images (per attribute)."""
    val = ds.split("val")
    f = encode_images(bundle.model, image_cache(val.paths(), image_size(bundle.model)))
    scores = pre_eval._attribute_scores(bundle.model, bundle.tokenizer, f, val.table.to_dict("records"))
    return {a: round(v["top1"], 3) for a, v in scores.items()}


# ---------------------------------------------------------------- captions
def oracle_caption(classname: str, row: dict, rng, style: str = "all", withheld=(), prefix: bool = True) -> str:
    """``"<class>: a bird with ..."`` naming the attributes the image shows, in the pretraining's words:
    every attribute (``all``), only the ``withheld`` ones, or ``one`` drawn at random."""
    if style == "all":
        pattern = "" if row["breast_pattern"] == "plain" else f"{row['breast_pattern']} "
        parts = [f"a {row['crown_color']} crown", f"{row['wing_color']} wings", f"a {pattern}{row['breast_color']} breast",
                 f"a {row['beak_shape']} beak", f"a {row['tail_size']} tail"]
    else:
        attrs = list(withheld) if style == "withheld" else [str(rng.choice(syn.ATTRIBUTES))]
        parts = [_phrase(a, row[a]) for a in attrs]
    parts = [parts[i] for i in rng.permutation(len(parts))]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return (f"{classname}: " if prefix else "") + str(rng.choice(_OPENERS)).format(body)


def caption_matches(method: str, sub, descriptions: dict, tokenizer, per_image: int, seed: int, args=None) -> list[dict]:
    """match records (the ``matches.jsonl`` shape :func:`build_pairs` reads) for ``oracle`` / ``random-own-class``."""
    rng = np.random.default_rng([seed, 2323])
    out = []
    for row in sub.table.to_dict("records"):
        name = sub.classnames[row["label"]]
        if method == "oracle":
            style = args.oracle_style if args else "all"
            withheld = [a for a in (args.withhold.split(",") if args else []) if a]
            caps = [oracle_caption(name, row, rng, style, withheld, not (args and args.no_class_prefix))
                    for _ in range(per_image)]
        else:  # random-own-class: never another class's text
            pool = descriptions[name]
            caps = [truncate_caption(name, pool[i], tokenizer) for i in rng.choice(len(pool), per_image, replace=False)]
        out.append({"image": row["filename"], "class": name, "captions": caps})
    return out


# ---------------------------------------------------------------- one run
def probe_outcomes(model, tr_images, ytr, va_images, yva, vb_images, yvb, n_classes) -> np.ndarray:
    """0/1 per val-B image of the workbench probe on ``model``'s image features (weight decay chosen on val A)."""
    f = [encode_images(model, x, precision="fp32") for x in (tr_images, va_images, vb_images)]
    pr = linear_probe(f[0], ytr, f[1], yva, n_classes, device="cpu")
    return topk_correct(pr.logits(f[2]), yvb, 1).numpy().astype(np.int8)


def finetune(state, method, sub, tr_images, ctx, args, seed) -> tuple[torch.nn.Module, dict]:
    bundle = fresh_model(state)
    per = 1 if method == "finetune-classname" else args.captions_per_image
    matches = None if method == "finetune-classname" else caption_matches(
        method, sub, ctx["descriptions"], bundle.tokenizer, per, seed, args)
    rows, texts, labels = build_pairs(sub, "finetune-classname" if method == "finetune-classname" else "gist", per, matches)
    n = len(rows)
    spe = math.ceil(n / min(args.batch_size, n))
    cfg = FinetuneConfig(method="finetune-classname" if method == "finetune-classname" else "gist", captions_per_image=per, loss=args.loss,
                         epochs=math.ceil(args.steps / spe), batch_size=args.batch_size, lr=args.lr, seed=seed,
                         validate=False, precision="fp32", max_steps=args.steps)
    r = train_run(bundle.model, bundle.tokenizer, cfg, tr_images, rows, texts, labels, validate=None, out_dir=None,
                  log_path=None, run=f"{method}-{seed}", device="cpu", resume=False)
    bundle.model.eval()
    info = {"steps": r["steps"], "pairs": n, "batch": r["batch_size"], "loss_first": r["loss_first_epoch"],
            "loss_last": r["loss_last_epoch"], "train_s": round(r["train_s"], 1), "example_caption": texts[0]}
    return bundle.model, info


# ---------------------------------------------------------------- the study
def load_design(args):
    opts = dict(n_species=args.n_species, seed=args.data_seed, n_val=args.n_val, n_test=1, noise=args.noise,
                occlusion=args.occlusion, pose=args.pose)
    ds = syn.load(**opts)
    return ds, opts


def val_halves(ds, size):
    val = ds.split("val")
    pos = val.table.groupby("label").cumcount().to_numpy()
    half = pos < ds.extras["config"]["n_val"] // 2
    imgs = image_cache(val.paths(), size)
    y = torch.tensor(val.labels)
    return (imgs[torch.from_numpy(half)], y[half]), (imgs[torch.from_numpy(~half)], y[~half]), val.table[~half]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    timing = {}
    t0 = time.time()
    state, weights_info = pretrained_state(args)
    timing["weights_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    ds, opts = load_design(args)
    size = image_size(fresh_model(state).model)
    (va, ya), (vb, yb), vb_table = val_halves(ds, size)
    train_all = ds.split("train")
    train_cache = image_cache(train_all.paths(), size)
    row_of = {f: i for i, f in enumerate(train_all.table["filename"])}
    desc = {}
    for d in synthetic_descriptions(ds):
        desc.setdefault(d["class"], []).append(d["text"])
    ctx = {"descriptions": desc}
    timing["data_s"] = round(time.time() - t0, 1)
    start = fresh_model(state)
    zs = attribute_zero_shot(start, ds)
    methods = [m for m in args.methods.split(",") if m]
    shots = [s if s == "full" else int(s) for s in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    outcomes, runs = {}, []
    C = ds.num_classes
    if args.full_probe:
        t0 = time.time()
        c = probe_outcomes(start.model, train_cache, torch.tensor(train_all.labels), va, ya, vb, yb, C)
        outcomes[("linear-probe", "full", 0)] = c
        timing["full_probe_s"] = round(time.time() - t0, 1)
    for k in shots:
        for seed in seeds if k != "full" else seeds[:1]:
            sub = few_shot(ds, k, seed).split("train")
            tr = train_cache[torch.tensor([row_of[f] for f in sub.table["filename"]])]
            ytr = torch.tensor(sub.labels)
            for m in methods:
                t0 = time.time()
                if m == "linear-probe":
                    model, info = start.model, {}
                else:
                    model, info = finetune(state, m, sub, tr, ctx, args, seed)
                c = probe_outcomes(model, tr, ytr, va, ya, vb, yb, C)
                outcomes[(m, k, seed)] = c
                runs.append({"method": m, "shots": k, "seed": seed, "val_b_top1": round(100 * float(c.mean()), 2),
                             "seconds": round(time.time() - t0, 1), **info})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return report(args, opts, weights_info, zs, outcomes, runs, timing, t_start, vb_table)


def report(args, opts, weights_info, zs, outcomes, runs, timing, t_start, vb_table) -> dict:
    acc, comps = [], []
    keys = sorted({(m, k) for m, k, _ in outcomes}, key=str)
    for m, k in keys:
        rows = np.stack([c for (mm, kk, _), c in sorted(outcomes.items(), key=str) if mm == m and kk == k])
        ci = bootstrap_ci(rows.mean(0))  # images resampled; seeds averaged per image
        per_seed = [round(100 * float(r.mean()), 2) for r in rows]
        acc.append({"method": m, "shots": k, "top1": round(float(rows.mean() * 100), 2),
                    "ci95": [round(v, 2) for v in ci["ci95"]], "per_seed": per_seed})
    for k in sorted({k for _, k in keys}, key=str):
        for a, b in PAIRS:
            sa = {s: c for (m, kk, s), c in outcomes.items() if m == a and kk == k}
            sb = {s: c for (m, kk, s), c in outcomes.items() if m == b and kk == k}
            seeds = sorted(set(sa) & set(sb))
            if not seeds:
                continue
            r = paired_difference(np.stack([sa[s] for s in seeds]), np.stack([sb[s] for s in seeds]))
            comps.append({"a": a, "b": b, "shots": k, "diff": round(r["diff"], 2), "ci95": [round(v, 2) for v in r["ci95"]],
                          "p": r["p"], "n_val_b": r["n_test"], "seeds": seeds})
    # the 1-shot variant split: val-B accuracy on images of the variant the 1-shot image did / did not show
    timing["total_s"] = round(time.time() - t_start, 1)
    out = {"design": args.design, "args": vars(args), "dataset_options": opts, "generator_version": syn.GENERATOR_VERSION,
           "weights": weights_info, "zero_shot_attributes_val": zs, "accuracy": acc, "comparisons": comps,
           "runs": runs, "timing": timing, "split": "val (probe weight decay on half A, reported on half B)",
           # per-image 0/1 on val half B of every run, so runs of separate invocations can be paired later
           "outcomes": [{"method": m, "shots": k, "seed": s, "correct": c.tolist()} for (m, k, s), c in
                        sorted(outcomes.items(), key=str)]}
    text = json.dumps(out, indent=1, default=str)
    print(json.dumps({k: v for k, v in out.items() if k != "outcomes"}, indent=1, default=str))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
