"""Helpers of bench_finetune.py: the synthetic JPEGs and captions, FLOP counts, the GIST reference run,
JSON output. Kept apart so the benchmark script reads as its measurements."""
from __future__ import annotations

import gc
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from open_clip.model import convert_weights_to_lp
from PIL import Image
from torchvision import transforms as T

from workbench.clip import resolve_name
from workbench.clip.tiny import adapt

PEAK_FLOPS = 790e12  # measured bf16 dense matmul peak of one H200
WORDS = ("red crown white breast dark wings long tail short hooked beak spotted streaked plain buff "
         "brown blue yellow feathers pale throat black mask grey back barred flanks orange rump").split()


def forward_flops(name: str, text_len: int | None = None) -> tuple[float, float]:
    """(image, text) forward FLOPs per pair of an open_clip ViT CLIP, from its config.

    Matmuls only, 2 FLOPs per MAC: per layer 2n(4w^2 + 2*mlp*w^2) + 4n^2w, plus the patch embedding
    and projections. Reproduces open_clip's profile (ViT-L/14@336: 381.9 + 13.3 GFLOPs). wb-tiny's conv stem
    is counted as the patchify convolution it replaces (the benchmark's MFU is for the ViT models).
    """
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


def write_jpegs(folder: Path, n: int, px: int, workers: int, aspect: float = 4 / 3) -> list[Path]:
    """``n`` JPEG files, short side ``px``, long side ``px * aspect`` (landscape, every fourth portrait, as
    photos come), of smooth colour fields + noise (realistic file sizes)."""
    folder.mkdir(parents=True, exist_ok=True)

    def one(i):
        rng = np.random.default_rng(i)
        w, h = round(px * aspect), px
        w, h = (h, w) if i % 4 == 3 else (w, h)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.int16) + rng.integers(-20, 20, (h, w, 3))
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
    dynamo.reset()  # compiled graphs of the last model are no use to the next
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _JpegPairs(torch.utils.data.Dataset):
    """The reference data path: open the JPEG, RandomResizedCrop + flip + ToTensor + Normalize (PIL)."""

    def __init__(self, paths, rows, ids, size, mean, std):
        self.paths, self.rows, self.ids = paths, rows, ids
        self.tf = T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                             T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        with Image.open(self.paths[self.rows[i]]) as im:
            return self.tf(im.convert("RGB")), self.ids[i]


def bench_reference(name, paths, texts, rows, device, steps, warmup, workers, budget_s):
    """The GIST recipe: fp16 weights (fp32 on CPU, which has no fast fp16), cast to fp32 around each Adam step."""
    t0 = time.perf_counter()
    fp16 = device.type == "cuda"
    torch.manual_seed(0)
    model = open_clip.create_model(resolve_name(name), precision="fp16" if fp16 else "fp32", device=device)
    adapt(resolve_name(name), model)  # the same architecture as the workbench's (wb-tiny's conv stem)
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


def add_flops(res: dict, name: str, cuda: bool) -> None:
    img_f, txt_f = forward_flops(name)
    res["gflops_per_pair_forward"] = round((img_f + txt_f) / 1e9, 2)
    if "pairs_per_s" in res:
        exec_f = sum(forward_flops(name, round(res["text_tokens_run"])))
        res["tflops"] = 3 * (img_f + txt_f) * res["pairs_per_s"] / 1e12
        res["mfu"] = 3 * (img_f + txt_f) * res["pairs_per_s"] / PEAK_FLOPS if cuda else None
        res["mfu_executed"] = 3 * exec_f * res["pairs_per_s"] / PEAK_FLOPS if cuda else None


def emit(res: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)
