"""Fine-tuning throughput: the workbench loop vs a replica of the GIST recipe, from real JPEG files.

Prints one JSON object per model:
``{"model", "pairs_per_s", "mfu", "reference_pairs_per_s", "speedup", ...}``.

Workbench: JPEGs decoded once into the uint8 cache (``image_cache``), random resized crop + flip +
normalise on the device, fp32 master weights, bf16 autocast, fused AdamW, regional ``torch.compile``,
the production :class:`workbench.trainer.Trainer` step. Reference (same process, same files): the GIST
recipe - fp16 weights cast to fp32 around each Adam step (lr 1e-6, betas (0.9, 0.98), eps 1e-6,
wd 1e-3), batch 20, PIL RandomResizedCrop + flip per image in a DataLoader.

MFU = 3 x forward FLOPs per pair (open_clip's profile: ViT-L/14@336 381.9 + 13.3 GFLOPs, ViT-B/16
35.1 + 6.0; computed here from the architecture, full 77-token text) x pairs/s / 790e12 (a measured
H200 bf16 matmul peak). ``mfu_executed`` counts the text FLOPs at the trimmed length actually run.

    python benchmarks/bench_finetune.py                       # CPU, tiny model
    python benchmarks/bench_finetune.py --device cuda         # ViT-B-16 and ViT-L-14-336, random init
    python benchmarks/bench_finetune.py --device cuda --quick # fewer steps and images
Each model's workbench part is bounded by ``--budget-s`` (default 60 s on CUDA, warm-up and compile
included, at least 5 timed steps), the reference by half of it, and the whole script by
``--deadline-s`` (default 290 s on CUDA; the reference is skipped rather than overrun). A failure (compile, memory) is
reported in that model's JSON (``error_0``, ...: then it is re-run with PyTorch's default attention
kernel, then without compile) and the next model still runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_FLOPS = 790e12  # measured bf16 dense matmul peak of one H200
DEFAULT_BATCH = {"tiny": 64, "ViT-B-16": 1024, "ViT-L-14-336": 192}
WORDS = ("red crown white breast dark wings long tail short hooked beak spotted streaked plain buff "
         "brown blue yellow feathers pale throat black mask grey back barred flanks orange rump").split()


def forward_flops(name: str, text_len: int | None = None) -> tuple[float, float]:
    """(image, text) forward FLOPs per pair of an open_clip ViT CLIP, from its config.

    Matmuls only, 2 FLOPs per MAC: per layer 2n(4w^2 + 2*mlp*w^2) + 4n^2w, plus the patch embedding
    and projections. Reproduces open_clip's profile (ViT-L/14@336: 381.9 + 13.3 GFLOPs).
    """
    import open_clip

    from workbench.clip import resolve_name

    cfg = open_clip.get_model_config(resolve_name(name))
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    mlp = v.get("mlp_ratio", 4.0)
    grid = v["image_size"] // v["patch_size"]
    n, w = grid * grid + 1, v["width"]
    img = v["layers"] * (2 * n * (4 + 2 * mlp) * w * w + 4 * n * n * w)
    img += 2 * (n - 1) * 3 * v["patch_size"] ** 2 * w + 2 * w * e
    n, w = text_len or t.get("context_length", 77), t["width"]
    txt = t["layers"] * (2 * n * (4 + 2 * t.get("mlp_ratio", 4.0)) * w * w + 4 * n * n * w) + 2 * w * e
    return img, txt


def write_jpegs(folder: Path, n: int, px: int, workers: int) -> list[Path]:
    """``n`` JPEG files of ``px`` x ``px`` (smooth colour fields + noise: realistic file sizes)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)

    def one(i):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((px, px), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.int16) + rng.integers(-20, 20, (px, px, 3))
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        return path

    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, range(n)))


def make_captions(n_images: int, k: int, seed: int = 0) -> tuple[list[str], list[int], list[int]]:
    """GIST-style "class: caption" texts, ``k`` per image (about 15-35 CLIP tokens)."""
    rng = np.random.default_rng(seed)
    texts, rows, labels = [], [], []
    for i in range(n_images):
        label = i % 100
        for _ in range(k):
            words = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 22))))
            texts.append(f"species {label}: {words}.")
            rows.append(i)
            labels.append(label)
    return texts, rows, labels


def _free(device):
    import torch._dynamo as dynamo

    dynamo.reset()  # compiled graphs of the last model are no use to the next
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_workbench(name, paths, texts, rows, labels, device, batch, steps, warmup, compile_, budget_s,
                    attention="auto"):
    from workbench.clip import image_size, load_clip
    from workbench.data.images import image_cache
    from workbench.finetune.trainer import FinetuneConfig, Trainer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    clip, _, tok = load_clip(name, None, "cpu")
    size = image_size(clip)
    t1 = time.perf_counter()
    images = image_cache(paths, size)  # decode once (cached on disk, keyed by the files)
    decode_s = time.perf_counter() - t1
    keep = len(texts) // batch * batch  # whole batches: the trainer then runs exactly `batch`
    if keep == 0:
        raise ValueError(f"{len(texts)} pairs are fewer than one batch of {batch}; pass more --images")
    texts, rows, labels = texts[:keep], rows[:keep], labels[:keep]
    n_pairs = keep
    cfg = FinetuneConfig(
        loss="clip", batch_size=batch, epochs=10_000, lr=1e-5, warmup=10, compile=compile_,
        validate=False, precision="auto", attention=attention,
    )
    tr = Trainer(clip, tok, cfg, images, torch.tensor(rows), texts, torch.tensor(labels), device)
    setup_s = time.perf_counter() - t0
    t_start = time.perf_counter()
    for s in range(warmup):  # compile happens here
        loss, _ = tr.train_step(s)
    _sync(device)
    warm_s = time.perf_counter() - t_start
    # one more step to estimate the step time, then as many steps as the budget allows
    t1 = time.perf_counter()
    tr.train_step(warmup)
    _sync(device)
    step_s = time.perf_counter() - t1
    left = budget_s - (time.perf_counter() - t0)
    n_steps = max(5 if device.type == "cuda" else 2, min(steps, int(left / max(step_s, 1e-6))))
    t1 = time.perf_counter()
    for s in range(warmup + 1, warmup + 1 + n_steps):
        loss, gnorm = tr.train_step(s)
    _sync(device)
    dt = time.perf_counter() - t1
    final_loss = float(loss)
    # the input pipeline alone (index the cache, crop, flip, normalise, text ids to device)
    t1 = time.perf_counter()
    for s in range(5):
        tr.batch(s)
    _sync(device)
    pipeline_ms = (time.perf_counter() - t1) / 5 * 1e3
    text_len = float(np.mean([int(tr.eot[tr._perm[i * tr.B:(i + 1) * tr.B]].max()) + 1 for i in range(tr.steps_per_epoch)]))
    if cfg.compile:
        text_len = float(min(tr.ids.shape[1], math.ceil(text_len / 8) * 8))
    out = {
        "pairs_per_s": n_steps * tr.B / dt,
        "batch_size": tr.B,
        "steps_timed": n_steps,
        "step_ms": dt / n_steps * 1e3,
        "input_pipeline_ms": pipeline_ms,
        "warmup_s": warm_s,
        "setup_s": setup_s,
        "decode_images_per_s": len(paths) / decode_s,
        "image_px": size,
        "pairs": n_pairs,
        "compile": cfg.compile,
        "attention": tr.attention,
        "final_loss": final_loss,
        "text_tokens_run": text_len,
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    del tr, clip, images, loss, gnorm
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return out


class _JpegPairs(torch.utils.data.Dataset):
    """The reference data path: open the JPEG, RandomResizedCrop + flip + ToTensor + Normalize (PIL)."""

    def __init__(self, paths, rows, ids, size, mean, std):
        from torchvision import transforms as T

        self.paths, self.rows, self.ids = paths, rows, ids
        self.tf = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                             T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[self.rows[i]]) as im:
            return self.tf(im.convert("RGB")), self.ids[i]


def bench_reference(name, paths, texts, rows, device, steps, warmup, workers, budget_s):
    """The GIST recipe: fp16 weights (fp32 on CPU, which has no fast fp16), cast to fp32 around each Adam step."""
    import open_clip
    from open_clip.model import convert_weights_to_lp

    from workbench.clip import resolve_name

    t0 = time.perf_counter()
    fp16 = device.type == "cuda"
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_name(name), precision="fp16" if fp16 else "fp32", device=device)
    model.train()
    tok = open_clip.get_tokenizer(resolve_name(name))
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]
    ids = tok(texts)
    ds = _JpegPairs([str(p) for p in paths], rows, ids, size, pp["mean"], pp["std"])
    loader = torch.utils.data.DataLoader(ds, batch_size=20, shuffle=True, drop_last=True, num_workers=workers,
                                         persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-6, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-3)
    gt = torch.arange(20, device=device)

    def to_fp32(m):  # the recipe's convert_models_to_fp32
        for p in m.parameters():
            p.data = p.data.float()
            if p.grad is not None:
                p.grad.data = p.grad.data.float()

    done, t_start, dtype = 0, None, torch.float16 if fp16 else torch.float32
    it = iter(loader)
    while True:
        try:
            x, t = next(it)
        except StopIteration:
            it = iter(loader)
            x, t = next(it)
        x, t = x.to(device, dtype), t.to(device)
        opt.zero_grad()
        li, lt = model.get_logits(x, t)
        loss = (F.cross_entropy(li, gt) + F.cross_entropy(lt, gt)) / 2
        loss.backward()
        if fp16:
            to_fp32(model)
            opt.step()
            convert_weights_to_lp(model, torch.float16)
        else:
            opt.step()
        done += 1
        if done == warmup:
            _sync(device)
            t_start = time.perf_counter()
            step_s = None
        elif t_start is not None:
            timed = done - warmup
            if timed == 1:
                _sync(device)
                step_s = time.perf_counter() - t_start
            if timed >= steps or (step_s and time.perf_counter() - t0 + step_s > budget_s and timed >= 3):
                break
    _sync(device)
    dt = time.perf_counter() - t_start
    del model, opt, loader, it
    _free(device)
    return {"reference_pairs_per_s": timed * 20 / dt, "reference_steps_timed": timed,
            "reference_precision": "fp16 weights, fp32 step" if fp16 else "fp32 (CPU)", "reference_workers": workers}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=None, help="comma-separated (default: tiny on CPU, ViT-B-16,ViT-L-14-336 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="override the per-model default batch")
    p.add_argument("--images", type=int, default=None, help="JPEG files to write (default: 2000 on CUDA, 256 on CPU)")
    p.add_argument("--image-px", type=int, default=None, help="side of the JPEG files (default 384 on CUDA, 96 on CPU)")
    p.add_argument("--captions", type=int, default=4, help="captions per image (pairs = images x captions)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (at most; bounded by --budget-s)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (compile happens here)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget per model for the workbench part")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="wall-clock limit for the whole script (default 290 s on CUDA): budgets shrink to fit, "
                        "the reference is skipped when too little time is left")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer images and steps (a smoke run)")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    models = (a.models or ("ViT-B-16,ViT-L-14-336" if cuda else "tiny")).split(",")
    n_images = a.images or ((600 if a.quick else 2000) if cuda else (64 if a.quick else 256))
    px = a.image_px or (384 if cuda else 96)
    steps = a.steps or ((10 if a.quick else 40) if cuda else (3 if a.quick else 8))
    warmup = a.warmup if a.warmup is not None else (4 if cuda else 1)
    budget = a.budget_s or ((30 if a.quick else 60) if cuda else 120)
    t_script = time.perf_counter()
    deadline = a.deadline_s or (290 if cuda else 3600)
    remaining = lambda: deadline - (time.perf_counter() - t_script)  # noqa: E731
    workers = min(8, os.cpu_count() or 1) if cuda else 0
    compile_ = cuda and not a.no_compile

    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        os.environ.setdefault("WORKBENCH_CACHE", str(Path(tmp) / "cache"))
        t0 = time.perf_counter()
        paths = write_jpegs(Path(tmp) / "jpeg", n_images, px, workers=max(1, os.cpu_count() or 1))
        write_s = time.perf_counter() - t0
        texts, rows, labels = make_captions(n_images, a.captions)
        for i, name in enumerate(models):
            batch = a.batch_size or DEFAULT_BATCH.get(name, 256 if cuda else 32)
            # the later models keep their share of what is left (model setup and compile ~ 40 s each)
            share = remaining() / (len(models) - i)
            wb_budget = max(20.0, min(budget, share - budget / 2 - 40))
            res = {"model": name, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                   "precision": "bf16 autocast, fp32 master weights" if cuda else "fp32"}
            # fall-backs, each only if the last attempt raised: the fastest attention kernel may not
            # compile on some builds, compile itself may fail; the error of each failed try is kept
            tries = [(True, "auto"), (True, "default"), (False, "default")] if compile_ else [(False, "auto")]
            for n_try, (use_compile, attention) in enumerate(tries):
                if n_try and remaining() < 60:
                    res["skipped"] = f"no retry: {remaining():.0f} s left of the {deadline:.0f} s deadline"
                    break
                try:
                    res.update(bench_workbench(name, paths, texts, rows, labels, device, batch, steps, warmup,
                                               use_compile, wb_budget, attention))
                    break
                except Exception as e:  # report and go on: one failure must not cost the other models
                    res[f"error_{n_try}"] = f"compile={use_compile} attention={attention}: {type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc(file=sys.stderr)
                    _free(device)
                    if isinstance(e, torch.cuda.OutOfMemoryError):
                        break
            img_f, txt_f = forward_flops(name)
            res["gflops_per_pair_forward"] = round((img_f + txt_f) / 1e9, 2)
            if "pairs_per_s" in res:
                exec_f = sum(forward_flops(name, round(res["text_tokens_run"])))
                res["tflops"] = 3 * (img_f + txt_f) * res["pairs_per_s"] / 1e12
                res["mfu"] = 3 * (img_f + txt_f) * res["pairs_per_s"] / PEAK_FLOPS if cuda else None
                res["mfu_executed"] = 3 * exec_f * res["pairs_per_s"] / PEAK_FLOPS if cuda else None
            ref_budget = min(budget / 2, remaining() - (len(models) - i - 1) * (budget + 40) - 20)
            if not a.no_reference and ref_budget < 10:
                res["reference_error"] = f"skipped: {remaining():.0f} s left of the {deadline:.0f} s deadline"
            elif not a.no_reference:
                try:
                    res.update(bench_reference(name, paths, texts, rows, device, max(3, steps // 2) if cuda else 3,
                                               2, workers, ref_budget))
                except Exception as e:
                    res["reference_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc(file=sys.stderr)
                    _free(device)
            if "pairs_per_s" in res and "reference_pairs_per_s" in res:
                res["speedup"] = res["pairs_per_s"] / res["reference_pairs_per_s"]
            res.update(images=n_images, jpeg_px=px, jpeg_write_s=round(write_s, 2), torch=torch.__version__,
                       date=time.strftime("%Y-%m-%d"))
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)


if __name__ == "__main__":
    main()
