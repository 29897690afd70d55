"""Versioned prompt sets per domain: each set asks for one description per request, with variants.

A prompt set's text is frozen once released: change wording by adding a new version (``birds-v2``),
never by editing ``birds-v1``, so cached responses and ``prompt_id`` fields in old runs keep their
meaning. ``tests/test_describe_prompts.py`` pins the fingerprints in :data:`FINGERPRINTS`.

Diversity comes from two sources: prompt variants (male / female / juvenile for birds, skin tones and
body sites for skin conditions, ...) cycled over a class's requests, and sampling (each request has
its own sample index and seed).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Variant:
    name: str  # "male", "dark-skin", ...
    user: str  # user message template: {classname}, {noun}


@dataclass(frozen=True)
class PromptSet:
    domain: str
    version: int
    system: str
    variants: tuple[Variant, ...]
    noun: str = ""  # generic set: what a class is ("bird", "car model", ...)

    @property
    def name(self) -> str:
        return f"{self.domain}-v{self.version}"

    def prompt_id(self, variant: Variant) -> str:
        return f"{self.name}/{variant.name}"

    def messages(self, classname: str, variant: Variant) -> list[dict]:
        """OpenAI-style chat messages asking for one description of ``classname``."""
        user = variant.user.format(classname=classname, noun=self.noun or "object")
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def fingerprint(self) -> str:
        """Digest of every text in the set (the noun excluded: it is a parameter)."""
        blob = json.dumps([self.system, [(v.name, v.user) for v in self.variants]])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_VISUAL_ONLY = (
    "Describe only what is visible in a photograph: colours, patterns, shapes, sizes and parts. "
    "Do not mention behaviour, sounds, habitat, range, diet or history. "
    "Answer with one paragraph of 2-3 sentences and nothing else."
)

_BIRD = (
    "Describe the appearance of {who} {classname} (a bird species) as it looks in a photograph: "
    "plumage colours and patterns of the head, crown, breast, back, wings and tail, and the shape and "
    "colour of the bill, eyes, legs and feet. Start with \"{start} {classname}\"."
)

BIRDS_V1 = PromptSet(
    domain="birds",
    version=1,
    system="You are an expert ornithologist writing precise field-guide descriptions. " + _VISUAL_ONLY,
    variants=(
        Variant("male", _BIRD.replace("{who}", "an adult male").replace("{start}", "The male")),
        Variant("female", _BIRD.replace("{who}", "an adult female").replace("{start}", "The female")),
        Variant("juvenile", _BIRD.replace("{who}", "a juvenile").replace("{start}", "The juvenile")),
    ),
)

FLOWERS_V1 = PromptSet(
    domain="flowers",
    version=1,
    system="You are an expert botanist writing precise descriptions for a flower identification guide. "
    + _VISUAL_ONLY,
    variants=(
        Variant(
            "bloom",
            "Describe the open bloom of the {classname} (a flower): petal colour, number, shape, texture and "
            "arrangement, and the colour of its centre. Start with \"The {classname}\".",
        ),
        Variant(
            "centre",
            "Describe a close-up photograph of the {classname} flower: the centre, stamens, pistil, and "
            "any markings, veins or gradients on the petals. Start with \"The {classname}\".",
        ),
        Variant(
            "plant",
            "Describe the {classname} plant as photographed in bloom: flower head shape and size, stem, "
            "leaves, buds and how the flowers are clustered. Start with \"The {classname}\".",
        ),
    ),
)

AIRCRAFT_V1 = PromptSet(
    domain="aircraft",
    version=1,
    system="You are an aviation expert writing precise aircraft recognition guides. "
    + _VISUAL_ONLY.replace("behaviour, sounds, habitat, range, diet or history", "airline liveries, history or performance figures"),
    variants=(
        Variant(
            "airframe",
            "Describe the {classname} aircraft as seen in a photograph: fuselage length and shape, nose, "
            "wing position and sweep, and tail configuration. Start with \"The {classname}\".",
        ),
        Variant(
            "engines",
            "Describe the engines, landing gear and windows of the {classname} aircraft as visible in a "
            "photograph: number and placement of engines, nacelle shape, door and window layout. "
            "Start with \"The {classname}\".",
        ),
        Variant(
            "distinguishing",
            "Describe the visual features that distinguish the {classname} aircraft from closely related "
            "models and variants: length, winglets, engine count, tail and nose details. "
            "Start with \"The {classname}\".",
        ),
    ),
)

_SKIN = (
    "Describe a clinical photograph of {classname} {where}: lesion morphology, colour, size, borders, "
    "surface texture and distribution. Start with \"The image shows a person's\"."
)

SKIN_V1 = PromptSet(
    domain="skin",
    version=1,
    system="You are a dermatologist writing precise descriptions of skin conditions as they appear in "
    "clinical photographs, for a teaching atlas. " + _VISUAL_ONLY.replace(
        "behaviour, sounds, habitat, range, diet or history", "causes, symptoms, treatment or prognosis"
    ),
    variants=(
        Variant("typical", _SKIN.replace("{where}", "in its most typical presentation")),
        Variant("body-site", _SKIN.replace("{where}", "on a body site where it commonly appears, naming the site")),
        Variant("light-skin", _SKIN.replace("{where}", "on light skin (Fitzpatrick types I-II)")),
        Variant("medium-skin", _SKIN.replace("{where}", "on medium skin (Fitzpatrick types III-IV)")),
        Variant("dark-skin", _SKIN.replace("{where}", "on dark skin (Fitzpatrick types V-VI)")),
        Variant("atypical", _SKIN.replace("{where}", "in a less common or early-stage presentation")),
    ),
)

GENERIC_V1 = PromptSet(
    domain="generic",
    version=1,
    system="You are an expert writing precise visual descriptions for a fine-grained identification guide. "
    + _VISUAL_ONLY,
    variants=(
        Variant(
            "overall",
            "Describe the overall appearance of a {classname} ({noun}) in a photograph: shape, size, colours "
            "and patterns. Start with \"The {classname}\".",
        ),
        Variant(
            "parts",
            "Describe the visible parts of a {classname} ({noun}) one by one, with their colour, shape and "
            "texture. Start with \"The {classname}\".",
        ),
        Variant(
            "distinguishing",
            "Describe the visual features that distinguish a {classname} from other similar kinds of "
            "{noun}. Start with \"The {classname}\".",
        ),
    ),
    noun="object",
)

PROMPT_SETS: dict[str, PromptSet] = {p.name: p for p in (BIRDS_V1, FLOWERS_V1, AIRCRAFT_V1, SKIN_V1, GENERIC_V1)}

# Released sets; a test fails if a released text changes (add a new version instead).
FINGERPRINTS = {
    "birds-v1": "834e3d7793ac",
    "flowers-v1": "c337105dd321",
    "aircraft-v1": "31a7ae75d3c0",
    "skin-v1": "88ac2913ed6b",
    "generic-v1": "c1ba0fb82685",
}

# Which domain a dataset's descriptions are asked in by default.
DATASET_DOMAINS = {"cub": "birds", "flowers": "flowers", "aircraft": "aircraft", "fitzpatrick40": "skin"}


def get_prompt_set(domain: str, noun: str | None = None) -> PromptSet:
    """The prompt set for ``domain`` ("birds", "birds-v1", "generic", ...): the latest version unless one is named.

    ``noun`` parameterizes the generic set ("bird", "car model"); an unknown domain name with a noun
    falls back to the generic set with that noun.
    """
    if domain in PROMPT_SETS:
        ps = PROMPT_SETS[domain]
    else:
        versions = [p for p in PROMPT_SETS.values() if p.domain == domain]
        if not versions:
            raise ValueError(
                f"unknown prompt domain {domain!r}; known: {sorted({p.domain for p in PROMPT_SETS.values()})} "
                f"or versioned names {sorted(PROMPT_SETS)}"
            )
        ps = max(versions, key=lambda p: p.version)
    if noun:
        ps = replace(ps, noun=noun)
    return ps


def domain_for_dataset(dataset_name: str) -> str:
    return DATASET_DOMAINS.get(dataset_name, "generic")


SUMMARY_SYSTEM = (
    "You shorten visual descriptions into compact captions for an image-text model. "
    "Answer with the caption only."
)
SUMMARY_USER = (
    "Summarize the following description of a {classname} into a short comma-separated list of its most "
    "distinctive visual features, at most {max_words} words. Do not repeat the name {classname}, do not "
    "write full sentences.\n\nDescription: {text}"
)
SUMMARY_PROMPT_ID = "summary-v1"


def summary_messages(classname: str, text: str, max_words: int = 25) -> list[dict]:
    """Chat messages asking an LLM for the short part of "<class name>: <short description>"."""
    user = SUMMARY_USER.format(classname=classname, text=text.strip(), max_words=max_words)
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": user}]
