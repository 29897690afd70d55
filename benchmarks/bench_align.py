"""Alignment throughput and exactness on one model: prints one JSON object.

    python benchmarks/bench_align.py --model ViT-B-16 --device cuda --pairs 512

Random-init weights (no downloads): checks that the recomputed attention forward equals
``encode_image`` / ``encode_text``, then times the pointing game's three methods on random
images with part-style captions (pairs/s; similarity and rollout reuse each image's forward).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pairs", type=int, default=256, help="image-caption pairs (6 captions per image)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    from workbench.align import attention as A
    from workbench.align.features import _prepare
    from workbench.align.pointing import METHODS, PartItem, pointing_game
    from workbench.clip import image_size, load_clip

    torch.manual_seed(0)
    b = load_clip(args.model, None, device=args.device)
    model, _, tok = b
    dev = next(model.parameters()).device
    S = image_size(model)
    n_img = max(1, args.pairs // 6)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_img, 3, S, S), dtype=torch.uint8, generator=g)
    parts = ["crown", "beak", "eye", "wing", "breast", "tail"]
    colours = ["red", "blue", "yellow", "black", "white", "brown"]
    items = []
    for k in range(args.pairs):
        region = torch.zeros(S, S, dtype=torch.bool)
        y, x = torch.randint(0, S - S // 8, (2,), generator=g).tolist()
        region[y : y + S // 8, x : x + S // 8] = True
        p = parts[k % 6]
        items.append(PartItem(k // 6 % n_img, p, f"a bird with a {colours[k % 5]} {p}", p, region))

    with torch.no_grad():
        x = _prepare(model, images[:4])
        ids = tok([it.text for it in items[:4]])
        e, _ = A.image_forward(model, x)
        te, _ = A.text_forward(model, ids)
        img_err = (e - model.encode_image(x)).abs().max().item()
        txt_err = (te - model.encode_text(ids.to(dev))).abs().max().item()

    out = {"model": args.model, "device": str(dev), "image_size": S, "pairs": len(items), "images": n_img,
           "max_abs_err_image": img_err, "max_abs_err_text": txt_err,
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}
    pointing_game(model, tok, images, items[: args.batch], batch_size=args.batch)  # warm-up
    for m in METHODS:
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = pointing_game(model, tok, images, items, methods=(m,), batch_size=args.batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        out[f"{m}_pairs_per_s"] = round(len(items) / dt, 1)
        out[f"{m}_score"] = round(r[m]["score"], 4)
        if dev.type == "cuda":
            out[f"{m}_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
