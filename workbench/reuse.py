"""Stage reuse by content: a stage whose inputs have the identity of one already computed is not run again.

After each stage, ``stages.json`` in the run folder records the stage's **key**, the files the stage wrote
(size, mtime, sha256) and the ``metrics.json`` sections it wrote. The key is the digest of everything the
stage's outputs depend on:

- the stage's resolved parameters, less those that change no output (``config.OUTPUT_NEUTRAL``);
- the notebook's own bytes, and the workbench's code (every module's bytes: an upgrade or a local edit of
  the package computes again rather than trust outputs the old code made);
- the dataset as loaded (its table's digest) and the weights' identity (a local file's sha256);
- the content of every file the earlier stages recorded in the run folder (files no stage recorded, such
  as a killed stage's partial outputs, are not inputs: the stage that made them resumes from them to the
  outputs it would have written).

Another folder's stage with the same key and its outputs intact (the same size and mtime as recorded) is a
**donor**: its checkpoints are hard-linked into this run (they are only ever replaced whole, by an atomic
rename) and every other file is copied (notebooks, figures and ``.jsonl`` files are rewritten or appended
in place), so neither folder can change the other's and each stays valid if the other is deleted; its
metrics sections are copied, and ``stages.json`` says where they came from. A run's own folder
is a donor to itself: a rerun of an unchanged stage takes no time. Computing a stage holds a lock on its
key (in the cache folder), so two runs that need the same stage at once compute it once.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from . import config as C
from .identity import digest, file_sha256, weights_identity
from .io import atomic_write_text, cache_root, read_json
from .runlock import LOCK
from .runs import METRICS, PARAMS

RECORD = "stages.json"
# never a stage's output: the runner's own files, and files moved aside
_RUNNER_FILES = {PARAMS, METRICS, RECORD, LOCK}
# sections of metrics.json that are not one stage's (the runner's timings, rows moved aside)
_SHARED_SECTIONS = {"timing", "stale"}
# Files of paid answers keyed by request (describe's LLM responses): when a stage must be computed again
# only because the code or the notebook changed, they are copied from the run that paid for them first,
# so no request is paid twice (a request the new code no longer sends is never replayed).
PAID_FILES = ("describe_responses.jsonl",)
LINK_SUFFIXES = (".safetensors",)  # written only by atomic replacement (finetune/checkpoint.py): safe to share
VERSION = 1


def _is_runner_file(rel: str) -> bool:
    return rel in _RUNNER_FILES or ".broken-" in rel.rsplit("/", 1)[-1]


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file in the run folder a stage may own."""
    out = {}
    for p in sorted(Path(run_dir).rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or _is_runner_file(rel):
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if p.is_file():
            out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def read_records(run_dir: str | Path) -> dict:
    """``stages.json``: ``{stage: record}`` ({} when absent or unreadable: nothing is reused from it)."""
    path = Path(run_dir) / RECORD
    try:
        data = read_json(path) if path.is_file() else {}
    except Exception:  # a broken record only costs recomputation
        return {}
    return data.get("stages", {}) if isinstance(data, dict) and data.get("version") == VERSION else {}


def _write_records(run_dir: Path, records: dict) -> None:
    atomic_write_text(run_dir / RECORD, json.dumps({"version": VERSION, "stages": records}, indent=1, default=str))


_NOTEBOOK = re.compile(r"\d\d_[a-z0-9_]+\.(ipynb|html)")


def _display_only(rel: str) -> bool:
    """Files no later stage reads: executed stage notebooks, their HTML, figures."""
    return rel.split("/", 1)[0] == "figures" or bool(_NOTEBOOK.fullmatch(rel))


def intact(run_dir: Path, record: dict) -> bool:
    """Are the files a stage recorded still there, unchanged (size and mtime)?"""
    for rel, (size, mtime, _sha) in record.get("outputs", {}).items():
        try:
            st = (Path(run_dir) / rel).stat()
        except FileNotFoundError:
            return False
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return False
    return True


def _neutral(stage: str, name: str) -> bool:
    return name == "run_dir" or name in C.OUTPUT_NEUTRAL or f"{stage}.{name}" in C.OUTPUT_NEUTRAL


def stage_inputs(run_dir: Path, stage: str, notebook: Path, params: dict, order: list[str],
                 dataset_sha: str | None) -> dict:
    """What the outputs of ``stage`` depend on (the key is its digest)."""
    records = read_records(run_dir)
    earlier = order[: order.index(stage)] if stage in order else []
    now = snapshot(run_dir)
    upstream = {}
    for s in earlier:
        for rel, (size, mtime, sha) in records.get(s, {}).get("outputs", {}).items():
            if rel not in now or _display_only(rel):
                continue
            upstream[rel] = sha if now[rel] == (size, mtime) else file_sha256(run_dir / rel)
    kept = {k: v for k, v in params.items() if not _neutral(stage, k)}
    inputs = {"stage": stage, "notebook_sha256": file_sha256(notebook), "code_sha256": code_sha256(),
              "params": kept, "upstream": upstream}
    if "dataset" in params:
        inputs["dataset_sha256"] = dataset_sha
    if "model" in params:
        inputs["weights"] = weights_identity(str(params["model"]), params.get("pretrained"))
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


@functools.lru_cache(maxsize=1)
def code_sha256() -> str:
    """sha256 over the workbench package's Python files (path and bytes), read once per process."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def stage_key(inputs: dict) -> str:
    return digest(inputs)


def candidate_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders to reuse from: each path that is a run folder (it has ``stages.json`` or ``params.yaml``),
    and the run folders one level under each other path (a sweep's members)."""
    out = []
    for p in map(Path, paths):
        if (p / RECORD).is_file() or (p / PARAMS).is_file():
            out.append(p.resolve())
        elif p.is_dir():
            out += [q.resolve() for q in sorted(p.iterdir()) if (q / RECORD).is_file()]
        else:
            raise FileNotFoundError(f"--reuse {p}: no such run folder")
    return list(dict.fromkeys(out))


def find_donor(key: str, run_dir: Path, stage: str, candidates: Iterable[Path]) -> tuple[Path, dict] | None:
    """The first folder (this run's own first) whose record of ``stage`` has ``key`` and intact outputs."""
    for d in dict.fromkeys([run_dir.resolve(), *candidates]):
        rec = read_records(d).get(stage)
        if rec and rec.get("key") == key and intact(d, rec):
            return d, rec
    return None


def _same_but_code(a: dict, b: dict) -> bool:
    skip = ("code_sha256", "notebook_sha256")
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def prime(run_dir: Path, stage: str, inputs: dict, candidates: Iterable[Path]) -> list[str]:
    """Before ``stage`` is computed: copy each paid-answer file (:data:`PAID_FILES`) this run lacks from a
    folder whose record of ``stage`` had the same inputs but other code; returns the files copied."""
    copied = []
    for d in candidates:
        if d == Path(run_dir).resolve():
            continue
        rec = read_records(d).get(stage) or {}
        if not rec.get("inputs") or not _same_but_code(rec["inputs"], inputs):
            continue
        for name in PAID_FILES:
            if (d / name).is_file() and not (Path(run_dir) / name).exists():
                _place(d / name, Path(run_dir) / name)
                copied.append(str(d / name))
    return copied


@contextlib.contextmanager
def key_lock(key: str) -> Iterator[None]:
    """Hold an exclusive lock on ``key`` (``<cache>/stage-locks/<key>.lock``): a second run that needs
    the same stage waits here, then finds the first one's outputs."""
    folder = cache_root() / "stage-locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _place(src: Path, dst: Path) -> None:
    """Put ``src``'s content at ``dst`` (replacing it atomically): a hard link for a checkpoint (a copy
    where links cannot be made: another file system), a copy for anything else."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.reuse.tmp")
    tmp.unlink(missing_ok=True)
    try:
        if src.suffix not in LINK_SUFFIXES:
            raise OSError
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def adopt(run_dir: Path, stage: str, donor: Path, record: dict, key: str) -> dict:
    """Give ``run_dir`` the donor's outputs of ``stage`` and record them; returns the new record."""
    from .runs import update_metrics

    outputs = {}
    for rel, (_, _, sha) in record["outputs"].items():
        dst = run_dir / rel
        _place(donor / rel, dst)
        st = dst.stat()
        outputs[rel] = [st.st_size, st.st_mtime_ns, sha]
    for section, value in record.get("metrics", {}).items():
        update_metrics(run_dir, section, value)
    new = {**record, "key": key, "outputs": outputs, "reused_from": str(donor),
           "reused_at": _now(),
           "last": {"how": "reused", "from": str(donor), "at": _now()}}
    records = read_records(run_dir)
    records[stage] = new
    _write_records(run_dir, records)
    return new


def _sections(run_dir: Path) -> dict:
    from .runs import read_metrics

    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in read_metrics(run_dir).items()
            if k not in _SHARED_SECTIONS}


class StageRecorder:
    """Wraps one stage's execution: what the folder holds before, what changed after."""

    def __init__(self, run_dir: Path, stage: str, key: str, inputs: dict):
        self.run_dir, self.stage, self.key, self.inputs = Path(run_dir), stage, key, inputs
        self.before = snapshot(self.run_dir)
        self.sections_before = _sections(self.run_dir)
        self.t0 = time.time()

    def finish(self) -> dict:
        """Record the stage's outputs: files it wrote now and those it recorded before that are unchanged."""
        from .runs import read_metrics

        after = snapshot(self.run_dir)
        records = read_records(self.run_dir)
        old = records.get(self.stage, {})
        changed = {rel for rel, st in after.items() if self.before.get(rel) != st}
        outputs = {}
        for rel, st in after.items():
            prev = old.get("outputs", {}).get(rel)
            if rel in changed:
                outputs[rel] = [*st, file_sha256(self.run_dir / rel)]
            elif prev and tuple(prev[:2]) == st:
                outputs[rel] = prev
        for s, rec in records.items():  # an earlier stage's file rewritten here is no longer that stage's
            if s != self.stage and any(rel in changed for rel in rec.get("outputs", {})):
                rec["outputs"] = {r: v for r, v in rec["outputs"].items() if r not in changed}
                rec["altered_by"] = self.stage
                rec["key"] = None  # its recorded outputs are no longer what it made: never a donor
        now = _sections(self.run_dir)
        metrics = read_metrics(self.run_dir)
        names = [k for k, v in now.items() if self.sections_before.get(k) != v] + \
            [k for k in old.get("metrics", {}) if k in now]
        records[self.stage] = {
            "key": self.key, "inputs": self.inputs, "outputs": outputs,
            "metrics": {k: metrics[k] for k in dict.fromkeys(names)},
            "seconds": round(time.time() - self.t0, 2),
            "finished": _now(), "last": {"how": "computed", "from": None, "at": _now()},
        }
        _write_records(self.run_dir, records)
        return records[self.stage]


def note(run_dir: Path, stage: str, how: str, donor: Path | None = None) -> None:
    """Say in ``stage``'s record how this run's last execution obtained it: computed, reused or unchanged."""
    records = read_records(run_dir)
    if stage in records:
        records[stage]["last"] = {"how": how, "from": str(donor) if donor else None, "at": _now()}
        _write_records(run_dir, records)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def forget(run_dir: Path, stage: str) -> None:
    """Drop ``stage``'s record (it is about to be recomputed: a failure half-way leaves no stale key)."""
    records = read_records(run_dir)
    if stage in records:
        records[stage] = {**records[stage], "key": None}
        _write_records(run_dir, records)
