"""Checkpoints of a run: the best weights (safetensors, loadable by ``load_clip``) and the resume state
(model, optimizer, schedule, RNG, step, history), each written atomically; the training log trimmed
to what a resumed run has done, so every step is logged once."""
from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from ..io import atomic_write_bytes, read_jsonl, write_jsonl


def save_state(path: Path, state: dict) -> None:
    """torch.save to a temp file, fsync, rename: readers see the old or the new file, never half."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_weights(path: Path, clip, metadata: dict) -> None:
    sd = {k: v.detach().float().contiguous().cpu() for k, v in clip.state_dict().items()}
    atomic_write_bytes(path, save_safetensors(sd, metadata={k: str(v) for k, v in metadata.items()}))


def resume_state(clip, opt, cfg, step: int, pairs: int, total: int, history: list, best: dict, device) -> dict:
    """Everything a resumed run needs to continue exactly as if it had not stopped."""
    st = {
        "model": {k: v.detach().cpu() for k, v in clip.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scheduler": {"kind": "warmup-cosine", "base_lr": cfg.lr, "warmup": cfg.warmup, "total": total},
        "step": step,
        "pairs": pairs,
        "fingerprint": cfg.fingerprint(),
        "config": json.dumps(asdict(cfg)),
        "history": json.dumps(history),
        "best": json.dumps(best),
        "rng_cpu": torch.get_rng_state(),
    }
    if device.type == "cuda":
        st["rng_cuda"] = torch.cuda.get_rng_state(device)
    return st


def rewrite_log(log_path: Path | None, run: str, keep_upto_step: int) -> None:
    """Drop this run's rows past ``keep_upto_step`` (-1: all), so a resumed or repeated run logs each step once."""
    if log_path is None or not Path(log_path).exists():
        return
    rows = read_jsonl(log_path)
    kept = [r for r in rows if r.get("run") != run or r.get("step", 0) <= keep_upto_step]
    if len(kept) != len(rows):
        write_jsonl(log_path, kept)
