"""Class names as people and files spell them: one home for comparing, matching and finding them.

CUB's folders say ``001.Black_footed_Albatross``, GIST's ``species`` column "Black footed Albatross",
its caption files "black-footed albatross", its description keys "black-footed-albatross\\n".
"""
from __future__ import annotations

import re

_NUMBER_PREFIX = re.compile(r"^\d+\.")  # CUB-style "001." class-folder prefix


def humanize(folder: str) -> str:
    """Folder-style class name to a readable one: ``001.Black_footed_Albatross`` -> ``Black footed Albatross``.

    This is how GIST's ``species`` column spells CUB classes; the loaders keep the folder name
    in a ``class_folder`` column.
    """
    s = _NUMBER_PREFIX.sub("", folder.strip())
    return re.sub(r"\s+", " ", s.replace("_", " ")).strip() or folder


def norm_name(name: str) -> str:
    """Case-, hyphen- and underscore-insensitive form of a class name ("Black_footed-Albatross" -> "black footed albatross")."""
    name = re.sub(r"^\s*\d+\.", "", name.strip())  # CUB's "001." prefixes
    name = name.replace("'", "").replace("’", "")
    return " ".join(re.sub(r"[^0-9a-z]+", " ", name.lower()).split())


def same_name(a: str, b: str) -> bool:
    """Do two spellings name the same class (case, hyphens, underscores, apostrophes aside)?"""
    return norm_name(a) == norm_name(b)


def loose_key(name: str) -> str:
    """:func:`norm_name` that also ignores spaces and a plural or possessive ``s`` ending a word."""
    return "".join(re.sub(r"s\b", "", w) for w in norm_name(name).split())


def match_names(keys, classnames) -> tuple[dict[str, str], list[str]]:
    """Map each key (e.g. a file's class key) to one class name: by :func:`norm_name`, then, for what is
    left, by :func:`loose_key`. Returns ``(mapping, unmatched keys)``; a key matching several classes
    is unmatched, never guessed."""
    exact: dict[str, list[str]] = {}
    loose: dict[str, list[str]] = {}
    for c in classnames:
        exact.setdefault(norm_name(c), []).append(c)
        loose.setdefault(loose_key(c), []).append(c)
    mapping, unmatched = {}, []
    for k in keys:
        hit = exact.get(norm_name(k)) or loose.get(loose_key(k)) or []
        if len(hit) == 1:
            mapping[k] = hit[0]
        else:
            unmatched.append(k)
    return mapping, unmatched


_SEP = r"[\s\-_'’]*"  # between the words of a name: "Black-footed", "Black footed", "Black_footed"


def name_regex(classname: str) -> str:
    """A regular expression for the class name in running text: its words in order, separated by any
    run of spaces, hyphens, underscores or apostrophes ("Black-footed" and "Black footed" alike)."""
    words = re.findall(r"[0-9A-Za-z]+", classname)
    return _SEP.join(re.escape(w) for w in words)


def mention_regex(classname: str) -> str:
    """A regular expression (use it case-insensitively) for a mention of the class in running text:
    :func:`name_regex` as whole words only, its last word also plural ("Purple Finches", "Canaries")
    and possessive ("Grackle's", "Finches'"), so removing a mention never leaves a fragment ("es")."""
    words = re.findall(r"[0-9A-Za-z]+", classname)
    if not words:
        return ""
    *head, last = words
    forms = [re.escape(last) + "(?:e?s)?"]
    if len(last) > 1 and last[-1] in "yY":
        forms.append(re.escape(last[:-1]) + "ies")
    body = _SEP.join([*map(re.escape, head), "(?:" + "|".join(forms) + ")"])
    return r"(?<![0-9A-Za-z])" + body + r"(?:['’]s?)?(?![0-9A-Za-z])"
