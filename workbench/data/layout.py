"""Validate a dataset root before any heavy work, and read the small text tables datasets ship.

Every loader calls :func:`check_layout` first. A wrong root or a missing file raises one
:class:`DatasetLayoutError` that lists everything missing and shows the expected layout, so a
user fixes all of it at once instead of one file per run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence


class DatasetLayoutError(FileNotFoundError):
    """A dataset root, file or image is missing or malformed; the message says what and where."""


def _layout_message(name: str, problem: str, expected: str, hint: str | None = None) -> str:
    msg = f"{name}: {problem}\nExpected layout:\n{expected.rstrip()}"
    return msg + (f"\n{hint}" if hint else "")


def _missing(root: Path, required: Sequence[str]) -> list[str]:
    # A trailing "/" marks a folder; anything else must be a file.
    out = []
    for rel in required:
        p = root / rel.rstrip("/")
        ok = p.is_dir() if rel.endswith("/") else p.is_file()
        if not ok:
            out.append(rel)
    return out


def check_layout(name: str, root, required: Sequence[str], expected: str) -> Path:
    """Return ``root`` as a Path when it holds every path in ``required``; else raise listing all missing.

    ``required`` entries are relative to ``root``; a trailing ``/`` means a folder. ``expected``
    is the layout tree shown in the error. When a direct subfolder of ``root`` has the full
    layout, the error suggests it (the usual mistake: pointing at the folder above).
    """
    if root is None or str(root) == "":
        raise DatasetLayoutError(_layout_message(name, "no dataset root given; set data_root to the dataset folder.", expected))
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DatasetLayoutError(_layout_message(name, f"dataset root {root} {what}.", expected))
    missing = _missing(root, required)
    if not missing:
        return root
    hint = None
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if not _missing(child, required):
            hint = f"Did you mean data_root={child}?"
            break
    listing = "\n".join(f"  {m}" for m in missing)
    problem = f"{root} is missing {len(missing)} required path(s):\n{listing}"
    raise DatasetLayoutError(_layout_message(name, problem, expected, hint))


def check_images_exist(image_root: Path, filenames: Sequence[str]) -> list[str]:
    """Filenames (relative to ``image_root``) that are not files, in input order."""
    base = str(image_root)
    return [f for f in filenames if not os.path.isfile(os.path.join(base, f))]  # str joins: 10x faster than Path


def missing_images_message(name: str, image_root: Path, missing: Sequence[str], show: int = 10) -> str:
    lines = "\n".join(f"  {f}" for f in missing[:show])
    more = f"\n  ... and {len(missing) - show} more" if len(missing) > show else ""
    return (
        f"{name}: {len(missing)} image file(s) listed by the dataset are missing under {image_root}:\n"
        f"{lines}{more}\n"
        "Restore them, or pass dataset_options.skip_missing=true to drop them (recorded in extras['skipped'])."
    )


def read_table(
    name: str,
    path: Path,
    columns: Sequence[tuple[str, Callable]],
    display: str | None = None,
) -> list[tuple]:
    """Read a whitespace-separated text table; the last column takes the rest of the line.

    ``columns`` is ``[(name, converter), ...]``. The last column may contain spaces (CUB part
    names, aircraft variants such as "Cessna 172"). A malformed line raises an error naming
    the file, the line number and the expected format.
    """
    n = len(columns)
    fmt = " ".join(f"<{c}>" for c, _ in columns)
    shown = display or path.name
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=n - 1)
            try:
                if len(parts) != n:
                    raise ValueError
                rows.append(tuple(conv(p) for (_, conv), p in zip(columns, parts)))
            except ValueError:
                raise DatasetLayoutError(
                    f"{name}: {shown} line {i}: expected '{fmt}', got {line[:80]!r}"
                ) from None
    return rows
