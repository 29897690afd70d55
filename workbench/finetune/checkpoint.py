"""Checkpoints of a run: the best weights (safetensors, loadable by ``load_clip``) and the resume state
(model, optimizer, schedule, each rank's RNG, step, history), each written atomically and one tensor at a
time; the training log trimmed to what a resumed run has done, so every step is logged once."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..cache import open_tensors, save_tensors
from ..io import CorruptFileError, read_jsonl, write_jsonl

STATE_FORMAT = "workbench-resume-1"
_SECTIONS = ("model", "optimizer", "rng")  # held as tensors; every other entry is JSON in the header
_REWRITE = ("the fine-tuning stage (03_finetune) writes it: delete it, or pass resume=False, "
            "to start the run over")


def save_state(path: Path, state: dict) -> None:
    """The resume state as one safetensors file, streamed one tensor at a time (the whole state is never
    copied to host memory at once): tensors under flat names (``model/<key>``,
    ``optimizer/<param>/<name>``, ``rng/<kind>/<rank>``), every other value as JSON in the header, so it
    loads without unpickling anything."""
    tensors = {f"model/{k}": v for k, v in state["model"].items()}
    values: dict = {}  # non-tensor per-parameter optimizer state (AdamW has none)
    for pid, st in state["optimizer"]["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer/{pid}/{name}"] = v
            else:
                values.setdefault(str(pid), {})[name] = v
    for kind, per_rank in state["rng"].items():
        tensors.update({f"rng/{kind}/{r}": v for r, v in enumerate(per_rank)})
    meta = {k: json.dumps(v) for k, v in state.items() if k not in _SECTIONS}
    meta.update(format=STATE_FORMAT, optimizer_param_groups=json.dumps(state["optimizer"]["param_groups"]),
                optimizer_values=json.dumps(values))
    save_tensors(path, tensors, meta)


def load_state(path: Path) -> dict:
    """The dict :func:`save_state` was given (tensors on the CPU). A truncated or corrupt file raises
    :class:`~workbench.io.CorruptFileError` naming it."""
    with open_tensors(path, _REWRITE) as f:
        meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise CorruptFileError(path, f"not a workbench resume state ({STATE_FORMAT})", _REWRITE)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    special = ("format", "optimizer_param_groups", "optimizer_values")
    st = {k: json.loads(v) for k, v in meta.items() if k not in special}
    opt_state = {int(pid): dict(v) for pid, v in json.loads(meta["optimizer_values"]).items()}
    model, rng = {}, {}
    for key, v in tensors.items():
        section, rest = key.split("/", 1)
        if section == "model":
            model[rest] = v
        elif section == "optimizer":
            pid, name = rest.split("/", 1)
            opt_state.setdefault(int(pid), {})[name] = v
        else:
            kind, rank = rest.split("/")
            rng.setdefault(kind, {})[int(rank)] = v
    groups = json.loads(meta["optimizer_param_groups"])
    for g in groups:
        if "betas" in g:  # a tuple, as the optimizer made it (JSON has only lists)
            g["betas"] = tuple(g["betas"])
    st.update(model=model, optimizer={"state": opt_state, "param_groups": groups},
              rng={kind: [rows[r] for r in sorted(rows)] for kind, rows in rng.items()})
    return st


def state_step(path: Path) -> int:
    """The step a resume state was written at (reads the header only)."""
    with open_tensors(path, _REWRITE) as f:
        meta = f.metadata() or {}
    if meta.get("format") != STATE_FORMAT or "step" not in meta:
        raise CorruptFileError(path, f"not a workbench resume state ({STATE_FORMAT}): no step in its header", _REWRITE)
    return json.loads(meta["step"])


def save_weights(path: Path, clip, metadata: dict) -> None:
    sd = {k: v.detach().float() for k, v in clip.state_dict().items()}  # fp32 master weights: no copy
    save_tensors(path, sd, {k: str(v) for k, v in metadata.items()})


def gather_rng(device: torch.device, world: int) -> dict[str, list[torch.Tensor]]:
    """Every rank's RNG states by kind (``cpu``, and ``cuda`` on a GPU), in rank order. A collective under
    DDP: every rank calls it."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return {k: [v] for k, v in mine.items()}
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    return {k: [r[k] for r in every] for k in mine}


def restore_rng(rng: dict[str, list[torch.Tensor]], rank: int, device: torch.device) -> None:
    """Put back this rank's own RNG states (rank 0's, when the state was written by fewer ranks)."""
    def own(rows):
        return rows[rank] if rank < len(rows) else rows[0]

    torch.set_rng_state(own(rng["cpu"]))
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(own(rng["cuda"]), device)


def resume_state(clip, opt, cfg, step: int, pairs: int, total: int, history: list, best: dict, rng: dict,
                 identity: dict | None = None) -> dict:
    """Everything a resumed run needs to continue exactly as if it had not stopped, and the identity of what
    it trains on (``workbench.identity``; None when the caller keeps none). Tensors stay where they are:
    :func:`save_state` copies them to the host one at a time."""
    return {
        "model": clip.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": {"kind": "warmup-cosine", "base_lr": cfg.lr, "warmup": cfg.warmup, "total": total},
        "step": step,
        "pairs": pairs,
        "fingerprint": cfg.fingerprint(),
        "config": json.dumps(asdict(cfg)),
        "history": json.dumps(history),
        "best": json.dumps(best),
        "identity": json.dumps(identity),
        "rng": rng,
    }


def rewrite_log(log_path: Path | None, run: str, keep_upto_step: int) -> None:
    """Drop this run's rows past ``keep_upto_step`` (-1: all), so a resumed or repeated run logs each step once."""
    if log_path is None or not Path(log_path).exists():
        return
    rows = read_jsonl(log_path)
    kept = [r for r in rows if r.get("run") != run or r.get("step", 0) <= keep_upto_step]
    if len(kept) != len(rows):
        write_jsonl(log_path, kept)
