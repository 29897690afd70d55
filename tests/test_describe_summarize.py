"""Summaries "<class>: <short description>" within CLIP's 77 tokens; the GIST CUB sample."""
from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from workbench.clip.text import get_tokenizer, token_counter
from workbench.describe import ChatBackend, extractive_summary, read_long_captions, summarize
from workbench.describe.summarize import split_clauses

# read-only; the checkout sits next to shared/ (GIST_SAMPLE_DIR points elsewhere, e.g. from a worktree)
SAMPLE = Path(os.environ.get("GIST_SAMPLE_DIR") or Path(__file__).parents[1].parent / "shared/reference/gist-format-sample")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("tiny")


def _reference_count(tok, text):
    """Independent count: tokenize to a long context and find the end-of-text token."""
    ids = tok([text], context_length=1024)[0]
    return int((ids == tok.eot_token_id).nonzero()[0]) + 1


def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def _assert_whole_words(summary, classname, source):
    body = summary.split(": ", 1)[1]
    src = set(_words(source))
    assert set(_words(body)) <= src, f"words not in the source (a cut inside a word?): {set(_words(body)) - src}"


def test_token_counter_counts_start_and_end_tokens(tok):
    count = token_counter(tok)
    short = "black-footed albatross: dark plumage, white around beak."
    assert count(short) == _reference_count(tok, short) == len(tok.encode(short)) + 2
    long = " ".join(["mottled"] * 120)
    assert count(long) == _reference_count(tok, long) > 77  # not truncated to the context
    assert count("") == 2


@pytest.mark.skipif(not SAMPLE.exists(), reason="GIST format sample not available")
def test_gist_cub_sample_summaries_fit(tok):
    meta = pd.read_csv(SAMPLE / "cub_metadata_sample.csv")
    classes = list(dict.fromkeys(meta["species"]))
    rep = read_long_captions(SAMPLE / "cub_long_captions_sample.json", classes)
    assert rep.unmatched_keys == [] and rep.classes_without == []
    assert len(rep.records) == 18
    texts, names = [r["text"] for r in rep.records], [r["class"] for r in rep.records]
    summaries = summarize(texts, names, tokenizer=tok)
    count = token_counter(tok)
    for s, c, t in zip(summaries, names, texts):
        assert s.startswith(c + ": ")
        assert count(s) <= 77 and _reference_count(tok, s) <= 77
        assert len(s) > len(c) + 10  # says something
        _assert_whole_words(s, c, t)
    assert max(count(t) for t in texts) > 60  # the sample really needed shortening


def test_extractive_keeps_informative_clauses_and_never_cuts_words(tok):
    text = ("The male Red Crowned Finch has a bright red crown, a short conical grey bill, and pale pink legs. "
            "It is often seen near water, which makes it popular with birdwatchers.")
    s = extractive_summary("Red Crowned Finch", text, tok, target_tokens=20)
    assert s.startswith("Red Crowned Finch: ") and token_counter(tok)(s) <= 20
    assert "red crown" in s and "birdwatchers" not in s  # visual clauses win over behaviour
    assert split_clauses("Red Crowned Finch", text)[0] == "bright red crown"
    # one enormous clause: shortened by whole words only, within 77 tokens
    huge = "The finch has " + " ".join(f"feather{i}" for i in range(200)) + "."
    s = extractive_summary("Red Crowned Finch", huge, tok)
    assert token_counter(tok)(s) <= 77 and s.endswith(".")
    _assert_whole_words(s, "Red Crowned Finch", huge)
    with pytest.raises(ValueError, match="alone takes more than"):
        extractive_summary("x" * 400, "a red bird", tok)


class ScriptedBackend(ChatBackend):
    name = "scripted"
    model = "script"

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def complete(self, requests):
        self.calls += len(requests)
        return [self.answers[r.meta["class"]] for r in requests]


def test_llm_summaries_with_fallbacks(tok, tmp_path):
    classes = ["Laysan Albatross", "Sooty Albatross", "Red Finch"]
    texts = ["The Laysan Albatross has a white head and a pale pink hooked bill with a dark tip.",
             "The Sooty Albatross is uniformly dark sooty brown with a slender black bill.",
             "The Red Finch has a red crown and a short grey bill."]
    be = ScriptedBackend({
        "Laysan Albatross": "Laysan Albatross: white head, pale pink hooked bill, dark bill tip.",
        "Sooty Albatross": "dark sooty brown " * 40,  # too long for 77 tokens: shortened by whole words
        "Red Finch": "I'm sorry, I can't summarize that.",  # refusal: summary of the original instead
    })
    stats = {}
    out = summarize(texts, classes, tokenizer=tok, backend=be, cache_path=tmp_path / "sum.jsonl", stats=stats)
    assert out[0] == "Laysan Albatross: white head, pale pink hooked bill, dark bill tip."
    assert out[1].startswith("Sooty Albatross: dark sooty brown") and token_counter(tok)(out[1]) <= 77
    assert out[2].startswith("Red Finch: ") and "red crown" in out[2] and "sorry" not in out[2]
    assert stats["llm"] == 1 and stats["fallback"] == 2 and stats["rejected"] == {"refusal": 1}
    assert stats["method"] == "llm" and stats["reasons"] == {"too_long": 1, "refusal": 1}  # why each fell back
    assert be.calls == 3
    again = summarize(texts, classes, tokenizer=tok, backend=be, cache_path=tmp_path / "sum.jsonl")
    assert again == out and be.calls == 3  # answered from the cache
    assert torch.is_tensor(tok(["x"]))  # the open_clip tokenizer still works as usual


# Descriptions that name their class the way people write: plural, possessive, another hyphenation,
# another case. Removing the class name must remove it whole ("Purple Finch: es have ..." was written).
VARIANTS = [
    ("Purple Finch", "Female Purple Finches have a light brownish-olive plumage with heavy streaking below. "
                     "Their bills are short, thick and conical."),
    ("Purple Finch", "Purple Finches' heads are washed in raspberry red, brightest on the crown and rump."),
    ("Boat tailed Grackle", "The Boat-tailed Grackle's tail is long and keel-shaped, held in a V."),
    ("Boat-tailed Grackle", "Boat tailed grackles are glossy iridescent black with pale yellow eyes."),
    ("Black footed Albatross", "BLACK-FOOTED ALBATROSSES have dark sooty-brown plumage and a white ring at the bill base."),
    ("Black-footed Albatross", "the black footed albatross has black feet, a pale face ring and long narrow wings."),
    ("Canary", "Male Canaries are bright yellow songbirds with a short pointed pink bill."),
    ("Grasshopper Sparrow", "The juvenile Grasshopper Sparrow's breast is streaked brown, its crown striped buff."),
    ("Chuck will Widow", "A Chuck-will's-widow has mottled brown plumage, a huge gape and rufous tones."),
    ("Bewick Wren", "Bewick's Wrens show a long white eyebrow, a grey-brown back and a barred tail."),
]


@pytest.mark.parametrize("classname,text", VARIANTS, ids=[f"{c}|{t[:24]}" for c, t in VARIANTS])
def test_class_name_variants_leave_no_word_fragments(tok, classname, text):
    s = extractive_summary(classname, text, tok)
    assert s.startswith(classname + ": ")
    _assert_whole_words(s, classname, text)
    body = s.split(": ", 1)[1]
    first = body.split()[0].strip(",.").lower()
    assert first not in {"es", "s", "'s", "ies", "footed", "tailed", "albatross", "grackle", "finch"}, s
    assert len(body.split()) >= 3, s  # the description's content is kept


def test_every_extractive_word_comes_from_the_description_or_it_falls_back(tok, monkeypatch):
    """The rule holds even when clause splitting goes wrong: a summary with a word that is not in the
    description is replaced by the description's own first words, and counted."""
    S = importlib.import_module("workbench.describe.summarize")  # the package exports a function of that name

    text = "The Purple Finch has a raspberry red head and a streaked brown back."
    monkeypatch.setattr(S, "split_clauses", lambda c, t: ["es have a raspberry red head"])
    stats = {}
    [s] = summarize([text], ["Purple Finch"], tokenizer=tok, stats=stats)
    assert s == "Purple Finch: The Purple Finch has a raspberry red head and a streaked brown back."
    assert S.foreign_words("Purple Finch: es have a red head.", "Purple Finch", "Purple Finches have a red head") == ["es"]
    assert stats["method"] == "extractive" and stats["summaries"] == 1
    assert stats["fallback"] == 1 and stats["reasons"] == {"foreign_words": 1}


def test_fallback_counts_and_reasons(tok):
    texts = ["The Red Finch has a red crown and a short grey bill.",
             "Red Finches.",  # nothing but the subject
             "The Red Finch has " + " ".join(f"feather{i}" for i in range(80)) + "."]  # no clause fits
    stats = {}
    summarize(texts, ["Red Finch"] * 3, tokenizer=tok, stats=stats)
    assert stats["fallback"] == 2 and stats["reasons"] == {"no_clause": 1, "clause_cut": 1}
    assert stats["extractive"] == 3 and stats["llm"] == 0


def test_describe_stage_records_summary_fallbacks_in_metrics(tmp_path):
    """metrics.json["describe"]["summaries"]: how many of the describe stage's (extractive) summaries fell
    back, and why."""
    from workbench import config, describe
    from workbench.describe.generate import DescribeResult
    from workbench.io import read_json

    records = [{"class": "Purple Finch", "text": t} for t in (VARIANTS[0][1], "Purple Finches.")]
    p = config.stage_params("describe", run_dir=str(tmp_path), progress=False)
    describe.token_report(p, DescribeResult(records, {"backend": "test"}))
    m = read_json(tmp_path / "metrics.json")["describe"]
    assert m["backend"] == "test"
    assert m["summaries"]["method"] == "extractive" and m["summaries"]["summaries"] == 2
    assert m["summaries"]["fallback"] == 1 and m["summaries"]["reasons"] == {"no_clause": 1}
