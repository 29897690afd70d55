"""Import description files in GIST's ``long_captions.json`` format (class -> list of descriptions).

GIST's keys are not the dataset's class names: CUB's are lower-case, hyphenated and end in a
newline (``"black-footed-albatross\\n"`` for ``"Black footed Albatross"``). Keys are matched to
class names by :func:`workbench.data.names.match_names` (case-, hyphen-, underscore- and
apostrophe-insensitively, then also ignoring spaces and a plural/possessive ``s``); keys that match
no class (or several) are reported, never guessed.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..data.names import match_names
from ..io import hash_key
from .backend import RecordBackend
from .generate import generate_descriptions


@dataclass
class ImportReport:
    records: list[dict]
    unmatched_keys: list[str] = field(default_factory=list)  # file keys that match no class
    classes_without: list[str] = field(default_factory=list)  # dataset classes the file has nothing for


def read_long_captions(path: str | Path, classnames, source: str | None = None) -> ImportReport:
    """Records (descriptions.jsonl schema) from a GIST ``long_captions.json``, keys mapped to ``classnames``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"long captions file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object mapping class names to lists of descriptions")
    classnames = list(classnames)
    mapping, unmatched = match_names(list(data), classnames)
    records, got = [], set()
    src = source or path.name
    for key, cname in mapping.items():
        for i, text in enumerate(data[key]):
            if not isinstance(text, str):
                raise ValueError(f"{path}: descriptions of {key!r} must be strings; item {i} is {type(text).__name__}")
            records.append({
                "id": "gist-" + hash_key(src, cname, i, text)[:16], "class": cname, "text": text,
                "backend": "import", "model": None, "prompt_id": "gist-long-captions",
                "params": {"source": src, "key": key, "index": i}, "variant": None,
            })
            got.add(cname)
    return ImportReport(records, unmatched, [c for c in classnames if c not in got])


def import_long_captions(path, dataset, out_path=None, run_dir=None, n_per_class=None, **kwargs):
    """Import a GIST ``long_captions.json`` into ``descriptions.jsonl`` (validated, resumable, reported).

    Shorthand for ``generate_descriptions(dataset, backend="import", path=path, ...)``; the
    unmatched keys are in ``result.metrics["unmatched_keys"]``.
    """
    return generate_descriptions(dataset, backend="import", path=path, out_path=out_path, run_dir=run_dir,
                                 n_per_class=n_per_class, **kwargs)


class LongCaptionsBackend(RecordBackend):
    """Record backend reading a GIST ``long_captions.json`` (``path``). ``strict``: unmatched keys are an error."""

    name = "import"
    model = None

    def __init__(self, path: str | Path, strict: bool = False):
        if not path:
            raise ValueError("the import backend needs path= (a GIST long_captions.json)")
        self.path, self.strict = Path(path), strict
        self.report: dict = {}

    def records(self, dataset, classnames, n_per_class, seed):
        rep = read_long_captions(self.path, classnames)
        self.report = {"source": str(self.path), "unmatched_keys": rep.unmatched_keys,
                       "classes_without": rep.classes_without}
        if rep.unmatched_keys:
            msg = (f"{self.path}: {len(rep.unmatched_keys)} keys match no class name: "
                   f"{[k.strip() for k in rep.unmatched_keys[:10]]}")
            if self.strict:
                raise ValueError(msg)
            warnings.warn(msg)
        if n_per_class is None:
            return rep.records
        kept, per = [], {}
        for r in rep.records:
            if per.get(r["class"], 0) < n_per_class:
                per[r["class"]] = per.get(r["class"], 0) + 1
                kept.append(r)
        return kept
