"""The process group of ``torchrun -m workbench.finetune``: a timeout long enough for rank-0-only work
between barriers (decoding the image cache, pretraining the tiny model, validation, checkpoint writes),
each rank's own device, and an abort that ends every rank within seconds when one of them raises.

Without it a rank that raises leaves the others blocked in their next collective until the timeout:
NCCL does not notice that a peer process has died."""
from __future__ import annotations

import os
import sys
import threading
import traceback
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

TIMEOUT_ENV = "WORKBENCH_DDP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0  # NCCL's default is 600 s, short for rank 0 decoding a large image cache alone
ABORT_KEY = "workbench/abort"


def ddp_timeout() -> timedelta:
    """The collective timeout: ``$WORKBENCH_DDP_TIMEOUT_S`` seconds, else 1800."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


def init_distributed(use_cuda: bool, timeout: timedelta | None = None) -> None:
    """Join the group torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_*``): NCCL bound to
    this rank's GPU, or gloo on CPUs; ``timeout`` defaults to :func:`ddp_timeout`."""
    device = None
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout or ddp_timeout(), device_id=device)


def _watch(store, rank: int, done: threading.Event, poll_s: float, grace_s: float) -> None:
    """Exit this process when another rank has posted an abort, or when the rendezvous store is gone
    (its host died) and this rank does not finish within ``grace_s``."""
    while not done.wait(poll_s):
        try:
            if not store.check([ABORT_KEY]):
                continue
            why = store.get(ABORT_KEY).decode(errors="replace")
        except Exception as e:  # noqa: BLE001 - any store failure means the job's rendezvous is gone
            if done.wait(grace_s):  # the normal end: the store's host exited first
                return
            why = f"the rendezvous store is unreachable ({type(e).__name__})"
        print(f"workbench.finetune rank {rank}: stopping, {why}", file=sys.stderr, flush=True)
        os._exit(1)  # the main thread may be blocked inside a collective: nothing else ends it


@contextmanager
def abort_on_error(poll_s: float = 0.5, grace_s: float = 3.0):
    """Around each rank's work: if this rank raises, post the error to the rendezvous store and exit the
    process at once; a watcher thread on every rank exits its process when it sees such a post. On success
    the ranks meet at a barrier first, so no rank's exit looks like a failure to another."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    store, rank, done = _get_default_store(), dist.get_rank(), threading.Event()
    watcher = threading.Thread(target=_watch, args=(store, rank, done, poll_s, grace_s), daemon=True)
    watcher.start()
    try:
        yield
        dist.barrier()
    except BaseException as e:
        try:
            store.set(ABORT_KEY, f"rank {rank} failed: {type(e).__name__}: {e}")
        except Exception:  # noqa: BLE001 - the store may be gone too; exiting still ends this rank
            pass
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    done.set()
    watcher.join(timeout=5)
