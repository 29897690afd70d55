"""Console entry point: ``workbench run``, ``workbench params``, ``workbench cache``."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from . import config as C
from . import pipeline
from .cache import cache_root, cache_usage, clear_cache
from .runs import RunBusyError, read_metrics, run_lock


def _run(args) -> int:
    if args.list:
        for name, desc in C.list_presets().items():
            print(f"{name:16s} {desc}")
        return 0
    if not args.target:
        print("workbench run: give a preset name or a config .yaml (see --list)", file=sys.stderr)
        return 2
    stages = [s for item in (args.stages or []) for s in item.split(",") if s]
    try:
        plan = pipeline.plan(args.target, args.set or [], name=args.name, stages=stages or None,
                             reports=args.reports)
    except (C.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"workbench run: {e}", file=sys.stderr)
        return 2
    try:
        with run_lock(plan.run_dir, force=args.force):  # a busy run name is refused before any work
            return _execute(plan)
    except RunBusyError as e:
        print(f"workbench run: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: the stage's kernel is down and the lock released by now
        where = f" during stage {e.stage!r}" if isinstance(e, pipeline.StageInterrupted) else ""
        print(f"workbench run: interrupted{where}; rerun the same command (workbench run {args.target} ... "
              f"--name {plan.name}) and it resumes", file=sys.stderr)
        return 128 + signal.SIGINT


def _execute(plan: pipeline.RunPlan) -> int:
    try:
        pipeline.check_dataset(plan.config)
    except (C.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"workbench run: {e}", file=sys.stderr)
        return 2
    print(f"run {plan.name!r}: stages {list(plan.stages)} -> {plan.run_dir}")
    try:
        pipeline.execute(plan)
    except pipeline.StageFailed as e:
        print(f"workbench run: {e}", file=sys.stderr)
        return 1
    if "finetune" in plan.stages:  # collapsed or unmoved runs: said here too, not only in the report
        for r in read_metrics(plan.run_dir).get("finetune", {}).get("runs", []):
            if r.get("warning"):
                print(f"workbench run: warning: {r['warning']}", file=sys.stderr)
    print(f"done: {plan.run_dir}")
    return 0


def _params(args) -> int:
    try:
        stages = C.discover_stages()
    except FileNotFoundError as e:
        print(f"workbench params: {e}", file=sys.stderr)
        return 2
    if args.stage not in stages:
        print(f"workbench params: unknown stage {args.stage!r}; stages: {list(stages)}", file=sys.stderr)
        return 2
    params = C.notebook_parameters(stages[args.stage])
    print(f"Parameters of stage {args.stage!r} ({stages[args.stage].name}); set with "
          f"--set {args.stage}.<name>=<value> (common keys without a prefix):")
    for name, p in params.items():
        tag = " [common]" if name in C.COMMON else " [set by the pipeline]" if name in C.RESERVED else ""
        print(f"  {name}: {p['inferred_type_name']} (default {p['default']}){tag}  {p['help']}")
    return 0


def _cache(args) -> int:
    if args.clear:
        try:
            freed = clear_cache(args.clear)
        except ValueError as e:
            print(f"workbench cache: {e}", file=sys.stderr)
            return 2
        print(f"freed {freed / 2**20:.1f} MiB under {cache_root()}")
        return 0
    rows = cache_usage()
    print(f"cache root: {cache_root()} (WORKBENCH_CACHE)")
    for r in rows:
        print(f"  {r['kind']:20s} {r['bytes'] / 2**20:10.1f} MiB {r['files']:7d} files  {r['what']}")
    print(f"  {'total':20s} {sum(r['bytes'] for r in rows) / 2**20:10.1f} MiB")
    return 0


def _pretrain(args) -> int:
    # imported here: the pretraining recipe pulls in torch and the trainer, which the other commands never need
    from .pretrain import build, pretrain_config

    try:
        overrides = dict(C.parse_set(s) for s in args.set or [])
        pretrain_config(**overrides)
    except (C.ConfigError, ValueError) as e:
        print(f"workbench pretrain: {e}", file=sys.stderr)
        return 2
    out = build(args.out, progress=True, **overrides)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="workbench", description="GIST workbench: run the notebook pipeline.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the stage notebooks with papermill into reports/<name>/")
    r.add_argument("target", nargs="?", help="preset name (see --list) or config .yaml")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override: common key, <stage>.<key>, or a bare stage key (sets it in every stage)")
    r.add_argument("--name", help="run name (default: the preset or file name)")
    r.add_argument("--stages", action="append", help="stages to run, e.g. --stages describe,match")
    r.add_argument("--reports", default="reports", help="folder that holds run directories")
    r.add_argument("--list", action="store_true", help="list presets and exit")
    r.add_argument("--force", action="store_true",
                   help="break the run folder's lock when its holder, on another host, cannot be checked")
    r.set_defaults(fn=_run)
    p = sub.add_parser("params", help="print a stage's parameters")
    p.add_argument("stage")
    p.set_defaults(fn=_params)
    c = sub.add_parser("cache", help="show what the cache holds, or clear parts of it (all recomputable)")
    c.add_argument("--clear", nargs="+", metavar="KIND", help="kinds to delete (see the listing), or 'all'")
    c.set_defaults(fn=_cache)
    t = sub.add_parser("pretrain", help="train the synthetic benchmark's tiny CLIP and write the weights the package ships")
    t.add_argument("--out", help="where to write them (default: the package's file, which load_clip('tiny', 'synthetic') reads)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe setting, e.g. steps=100")
    t.set_defaults(fn=_pretrain)
    args = ap.parse_args(argv)
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # a reader that left shows up here, not in the interpreter's last flush
    except KeyboardInterrupt:  # Ctrl-C outside a run's stages (`workbench run` says more itself)
        print(f"workbench {args.cmd}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # `workbench params match | head`: stop quietly, as Unix tools do. Later writes (and the final
        # flush at exit) go to /dev/null instead of raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return rc


if __name__ == "__main__":
    sys.exit(main())
