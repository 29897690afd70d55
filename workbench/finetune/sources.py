"""Caption sources of the control methods that bracket GIST (issue 23): each writes, for every training
image, ``captions_per_image`` captions ``"<class name>: <text>"`` (the form of GIST's matched captions),
returned as match records (``{image, class, captions}``, the ``matches.jsonl`` shape that
:func:`workbench.finetune.stage.build_pairs` trains on) with the identity of their inputs.

- ``oracle``: the image's TRUE attributes in the pretraining captions' words (synthetic data only): the
  most a description can tell about an image, an upper reference for GIST. By default it names the
  attributes the starting weights were never taught in words (:func:`oracle_attributes`): a caption that
  also names colours the model already reads is told apart from its batch by the colours alone, and its
  other words get no gradient (``benchmarks/INSTRUMENT_STUDY.md``).
- ``random-own-class``: descriptions of the image's own class drawn at random instead of by matching:
  what matching adds over "any text of the right class".
- ``waffle``: the class name plus random words, as many tokens as GIST's captions (WaffleCLIP, Roth et
  al. 2023): what text of that length adds without any content.

Every draw is seeded by the run's seed and the image's filename, so an image's captions do not depend
on which other images a few-shot draw holds.
"""
from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..clip.load import resolve_name
from ..clip.text import context_length, count_tokens, get_tokenizer
from ..clip.weights import metadata, package_weights
from ..data import synthetic as syn
from ..identity import caption_source_identity, columns_sha256, descriptions_sha256, matches_sha256, texts_sha256
from ..match.captions import truncate_caption
from ..pretrain import captions as pretrain_captions

SOURCES = ("oracle", "random-own-class", "waffle")
# bump when a source writes other captions from the same inputs (it is part of run identities)
VERSION = 2  # 2: the oracle names the attributes it is given (default: those the weights were not taught)
_SALT = {"oracle": 2301, "random-own-class": 2302, "waffle": 2303}
WAFFLE_WORDS = (3, 10)  # letters of a random word, at least and at most


def _rng(method: str, seed: int, filename: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SALT[method], zlib.crc32(str(filename).encode())])


def _images(train):
    """(filename, class name, table row) of each training image, in table order."""
    names = train.classnames
    return [(r["filename"], names[int(r["label"])], r) for r in train.table.to_dict("records")]


# ---------------------------------------------------------------- oracle
def check_oracle(ds) -> None:
    """The oracle needs each image's true attributes: only the synthetic dataset's table records them."""
    missing = [a for a in syn.ATTRIBUTES if a not in ds.table.columns]
    if ds.name != "synthetic" or missing:
        raise ValueError(f"method 'oracle' writes each image's caption from its true attributes, which only the "
                         f"synthetic dataset records; dataset {ds.name!r} has none"
                         + (f" (no columns {missing})" if missing else "") + ": drop 'oracle' from the methods")


def oracle_attributes(value="untaught", model: str | None = None, pretrained: str | None = None) -> list[str]:
    """The attributes the oracle names (:data:`syn.ATTRIBUTES` order).

    ``"untaught"``: those the starting weights' pretraining never named in words (the ``withhold`` of the
    recipe recorded in the weights' metadata: the shipped tiny CLIP's, or a ``workbench pretrain --out``
    file given as ``pretrained``); every attribute when the weights record none. ``"all"``: every
    attribute. A list: those attributes."""
    if value == "all":
        return list(syn.ATTRIBUTES)
    if value == "untaught":
        withheld = recorded_withhold(model, pretrained)
        return list(syn.ATTRIBUTES) if not withheld else [a for a in syn.ATTRIBUTES if a in withheld]
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"oracle_attributes must be 'untaught', 'all' or a non-empty list of attributes, got {value!r}")
    bad = [a for a in value if a not in syn.ATTRIBUTES]
    if bad:
        raise ValueError(f"oracle_attributes names unknown attribute(s) {bad}; known: {list(syn.ATTRIBUTES)}")
    return [a for a in syn.ATTRIBUTES if a in value]


def recorded_withhold(model: str | None, pretrained: str | None) -> list[str]:
    """The recipe ``withhold`` recorded in the metadata of the weights ``(model, pretrained)``, or []."""
    if model is None or pretrained is None:
        return []
    path = package_weights(resolve_name(model), pretrained)
    if path is None and str(pretrained).endswith(".safetensors") and Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
    if path is None:
        return []
    return list((metadata(path).get("recipe") or {}).get("withhold") or [])


def oracle_captions(train, per_image: int, seed: int, tokenizer, attributes=None) -> list[dict]:
    """``per_image`` captions per image naming its true ``attributes`` (the table's columns; default all
    six) in the pretraining captions' phrasing (:func:`workbench.pretrain.captions.bird_caption`: opener
    and attribute order drawn per caption), prefixed ``"<class>: "``. Raises when one exceeds the context."""
    check_oracle(train)
    only = oracle_attributes("all" if attributes is None else attributes)
    limit, out = context_length(tokenizer), []
    for f, name, row in _images(train):
        rng = _rng("oracle", seed, f)
        attrs = {a: str(row[a]) for a in syn.ATTRIBUTES}
        caps = [f"{name}: {pretrain_captions.bird_caption(attrs, rng, only)}" for _ in range(per_image)]
        long = [c for c in caps if count_tokens(tokenizer, c) > limit]
        if long:
            raise ValueError(f"oracle caption over {limit} tokens: {long[0]!r}")
        out.append({"image": f, "class": name, "captions": caps})
    return out


# ---------------------------------------------------------------- random own-class descriptions
def class_descriptions(descriptions: list[dict], classnames) -> dict[str, list[str]]:
    """Each class's description texts (``descriptions.jsonl`` order); a class without any raises."""
    pool: dict[str, list[str]] = {c: [] for c in classnames}
    for r in descriptions:
        if r.get("class") in pool:
            pool[r["class"]].append(str(r["text"]))
    empty = [c for c, v in pool.items() if not v]
    if empty:
        raise ValueError(f"{len(empty)} class(es) have no descriptions in descriptions.jsonl, e.g. {empty[:5]}; "
                         "rerun the describe stage")
    return pool


def random_own_class_captions(train, descriptions: list[dict], per_image: int, seed: int, tokenizer) -> list[dict]:
    """``per_image`` descriptions of the image's OWN class drawn at random (without replacement while the
    class has enough), from the run's ``descriptions.jsonl`` (the texts the match stage chooses from),
    each as ``"<class>: <description>"`` cut at a word to the context (the match stage's default,
    ``summarize="truncate"``)."""
    pool = class_descriptions(descriptions, sorted({name for _, name, _ in _images(train)}))
    out = []
    for f, name, _ in _images(train):
        texts = pool[name]
        picks = _rng("random-own-class", seed, f).choice(len(texts), per_image, replace=per_image > len(texts))
        out.append({"image": f, "class": name, "captions": [truncate_caption(name, texts[i], tokenizer) for i in picks]})
    return out


# ---------------------------------------------------------------- WaffleCLIP-style random words
@lru_cache(maxsize=8)
def waffle_vocabulary(exclude: frozenset = frozenset()) -> tuple[str, ...]:
    """The random words: whole words of the CLIP BPE vocabulary (open_clip's ``SimpleTokenizer``, the same
    for every model) that are ASCII letters only, 3 to 10 long, sorted; less ``exclude`` and the words
    of the pretraining captions (colours and parts, which would describe a synthetic bird)."""
    import open_clip

    drop = set(exclude) | pretrain_captions.caption_vocabulary()
    lo, hi = WAFFLE_WORDS
    words = {k[:-4] for k in open_clip.tokenizer.SimpleTokenizer().encoder if k.endswith("</w>")}
    return tuple(sorted(w for w in words if w.isascii() and w.isalpha() and lo <= len(w) <= hi and w not in drop))


def _class_words(classnames) -> frozenset:
    return frozenset(w for c in classnames for w in str(c).lower().replace("-", " ").split())


def waffle_caption(name: str, target: int, rng: np.random.Generator, vocab, tokenizer, cost=None) -> str:
    """``"<class>: w1 w2 ..."`` of random words from ``vocab`` with exactly ``target`` tokens (start and
    end included; the class name alone when it already takes ``target`` or more). ``cost``: a
    :func:`word_cost` of ``tokenizer``, to share its memory between captions."""
    count = _counter(tokenizer)
    head = f"{name}:"
    words, n = [], count(head)
    cost = cost or word_cost(tokenizer)
    for _ in range(100 * max(1, target)):  # fast path: a word's tokens add up (CLIP's BPE tokenizer)
        if n >= target:
            break
        w = vocab[int(rng.integers(len(vocab)))]
        if n + cost(w) <= target:
            words.append(w)
            n += cost(w)
    text = " ".join([head, *words])
    if count(text) == n:
        return text
    words, n, tries = [], count(head), 0  # a tokenizer whose counts do not add up: count each candidate
    while n < target and tries < 1000:
        w = vocab[int(rng.integers(len(vocab)))]
        m = count(" ".join([head, *words, w]))
        if m <= target:
            words.append(w)
            n = m
        else:
            tries += 1
    return " ".join([head, *words])


def _counter(tokenizer):
    tok = get_tokenizer(tokenizer)
    return lambda text: count_tokens(tok, text)


def word_cost(tokenizer):
    """Tokens one word adds to a text: its count less the empty text's (start and end tokens)."""
    count, memo = _counter(tokenizer), {}
    base = count("")

    def cost(word: str) -> int:
        if word not in memo:
            memo[word] = count(word) - base
        return memo[word]
    return cost


def waffle_captions(train, per_image: int, seed: int, tokenizer, matches: list[dict] | None = None,
                    descriptions: list[dict] | None = None) -> list[dict]:
    """``per_image`` captions per image: the class name and random words (:func:`waffle_vocabulary`, less
    every word of the dataset's class names), each as many tokens as the GIST caption it stands for.

    Token counts: an image with a match record copies the counts of its matched captions, the first
    ``per_image`` of them (the ones GIST trains on; repeated in turn when it has fewer); an image without
    one (no ``matches.jsonl``, or the image missing from it) takes the rounded mean count of its class's
    descriptions written as GIST captions (``"<class>: <description>"`` cut to the context).
    """
    vocab, cost = waffle_vocabulary(_class_words(train.classnames)), word_cost(tokenizer)
    by_file = {m["image"]: m["captions"] for m in (matches or []) if m.get("captions")}
    images = _images(train)
    means = {}
    if any(f not in by_file for f, _, _ in images):
        if descriptions is None:
            raise ValueError("method 'waffle' needs matches.jsonl (match the token counts of the matched captions) "
                             "or descriptions.jsonl (the class's mean): run the describe (and match) stage first")
        pool = class_descriptions(descriptions, sorted({name for f, name, _ in images if f not in by_file}))
        means = {c: int(round(np.mean([count_tokens(tokenizer, truncate_caption(c, t, tokenizer)) for t in ts])))
                 for c, ts in pool.items()}
    out = []
    for f, name, _ in images:
        rng = _rng("waffle", seed, f)
        caps = by_file.get(f)
        targets = ([count_tokens(tokenizer, caps[i % min(len(caps), per_image)]) for i in range(per_image)]
                   if caps else [means[name]] * per_image)
        out.append({"image": f, "class": name, "captions": [waffle_caption(name, t, rng, vocab, tokenizer, cost)
                                                              for t in targets]})
    return out


# ---------------------------------------------------------------- one entry point
def caption_records(method: str, train, per_image: int, seed: int, tokenizer, matches: list[dict] | None = None,
                    descriptions: list[dict] | None = None, attributes=None) -> tuple[list[dict], dict]:
    """``(match records, caption_source identity)`` of source ``method`` for the training images of
    ``train``; the identity names every input the captions are written from. ``attributes``: the
    oracle's (a list, default all six; :func:`oracle_attributes` resolves the stage's setting)."""
    if method == "oracle":
        named = oracle_attributes("all" if attributes is None else attributes)
        records = oracle_captions(train, per_image, seed, tokenizer, named)
        inputs = {"attributes_sha256": columns_sha256(train.table, syn.ATTRIBUTES), "attributes": named}
    elif method == "random-own-class":
        if descriptions is None:
            raise ValueError("method 'random-own-class' needs descriptions.jsonl: run the describe stage first")
        records = random_own_class_captions(train, descriptions, per_image, seed, tokenizer)
        inputs = {"descriptions_sha256": descriptions_sha256(descriptions)}
    elif method == "waffle":
        records = waffle_captions(train, per_image, seed, tokenizer, matches, descriptions)
        files = set(train.table["filename"])
        used = [m for m in (matches or []) if m.get("image") in files]
        inputs = {"matches_sha256": matches_sha256(used) if used else None,
                  "descriptions_sha256": descriptions_sha256(descriptions) if len(used) < len(files) else None,
                  "vocabulary_sha256": texts_sha256(waffle_vocabulary(_class_words(train.classnames)))}
    else:
        raise ValueError(f"unknown caption source {method!r}; expected one of {SOURCES}")
    return records, caption_source_identity(method, VERSION, seed=int(seed), **inputs)
