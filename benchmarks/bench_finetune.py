"""Fine-tuning throughput: the workbench loop vs a replica of the GIST recipe, from real JPEG files.

Prints two JSON lines per model, each the moment it is known: first the workbench figures
``{"model", "part": "workbench", "pairs_per_s", "mfu", "timed_recompiles", ...}``, then, after the
reference run, the full line ``{"model", "pairs_per_s", "mfu", "reference_pairs_per_s", "speedup", ...}``
(a run cut short by a timeout keeps the first). A model skipped for lack of time prints one line with
``skipped``.

Workbench: JPEGs (4:3, one in four portrait: ``--aspect``) decoded once into the stage's training cache
(``whole_image_cache``: each image whole), random resized crop + flip + normalise on the device, fp32 master weights, bf16 autocast, fused AdamW, regional ``torch.compile``,
the production :class:`workbench.finetune.trainer.Trainer` step. Warm-up runs every trimmed text length
the timed steps will run (each compiles the text tower once), and ``timed_recompiles`` counts Dynamo
compiles inside the timed loop (``torch._dynamo.utils.counters``): it should be 0. Reference (same
process, same files): the GIST recipe - fp16 weights cast to fp32 around each Adam step (lr 1e-6, betas
(0.9, 0.98), eps 1e-6, wd 1e-3), batch 20, PIL RandomResizedCrop + flip per image in a DataLoader.

MFU = 3 x forward FLOPs per pair (open_clip's profile: ViT-L/14@336 381.9 + 13.3 GFLOPs, ViT-B/16
35.1 + 6.0; computed here from the architecture, full 77-token text) x pairs/s / 790e12 (a measured
H200 bf16 matmul peak). ``mfu_executed`` counts the text FLOPs at the trimmed lengths actually timed.
``input_pipeline_ms`` times the batches alone (index the cache, crop, flip, normalise, text ids) on the
whole-image cache; ``input_pipeline_centre_ms`` the same on the centre crops (``image_cache``: what training
cropped before it kept images whole), and ``input_pipeline_ratio`` = whole / centre.

    python benchmarks/bench_finetune.py                       # CPU, tiny model
    python benchmarks/bench_finetune.py --device cuda         # ViT-B-16 and ViT-L-14-336, random init
    python benchmarks/bench_finetune.py --device cuda --quick # fewer steps and images
Time: each model's workbench part aims at ``--budget-s`` (default 60 s on CUDA, warm-up and compile
included), the reference at half of it, and everything at ``--deadline-s`` (default 290 s on CUDA):
warm-up and timing stop at the deadline, a model starts only with at least 30 s (CUDA) left after the
minimum of those still to come, and the reference is skipped rather than overrun. Compiling cannot be
interrupted, so run the script under ``timeout`` with the deadline plus 60 s. A failure (compile,
memory) is reported in that model's JSON (``error_0``, ...): then it is re-run with the flash attention
kernel, then without compile (a try equal to one that failed is skipped), and the next model still runs.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _finetune_bench_util import (  # noqa: E402
    _free,
    _sync,
    add_flops,
    bench_reference,
    emit,
    forward_flops,  # noqa: F401  (tests import it from here)
    make_captions,
    write_jpegs,
)

from workbench.clip import image_size, load_clip  # noqa: E402
from workbench.data.images import image_cache, whole_image_cache  # noqa: E402
from workbench.finetune.trainer import FinetuneConfig, Trainer  # noqa: E402

DEFAULT_BATCH = {"tiny": 64, "ViT-B-16": 1024, "ViT-L-14-336": 192}
MIN_MODEL_S = {"cuda": 30.0, "cpu": 5.0}  # the least time worth starting a model with (setup + compile)


class OutOfTime(RuntimeError):
    """Too little time left to time a single step."""


def dynamo_frames() -> int:
    """Frames Dynamo has compiled so far in this process (each compile and recompile counts once)."""
    return counters["frames"]["total"]


def plan_warmup(tr, warmup: int, steps: int) -> tuple[list[int], list[int]]:
    """(warm-up steps, candidate timed steps). Under compile the text tower compiles once per trimmed text
    length, so after the first ``warmup`` steps come, for each length the candidates will run and those
    steps did not, the first candidate step with it: no compile is left for the timed loop."""
    later = list(range(warmup, warmup + 1 + steps))
    if not tr.cfg.compile:
        return list(range(warmup)), later
    seen, extra = {tr.text_length(s) for s in range(warmup)}, {}
    for s in later:
        length = tr.text_length(s)
        if length not in seen:
            extra.setdefault(length, s)
    return list(range(warmup)) + list(extra.values()), later


def warm_up(tr, steps: list[int], device, until: float) -> tuple[set | None, int, float]:
    """Run the warm-up ``steps``, skipping the rest once the longest step so far (the first compiles) would
    end past ``until``. Returns the text lengths compiled (None without compile: any may be timed), the
    steps run and the seconds taken."""
    t0, longest, warmed, done = time.perf_counter(), 0.0, set(), 0
    for s in steps:
        if done and time.perf_counter() + longest > until:
            break
        t = time.perf_counter()
        tr.train_step(s)
        _sync(device)
        longest, done = max(longest, time.perf_counter() - t), done + 1
        warmed.add(tr.text_length(s))
    return (warmed if tr.cfg.compile else None), done, time.perf_counter() - t0


def time_steps(tr, steps: list[int], device) -> tuple[float, int, float]:
    """(seconds, Dynamo compiles during them, last loss) for ``steps``, synchronised at both ends."""
    frames = dynamo_frames()
    _sync(device)
    t = time.perf_counter()
    for s in steps:
        loss, _ = tr.train_step(s)
    _sync(device)
    return time.perf_counter() - t, dynamo_frames() - frames, float(loss)


def pipeline_ms(tr, device, n: int = 10) -> float:
    """Milliseconds per batch of ``tr.batch`` alone (index the cache, crop, flip, normalise, text ids)."""
    tr.batch(0)  # a first call on this cache's shapes
    _sync(device)
    t = time.perf_counter()
    for s in range(n):
        tr.batch(s)
    _sync(device)
    return (time.perf_counter() - t) / n * 1e3


def input_pipeline(tr, centre: torch.Tensor, device) -> dict:
    """The batches alone on the trainer's whole-image cache (the stage's), and the same trainer on the centre
    crops, as training cropped them before it kept images whole (the baseline)."""
    whole = pipeline_ms(tr, device)
    old = copy.copy(tr)  # shares the model and text ids: only its image cache differs
    old.images, old.sizes = centre.to(tr.images.images.device), None
    before = pipeline_ms(old, device)
    return {"input_pipeline_ms": whole, "input_pipeline_centre_ms": before, "input_pipeline_ratio": whole / before,
            "train_cache_mb": tr.images.nbytes / 2**20, "centre_cache_mb": centre.numel() / 2**20}


def bench_workbench(name, paths, texts, rows, labels, device, batch, steps, warmup, compile_, soft, hard,
                    attention="auto", info=None):
    """The production step on ``name``: setup, warm-up (compiles), then up to ``steps`` timed steps, as many as
    fit before ``soft`` (at least 5 on CUDA if they fit before ``hard``; both ``time.perf_counter()`` values).
    ``info`` receives the attention kernel chosen, even when a later part fails."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    clip, _, tok = load_clip(name, None, "cpu")
    size = image_size(clip)
    t1 = time.perf_counter()
    images = whole_image_cache(paths, size)  # the stage's training cache: decoded once, cached on disk
    decode_s = time.perf_counter() - t1
    centre = image_cache(paths, size)  # stored by that decode: the old training cache, for the baseline
    keep = len(texts) // batch * batch  # whole batches: the trainer then runs exactly `batch`
    if keep == 0:
        raise ValueError(f"{len(texts)} pairs are fewer than one batch of {batch}; pass more --images")
    cfg = FinetuneConfig(loss="clip", batch_size=batch, epochs=10_000, lr=1e-5, warmup=10, compile=compile_,
                         validate=False, precision="auto", attention=attention)
    tr = Trainer(clip, tok, cfg, images, torch.tensor(rows[:keep]), texts[:keep], torch.tensor(labels[:keep]), device)
    if info is not None:
        info["attention"] = tr.attention
    setup_s = time.perf_counter() - t0
    warm_steps, candidates = plan_warmup(tr, warmup, steps)
    warmed, n_warm, warm_s = warm_up(tr, warm_steps, device, hard)
    timed = [s for s in candidates if warmed is None or tr.text_length(s) in warmed]  # nothing left to compile
    if not timed:
        raise OutOfTime(f"the deadline came before the text lengths of the timed steps were compiled ({warmed})")
    t1 = time.perf_counter()
    tr.train_step(timed[0])  # the step time, to size the timed loop
    _sync(device)
    step_s, left = time.perf_counter() - t1, timed[1:]
    fit_soft, fit_hard = int((soft - time.perf_counter()) / step_s), int((hard - time.perf_counter()) / step_s)
    n = min(len(left), fit_hard, max(fit_soft, 5 if device.type == "cuda" else 2))
    if n < 1:
        raise OutOfTime(f"warm-up and compile took {time.perf_counter() - t0:.0f} s; no time left to time a step")
    dt, recompiles, final_loss = time_steps(tr, left[:n], device)
    out = {
        "pairs_per_s": n * tr.B / dt, "batch_size": tr.B, "steps_timed": n, "step_ms": dt / n * 1e3,
        "timed_recompiles": recompiles, "text_lengths_warmed": sorted(warmed) if warmed is not None else None,
        **input_pipeline(tr, centre, device), "warmup_s": warm_s, "warmup_steps": n_warm,
        "setup_s": setup_s, "decode_images_per_s": len(paths) / decode_s, "image_px": size, "pairs": tr.n,
        "compile": tr.cfg.compile, "attention": tr.attention, "final_loss": final_loss,
        "text_tokens_run": float(np.mean([tr.text_length(s) for s in left[:n]])),
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    del tr, clip, images, centre
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return out


def run_workbench(name, data, device, batch, steps, warmup, compile_, soft, hard) -> dict:
    """:func:`bench_workbench` with fall-backs, each only if the last try raised: the flash attention kernel
    (the "auto" pick, cuDNN on an H200, may not compile on some builds; PyTorch's default order prefers
    cuDNN too), then no compile. A try equal to one that failed is skipped; every error is kept."""
    out, failed = {}, set()
    tries = [(True, "auto"), (True, "flash"), (False, "flash")] if compile_ else [(False, "auto")]
    for n_try, (use_compile, attention) in enumerate(tries):
        if (use_compile, attention) in failed:
            continue
        if n_try and time.perf_counter() + MIN_MODEL_S[device.type] > hard:
            out["skipped"] = f"no retry: {hard - time.perf_counter():.0f} s left for this model"
            break
        info = {}
        try:
            return {**out, **bench_workbench(name, *data, device, batch, steps, warmup, use_compile, soft, hard,
                                             attention, info)}
        except Exception as e:  # report and go on: one failure must not cost the other models
            resolved = info.get("attention", attention)
            out[f"error_{n_try}"] = f"compile={use_compile} attention={resolved}: {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(file=sys.stderr)
            _free(device)
            failed.add((use_compile, resolved))
            if isinstance(e, (torch.cuda.OutOfMemoryError, OutOfTime)):
                break
    return out


def bench_model(name, i, data, a, ctx) -> None:
    """One model: the workbench line as soon as it is measured, then the full line after the reference."""
    device, cuda, deadline_at, n_models = ctx["device"], ctx["cuda"], ctx["deadline_at"], ctx["n_models"]
    res = {"model": name, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
           "precision": "bf16 autocast, fp32 master weights" if cuda else "fp32"}
    tail = ctx["tail"]
    # this model may run until `hard`, which leaves each later model the least time worth starting it with
    hard = deadline_at - (n_models - i - 1) * MIN_MODEL_S[device.type]
    left = hard - time.perf_counter()
    if left < MIN_MODEL_S[device.type]:
        left_all = deadline_at - time.perf_counter()
        emit({**res, "skipped": f"{left_all:.0f} s left of the {ctx['deadline']:.0f} s deadline", **tail})
        return
    soft = time.perf_counter() + min(ctx["budget"], 0.7 * left)  # the rest is the reference's
    batch = a.batch_size or DEFAULT_BATCH.get(name, 256 if cuda else 32)
    res.update(run_workbench(name, data, device, batch, ctx["steps"], ctx["warmup"], ctx["compile"], soft, hard))
    add_flops(res, name, cuda)
    emit({**res, "part": "workbench", **tail})
    ref_budget = min(ctx["budget"] / 2, hard - time.perf_counter() - 5)
    if not a.no_reference and ref_budget < 10:
        res["reference_error"] = f"skipped: {deadline_at - time.perf_counter():.0f} s left of the deadline"
    elif not a.no_reference:
        try:
            res.update(bench_reference(name, data[0], data[1], data[2], device,
                                       max(3, ctx["steps"] // 2) if cuda else 3, 2, ctx["workers"], ref_budget))
        except Exception as e:
            res["reference_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(file=sys.stderr)
            _free(device)
    if "pairs_per_s" in res and "reference_pairs_per_s" in res:
        res["speedup"] = res["pairs_per_s"] / res["reference_pairs_per_s"]
    emit({**res, **tail})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=None, help="comma-separated (default: tiny on CPU, ViT-B-16,ViT-L-14-336 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="override the per-model default batch")
    p.add_argument("--images", type=int, default=None, help="JPEG files to write (default: 2000 on CUDA, 256 on CPU)")
    p.add_argument("--image-px", type=int, default=None,
                   help="short side of the JPEG files (default 384 on CUDA, 96 on CPU)")
    p.add_argument("--aspect", type=float, default=4 / 3,
                   help="long / short side of the JPEG files (every fourth portrait; 1: squares)")
    p.add_argument("--captions", type=int, default=4, help="captions per image (pairs = images x captions)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (at most; bounded by --budget-s)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (compile happens here)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget per model for the workbench part")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="wall-clock limit for the whole script (default 290 s on CUDA): warm-up and timing stop "
                        "there, models and references are skipped when too little time is left")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer images and steps (a smoke run)")
    a = p.parse_args(argv)
    t_script = time.perf_counter()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = (a.models or ("ViT-B-16,ViT-L-14-336" if cuda else "tiny")).split(",")
    n_images = a.images or ((600 if a.quick else 2000) if cuda else (64 if a.quick else 256))
    px = a.image_px or (384 if cuda else 96)
    deadline = a.deadline_s or (290 if cuda else 3600)
    ctx = {"device": device, "cuda": cuda, "n_models": len(models), "deadline": deadline,
           "deadline_at": t_script + deadline, "compile": cuda and not a.no_compile,
           "steps": a.steps or ((10 if a.quick else 40) if cuda else (3 if a.quick else 8)),
           "warmup": a.warmup if a.warmup is not None else (4 if cuda else 1),
           "budget": a.budget_s or ((30 if a.quick else 60) if cuda else 120),
           "workers": min(8, os.cpu_count() or 1) if cuda else 0}
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        os.environ.setdefault("WORKBENCH_CACHE", str(Path(tmp) / "cache"))
        t0 = time.perf_counter()
        paths = write_jpegs(Path(tmp) / "jpeg", n_images, px, max(1, os.cpu_count() or 1), a.aspect)
        ctx["tail"] = {"images": n_images, "jpeg_px": px, "jpeg_aspect": round(a.aspect, 4),
                       "jpeg_write_s": round(time.perf_counter() - t0, 2),
                       "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        texts, rows, labels = make_captions(n_images, a.captions)
        for i, name in enumerate(models):
            bench_model(name, i, (paths, texts, rows, labels), a, ctx)


if __name__ == "__main__":
    main()
