"""The run-directory contract: what each stage writes into ``reports/<name>/`` and how it is read back.

Every stage reads and writes its run directory through here: one reader per file (validating it the
same way for every stage), "run stage X first" errors for a missing input, and one rule for merging
a section into ``metrics.json``.
"""
from __future__ import annotations

import difflib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

from .data.shots import parse_shots
from .io import read_json, read_jsonl, write_json, write_jsonl

PARAMS = "params.yaml"
METRICS = "metrics.json"
DESCRIPTIONS = "descriptions.jsonl"
MATCHES = "matches.jsonl"
TRAIN_LOG = "train_log.jsonl"
INDEX = "checkpoints/index.json"
CHECKPOINTS = "checkpoints"

# Which stage writes each file, for "run the ... first" errors.
WRITERS = {
    DESCRIPTIONS: "describe stage (01_describe)",
    MATCHES: "match stage (02_match)",
    TRAIN_LOG: "fine-tuning stage (03_finetune)",
    INDEX: "fine-tuning stage (03_finetune)",
}
# Methods whose fine-tuned checkpoints a run directory can hold.
FINETUNE_METHODS = ("gist", "finetune-classname")


def stage_file(run_dir_or_path: str | Path, name: str) -> Path:
    """``run_dir/name`` (or the file itself when a file is given); a missing file names the stage that writes it."""
    path = Path(run_dir_or_path)
    if path.is_dir():
        path = path / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the {WRITERS.get(name, 'stage that writes it')} first")
    return path


# ----------------------------------------------------------------------------- metrics.json
# How a section merges into what metrics.json holds. A list of rows with declared key fields: new rows
# replace old rows with the same key, other old rows stay. "keys": a dict merged key by key. A dotted
# name applies to one key of a dict section. Everything else is replaced whole.
MERGE: dict[str, Any] = {
    "accuracy": ("method", "shots", "seed"),
    "comparisons": ("a", "b", "shots"),
    "finetune.runs": ("run",),
    "timing": "keys",
}


def _merge(path: str, old: Any, new: Any) -> Any:
    how = MERGE.get(path)
    if how == "keys" and isinstance(old, dict) and isinstance(new, dict):
        return {**old, **new}
    if isinstance(how, tuple) and isinstance(old, list) and isinstance(new, list):
        key = lambda r: tuple(str(r.get(k)) for k in how)  # noqa: E731
        fresh = {key(r) for r in new}
        return [r for r in old if key(r) not in fresh] + list(new)
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: _merge(f"{path}.{k}", old[k], v) if k in old else v for k, v in new.items()}
    return new


def read_metrics(run_dir: str | Path) -> dict:
    path = Path(run_dir) / METRICS
    return read_json(path) if path.exists() else {}


def update_metrics(run_dir: str | Path, section: str, value: Any) -> dict:
    """Merge ``value`` into ``metrics.json[section]`` by the one rule (:data:`MERGE`); atomic write."""
    metrics = read_metrics(run_dir)
    metrics[section] = _merge(section, metrics[section], value) if section in metrics else value
    write_json(Path(run_dir) / METRICS, metrics)
    return metrics


# ----------------------------------------------------------------------------- descriptions
def read_descriptions(run_dir_or_path: str | Path) -> list[dict]:
    """The records of ``descriptions.jsonl`` (a run directory or the file)."""
    return read_jsonl(stage_file(run_dir_or_path, DESCRIPTIONS))


def check_descriptions(records: Sequence[dict], classnames: Sequence[str], needed: Sequence[str]) -> dict[str, list[int]]:
    """Record indices per class. Raises (listing every offender) on classes not in the dataset, missing
    or duplicate ids, empty texts, and classes in ``needed`` that have no description."""
    problems = []
    unknown = sorted({r.get("class") for r in records} - set(classnames), key=str)
    if unknown:
        hints = []
        for c in unknown:
            close = difflib.get_close_matches(str(c), classnames, n=1)
            hints.append(f"{c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        problems.append(f"descriptions name {len(unknown)} class(es) not in the dataset: " + ", ".join(hints))
    counts = Counter(r.get("id") for r in records)
    dup = sorted((i for i, n in counts.items() if n > 1 or i is None), key=str)
    if dup:
        problems.append(f"missing or duplicate description ids: {dup[:20]}")
    empty = [r.get("id") for r in records if not str(r.get("text") or "").strip()]
    if empty:
        problems.append(f"{len(empty)} description(s) with empty text: {empty[:20]}")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.get("class")].append(i)
    missing = [c for c in needed if not groups.get(c)]
    if missing:
        problems.append(f"{len(missing)} class(es) have no descriptions: " + ", ".join(map(repr, missing)))
    if problems:
        raise ValueError("descriptions do not fit the dataset:\n- " + "\n- ".join(problems))
    return dict(groups)


# ----------------------------------------------------------------------------- matches
def read_matches(run_dir_or_path: str | Path) -> list[dict]:
    return read_jsonl(stage_file(run_dir_or_path, MATCHES))


def write_matches(run_dir: str | Path, records: Sequence[dict]) -> Path:
    path = Path(run_dir) / MATCHES
    write_jsonl(path, records)
    return path


# ----------------------------------------------------------------------------- checkpoints
def read_index(run_dir: str | Path, required: bool = True) -> list[dict] | None:
    """The entries of ``checkpoints/index.json``, validated, with ``shots`` parsed and ``abspath`` set.

    A missing index raises ("run the fine-tuning stage first"), or gives None with ``required=False``.
    """
    path = Path(run_dir) / INDEX
    if not path.exists():
        if required:
            stage_file(run_dir, INDEX)
        return None
    entries = read_json(path)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of checkpoint entries, got {type(entries).__name__}")
    problems, out = [], []
    for i, e in enumerate(entries):
        miss = [k for k in ("method", "shots", "seed", "path", "model") if k not in e]
        if miss:
            problems.append(f"entry {i}: missing {miss}")
            continue
        if e["method"] not in FINETUNE_METHODS:
            problems.append(f"entry {i}: method {e['method']!r} is not one of {list(FINETUNE_METHODS)}")
        try:
            shots = parse_shots([e["shots"]])[0]
        except ValueError as err:
            problems.append(f"entry {i}: {err}")
            continue
        ckpt = Path(e["path"]) if Path(e["path"]).is_absolute() else Path(run_dir) / e["path"]
        if not ckpt.exists():
            problems.append(f"entry {i}: checkpoint file not found: {ckpt}")
        out.append({**e, "shots": shots, "seed": int(e["seed"]), "abspath": str(ckpt.resolve())})
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return out


def update_index(run_dir: str | Path, rows: Sequence[dict]) -> None:
    """Merge rows into ``checkpoints/index.json``: rows of the same (method, shots, seed) are replaced."""
    path = Path(run_dir) / INDEX
    old = read_json(path) if path.exists() else []
    key = lambda r: (r["method"], str(r["shots"]), int(r["seed"]))  # noqa: E731
    new = {key(r) for r in rows}
    write_json(path, [r for r in old if key(r) not in new] + list(rows))


def read_train_log(run_dir: str | Path) -> list[dict]:
    return read_jsonl(stage_file(run_dir, TRAIN_LOG))
