"""Console entry point: ``workbench run``, ``sweep``, ``compare``, ``params``, ``cache``, ``pretrain``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import config as C
from . import pipeline
from .reuse import candidate_dirs as reuse_candidates
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
        reuse_candidates(args.reuse or [])  # a --reuse folder that is not there fails before any work
    except (C.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"workbench run: {e}", file=sys.stderr)
        return 2
    try:
        with run_lock(plan.run_dir, force=args.force):  # a busy run name is refused before any work
            return _execute(plan, args.reuse)
    except RunBusyError as e:
        print(f"workbench run: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: the stage's kernel is down and the lock released by now
        where = f" during stage {e.stage!r}" if isinstance(e, pipeline.StageInterrupted) else ""
        print(f"workbench run: interrupted{where}; rerun the same command (workbench run {args.target} ... "
              f"--name {plan.name}) and it resumes", file=sys.stderr)
        return 128 + signal.SIGINT


def _execute(plan: pipeline.RunPlan, reuse: list | None = None) -> int:
    try:
        ds = pipeline.check_dataset(plan.config)
    except (C.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"workbench run: {e}", file=sys.stderr)
        return 2
    print(f"run {plan.name!r}: stages {list(plan.stages)} -> {plan.run_dir}")
    try:
        pipeline.execute(plan, reuse=reuse, dataset=ds)
    except pipeline.StageFailed as e:
        print(f"workbench run: {e}", file=sys.stderr)
        return 1
    if "finetune" in plan.stages:  # collapsed or unmoved runs: said here too, not only in the report
        for r in read_metrics(plan.run_dir).get("finetune", {}).get("runs", []):
            if r.get("warning"):
                print(f"workbench run: warning: {r['warning']}", file=sys.stderr)
    print(f"done: {plan.run_dir}")
    return 0


def _sweep(args) -> int:
    from . import sweep as S
    from .track import make_tracker

    stages = [s for item in (args.stages or []) for s in item.split(",") if s]
    try:
        sw = S.plan_sweep(args.target, args.grid or [], args.set or [], name=args.name, reports=args.reports,
                          stages=stages or None, reuse=args.reuse or [])
        executor = S.make_executor(args)
        tracker = make_tracker(args.track, sw.name)
    except (S.SweepError, C.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"workbench sweep: {e}", file=sys.stderr)
        return 2
    try:
        return S.run_sweep(sw, executor, retry_failed=args.retry_failed, tracker=tracker)
    except RunBusyError as e:
        print(f"workbench sweep: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench sweep: interrupted; rerun the same command and it finishes what is missing", file=sys.stderr)
        return 128 + signal.SIGINT


def _compare(args) -> int:
    from . import compare

    try:
        runs = compare.load_runs(args.paths)
        out = Path(args.out or args.paths[0]).resolve()
        src = C.notebooks_dir() / compare.COMPARE_NOTEBOOK
        if not src.is_file():
            raise FileNotFoundError(f"{src} not found (set WORKBENCH_NOTEBOOKS to the folder of the notebooks)")
    except (compare.CompareError, FileNotFoundError, OSError) as e:
        print(f"workbench compare: {e}", file=sys.stderr)
        return 2
    if len(runs) > 1:
        try:
            compare.check_same_test(runs)
        except compare.CompareError as e:
            print(f"workbench compare: note: paired comparison refused: {e}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    print(f"comparing {len(runs)} runs -> {out / compare.COMPARE_NOTEBOOK}")
    try:
        pipeline.run_notebook(src, out / compare.COMPARE_NOTEBOOK,
                              {"run_dir": str(out), "runs": [str(r.path) for r in runs], "bootstrap_n": args.bootstrap_n},
                              cwd=out, stage="compare")
    except pipeline.StageFailed as e:
        print(f"workbench compare: {e}", file=sys.stderr)
        return 1
    print(f"done: {(out / compare.COMPARE_NOTEBOOK).with_suffix('.html')}")
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
    from .cache import cache_root, cache_usage, clear_cache  # torch: only this command needs it

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
    r.add_argument("--reuse", action="append", metavar="DIR",
                   help="take each stage whose settings and inputs are unchanged from this run folder (or a folder "
                        "of them, e.g. a sweep) instead of computing it; name the run's own folder to skip its "
                        "unchanged stages on a rerun")
    r.set_defaults(fn=_run)
    w = sub.add_parser("sweep", help="run a grid of settings as runs under reports/<name>/, computing each stage once")
    w.add_argument("target", help="preset name or config .yaml (which may hold a grid: section)")
    w.add_argument("--name", help="sweep name: its folder is <reports>/<name>")
    w.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="a swept setting and its values (YAML, as --set); 'a.x,b.x=0,1' sets both together; "
                        "brackets hold one list value: 'finetune.shots=[1,3],[5]'")
    w.add_argument("--set", action="append", metavar="KEY=VALUE", help="a fixed override, as for workbench run")
    w.add_argument("--stages", action="append", help="stages each member runs, e.g. --stages describe,match")
    w.add_argument("--reports", default="reports", help="folder that holds the sweep folder")
    w.add_argument("--reuse", action="append", metavar="DIR",
                   help="also take unchanged stages from this run folder (or folder of runs)")
    w.add_argument("--retry-failed", action="store_true", help="rerun only the members that failed")
    w.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: child processes on this machine; slurm: one SLURM job per member (submitit)")
    w.add_argument("--jobs", type=int, default=1, help="local: members at a time (with GPUs, one GPU set each)")
    w.add_argument("--gpus-per-job", type=int, default=0, help="GPUs each member sees (CUDA_VISIBLE_DEVICES)")
    w.add_argument("--slurm-partition", help="slurm: partition")
    w.add_argument("--slurm-time", type=int, default=240, help="slurm: time limit per member, minutes")
    w.add_argument("--slurm-account", help="slurm: account")
    w.add_argument("--slurm-cpus", type=int, default=8, help="slurm: CPUs per member")
    w.add_argument("--slurm-mem-gb", type=int, default=64, help="slurm: memory per member, GB")
    w.add_argument("--slurm-option", action="append", metavar="KEY=VALUE",
                   help="slurm: any other sbatch option, e.g. qos=high or constraint=a100")
    w.add_argument("--track", choices=["mlflow"], help="log each member's settings, metrics and reports to MLflow "
                   "(MLFLOW_TRACKING_URI, else ./mlruns; pip install 'gist-workbench[track]')")
    w.add_argument("--slurm-local", action="store_true", help=argparse.SUPPRESS)  # submitit's local executor (tests)
    w.set_defaults(fn=_sweep)
    m = sub.add_parser("compare", help="one report comparing runs (a sweep's members or run folders): 06_compare.html")
    m.add_argument("paths", nargs="+", help="run folders, or folders of runs (a sweep)")
    m.add_argument("--out", help="folder for 06_compare.ipynb/.html and its figure (default: the first path)")
    m.add_argument("--bootstrap-n", type=int, default=2000, help="bootstrap resamples of the paired differences")
    m.set_defaults(fn=_compare)
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
