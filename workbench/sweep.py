"""Sweeps: a grid of settings expanded to ordinary runs, ``reports/<sweep>/<member>/``, each computed by
``workbench run`` with the sweep's folder as its reuse pool (:mod:`workbench.reuse`): a stage that two
members configure alike runs once.

``reports/<sweep>/base.yaml`` is the configuration every member starts from (the target's, less its
``grid:`` section) and ``sweep.json`` the sweep's state: its grid, and per member its settings, state
(pending, running, done, failed, with the error), timings and how each stage was obtained. Only the
process that holds the sweep folder's lock writes it. Members run as separate processes
(:mod:`workbench.executors`); a member's result does not depend on where it ran, since it is the same
command either way.
"""
from __future__ import annotations

import itertools
import json
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config as C
from . import pipeline
from . import reuse as R
from .executors import LOGS, LocalExecutor, SubmititExecutor, SweepError, _now, make_executor  # noqa: F401
from .io import atomic_write_text, read_json

SWEEP = "sweep.json"
BASE = "base.yaml"


# ----------------------------------------------------------------------------- the grid
def split_values(raw: str) -> list[str]:
    """``1e-5,3e-5`` -> two values; commas inside brackets, braces or quotes stay (``[1,3],[5]``: two lists)."""
    out, depth, cur, quote = [], 0, "", None
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v.strip() for v in out + [cur]]


def parse_grid(items: list[str]) -> dict[str, list]:
    """``--grid KEY=V1,V2`` items -> ``{KEY: [values]}`` (values parsed as YAML, as ``--set`` does). A key
    may name several settings that take each value together: ``finetune.seed,evaluate.seed=0,1``."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"--grid {item!r}: expected KEY=V1,V2,...")
        key, _, raw = item.partition("=")
        key = ",".join(k.strip() for k in key.split(","))
        if not key or any(not k for k in key.split(",")):
            raise SweepError(f"--grid {item!r}: no key before '='")
        values = [v for v in split_values(raw) if v != ""]
        if not values:
            raise SweepError(f"--grid {key}: no values (give {key}=V1,V2,...)")
        if key in grid:
            raise SweepError(f"--grid {key} is given twice: give one entry with all its values")
        grid[key] = [C.parse_set(f"k={v}")[1] for v in values]
    return grid


def grid_from_file(src: dict) -> dict[str, list]:
    """A sweep file's ``grid:`` section, ``{key: [values]}`` (a single value is one value)."""
    grid = src.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepError(f"the grid: section must map keys to lists of values, not {type(grid).__name__}")
    out = {}
    for key, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SweepError(f"grid: {key}: no values")
        out[str(key)] = values
    return out


def _value_text(v: Any) -> str:
    return json.dumps(v)  # JSON is YAML: --set parses it back to the same value


def _paths(schema: dict, key: str) -> set[str]:
    """The configuration paths one ``--set``/``--grid`` key sets (as ``config.resolve`` assigns it): a bare
    stage key sets that parameter in every stage that has it."""
    if key in C.COMMON or key in C.META or "." in key:
        return {key}
    return {f"{s}.{key}" for s, params in schema.items() if key in params} or {key}


def check_grid(schema: dict, base: dict, grid: dict[str, list], sets: list[str]) -> None:
    """Every grid key and value is valid and no setting is swept twice or both swept and set."""
    if not grid:
        raise SweepError("a sweep needs a grid: give --grid KEY=V1,V2 (or a grid: section in the sweep file)")
    owner: dict[str, str] = {}
    set_paths: dict[str, str] = {}
    for s in sets:
        k, _ = C.parse_set(s)
        for p in _paths(schema, k):
            set_paths[p] = s
    for key, values in grid.items():
        for v in values:
            try:
                for k in key.split(","):
                    C.resolve(schema, [base], [*sets, f"{k}={_value_text(v)}"])
            except C.ConfigError as e:
                raise SweepError(f"--grid {key}={_value_text(v)}: {e}") from None
        for p in {p for k in key.split(",") for p in _paths(schema, k)}:
            if p in owner:
                raise SweepError(f"--grid {key} and --grid {owner[p]} both set {p}: give it one grid entry")
            if p in set_paths:
                raise SweepError(f"--grid {key} sets {p}, which --set {set_paths[p]} fixes: sweep it or set it")
            owner[p] = key


def _short(key: str, keys: list[str]) -> str:
    first = key.split(",")[0]
    tail = first.rsplit(".", 1)[-1]
    clash = sum(k.split(",")[0].rsplit(".", 1)[-1] == tail for k in keys) > 1
    return first if clash else tail


def member_name(settings: dict, keys: list[str]) -> str:
    parts = [_short(k, keys) + re.sub(r"[^A-Za-z0-9.-]+", "-", _value_text(v).strip('"')).strip("-")
             for k, v in settings.items()]
    return "_".join(parts) or "member"


@dataclass
class Member:
    name: str
    settings: dict  # grid key -> value
    sets: list[str]  # the --set items that make it


def expand(grid: dict[str, list], sets: list[str]) -> list[Member]:
    """One member per combination, in grid order (the last key varies fastest)."""
    keys = list(grid)
    members, seen = [], set()
    for combo in itertools.product(*grid.values()):
        settings = dict(zip(keys, combo))
        name = member_name(settings, keys)
        if name in seen or not pipeline.RUN_NAME.fullmatch(name) or name in (".", ".."):
            name = f"m{len(members):03d}"
        seen.add(name)
        items = [f"{k}={_value_text(v)}" for key, v in settings.items() for k in key.split(",")]
        members.append(Member(name, settings, [*sets, *items]))
    return members


# ----------------------------------------------------------------------------- the sweep
@dataclass
class Sweep:
    name: str
    folder: Path
    target: str
    base: dict
    grid: dict[str, list]
    sets: list[str]
    stages: list[str] | None
    members: list[Member]
    reuse: list[str]

    @property
    def state_path(self) -> Path:
        return self.folder / SWEEP


def plan_sweep(target: str, grid_items: list[str] = (), sets: list[str] = (), name: str | None = None,
               reports: str | Path = "reports", stages: list[str] | None = None, reuse: list[str] = (),
               nb_dir: str | Path | None = None) -> Sweep:
    """Resolve and validate the whole sweep (every member's configuration) before anything runs."""
    if not name:
        raise SweepError("give the sweep a name: --name NAME (its folder is reports/NAME)")
    pipeline.check_run_name(name)
    try:
        src = C.load_source(target)
    except C.ConfigError as e:
        raise SweepError(str(e)) from None
    file_grid = grid_from_file(src)
    base = {k: v for k, v in src.items() if k != "grid"}
    cli_grid = parse_grid(list(grid_items))
    both = sorted(set(file_grid) & set(cli_grid))
    if both:
        raise SweepError(f"--grid {both[0]} is also in the file's grid: section: give it once")
    grid = {**file_grid, **cli_grid}
    schema = C.load_schema(nb_dir)
    check_grid(schema, base, grid, list(sets))
    folder = Path(reports).resolve() / name
    members = expand(grid, list(sets))
    for m in members:  # the same checks `workbench run` makes, for each member, before any runs
        cfg = C.resolve(schema, [base], m.sets)
        if stages:
            cfg["stages"] = list(stages)
            C.validate(cfg, schema)
    R.candidate_dirs(reuse)
    return Sweep(name, folder, target, base, grid, list(sets), list(stages) if stages else None, members, list(reuse))


def load_state(folder: Path) -> dict:
    path = Path(folder) / SWEEP
    return read_json(path) if path.is_file() else {}


class State:
    """``sweep.json``, written whole (atomically) on every change, by one process, under a thread lock."""

    def __init__(self, sweep: Sweep):
        self.sweep, self.lock = sweep, threading.Lock()
        old = load_state(sweep.folder)
        before = {m["name"]: m for m in old.get("members", [])}
        self.members = {m.name: {"name": m.name, "settings": m.settings, "state": "pending",
                                 **{k: v for k, v in before.get(m.name, {}).items() if k not in ("name", "settings")}}
                        for m in sweep.members}
        self.retired = [m for n, m in before.items() if n not in self.members] + old.get("retired", [])
        self.created = old.get("created") or _now()

    def update(self, name: str, **fields) -> None:
        with self.lock:
            self.members[name].update(fields)
            self.write()

    def write(self) -> None:
        s = self.sweep
        doc = {"name": s.name, "target": s.target, "created": self.created, "updated": _now(),
               "grid": s.grid, "sets": s.sets, "stages": s.stages, "reuse": s.reuse,
               "members": list(self.members.values()), "retired": self.retired}
        atomic_write_text(s.state_path, json.dumps(doc, indent=1, default=str))


def member_command(sweep: Sweep, m: Member) -> list[str]:
    """The ``workbench run`` command line of a member (the same on every executor)."""
    cmd = [sys.executable, "-m", "workbench.cli", "run", str(sweep.folder / BASE), "--name", m.name,
           "--reports", str(sweep.folder), "--reuse", str(sweep.folder)]
    for r in sweep.reuse:
        cmd += ["--reuse", str(Path(r).resolve())]
    if sweep.stages:
        cmd += ["--stages", ",".join(sweep.stages)]
    for s in m.sets:
        cmd += ["--set", s]
    return cmd


def up_to_date(sweep: Sweep, m: Member, nb_dir: str | Path | None = None) -> bool:
    """Does the member's folder hold every planned stage, recorded under the key it would have now?"""
    run_dir = sweep.folder / m.name
    records = R.read_records(run_dir)
    if not records:
        return False
    plan = pipeline.plan(str(sweep.folder / BASE), m.sets, name=m.name, stages=sweep.stages,
                         reports=sweep.folder, nb_dir=nb_dir)
    data_sha = pipeline.dataset_sha(plan.config)
    for stage, nb in plan.stages.items():
        rec = records.get(stage)
        if not rec or not rec.get("key") or not R.intact(run_dir, rec):
            return False
        if pipeline.stage_key(plan, stage, nb, data_sha)[2] != rec["key"]:
            return False
    return True


def how_stages(run_dir: Path) -> dict[str, str]:
    """``{stage: "computed" | "reused from <member>" | "unchanged"}``: what the member's last run did."""
    out = {}
    for stage, rec in R.read_records(run_dir).items():
        last = rec.get("last") or {}
        how = last.get("how", "computed")
        out[stage] = f"reused from {Path(last['from']).name}" if how == "reused" and last.get("from") else how
    return out


def _error_of(log_path: Path) -> str:
    """The member's ``workbench run:`` error lines (the last 20 lines of its log when there are none)."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "no log"
    errs = [ln for ln in lines if ln.startswith("workbench run:") and "warning:" not in ln]
    return "\n".join(errs[-5:] or lines[-20:])


def run_sweep(sweep: Sweep, executor, retry_failed: bool = False, log=print, tracker=None) -> int:
    """Run the members that are not done (only the failed ones with ``retry_failed``); 0 when all are done.
    With a ``tracker`` (:mod:`workbench.track`), each member that ends is logged there (once per ending)."""
    from .runs import run_lock

    sweep.folder.mkdir(parents=True, exist_ok=True)
    with run_lock(sweep.folder):
        atomic_write_text(sweep.folder / BASE, f"# base configuration of sweep {sweep.name!r} (from {sweep.target})\n"
                          + C.dump(sweep.base))
        (sweep.folder / LOGS).mkdir(exist_ok=True)
        state = State(sweep)
        todo = []
        for m in sweep.members:
            st = state.members[m.name]
            if st.get("state") == "failed" and not retry_failed:
                continue
            if retry_failed and st.get("state") != "failed":
                continue
            if st.get("state") == "done" and up_to_date(sweep, m):
                continue
            st["state"] = "pending"
            todo.append(m)
        state.write()
        skipped = [n for n, s in state.members.items() if s["state"] == "failed" and not retry_failed]
        log(f"sweep {sweep.name!r}: {len(sweep.members)} members, {len(todo)} to run -> {sweep.folder}")

        def one(m: Member) -> None:
            t0 = time.time()
            state.update(m.name, state="running", started=_now(), error=None)
            log(f"[{m.name}] running ({', '.join(f'{k}={_value_text(v)}' for k, v in m.settings.items())})")
            rc = executor.run(member_command(sweep, m), sweep.folder / LOGS / f"{m.name}.log",
                              on_start=lambda info: state.update(m.name, job=info))
            dt = round(time.time() - t0, 1)
            stages = how_stages(sweep.folder / m.name)
            err = None if rc in (0, 128 + signal.SIGINT) else _error_of(sweep.folder / LOGS / f"{m.name}.log")
            if tracker is not None and rc != 128 + signal.SIGINT:
                try:
                    rid = tracker.log_member(sweep.folder / m.name, m.name, sweep.name, m.settings,
                                             "done" if rc == 0 else "failed", err)
                    state.update(m.name, tracking={"run_id": rid, "uri": tracker.uri})
                except Exception as e:  # tracking is a copy of what the folder holds: never fail a member for it
                    log(f"[{m.name}] tracking failed: {type(e).__name__}: {e}")
            if rc == 0:
                state.update(m.name, state="done", finished=_now(), seconds=dt, stages=stages)
                log(f"[{m.name}] done in {dt:.0f} s: " + ", ".join(f"{s} {h}" for s, h in stages.items()))
            elif rc == 128 + signal.SIGINT:
                state.update(m.name, state="pending", error="interrupted", seconds=dt, stages=stages)
                log(f"[{m.name}] interrupted")
            else:
                state.update(m.name, state="failed", finished=_now(), seconds=dt, error=err, stages=stages)
                log(f"[{m.name}] FAILED (exit {rc}): {err.splitlines()[-1] if err else ''} "
                    f"(log: {sweep.folder / LOGS / (m.name + '.log')})")

        executor.map(one, todo)
        states = [s["state"] for s in state.members.values()]
        failed = [n for n, s in state.members.items() if s["state"] == "failed"]
        log(f"sweep {sweep.name!r}: {states.count('done')} done, {len(failed)} failed"
            + (f" ({', '.join(failed)}; rerun with --retry-failed)" if failed else "")
            + (f"; {len(skipped)} failed earlier, not retried" if skipped and not retry_failed else ""))
        return 0 if states.count("done") == len(states) else 1
