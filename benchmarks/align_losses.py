"""Which fine-tuning loss moves the word-patch maps towards the named parts (FILIP's claim)?

On the synthetic benchmark (part masks are ground truth): describe + match once, then GIST full-shot
fine-tuning with each loss (CLIP, class-aware, FILIP) from the same pretrained tiny CLIP (its last
weights, no checkpoint selection), and the pointing game of the pretrained and each fine-tuned model
on the same test images. Prints one JSON line per loss: per method, the pretrained and fine-tuned
score with 95% intervals, the other-parts control, and the change (points, paired over the same
queries, with its 95% interval and p-value). Not part of the demo (it trains three extra runs); a
few CPU minutes.

    python benchmarks/align_losses.py [--epochs 3] [--images 200] [--out reports/align_losses]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.align.pointing import pointing_game  # noqa: E402
from workbench.align.regions import part_items  # noqa: E402
from workbench.align.report import pointing_change  # noqa: E402
from workbench.clip import image_size, load_clip  # noqa: E402
from workbench.config import stage_params  # noqa: E402
from workbench.data import load_dataset  # noqa: E402
from workbench.data.images import image_cache  # noqa: E402
from workbench.describe import generate_descriptions  # noqa: E402
from workbench.finetune import finetune_all  # noqa: E402
from workbench.match import match_dataset  # noqa: E402

LOSSES = ("clip", "class-aware", "filip")


def _round(r: dict) -> dict:
    keep = ("score", "score_ci95", "other_parts", "chance")
    return {k: (None if r.get(k) is None else [round(x, 3) for x in r[k]] if isinstance(r[k], list) else round(r[k], 3))
            for k in keep}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: 03_finetune's)")
    ap.add_argument("--images", type=int, default=200, help="test images in the pointing game")
    ap.add_argument("--out", default="reports/align_losses", help="run folder (one per loss inside)")
    a = ap.parse_args(argv)
    ft = stage_params("finetune")
    al = stage_params("align")
    ds = load_dataset("synthetic")
    base = load_clip("tiny", "synthetic", device="cpu")
    size = image_size(base.model)
    items, files = part_items(ds.split("test"), size, parts=al.parts, max_images=a.images,
                              template=al.caption_template, part_nouns=al.part_nouns)
    images = image_cache([ds.root / f for f in files], size)
    methods = [m for m in al.methods if m != "rollout"]  # rollout is the same for every caption
    before = pointing_game(base.model, base.tokenizer, images, items, methods)
    for loss in LOSSES:
        run = Path(a.out) / loss
        run.mkdir(parents=True, exist_ok=True)
        generate_descriptions(ds, "template", n_per_class=8, run_dir=run, progress=False)
        match_dataset(ds, run, base, k=5, run_dir=run)
        t0 = time.time()
        opts = {k: ft[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup", "captions_per_image")}
        # the weights after training, not the epoch validation would keep: the question is what the loss does
        # to the maps, and a checkpoint chosen on classification may be the starting weights themselves
        opts.update(loss=loss, validate=False, **({"epochs": a.epochs} if a.epochs else {}))
        rows = finetune_all(run, ds, model="tiny", pretrained="synthetic", methods=["gist"], shots=["full"],
                            seeds=[0], device="cpu", progress=False, **opts)
        tuned = load_clip("tiny", str(run / rows[0]["path"]), device="cpu")
        after = pointing_game(tuned.model, tuned.tokenizer, images, items, methods)
        out = {"loss": loss, "train_s": round(time.time() - t0, 1), "checkpoint_epoch": rows[0]["epoch"],
               "n": len(items), "images": len(files)}
        for m in methods:
            change = pointing_change(before[m], after[m])  # paired over the same queries, in points
            out[m] = {"pretrained": _round(before[m]), "finetuned": _round(after[m]),
                      "change": {"diff": round(change["diff"], 1), "ci95": [round(x, 1) for x in change["ci95"]],
                                 "p": round(change["p"], 4)}}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
