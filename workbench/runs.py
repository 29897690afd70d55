"""The run-directory contract: what each stage writes into ``reports/<name>/`` and how it is read back.

Every stage reads and writes its run directory through here: one reader per file (validating it the
same way for every stage), "run stage X first" errors for a missing input, one rule for merging
a section into ``metrics.json``, the names and health of fine-tuning runs (:func:`run_name`,
:func:`run_warnings`), and one lock per run folder (:func:`run_lock`, from ``runlock.py``).
"""
from __future__ import annotations

import datetime as _dt
import difflib
import math
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import yaml

from .data.shots import parse_shots
from .io import CorruptFileError, read_json, read_jsonl, set_aside, write_json, write_jsonl
from .runlock import LOCK, LOCK_ENV, RunBusyError, lock_holder, locked, run_lock  # noqa: F401  (the contract's)

PARAMS = "params.yaml"
METRICS = "metrics.json"
DESCRIPTIONS = "descriptions.jsonl"
MATCHES = "matches.jsonl"
TRAIN_LOG = "train_log.jsonl"
OUTCOMES = "test_outcomes.json"  # per-image top-1 correctness of every accuracy row: paired comparisons across runs
INDEX = "checkpoints/index.json"
CHECKPOINTS = "checkpoints"  # one folder per fine-tuning run (run_name), beside INDEX

# Which stage writes each file, for "run the ... first" errors.
WRITERS = {
    DESCRIPTIONS: "describe stage (01_describe)",
    MATCHES: "match stage (02_match)",
    TRAIN_LOG: "fine-tuning stage (03_finetune)",
    INDEX: "fine-tuning stage (03_finetune)",
    OUTCOMES: "evaluate stage (04_evaluate)",
}
# Methods whose fine-tuned checkpoints a run directory can hold: GIST, FLYP-style class names, and the
# controls that bracket GIST (caption sources of workbench.finetune.sources).
FINETUNE_METHODS = ("gist", "finetune-classname", "oracle", "random-own-class", "waffle")


def stage_file(run_dir_or_path: str | Path, name: str) -> Path:
    """``run_dir/name`` (or the file itself when a file is given); a missing file names the stage that writes it."""
    path = Path(run_dir_or_path)
    if path.is_dir():
        path = path / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the {WRITERS.get(name, 'stage that writes it')} first")
    return path


def read_params(run_dir: str | Path) -> tuple[dict, dict]:
    """``params.yaml`` as a dict and its header line's ``{version, commit, created}`` (both empty when absent)."""
    path = Path(run_dir) / PARAMS
    if not path.is_file():
        return {}, {}
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0] if text else ""
    found = re.search(r"workbench (\S+), commit (\S+), (\S+)", first)
    header = dict(zip(("version", "commit", "created"), found.groups())) if found else {}
    return yaml.safe_load(text) or {}, header


# ----------------------------------------------------------------------------- metrics.json
# How a section merges into what metrics.json holds. A list of rows with declared key fields is the
# current configuration's rows, whole: it replaces the old list, and old rows whose key is not among the
# new ones (a method, shots value or seed no longer configured) move to ``metrics["stale"][section]``
# with the time they left, so no table or plot of this run shows them. "keys": a dict merged key by key.
# A dotted name applies to one key of a dict section. Everything else is replaced whole.
MERGE: dict[str, Any] = {
    "accuracy": ("method", "shots", "seed"),
    "comparisons": ("a", "b", "shots"),
    "finetune.runs": ("run",),
    "timing": "keys",
}
STALE = "stale"


def _row_key(how: tuple, r: dict) -> tuple:
    return tuple(str(r.get(k)) for k in how)


def _merge(path: str, old: Any, new: Any, stale: dict) -> Any:
    how = MERGE.get(path)
    if how == "keys" and isinstance(old, dict) and isinstance(new, dict):
        return {**old, **new}
    if isinstance(how, tuple) and isinstance(old, list) and isinstance(new, list):
        fresh = {_row_key(how, r) for r in new}
        gone = [r for r in old if _row_key(how, r) not in fresh]
        kept = [r for r in stale.get(path, []) if _row_key(how, r) not in fresh]  # back in the configuration
        when = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        stale[path] = kept + [{**r, "stale_since": when} for r in gone]
        if not stale[path]:
            stale.pop(path)
        return list(new)
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: _merge(f"{path}.{k}", old[k], v, stale) if k in old else v for k, v in new.items()}
    return new


def read_metrics(run_dir: str | Path) -> dict:
    """``metrics.json`` ({} before any stage wrote one). A broken one (cut off, not a JSON object) is moved
    aside to ``metrics.json.broken-<time>``, with a warning naming both, and read as {}: no stage trips on it."""
    path = Path(run_dir) / METRICS
    try:
        metrics = read_json(path) if path.exists() else {}
    except CorruptFileError as e:
        set_aside(path, str(e))
        return {}
    if not isinstance(metrics, dict):
        set_aside(path, f"{path}: holds a JSON {type(metrics).__name__}, not an object of sections")
        return {}
    return metrics


def update_metrics(run_dir: str | Path, section: str, value: Any) -> dict:
    """Merge ``value`` into ``metrics.json[section]`` by the one rule (:data:`MERGE`: row lists are the
    current configuration's, earlier rows no longer in it move to ``metrics["stale"]``); atomic write. Keys
    that start with "_", at any depth (per-image outcomes a stage keeps in memory), are not written."""
    value = _public(value)
    metrics = read_metrics(run_dir)
    stale = metrics.pop(STALE, {})
    metrics[section] = _merge(section, metrics[section], value, stale) if section in metrics else value
    if stale:
        metrics[STALE] = stale
    write_json(Path(run_dir) / METRICS, metrics)
    return metrics


def _public(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


# ----------------------------------------------------------------------------- descriptions
def read_descriptions(run_dir_or_path: str | Path) -> list[dict]:
    """The records of ``descriptions.jsonl`` (a run directory or the file), each id once (see :func:`dedupe_jsonl`)."""
    return dedupe_jsonl(stage_file(run_dir_or_path, DESCRIPTIONS))


def dedupe_jsonl(path: str | Path, key: str = "id") -> list[dict]:
    """The records of a JSONL file, the first of each ``key`` only. Repeats (two runs that appended at
    once, before run folders were locked) are also dropped from the file, so the folder heals and no
    later stage trips over them; only under the run lock, and left on disk when another process holds it."""
    path = Path(path)
    records = read_jsonl(path)
    seen: set = set()
    unique = []
    for r in records:
        k = r.get(key)
        if k is None or k not in seen:
            seen.add(k)
            unique.append(r)
    if len(unique) < len(records):
        try:
            with run_lock(path.parent):
                write_jsonl(path, unique)
            warnings.warn(f"{path}: dropped {len(records) - len(unique)} repeated record(s) (same {key}; "
                          "the first of each is kept)", stacklevel=2)
        except RunBusyError:
            pass  # its writer will heal it
    return unique


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


# ----------------------------------------------------------------------------- test outcomes
def write_outcomes(run_dir: str | Path, rows: Sequence[dict], filenames: Sequence[str]) -> Path:
    """``test_outcomes.json``: for each accuracy row with per-image results (``_test``: positions in the
    dataset table and top-1 correctness), its key (method, shots, seed, identity) and correctness as a
    string of 0/1; the test images are listed once, by file name (``filenames``: the table's column), so two
    runs' rows pair image by image."""
    test, out = None, []
    for r in rows:
        t = r.get("_test")
        if t is None:
            continue
        files = [str(filenames[int(i)]) for i in t["rows"]]
        if test is None:
            test = files
        elif files != test:
            raise ValueError(f"row {r['method']}/{r['shots']}/{r['seed']} was scored on other test images than the rest")
        out.append({"method": r["method"], "shots": r["shots"], "seed": r.get("seed"), "identity": r.get("identity"),
                    "correct": "".join("1" if c else "0" for c in t["correct"])})
    path = Path(run_dir) / OUTCOMES
    write_json(path, {"version": 1, "test": test or [], "rows": out})
    return path


def read_outcomes(run_dir: str | Path) -> dict:
    """``test_outcomes.json`` with each row's ``correct`` as a bool array."""
    import numpy as np

    data = read_json(stage_file(run_dir, OUTCOMES))
    for r in data["rows"]:
        r["correct"] = np.frombuffer(r["correct"].encode(), dtype=np.uint8) == ord("1")
    return data


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
    new = {_index_key(r) for r in rows}
    write_json(path, [r for r in old if _index_key(r) not in new] + list(rows))


def _index_key(r: dict) -> tuple:
    return r["method"], str(r["shots"]), int(r["seed"])


def retire_index(run_dir: str | Path, planned: Sequence[tuple]) -> list[dict]:
    """Move the index entries of runs not in ``planned`` ((method, shots, seed) of the current configuration)
    to ``checkpoints/index.stale.json``, so evaluation never probes them; their files stay. Returns them."""
    path = Path(run_dir) / INDEX
    if not path.exists():
        return []
    keep = {(m, str(k), int(s)) for m, k, s in planned}
    entries = read_json(path)
    gone = [e for e in entries if _index_key(e) not in keep]
    if gone:
        stale_path = path.with_name("index.stale.json")
        old = read_json(stale_path) if stale_path.exists() else []
        fresh = {_index_key(e) for e in gone}
        write_json(stale_path, [e for e in old if _index_key(e) not in fresh] + gone)
        write_json(path, [e for e in entries if _index_key(e) in keep])
    return gone


def read_train_log(run_dir: str | Path) -> list[dict]:
    return read_jsonl(stage_file(run_dir, TRAIN_LOG))


# ----------------------------------------------------------------------------- fine-tuning runs, as stored
def run_name(method: str, shots, seed: int) -> str:
    """The name of one fine-tuning run: its checkpoint folder, its rows in train_log.jsonl."""
    return f"{method}-{shots}-s{seed}"


# A last epoch whose mean loss is within 2% of ln(batch) (or above it) has not left chance level: the
# loss of uniform scores, every caption equally likely for every image, for each of the losses.
CHANCE_TOLERANCE = 0.02


def run_warnings(summary: dict) -> str | None:
    """A sentence naming the run and why its result should not be trusted, or None when nothing is wrong.

    - collapsed: the mean training loss of its last epoch stayed at ``ln(batch)`` (``loss_last_epoch``
      against ``loss_chance``, or ``ln(batch_size)``): the model scores every caption alike.
    - unmoved: a finished run (``status`` "done", ``steps`` > 0) whose ``best_step`` (or, in summaries
      without it, ``best_epoch``) is 0: no validation after training began beat the starting weights, so
      its checkpoint is the model it started from.
    """
    problems = []
    last, chance = summary.get("loss_last_epoch"), summary.get("loss_chance")
    if chance is None and summary.get("batch_size", 0) > 1:
        chance = math.log(summary["batch_size"])
    if last is not None and chance and last >= (1 - CHANCE_TOLERANCE) * chance:
        problems.append(
            f"collapsed: its training loss ended at {last:.3f}, the chance level ln(batch) = {chance:.3f}, so the "
            "model tells no caption from another (lower the learning rate, or check the captions)")
    if unmoved(summary):
        start = summary.get("start_val_top1", summary.get("val_top1"))
        at = f" (val top-1 {start:.1f}%)" if isinstance(start, (int, float)) else ""
        problems.append(
            f"unmoved: no epoch beat the starting weights on validation{at}, so its checkpoint is the model it "
            "started from (lower the learning rate, train longer, or check the captions)")
    if not problems:
        return None
    return f"run {summary.get('run', '?')} " + "; ".join(problems) + "."


def unmoved(summary: dict) -> bool:
    """A finished run that trained (``steps`` > 0) and kept its starting weights (best step, or epoch, 0)."""
    best = summary["best_step"] if summary.get("best_step") is not None else summary.get("best_epoch")
    return best == 0 and (summary.get("steps") or 0) > 0 and summary.get("status", "done") == "done"


def unmoved_counts(summaries: Sequence[dict]) -> list[dict]:
    """Per method and shot count (in the order they first appear): how many finished runs ended unmoved
    (:func:`unmoved`, or a ``warning`` that says "unmoved") out of how many finished runs, and their names.
    Interrupted runs are not counted: their checkpoint is not a result yet."""
    groups: dict[tuple, dict] = {}
    for s in summaries:
        if s.get("status", "done") != "done":
            continue
        g = groups.setdefault((s.get("method"), str(s.get("shots"))), {
            "method": s.get("method"), "shots": str(s.get("shots")), "unmoved": 0, "runs": 0, "unmoved_runs": []})
        g["runs"] += 1
        if unmoved(s) or "unmoved:" in (s.get("warning") or ""):
            g["unmoved"] += 1
            g["unmoved_runs"].append(s.get("run"))
    return [{**g, "fraction": g["unmoved"] / g["runs"]} for g in groups.values()]


def warnings_note(summaries: list[dict], runs: list[str] | None = None) -> str | None:
    """The warnings of ``summaries`` (of the named ``runs`` only, when given) as one Markdown note, or None."""
    found = [run_warnings(s) for s in summaries if runs is None or s.get("run") in runs]
    return "\n".join(f"- **Warning:** {w}" for w in found if w) or None
