"""Checks on generated descriptions: empty text, refusals, naming another class, duplicates."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

from ..data.names import norm_name

REASONS = ("empty", "refusal", "other_class", "duplicate")

_REFUSAL = re.compile(
    r"^\W*(?:i\s*(?:'|’)?\s*m\s+sorry|i\s+am\s+sorry|sorry\b|i\s+apologi[sz]e|as\s+an\s+ai\b|"
    r"i\s+(?:cannot|can\s*not|can(?:'|’)t|am\s+unable|(?:'|’)m\s+unable|am\s+not\s+able|do\s+not\s+have|don(?:'|’)t\s+have)\b|"
    r"unfortunately,?\s+i\b)",
    re.IGNORECASE,
)
_LEADS = re.compile(r"^\s*(?:(?:description|answer|response)\s*:\s*|[-*•]\s+|\d+[.)]\s+)", re.IGNORECASE)


def norm_text(text: str) -> str:
    """Key for duplicate detection: lower case, words only."""
    return " ".join(re.findall(r"[0-9a-z]+", text.lower().replace("'", "").replace("’", "")))


def clean_text(text: str | None) -> str:
    """Strip whitespace, wrapping quotes, "Description:" leads and list markers; join lines."""
    if not text:
        return ""
    text = _unquote(str(text).strip())
    lines = [_LEADS.sub("", ln).strip() for ln in text.splitlines()]
    return " ".join(_unquote(" ".join(ln for ln in lines if ln)).split())


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] in "\"'“" and text[-1] in "\"'”":
        return text[1:-1].strip()
    return text


class Validator:
    """Decides whether a description is acceptable for its class; remembers accepted texts per class.

    ``check`` returns None (accept) or one of :data:`REASONS`. A description *names another class*
    when another class's name (hyphen/case-insensitive, whole words) occurs in it after this class's
    own name is removed, so "Laysan Albatross" text may say "albatross" even if "Albatross" were a class.
    ``ignore_names`` are never treated as another class (e.g. a class named like a colour word).
    """

    def __init__(self, classnames: Iterable[str], ignore_names: Iterable[str] = (), min_words: int = 3):
        self.classnames = list(classnames)
        self.min_words = min_words
        ignore = {norm_name(n) for n in ignore_names}
        names = sorted({norm_name(c) for c in self.classnames} - ignore - {""}, key=len, reverse=True)
        self._names = {norm_name(c): c for c in self.classnames}
        self._any = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b") if names else None
        self.seen: dict[str, set[str]] = defaultdict(set)

    def add(self, classname: str, text: str) -> None:
        self.seen[classname].add(norm_text(text))

    def other_classes(self, classname: str, text: str) -> list[str]:
        if self._any is None:
            return []
        t = " " + norm_name(text) + " "
        own = norm_name(classname)
        if own:
            t = re.sub(r"\b" + re.escape(own) + r"\b", " | ", t)
        return sorted({self._names[m] for m in self._any.findall(t) if m != own})

    def check(self, classname: str, text: str) -> str | None:
        if len(re.findall(r"\w+", text)) < self.min_words:
            return "empty"
        if _REFUSAL.search(text):
            return "refusal"
        if self.other_classes(classname, text):
            return "other_class"
        if norm_text(text) in self.seen[classname]:
            return "duplicate"
        return None
