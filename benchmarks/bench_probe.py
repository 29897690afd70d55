"""Benchmark: workbench linear probe (L-BFGS + weight-decay sweep) vs the GIST reference recipe.

CUB-sized random features with a planted linear structure (768-d, 200 classes; train 5394 /
val 600 / test 5794 like CUB's GIST split), both probes in the same process. Prints one JSON object.

    python benchmarks/bench_probe.py               # CPU (leave OMP_NUM_THREADS unset)
    python benchmarks/bench_probe.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench.evaluate.probe import DEFAULT_WEIGHT_DECAYS, linear_probe, reference_probe, topk_correct  # noqa: E402


def planted_features(n_train=5394, n_val=600, n_test=5794, dim=768, classes=200, rank=64, sep=0.7, seed=0):
    """Gaussian classes whose means lie in a ``rank``-dim subspace, plus isotropic noise, then an
    uneven per-dimension scale and offset (raw CLIP features are neither centred nor isotropic)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g)).Q.T  # orthonormal rows
    means = torch.randn(classes, rank, generator=g) @ basis * sep
    scale = torch.exp(0.5 * torch.randn(dim, generator=g)) * 0.4
    offset = 0.3 * torch.randn(dim, generator=g)

    def draw(n):
        y = torch.arange(n) % classes  # balanced
        y = y[torch.randperm(n, generator=g)]
        x = (means[y] + torch.randn(n, dim, generator=g)) * scale + offset
        return x, y

    return draw(n_train), draw(n_val), draw(n_test)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--epochs", type=int, default=1000, help="reference recipe epochs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = planted_features(seed=args.seed)
    C = 200

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def acc(res):
        logits = res.logits(Xte.to(dev))
        return {k: topk_correct(logits, yte, k).float().mean().item() * 100 for k in (1, 3)}

    # Warm-up (CUDA context, kernels) on a tiny problem so neither timing pays it.
    linear_probe(Xtr[:400], ytr[:400], Xva[:100], yva[:100], C, weight_decays=[1e-2], device=dev, max_iter=5)
    reference_probe(Xtr[:400], ytr[:400], Xva[:100], yva[:100], C, epochs=1, device=dev)
    sync()

    t, c = time.perf_counter(), time.process_time()
    wb = linear_probe(Xtr, ytr, Xva, yva, C, weight_decays=DEFAULT_WEIGHT_DECAYS, device=dev)
    sync()
    wb_s, wb_cpu = time.perf_counter() - t, time.process_time() - c
    wb_acc = acc(wb)

    t, c = time.perf_counter(), time.process_time()
    ref = reference_probe(Xtr, ytr, Xva, yva, C, epochs=args.epochs, seed=args.seed, device=dev)
    sync()
    ref_s, ref_cpu = time.perf_counter() - t, time.process_time() - c
    ref_acc = acc(ref)

    print(json.dumps({
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "data": {"train": len(Xtr), "val": len(Xva), "test": len(Xte), "dim": Xtr.shape[1], "classes": C},
        "workbench_s": round(wb_s, 3),
        "reference_s": round(ref_s, 3),
        "speedup": round(ref_s / wb_s, 1),
        # CPU seconds of this process (all threads): less sensitive than wall time to a busy machine.
        "workbench_cpu_s": round(wb_cpu, 2),
        "reference_cpu_s": round(ref_cpu, 2),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "workbench_top1": round(wb_acc[1], 2),
        "reference_top1": round(ref_acc[1], 2),
        "workbench_top3": round(wb_acc[3], 2),
        "reference_top3": round(ref_acc[3], 2),
        "workbench_weight_decay": wb.weight_decay,
        "workbench_sweep": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()} for s in wb.sweep],
        "reference_epochs": args.epochs,
        "reference_best_epoch": ref.sweep[0]["iters"],
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
