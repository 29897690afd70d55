"""Summaries "<class name>: <short description>" that fit CLIP's context, counted with its tokenizer.

Two ways: an LLM summarization prompt (:func:`summarize` with a chat backend), and an offline
extractive fallback (:func:`extractive_summary`) that keeps the most informative clauses that fit.
Text is only ever shortened at clause or word boundaries, never inside a word: every word after the
``"<class>: "`` prefix of an extractive summary is a word of its description (:func:`foreign_words`).
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..clip.text import context_length, get_tokenizer, token_counter
from ..data.names import mention_regex, name_regex
from ..progress import progress_bar
from .backend import ChatBackend, ChatRequest, make_backend
from .cache import ResponseCache, request_key
from .prompts import SUMMARY_PROMPT_ID, summary_messages
from .validate import Validator, clean_text

# --- extractive summary ----------------------------------------------------------------------------

_COLOURS = (
    "black white grey gray brown red orange yellow green blue purple violet pink buff olive rufous chestnut "
    "cinnamon tan cream golden gold silver iridescent dark pale light bright dull glossy metallic crimson "
    "scarlet maroon lavender magenta ivory bronze copper rust rusty sooty blackish whitish brownish greyish "
    "grayish reddish yellowish bluish greenish pinkish erythematous violaceous hyperpigmented hypopigmented"
).split()
_PATTERNS = (
    "striped streaked spotted speckled barred mottled patch patches stripe stripes streak streaks spots "
    "spot band bands bar bars ring ring-shaped eyering crest crested hooked curved pointed forked notched "
    "rounded long short large small slender thick thin stout tipped edged scaly plaque plaques papules "
    "papule nodule nodules scale scales vesicles pustules crust ulcer annular raised flat smooth rough"
).split()
_PARTS = (
    "head crown forehead nape neck throat chin cheek face eye eyes eyebrow beak bill breast chest belly "
    "back wing wings wingbars tail rump flank flanks leg legs feet foot toes plumage feathers underparts "
    "upperparts mantle petal petals stamen stamens pistil sepal sepals leaf leaves stem centre center "
    "fuselage engine engines nose cockpit winglet winglets fin propeller propellers gear skin lesion "
    "lesions border borders surface"
).split()
_VISUAL = {w: 2.0 for w in _COLOURS + _PATTERNS + _PARTS}
_STOP = set(
    "a an the and or of with its it is are has have having in on at to from by as for this that these those "
    "which while also be been being very some any into over under up down out appear appears appearing "
    "overall its their there they can may display displays exhibits features feature possesses shows "
    "showing distinguished distinguishes provides providing allowing along".split()
)
_LEAD_VERBS = r"(?:also\s+)?(?:has|have|is|are|features|displays|exhibits|possesses|shows|boasts|sports|bears|presents)\b"
_SUBJECTS = [
    r"(?:the|this|a|an)\s+(?:image|photo|photograph)\s+shows\s+(?:a\s+)?(?:person'?s|patient'?s)?",
    r"(?:it|this\s+(?:\w+\s+){0,2}(?:bird|flower|plant|aircraft|plane|species|condition)|the\s+(?:bird|flower|plant|aircraft|plane))(?:'s|s)?",
    r"its",
]
# A word: letters and digits, hyphenated compounds and apostrophes inside ("sooty-brown", "grackle's")
# kept whole, so a fragment of one ("es" of "Finches", "footed" of "Black-footed") is not a word.
_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")


def split_clauses(classname: str, text: str) -> list[str]:
    """Clauses of ``text`` without their subject lead ("The male <class> has", "It has", "Its")."""
    name = mention_regex(classname)  # whole words, plural and possessive too: no "es" left of "Finches"
    lead_class = re.compile(
        r"^(?:(?:the|this|a|an)\s+)?(?:(?:adult|male|female|juvenile|immature|young|breeding|non-breeding)\s+)*"
        + name + r"\s*(?:" + _LEAD_VERBS + r")?\s*",
        re.IGNORECASE,
    )
    lead_other = re.compile(r"^(?:" + "|".join(_SUBJECTS) + r")\b\s*(?:" + _LEAD_VERBS + r")?\s*", re.IGNORECASE)
    connectors = re.compile(
        r"^(?:and|with|while|along\s+with|which|but|as\s+well\s+as|plus|look\s+for|note|also)\b\s*", re.IGNORECASE
    )
    clauses = []
    for sent in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        sent = sent.strip().rstrip(".!?").strip()
        sent = lead_class.sub("", sent, count=1) if name else sent
        sent = lead_other.sub("", sent, count=1)
        parts = []
        for part in re.split(r"\s*[;,]\s*", sent):
            part = connectors.sub("", part.strip()).strip(" .:-")
            part = connectors.sub("", part).strip()  # "and with ..."
            part = re.sub(r"^(?:a|an|the)\s+", "", part, flags=re.IGNORECASE)
            if part[:1].isupper() and part[1:2].islower():  # "The bill" -> "bill"; keeps "DC-10"
                part = part[0].lower() + part[1:]
            if part and re.search(r"[A-Za-z]", part):
                parts.append(part)
        # one- or two-word pieces are list items cut off by commas ("a dark, sooty-brown plumage",
        # "white head, neck, and underparts"): glue them to their neighbour
        merged: list[str] = []
        for part in parts:
            if merged and len(part.split()) <= 2:
                merged[-1] += ", " + part
            elif merged and len(merged[-1].split()) <= 2 and len(merged) == 1:
                merged[-1] += ", " + part
            else:
                merged.append(part)
        clauses.extend(merged)
    return clauses


def informativeness(clause: str, classname: str = "") -> float:
    """Visual words (colours, patterns, parts) count double; other content words once; the class name not at all."""
    own = set(re.findall(r"[a-z]+", classname.lower()))
    score = 0.0
    for w in re.findall(r"[a-z][a-z\-]*", clause.lower()):
        if w in own or w in _STOP or len(w) < 3:
            continue
        score += max((_VISUAL.get(p, 1.0) for p in w.split("-")), default=1.0)
    return score


def _join(classname: str, clauses: Sequence[str]) -> str:
    return f"{classname}: " + ", ".join(clauses) + "." if clauses else f"{classname}:"


def foreign_words(caption: str, classname: str, source: str) -> list[str]:
    """Words after the ``"<classname>: "`` prefix of ``caption`` that are not words of ``source`` (case
    aside), such as the "es" once left of "Purple Finches". An extractive summary has none."""
    body = caption[len(classname) + 1:] if caption.startswith(classname + ":") else caption
    have = set(_WORD.findall(source.lower()))
    return [w for w in _WORD.findall(body.lower()) if w not in have]


def _fit_words(classname: str, words: list[str], count, budget: int) -> str:
    """``"<classname>: w1 w2 ..."``: as many of ``words``, in order, as fit ``budget`` tokens."""
    words = list(words)
    while words and count(_join(classname, [" ".join(words)])) > budget:
        words.pop()
    return _join(classname, [" ".join(words).rstrip(",;:.!?")] if words else [])


def _extractive(classname: str, text: str, count, limit: int, budget: int) -> tuple[str, str | None]:
    """The extractive summary and why it is not made of whole clauses (None when it is): ``no_clause``
    (nothing but the subject), ``clause_cut`` (no clause fits: the best one cut by words), or
    ``foreign_words`` (a word not in the description: its own first words instead)."""
    if count(_join(classname, [])) > limit:
        raise ValueError(f"class name {classname!r} alone takes more than {limit} tokens")
    first: dict[str, str] = {}
    for c in split_clauses(classname, text):
        first.setdefault(c.lower(), c)  # a clause said twice is kept once, where it came first
    clauses = list(first.values())
    if not clauses:
        return _join(classname, []), "no_clause"
    ranked = sorted(range(len(clauses)), key=lambda i: (-informativeness(clauses[i], classname), i))
    keep: list[int] = []
    for i in ranked:
        if informativeness(clauses[i], classname) <= 0 and keep:
            break
        trial = sorted(keep + [i])
        if count(_join(classname, [clauses[j] for j in trial])) <= budget:
            keep = trial
    if keep:
        caption, reason = _join(classname, [clauses[j] for j in keep]), None
    else:  # the best clause alone is too long: drop whole words from its end
        caption, reason = _fit_words(classname, clauses[ranked[0]].split(), count, budget), "clause_cut"
    if foreign_words(caption, classname, text):  # never a fragment: the description's own words instead
        return _fit_words(classname, text.split(), count, budget), "foreign_words"
    return caption, reason


def _limits(tok, max_tokens: int | None, target_tokens: int) -> tuple[int, int]:
    """``(limit, budget)``: the tokens a caption may take, and the tokens an extractive one aims for."""
    limit = context_length(tok) if max_tokens is None else max_tokens
    return limit, (min(limit, target_tokens) if target_tokens else limit)


def extractive_summary(classname: str, text: str, tokenizer="tiny", max_tokens: int | None = None,
                       target_tokens: int = 40) -> str:
    """``"<classname>: clause, clause, ..."`` from ``text``: the most informative clauses that fit.

    Clauses are chosen greedily by :func:`informativeness` while the caption stays within
    ``min(target_tokens, max_tokens)`` tokens (``max_tokens``: the tokenizer's context, 77 for CLIP),
    then kept in their original order. If not even the best clause fits, it is shortened by whole
    words. Every word after the prefix is a word of ``text`` (:func:`foreign_words`); a class name in
    the plural, possessive or hyphenated otherwise is removed whole. Raises ``ValueError`` when the
    class name alone does not fit.
    """
    tok = get_tokenizer(tokenizer)
    return _extractive(classname, text, token_counter(tok), *_limits(tok, max_tokens, target_tokens))[0]


# --- summaries of many descriptions, optionally by an LLM ---------------------------------------


def _tidy_llm(classname: str, text: str) -> str:
    text = clean_text(text)
    text = re.sub(r"^\s*(?:summary|caption)\s*:\s*", "", text, flags=re.IGNORECASE)
    name = name_regex(classname)
    if name:
        text = re.sub(r"^\s*" + name + r"\s*:\s*", "", text, flags=re.IGNORECASE)
    return text.strip().rstrip(".").strip()


def _llm_answers(be: ChatBackend, texts, classes, cache_path, max_words: int, progress: bool) -> list[str]:
    """The backend's raw answer to the summary prompt of each (text, class); cached answers are not asked again."""
    cache = ResponseCache(cache_path)
    reqs = []
    for t, c in zip(texts, classes):
        msgs = summary_messages(c, t, max_words=max_words)
        params = {**be.sampling(), "seed": 0}
        reqs.append(ChatRequest(request_key(be.identity(), msgs, params), msgs, params,
                                {"class": c, "prompt_id": SUMMARY_PROMPT_ID}))
    todo = [r for r in reqs if r.key not in cache]
    step = max(1, be.batch_size)

    def work(batch):
        for r, res in zip(batch, be.complete(batch)):
            if isinstance(res, str):
                cache.put(r.key, res, backend=be.name, model=be.model, messages=r.messages, params=r.params, meta=r.meta)

    with ThreadPoolExecutor(max_workers=be.max_concurrency) as ex:
        list(progress_bar(ex.map(work, [todo[i : i + step] for i in range(0, len(todo), step)]),
                  total=-(-len(todo) // step), disable=not progress, desc="summarize"))
    return [cache.get(r.key) or "" for r in reqs]


def _tally(counts: dict, reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def summarize(
    texts: Sequence[str],
    classes: Sequence[str],
    tokenizer="tiny",
    backend=None,
    cache_path=None,
    max_tokens: int | None = None,
    target_tokens: int = 40,
    max_words: int = 25,
    progress: bool = False,
    stats: dict | None = None,
) -> list[str]:
    """One ``"<class>: <short description>"`` per ``(text, class)``, each within the tokenizer's context.

    ``backend``: None for the extractive summary, or a chat backend (instance or name + defaults)
    asked with the summary prompt; its answers are cached in ``cache_path`` by request hash and
    fall back to the extractive summary when empty, a refusal, or too long.

    ``stats`` (a dict) receives what ``metrics.json`` records of the summaries: ``method``
    ("extractive" or "llm"), ``summaries``, and how many fell back (``fallback``) and why
    (``reasons``): extractive summaries that could not keep whole clauses (``no_clause``,
    ``clause_cut``, ``foreign_words``), or LLM answers replaced or shortened by the extractive
    summary (the validator's reasons, ``too_long``). Also ``llm`` (answers used as they are),
    ``rejected`` (answers not used, per reason) and ``extractive`` (summaries made extractively).
    """
    if len(texts) != len(classes):
        raise ValueError(f"{len(texts)} texts but {len(classes)} class names")
    tok = get_tokenizer(tokenizer)
    count = token_counter(tok)
    limit, budget = _limits(tok, max_tokens, target_tokens)
    stats = stats if stats is not None else {}
    stats.update(method="extractive" if backend is None else "llm", summaries=len(texts), fallback=0, reasons={},
                 llm=0, rejected={}, extractive=0)

    def extract(c, t):
        caption, why = _extractive(c, t, count, limit, budget)
        stats["extractive"] += 1
        if why and backend is None:
            stats["fallback"] += 1
            _tally(stats["reasons"], why)
        return caption

    if backend is None:
        return [extract(c, t) for t, c in progress_bar(list(zip(texts, classes)), disable=not progress, desc="summarize")]
    be = make_backend(backend)
    if not isinstance(be, ChatBackend):
        raise TypeError("summarize(backend=...) needs an LLM backend (openai, transformers)")
    validator = Validator(sorted(set(classes)), min_words=1)
    out = []
    for raw, t, c in zip(_llm_answers(be, texts, classes, cache_path, max_words, progress), texts, classes):
        answer = _tidy_llm(c, raw)
        reason = validator.check(c, answer) if answer else "empty"
        if reason == "duplicate":  # identical summaries of different descriptions are fine
            reason = None
        caption = f"{c}: {answer}." if reason is None else ""
        if reason is None and count(caption) <= limit:
            stats["llm"] += 1
            out.append(caption)
            continue
        if reason is not None:
            _tally(stats["rejected"], reason)
        _tally(stats["reasons"], reason or "too_long")
        stats["fallback"] += 1
        out.append(extract(c, answer if reason is None else t))  # too long: shorten the LLM's own words
    return out
