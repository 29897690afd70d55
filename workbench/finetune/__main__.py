"""``torchrun --nproc_per_node N -m workbench.finetune --run-dir DIR [--set key=value ...]``: the
fine-tuning stage under DDP over N processes (NCCL on GPUs, gloo on CPU). Each batch is split across
ranks and features are gathered for the loss, so the runs equal single-process ones.

Settings are the run's own: ``DIR/params.yaml`` (what ``workbench run`` wrote: the ``finetune`` stage's
parameters exactly as ``03_finetune`` got them), with ``--set`` on top (``--set epochs=5`` or
``--set finetune.epochs=5``, validated like ``workbench run``'s). A ``--set`` that changes a setting is
recorded in ``DIR/params.yaml`` (its ``finetune`` section, or the common key, and a comment line saying
what torchrun changed and when), so the file always says what trained the folder's checkpoints. A folder
without ``params.yaml`` is refused unless ``--set`` or ``--defaults`` is given: then the settings are
``03_finetune``'s notebook defaults (with ``--set`` on top), and it says so.

Collectives time out after ``$WORKBENCH_DDP_TIMEOUT_S`` seconds (default 1800; rank 0 alone decodes the
image cache and writes checkpoints between them). When a rank raises, every rank ends within seconds.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import itertools
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import torch.distributed as dist

from ..clip.device import cuda_wanted
from ..config import COMMON, META, ConfigError, dump, load_schema, load_yaml, parse_set, resolve, stage_parameters
from ..io import atomic_write_text
from ..params import Params
from ..runs import PARAMS, RunBusyError, read_metrics, run_lock, run_name
from .distributed import abort_on_error, ddp_timeout, init_distributed
from .stage import run
from .trainer import rank_world

STAGE = "finetune"
PROG = "workbench.finetune"


def _say(msg: str) -> None:
    """A line on stderr from rank 0 only (every rank resolves the settings; one says what it found)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: {msg}", file=sys.stderr)


def _off_stage(keys: list[str], schema: dict) -> list[str]:
    """``--set`` keys that name no parameter of this stage (another stage's, or ``stages``)."""
    declared = schema[STAGE]
    bad = []
    for key in keys:
        head = key.partition(".")[0]
        if head in COMMON:
            ok = head in declared
        elif head in META:
            ok = False
        elif "." in key or head in schema:
            ok = head == STAGE
        else:
            ok = key in declared
        if not ok:
            bad.append(key)
    return bad


def _resolve(schema: dict, sources: list[dict], sets: list[str]) -> dict:
    """``workbench run``'s resolution (defaults < sources < ``--set``), refusing keys of other stages."""
    cfg = resolve(schema, sources, sets)
    off = _off_stage([parse_set(s)[0] for s in sets], schema)
    if off:
        raise ConfigError(f"not a parameter of stage {STAGE!r}: {', '.join(off)} (torchrun trains the {STAGE} "
                          f"stage only; see `workbench params {STAGE}`)")
    if cfg.get("data_root"):  # as `workbench run` does: a relative root keeps its meaning
        cfg["data_root"] = str(Path(cfg["data_root"]).expanduser().resolve())
    return cfg


def settings(run_dir: str, sets: list[str], defaults: bool = False) -> tuple[Params, dict | None, list[str]]:
    """This run's parameters: ``run_dir/params.yaml`` + ``sets``, else (``sets`` or ``defaults``) the
    notebook defaults + ``sets``. Returns (the parameters, the configuration to record in params.yaml or
    None when nothing changed or there is no params.yaml, the keys ``sets`` changed)."""
    schema = load_schema()
    path = Path(run_dir) / PARAMS
    if not path.exists():
        if not sets and not defaults:
            raise ConfigError(
                f"{run_dir} has no settings ({PARAMS} not found). Make them with `workbench run <preset> --name "
                f"<name> --stages describe,match` (that writes {path}; the match stage is what gist runs train "
                f"on), then run this again; or pass --defaults to train with 03_finetune's notebook defaults")
        cfg = _resolve(schema, [], sets)
        _say(f"{path} not found: training with 03_finetune's notebook DEFAULTS"
             + (f" and --set {' '.join(sets)}" if sets else " (--defaults)"))
        return Params({"run_dir": run_dir, **stage_parameters(cfg, STAGE, schema)}), None, []
    if defaults:
        raise ConfigError(f"--defaults: {run_dir} has settings ({path}); drop --defaults to train with them "
                          "(--set changes some)")
    written = load_yaml(path)
    try:
        base = stage_parameters(_resolve(schema, [written], []), STAGE, schema)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    trained = stage_parameters(_resolve(schema, [written], sets), STAGE, schema)
    changed = [k for k in trained if k not in base or base[k] != trained[k]]
    p = Params({"run_dir": run_dir, **trained})
    if not changed:
        return p, None, []
    record = copy.deepcopy(written)
    record[STAGE] = {**record.get(STAGE, {}), **{k: v for k, v in trained.items() if k not in COMMON}}
    record.update({k: v for k, v in trained.items() if k in COMMON})
    names = [k if k in COMMON else f"{STAGE}.{k}" for k in changed]
    _say(f"--set changes {', '.join(names)} of {path}; recording what trains in it")
    return p, record, names


def _record(run_dir: str, cfg: dict, changed: list[str]) -> None:
    """Rewrite ``params.yaml`` with what trains: its comment header kept, one line added saying what changed."""
    path = Path(run_dir) / PARAMS
    lines = path.read_text().splitlines()
    header = list(itertools.takewhile(lambda ln: ln.startswith("#"), lines))
    when = _dt.datetime.now().isoformat(timespec="seconds")
    note = f"# torchrun -m {PROG} --set changed {', '.join(changed)} on {when}; the values below trained checkpoints/"
    atomic_write_text(path, "\n".join([*header, note]) + "\n" + dump(cfg))


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
    ap = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a 03_finetune parameter, on top of DIR/params.yaml (epochs=5 or finetune.epochs=5)")
    ap.add_argument("--defaults", action="store_true",
                    help="DIR has no params.yaml: train with 03_finetune's notebook defaults")
    a = ap.parse_args(argv)
    try:
        p, record, changed = settings(a.run_dir, a.set, a.defaults)
    except ConfigError as e:
        _say(str(e))
        return 2
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        try:
            timeout = ddp_timeout()
        except ValueError as e:
            _say(str(e))
            return 2
        init_distributed(cuda_wanted(p.device), timeout)
    try:
        with ExitStack() as stack:
            refusal = _lock_for_all_ranks(stack, a.run_dir)
            if refusal is not None:
                if rank_world()[0] == 0:
                    print(f"{PROG}: {refusal}", file=sys.stderr)
                return 2
            if record is not None and rank_world()[0] == 0:
                _record(a.run_dir, record, changed)
            with abort_on_error():
                rows = run(p)
            if rank_world()[0] == 0:
                _report(a.run_dir, rows)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _report(run_dir: str, rows: list[dict]) -> None:
    print(json.dumps(rows, indent=1))
    names = {run_name(r["method"], r["shots"], r["seed"]) for r in rows}
    for r in read_metrics(run_dir).get("finetune", {}).get("runs", []):
        if r["run"] in names and r.get("warning"):  # collapsed or unmoved: say so, not just exit 0
            print(f"{PROG}: warning: {r['warning']}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
