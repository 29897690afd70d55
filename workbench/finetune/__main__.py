"""``torchrun --nproc_per_node N -m workbench.finetune --run-dir DIR [--set key=value ...]``: the
fine-tuning stage under DDP over N processes (NCCL on GPUs, gloo on CPU). Each batch is split across
ranks and features are gathered for the loss, so the runs equal single-process ones.

Settings are ``03_finetune``'s parameters, with its defaults: ``--set epochs=5 --set shots=[full]``.
Collectives time out after ``$WORKBENCH_DDP_TIMEOUT_S`` seconds (default 1800; rank 0 alone decodes the
image cache and writes checkpoints between them). When a rank raises, every rank ends within seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack

import torch
import torch.distributed as dist

from ..config import ConfigError, parse_set, stage_params
from ..runs import RunBusyError, read_metrics, run_lock
from .distributed import abort_on_error, ddp_timeout, init_distributed
from .plots import run_name
from .stage import run
from .trainer import rank_world


def _lock_for_all_ranks(stack: ExitStack, run_dir: str) -> str | None:
    """Rank 0 takes the run folder's lock for the whole group and tells every rank whether it got it,
    so a busy folder stops all ranks at once (none waits at a barrier for a rank that left)."""
    rank, world = rank_world()
    refusal = None
    if rank == 0:
        try:
            stack.enter_context(run_lock(run_dir))
        except RunBusyError as e:
            refusal = str(e)
    if world > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    return refusal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workbench.finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a 03_finetune parameter")
    a = ap.parse_args(argv)
    try:
        p = stage_params("finetune", run_dir=a.run_dir, **dict(parse_set(s) for s in a.set))
    except ConfigError as e:
        print(f"workbench.finetune: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        try:
            timeout = ddp_timeout()
        except ValueError as e:
            print(f"workbench.finetune: {e}", file=sys.stderr)
            return 2
        init_distributed(torch.cuda.is_available() and p.device != "cpu", timeout)
    try:
        with ExitStack() as stack:
            refusal = _lock_for_all_ranks(stack, a.run_dir)
            if refusal is not None:
                if rank_world()[0] == 0:
                    print(f"workbench.finetune: {refusal}", file=sys.stderr)
                return 2
            with abort_on_error():
                rows = run(p)
            if rank_world()[0] == 0:
                print(json.dumps(rows, indent=1))
                names = {run_name(r["method"], r["shots"], r["seed"]) for r in rows}
                for r in read_metrics(a.run_dir).get("finetune", {}).get("runs", []):
                    if r["run"] in names and r.get("warning"):  # collapsed or unmoved: say so, not just exit 0
                        print(f"workbench.finetune: warning: {r['warning']}", file=sys.stderr)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
