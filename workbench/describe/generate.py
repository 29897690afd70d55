"""Generate descriptions.jsonl: plan requests, reuse cached responses, call the backend, validate, append.

Files (next to ``out_path``, normally in the run directory):
- ``descriptions.jsonl``: accepted descriptions, one record per description, appended as they arrive.
- ``describe_responses.jsonl``: every raw LLM response keyed by request hash (:class:`ResponseCache`).
- ``describe_rejected.jsonl``: responses that failed validation, with the reason.

A *slot* is one wanted description: (class, prompt variant, index). Its id is a hash of the class,
prompt set, backend identity and sampling parameters, so re-running the same configuration finds
the same slots. Each slot makes attempts 0, 1, ... (each with its own seed) until a response passes
validation or ``max_attempts`` are used (then the slot is dropped). A re-run skips accepted slots,
replays cached responses without calling the backend, and only sends requests never answered.
"""
from __future__ import annotations

import time
import warnings
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..io import append_jsonl, hash_key, iter_jsonl, write_jsonl
from ..progress import progress_bar
from ..runs import DESCRIPTIONS, dedupe_jsonl, update_metrics
from .backend import BackendError, ChatBackend, ChatRequest, RecordBackend, make_backend
from .cache import ResponseCache, now, repair_jsonl, request_key
from .prompts import PromptSet, Variant, get_prompt_set
from .validate import REASONS, Validator, clean_text


class DescriptionsIncomplete(RuntimeError):
    """Some classes got no description at all (failed requests or everything rejected)."""


@dataclass
class DescribeResult:
    records: list[dict]  # accepted descriptions of this configuration, in class order
    metrics: dict  # what went into metrics.json["describe"]
    out_path: Path | None = None
    failures: dict[str, str] = field(default_factory=dict)  # slot id -> last error

    def frame(self):
        return pd.DataFrame(self.records)

    def counts(self, classnames: Iterable[str] | None = None):
        """Descriptions per class (classes with none included when ``classnames`` is given)."""
        c = Counter(r["class"] for r in self.records)
        names = list(classnames) if classnames is not None else sorted(c)
        return pd.Series({n: c.get(n, 0) for n in names}, name="descriptions")


@dataclass(frozen=True)
class _Slot:
    id: str
    classname: str
    variant: Variant
    index: int


def _classnames(dataset) -> tuple[list[str], Any]:
    if hasattr(dataset, "classnames"):
        names, ds = list(dataset.classnames), dataset
    elif isinstance(dataset, str):
        raise TypeError("pass a Dataset or a list of class names, not a string")
    else:
        names, ds = list(dataset), None
    if not names:
        raise ValueError("no class names given")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings; got {bad[:5]}")
    dup = [n for n, k in Counter(names).items() if k > 1]
    if dup:
        raise ValueError(f"duplicate class names: {dup[:5]}")
    return names, ds


def _plan(be: ChatBackend, ps: PromptSet, classnames: list[str], n: int, seed: int) -> list[_Slot]:
    base = [be.identity(), be.sampling(), ps.name, ps.fingerprint(), ps.noun, seed]
    slots = []
    for c in classnames:
        for j in range(n):
            v = ps.variants[j % len(ps.variants)]  # cycle variants: male, female, juvenile, male, ...
            slots.append(_Slot(hash_key(*base, c, v.name, j)[:16], c, v, j))
    return slots


def _request(be: ChatBackend, ps: PromptSet, slot: _Slot, attempt: int) -> ChatRequest:
    seed = int(hash_key(slot.id, attempt)[:8], 16) % 2**31
    messages = ps.messages(slot.classname, slot.variant)
    params = {**be.sampling(), "seed": seed}
    key = request_key(be.identity(), messages, params)
    meta = {"slot": slot.id, "attempt": attempt, "class": slot.classname, "prompt_id": ps.prompt_id(slot.variant)}
    return ChatRequest(key, messages, params, meta)


def generate_descriptions(
    dataset,
    backend: str | ChatBackend | RecordBackend = "template",
    *,
    domain: str | PromptSet | None = None,
    noun: str | None = None,
    n_per_class: int | None = 6,
    out_path: str | Path | None = None,
    run_dir: str | Path | None = None,
    cache_path: str | Path | None = None,
    seed: int = 0,
    max_attempts: int = 3,
    ignore_names: Iterable[str] = (),
    progress: bool = True,
    **backend_options,
) -> DescribeResult:
    """Write ``n_per_class`` validated descriptions per class to ``out_path`` (resuming what is there).

    ``dataset``: a :class:`~workbench.data.Dataset` (needed by the template/attributes backends) or
    a list of class names. ``backend``: a name in :data:`~workbench.describe.backend.BACKENDS`
    (``backend_options`` go to its constructor) or an instance. ``domain``: prompt set name
    ("birds", "skin-v1", ...; default "generic" with ``noun``) for LLM backends. ``out_path``:
    default ``run_dir/descriptions.jsonl``; ``run_dir`` (default ``out_path``'s folder) receives
    ``metrics.json["describe"]``. Records of another configuration (other backend, model, prompts,
    sampling, fewer per class) found in ``out_path`` are moved to ``describe_replaced.jsonl`` with a
    warning, never mixed in; their responses stay cached, so switching back costs nothing.
    Raises :class:`DescriptionsIncomplete` when a class ends with no description (after writing
    everything that succeeded; re-run to resume).
    """
    classnames, ds = _classnames(dataset)
    if n_per_class is not None and n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    be = make_backend(backend, **backend_options)
    if out_path is None and run_dir is not None:
        out_path = Path(run_dir) / DESCRIPTIONS
    out_path = Path(out_path) if out_path is not None else None
    if run_dir is None and out_path is not None:
        run_dir = out_path.parent
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl(out_path)
    existing = dedupe_jsonl(out_path) if out_path is not None else []  # heals a file two runs wrote at once
    validator = Validator(classnames, ignore_names=ignore_names)
    t0 = time.time()

    if isinstance(be, RecordBackend):
        result = _run_records(be, ds, classnames, n_per_class, seed, out_path, existing, validator, progress)
        metrics = {"backend": be.name, "model": be.model, "prompt_set": None, **result.pop("metrics")}
    elif isinstance(be, ChatBackend):
        if n_per_class is None:
            raise ValueError("n_per_class is required for LLM backends")
        ps = domain if isinstance(domain, PromptSet) else get_prompt_set(domain or "generic", noun=noun)
        run = _ChatRun(be, ps, validator, out_path, cache_path, max_attempts, progress)
        result = run.run(_plan(be, ps, classnames, n_per_class, seed), existing)
        metrics = {"backend": be.name, "model": be.model, "prompt_set": ps.name, "domain": ps.domain,
                   "noun": ps.noun or None, "max_attempts": max_attempts, **result.pop("metrics")}
    else:
        raise TypeError(f"not a description backend: {type(be).__name__}")
    return _finish(result, metrics, classnames, n_per_class, seed, t0, run_dir, out_path)


def _finish(result: dict, metrics: dict, classnames: list[str], n_per_class, seed, t0, run_dir, out_path):
    """Order the records, complete and store the metrics, raise when a class got nothing."""
    records = result["records"]
    order = {c: i for i, c in enumerate(classnames)}
    records.sort(key=lambda r: (order.get(r["class"], len(order)), r.get("_index", 0)))
    for r in records:
        r.pop("_index", None)
    counts = Counter(r["class"] for r in records)
    missing = [c for c in classnames if counts[c] == 0]
    metrics.update(
        classes=len(classnames),
        n_per_class=n_per_class,
        seed=seed,
        descriptions=len(records),
        per_class={"min": min(counts[c] for c in classnames), "max": max(counts[c] for c in classnames),
                   "mean": round(len(records) / len(classnames), 3)},
        short_classes={c: counts[c] for c in classnames if n_per_class and 0 < counts[c] < n_per_class},
        missing_classes=missing,
        seconds=round(time.time() - t0, 3),
    )
    if run_dir is not None:
        update_metrics(run_dir, "describe", metrics)
    res = DescribeResult(records, metrics, out_path, result.get("failures", {}))
    if missing:
        raise DescriptionsIncomplete(
            f"{len(missing)} of {len(classnames)} classes have no description: {missing[:10]}"
            + (f"; {len(res.failures)} requests failed, e.g. {next(iter(res.failures.values()))}" if res.failures else "")
            + ". Everything that succeeded is saved; run again to resume."
        )
    return res


def _check_stale(existing: list[dict], plan_ids: set[str], out_path: Path | None) -> list[dict]:
    """Records in ``out_path`` that belong to this configuration; the others are moved aside."""
    keep = [r for r in existing if r.get("id") in plan_ids]
    stale = [r for r in existing if r.get("id") not in plan_ids]
    if stale and out_path is not None:
        what = Counter((r.get("backend"), r.get("model"), str(r.get("prompt_id", "")).split("/")[0]) for r in stale)
        aside = out_path.with_name("describe_replaced.jsonl")
        append_jsonl(aside, stale)
        write_jsonl(out_path, keep)
        warnings.warn(
            f"{out_path.name}: moved {len(stale)} descriptions of another configuration "
            f"((backend, model, prompts): {dict(what)}) to {aside.name}"
        )
    return keep


class _ChatRun:
    """One generation with a chat backend: schedules each slot's attempts, replays cached responses,
    sends the rest concurrently, validates every answer and appends accepted descriptions at once."""

    def __init__(self, be, ps, validator, out_path, cache_path, max_attempts, progress):
        self.be, self.ps, self.validator, self.out_path = be, ps, validator, out_path
        self.max_attempts, self.progress = max_attempts, progress
        if cache_path is None and out_path is not None:
            cache_path = out_path.with_name("describe_responses.jsonl")
        self.cache = ResponseCache(cache_path)
        self.rejects_path = out_path.with_name("describe_rejected.jsonl") if out_path is not None else None
        if self.rejects_path is not None:
            repair_jsonl(self.rejects_path)
        self.rejected = {r["key"]: r for r in iter_jsonl(self.rejects_path)} if self.rejects_path is not None else {}
        self.session: Counter = Counter()
        self.failures: dict[str, str] = {}
        self.queue: deque[ChatRequest] = deque()
        self.done: dict[str, dict] = {}
        self.by_id: dict[str, _Slot] = {}
        self.bar = None

    def run(self, slots: list[_Slot], existing: list[dict]) -> dict:
        self.by_id = {s.id: s for s in slots}
        self.done = {r["id"]: r for r in _check_stale(existing, set(self.by_id), self.out_path)}
        for r in self.done.values():
            self.validator.add(r["class"], r["text"])
            r["_index"] = self.by_id[r["id"]].index
        pending = [s for s in slots if s.id not in self.done]
        self.bar = progress_bar(total=len(pending), disable=not self.progress, desc=f"describe ({self.be.name})", unit="desc")
        try:
            for s in pending:
                self.schedule(s, 0)
            self.send_all()
        finally:
            self.bar.close()
        return {"records": list(self.done.values()), "metrics": self.metrics(slots), "failures": self.failures}

    def schedule(self, slot: _Slot, attempt: int) -> None:
        """Queue the slot's next attempt not rejected before (a cached answer is handled at once)."""
        while attempt < self.max_attempts:
            req = _request(self.be, self.ps, slot, attempt)
            if req.key in self.rejected:  # answered and rejected in an earlier run: next attempt
                attempt += 1
                continue
            text = self.cache.get(req.key)
            if text is not None:
                self.session["from_cache"] += 1
                self.handle(req, text)
            else:
                self.queue.append(req)
            return
        self.session["dropped_slots"] += 1
        self.bar.update(1)

    def handle(self, req: ChatRequest, raw: str) -> None:
        """Accept a response as a description (appended to disk at once), or reject it and retry."""
        slot = self.by_id[req.meta["slot"]]
        text = clean_text(raw)
        reason = self.validator.check(slot.classname, text)
        if reason is None:
            rec = {"id": slot.id, "class": slot.classname, "text": text, "backend": self.be.name,
                   "model": self.be.model, "prompt_id": self.ps.prompt_id(slot.variant), "params": req.params,
                   "time": now(), "variant": None, "request": req.key, "attempt": req.meta["attempt"]}
            if self.out_path is not None:
                append_jsonl(self.out_path, rec)
            self.validator.add(slot.classname, text)
            self.done[slot.id] = {**rec, "_index": slot.index}
            self.bar.update(1)
            return
        rej = {"id": slot.id, "key": req.key, "attempt": req.meta["attempt"], "class": slot.classname,
               "reason": reason, "text": text, "time": now()}
        if reason == "other_class":
            rej["named"] = self.validator.other_classes(slot.classname, text)
        if self.rejects_path is not None:
            append_jsonl(self.rejects_path, rej)
        self.rejected[req.key] = rej
        self.schedule(slot, req.meta["attempt"] + 1)

    def work(self, batch: list[ChatRequest]) -> list:
        """A worker thread's call: every response is cached the moment it arrives (never paid twice)."""
        results = self.be.complete(batch)
        if len(results) != len(batch):
            raise RuntimeError(f"backend {self.be.name} returned {len(results)} results for {len(batch)} requests")
        for req, res in zip(batch, results):
            if isinstance(res, str):
                self.cache.put(req.key, res, backend=self.be.name, model=self.be.model, messages=req.messages,
                               params=req.params, meta=req.meta)
        return results

    def send_all(self) -> None:
        """Keep ``max_concurrency`` batches in flight until the queue is empty; handle results in
        submission order (deterministic); a fatal backend error stops sending and is raised."""
        be, fatal, order = self.be, None, 0
        with ThreadPoolExecutor(max_workers=be.max_concurrency, thread_name_prefix="describe") as ex:
            in_flight: dict = {}
            try:
                while (self.queue or in_flight) and fatal is None:
                    while self.queue and len(in_flight) < be.max_concurrency:
                        batch = [self.queue.popleft() for _ in range(min(be.batch_size, len(self.queue)))]
                        in_flight[ex.submit(self.work, batch)] = (order, batch)
                        order += 1
                    finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                    for fut in sorted(finished, key=lambda f: in_flight[f][0]):
                        _, batch = in_flight.pop(fut)
                        fatal = self._results(batch, fut.result()) or fatal
            finally:
                for fut in list(in_flight):  # in-flight requests finish (and are cached); the queue is dropped
                    fut.cancel()
        if fatal is not None:
            raise fatal

    def _results(self, batch, results) -> BackendError | None:
        fatal = None
        for req, res in zip(batch, results):
            if isinstance(res, BackendError):
                self.failures[req.meta["slot"]] = str(res)
                self.session["failed_slots"] += 1
                self.bar.update(1)
                fatal = res if res.fatal else fatal
            else:
                self.session["new_responses"] += 1
                self.handle(req, res)
        return fatal

    def metrics(self, slots: list[_Slot]) -> dict:
        reasons = {"rejected": Counter(), "retried": Counter(), "dropped": Counter()}
        plan_keys = {_request(self.be, self.ps, s, a).key for s in slots for a in range(self.max_attempts)}
        for key, rej in self.rejected.items():
            if key not in plan_keys:
                continue
            reasons["rejected"][rej["reason"]] += 1
            last = rej["attempt"] + 1 >= self.max_attempts
            reasons["dropped" if last else "retried"][rej["reason"]] += 1
        return {
            "planned": len(slots),
            **{k: {r: v.get(r, 0) for r in REASONS} for k, v in reasons.items()},
            "session": {"responses_from_cache": self.session["from_cache"],
                        "new_responses": self.session["new_responses"],
                        "failed_slots": self.session["failed_slots"], **self.be.stats()},
        }


def _fill(rec: dict, be: RecordBackend, index: int) -> dict:
    r = dict(rec)
    r.setdefault("backend", be.name)
    r.setdefault("model", be.model)
    r.setdefault("prompt_id", be.name)
    r.setdefault("params", {})
    r.setdefault("time", now())
    r.setdefault("variant", None)
    if not r.get("id"):
        r["id"] = hash_key(r["class"], r["prompt_id"], r["text"])[:16]
    r["_index"] = index
    return r


def _run_records(be, ds, classnames, n, seed, out_path, existing, validator, progress: bool = False):
    produced = be.records(ds, classnames, n, seed)
    unknown = sorted({r["class"] for r in produced} - set(classnames))
    if unknown:
        raise ValueError(f"backend {be.name} produced descriptions for classes not in the dataset: {unknown[:10]}")
    produced = [_fill(r, be, i) for i, r in enumerate(produced)]
    ids = [r["id"] for r in produced]
    dup_ids = [i for i, k in Counter(ids).items() if k > 1]
    if dup_ids:
        raise ValueError(f"backend {be.name} produced duplicate description ids: {dup_ids[:5]}")
    done = {r["id"]: r for r in _check_stale(existing, set(ids), out_path)}
    index = {r["id"]: r["_index"] for r in produced}
    for r in done.values():
        validator.add(r["class"], r["text"])
        r["_index"] = index[r["id"]]
    dropped = Counter()
    new = []
    for r in progress_bar(produced, disable=not progress, desc=f"describe ({be.name})", unit="desc"):
        if r["id"] in done:
            continue
        r["text"] = clean_text(r["text"])
        reason = validator.check(r["class"], r["text"])
        if reason is not None:
            dropped[reason] += 1
            continue
        validator.add(r["class"], r["text"])
        new.append(r)
        done[r["id"]] = r
    if out_path is not None and new:
        append_jsonl(out_path, [{k: v for k, v in r.items() if k != "_index"} for r in new])
    metrics = {"planned": len(produced), "dropped": {k: dropped.get(k, 0) for k in REASONS}, "new": len(new),
               **getattr(be, "report", {})}
    return {"records": list(done.values()), "metrics": metrics}
