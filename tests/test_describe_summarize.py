"""Summaries "<class>: <short description>" within CLIP's 77 tokens; the GIST CUB sample."""
from __future__ import annotations

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
    assert be.calls == 3
    again = summarize(texts, classes, tokenizer=tok, backend=be, cache_path=tmp_path / "sum.jsonl")
    assert again == out and be.calls == 3  # answered from the cache
    assert torch.is_tensor(tok(["x"]))  # the open_clip tokenizer still works as usual
