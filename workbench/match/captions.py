"""Captions for matched descriptions, and GIST's ``captions_top5.json`` format.

Captions are ``"<class name>: <short description>"`` within the CLIP text context (77 tokens),
never cut mid-word: the description as is (truncated at a word boundary), an extractive or LLM
summary from the describe stage, or any callable.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

from ..clip.text import context_length, count_tokens
from ..data.names import same_name
from ..describe.summarize import summarize as describe_summarize
from ..io import write_json
from ..runs import write_matches


def truncate_caption(classname: str, text: str, tokenizer, max_tokens: int | None = None) -> str:
    """``"<class>: <text>"``, cut at the last word boundary that fits ``max_tokens`` (default: the
    tokenizer's context, 77 for CLIP), so the text encoder never silently cuts a word."""
    max_tokens = max_tokens or context_length(tokenizer)
    head = f"{classname}: "
    words = " ".join(str(text).split()).split(" ")
    full = head + " ".join(words)
    if count_tokens(tokenizer, full) <= max_tokens:
        return full
    lo, hi = 0, len(words)  # largest n with head + words[:n] fitting; binary search on token count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(tokenizer, head + " ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise ValueError(f"class name {classname!r} alone does not fit {max_tokens} tokens")
    return (head + " ".join(words[:lo])).rstrip(",;:-— ")


Summarizer = Callable[[str, str], str]  # (class name, description) -> caption
SUMMARIZE_METHODS = ("truncate", "extractive", "llm")


def summarize_texts(classes: Sequence[str], texts: Sequence[str], summarize: str | Summarizer | None, tokenizer,
                    options: dict | None = None, progress: bool = False, stats: dict | None = None) -> list[str]:
    """Captions ``"<class>: <short description>"`` for (class, description) pairs, each within the
    tokenizer's context.

    ``summarize``: ``None``/``"truncate"`` keeps the description, cut at the last word that fits;
    ``"extractive"`` keeps its most informative clauses (offline); ``"llm"`` asks a chat backend
    (``options``: ``backend`` plus :func:`workbench.describe.summarize` keywords such as ``cache_path``);
    or a callable ``(classname, text) -> caption``. Whatever comes back is cut to fit if it overruns.
    ``stats``: for "extractive" and "llm", receives how many summaries fell back, and why
    (:func:`workbench.describe.summarize`).
    """
    classes, texts = list(classes), list(texts)
    options = dict(options or {})
    check_summarize(summarize, options)
    if summarize in (None, "", "none", "truncate"):
        return [truncate_caption(c, t, tokenizer) for c, t in zip(classes, texts)]
    if callable(summarize):
        caps = [summarize(c, t) for c, t in zip(classes, texts)]
    else:
        if summarize == "extractive":
            options["backend"] = None
        caps = list(describe_summarize(texts, classes, tokenizer=tokenizer, progress=progress, stats=stats, **options))
    limit = context_length(tokenizer)
    out = []
    if len(caps) != len(classes):
        raise ValueError(f"summarizer returned {len(caps)} captions for {len(classes)} descriptions")
    for c, cap in zip(classes, caps):
        if count_tokens(tokenizer, cap) > limit:  # never let the text encoder cut silently mid-word
            cap = truncate_caption(c, cap.split(": ", 1)[1] if cap.startswith(f"{c}: ") else cap, tokenizer)
        out.append(cap)
    return out


def check_summarize(summarize, options: dict | None = None) -> None:
    """Fail fast (before any embedding) on a summarize setting that cannot work."""
    if summarize in (None, "", "none", "truncate") or callable(summarize):
        return
    if summarize not in SUMMARIZE_METHODS:
        raise ValueError(f"unknown summarize={summarize!r}; expected one of {SUMMARIZE_METHODS} or a callable")
    if summarize == "llm" and not (options or {}).get("backend"):
        raise ValueError("summarize='llm' needs summarize_options={'backend': <chat backend>, ...}")


# GIST interop: captions_top5.json = {image filename: [caption, ...]}


def split_class_prefix(caption: str, classname: str) -> str:
    """The caption without a leading ``"<class>: "`` that names ``classname`` (loosely), else unchanged."""
    head, sep, body = caption.partition(": ")
    return body if sep and same_name(head, classname) else caption


def export_captions_top5(records: Sequence[dict], path: str | Path, k: int = 5, strip_class: bool = False) -> Path:
    """Write GIST's ``captions_top5.json`` (image filename -> its top-k captions, best first).

    ``strip_class=True`` drops the ``"<class>: "`` prefix: GIST's trainer prepends ``species + ": "``
    itself (its CUB file keeps the prefix, its Flowers file does not).
    """
    path = Path(path)
    cut = (lambda r, c: split_class_prefix(c, r["class"])) if strip_class else (lambda r, c: c)  # noqa: E731
    write_json(path, {r["image"]: [cut(r, c) for c in r["captions"][:k]] for r in records})
    return path


def import_captions_top5(path: str | Path, ds, run_dir: str | Path | None = None, strict: bool = True,
                         tokenizer=None) -> list[dict]:
    """Read GIST's ``captions_top5.json`` (also its ``captions_top5.csv``, which holds the same JSON)
    into matches records for ``ds``.

    Captions become ``"<class name>: <caption>"`` with the dataset's class name, replacing a loosely
    matching prefix when the file has one (CUB's ``"black-footed albatross: …"``); ``descriptions``
    keep the file's text. With ``tokenizer``, captions longer than its context are cut at a word.
    Images missing from the dataset raise (listing them) unless ``strict=False`` (then dropped).
    Description ids are content hashes, so identical texts share an id; scores are unknown (None).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); expected {{image filename: [caption, ...]}}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object mapping image filename -> list of captions")
    rows = {f: (int(l), s) for f, l, s in zip(ds.table["filename"], ds.table["label"], ds.table["species"])}
    unknown = [f for f in data if f not in rows]
    if unknown and strict:
        raise ValueError(f"{len(unknown)} image(s) in {path} are not in dataset {ds.name!r}: {unknown[:20]}"
                         + (" …" if len(unknown) > 20 else ""))
    records = []
    for f, texts in data.items():
        if f not in rows:
            continue
        label, species = rows[f]
        texts = [str(t) for t in texts]
        bodies = [split_class_prefix(t, species) for t in texts]
        caps = [truncate_caption(species, b, tokenizer) if tokenizer is not None else f"{species}: {b}" for b in bodies]
        records.append({
            "image": f, "label": label, "class": species,
            "description_ids": ["gist-" + hashlib.sha1(t.encode()).hexdigest()[:12] for t in texts],
            "descriptions": texts, "captions": caps, "scores": None, "probs": None,
            "model": None, "pretrained": None, "source": str(path),
        })
    if run_dir is not None:
        write_matches(run_dir, records)
    return records
