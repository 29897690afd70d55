"""Prompts, validation, cache repair, the template/attribute/import backends, and generation bookkeeping."""
from __future__ import annotations

import json
from collections import Counter

import pandas as pd
import pytest

from workbench.data import Dataset
from workbench.data.names import match_names as match_classnames
from workbench.describe import (
    ChatBackend,
    DescriptionsIncomplete,
    generate_descriptions,
    get_prompt_set,
    import_long_captions,
)
from workbench.describe.cache import ResponseCache, repair_jsonl
from workbench.describe.prompts import FINGERPRINTS, PROMPT_SETS, domain_for_dataset
from workbench.describe.validate import Validator, clean_text
from workbench.io import read_json, read_jsonl


def test_prompt_sets_are_frozen_and_complete():
    for name, ps in PROMPT_SETS.items():
        assert FINGERPRINTS[name] == ps.fingerprint(), f"{name} changed: release it as a new version instead"
        assert len({v.name for v in ps.variants}) == len(ps.variants) >= 3
        msgs = ps.messages("Laysan Albatross", ps.variants[0])
        assert [m["role"] for m in msgs] == ["system", "user"] and "Laysan Albatross" in msgs[1]["content"]
    birds = get_prompt_set("birds")
    assert [v.name for v in birds.variants] == ["male", "female", "juvenile"]
    assert "adult female" in birds.messages("X", birds.variants[1])[1]["content"]
    skin = {v.name for v in get_prompt_set("skin").variants}
    assert {"light-skin", "medium-skin", "dark-skin", "body-site"} <= skin
    generic = get_prompt_set("generic", noun="car model")
    assert "car model" in generic.messages("Audi TT", generic.variants[0])[1]["content"]
    assert get_prompt_set("flowers-v1") is PROMPT_SETS["flowers-v1"]
    assert domain_for_dataset("cub") == "birds" and domain_for_dataset("fitzpatrick40") == "skin"
    with pytest.raises(ValueError, match="unknown prompt domain 'fish'"):
        get_prompt_set("fish")


def test_validator_reasons():
    v = Validator(["Laysan Albatross", "Black footed Albatross", "Albatross", "Sooty Albatross"])
    ok = "The male Laysan Albatross has a white head and a pale hooked bill."
    assert v.check("Laysan Albatross", ok) is None
    v.add("Laysan Albatross", ok)
    assert v.check("Laysan Albatross", "  the MALE laysan albatross has a white head, and a pale hooked bill ") == "duplicate"
    assert v.check("Sooty Albatross", ok) == "other_class"
    assert v.check("Sooty Albatross", "Unlike the black-footed albatross, it is grey brown.") == "other_class"
    assert v.other_classes("Sooty Albatross", "Unlike the black-footed albatross, it is grey") == ["Black footed Albatross"]
    # its own name contains another class name ("Albatross"): not a mention of another class
    assert v.check("Sooty Albatross", "The Sooty Albatross is dark sooty brown all over.") is None
    assert v.check("Laysan Albatross", "") == "empty" and v.check("Laysan Albatross", " ... ") == "empty"
    assert v.check("Laysan Albatross", "I'm sorry, but I cannot describe birds.") == "refusal"
    assert v.check("Laysan Albatross", "As an AI language model, I do not see images.") == "refusal"
    assert clean_text('  "Description: The bird\n is white."  ') == "The bird is white."


def test_response_cache_survives_a_torn_line(tmp_path):
    p = tmp_path / "r.jsonl"
    c = ResponseCache(p)
    c.put("k1", "first", model="m")
    c.put("k2", "second", model="m")
    with open(p, "a") as f:
        f.write('{"key": "k3", "te')  # killed mid-write
    c2 = ResponseCache(p)
    assert c2.get("k1") == "first" and c2.get("k2") == "second" and "k3" not in c2
    c2.put("k3", "third")
    assert [r["key"] for r in read_jsonl(p)] == ["k1", "k2", "k3"]
    assert repair_jsonl(p) == 0


class ScriptedBackend(ChatBackend):
    """Answers from a function of the request; counts calls."""

    name = "scripted"
    model = "script"

    def __init__(self, answer, batch_size=2):
        self.answer, self.batch_size, self.calls = answer, batch_size, 0

    def complete(self, requests):
        self.calls += len(requests)
        return [self.answer(r) for r in requests]


def test_drops_after_max_attempts_and_reports_missing(tmp_path):
    classes = ["Red Finch", "Blue Jay"]

    def answer(r):  # Blue Jay always gets a refusal; Red Finch a fresh text per seed
        if r.meta["class"] == "Blue Jay":
            return "I'm sorry, I can't help with that."
        return f"The Red Finch has red wings, variant {r.params['seed']}."

    be = ScriptedBackend(answer)
    with pytest.raises(DescriptionsIncomplete, match="Blue Jay"):
        generate_descriptions(classes, be, n_per_class=2, max_attempts=2, run_dir=tmp_path, progress=False)
    m = read_json(tmp_path / "metrics.json")["describe"]
    assert m["missing_classes"] == ["Blue Jay"] and m["descriptions"] == 2
    assert m["rejected"]["refusal"] == 4 and m["retried"]["refusal"] == 2 and m["dropped"]["refusal"] == 2
    assert be.calls == 2 + 4
    # resuming does not ask again for what was answered (even when it was rejected)
    with pytest.raises(DescriptionsIncomplete):
        generate_descriptions(classes, be, n_per_class=2, max_attempts=2, run_dir=tmp_path, progress=False)
    assert be.calls == 6
    # one more attempt allowed: only the new attempts are sent
    with pytest.raises(DescriptionsIncomplete):
        generate_descriptions(classes, be, n_per_class=2, max_attempts=3, run_dir=tmp_path, progress=False)
    assert be.calls == 8


def _toy_dataset(tmp_path):
    rows = []
    for label, sp in enumerate(["Red Finch", "Blue Jay"]):
        for v in ("male", "female"):
            rows.append({"filename": f"{sp}_{v}.png", "split": "train", "label": label, "species": sp, "variant": v})
    return Dataset("synthetic", tmp_path, pd.DataFrame(rows), ["Red Finch", "Blue Jay"])


def test_template_backend_wraps_synthetic_descriptions(tmp_path, monkeypatch):
    calls = []

    def synthetic_descriptions(dataset, per_variant=3, seed=0):
        calls.append((per_variant, seed))
        out = []
        for sp in dataset.classnames:
            for v in ("male", "female"):
                for i in range(per_variant):
                    out.append({"id": f"{sp}-{v}-{i}", "class": sp, "variant": v, "backend": "template",
                                "model": None, "prompt_id": "synthetic-v1", "params": {"seed": seed},
                                "time": "2024-01-01T00:00:00+00:00",
                                "text": f"The {v} {sp} has a {['red', 'blue', 'green'][i]} crown."})
        return out

    monkeypatch.setattr("workbench.describe.tables.synthetic_descriptions", synthetic_descriptions)
    ds = _toy_dataset(tmp_path)
    res = generate_descriptions(ds, "template", n_per_class=3, run_dir=tmp_path / "run", seed=5, progress=False,
                                per_variant=2)
    assert calls == [(2, 5)]
    counts = Counter(r["class"] for r in res.records)
    assert counts == {"Red Finch": 3, "Blue Jay": 3}
    for c in ds.classnames:
        variants = Counter(r["variant"] for r in res.records if r["class"] == c)
        assert variants == {"male": 2, "female": 1}  # variants taken in turn
    recs = read_jsonl(tmp_path / "run" / "descriptions.jsonl")
    assert [r["id"] for r in recs] == [r["id"] for r in res.records]
    assert read_json(tmp_path / "run" / "metrics.json")["describe"]["backend"] == "template"
    # rerun: nothing appended twice
    generate_descriptions(ds, "template", n_per_class=3, run_dir=tmp_path / "run", seed=5, progress=False,
                          per_variant=2)
    assert len(read_jsonl(tmp_path / "run" / "descriptions.jsonl")) == 6


def _write_cub(root):
    """A 2-class attribute table: images 1-2 Red Finch, 3-4 Blue Jay (train), 5 Red Finch (test)."""
    (root / "attributes").mkdir(parents=True)
    (root / "classes.txt").write_text("1 001.Red_Finch\n2 002.Blue_Jay\n3 003.Ghost_Bird\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 2\n5 1\n")
    (root / "train_test_split.txt").write_text("1 1\n2 1\n3 1\n4 1\n5 0\n")
    (root.parent / "attributes.txt").write_text(
        "1 has_wing_color::red\n2 has_wing_color::blue\n3 has_bill_shape::hooked_seabird\n4 has_bill_shape::cone\n"
        "5 has_tail_shape::notched_tail\n"
    )
    lines = []
    present = {1: {1, 4, 5}, 2: {1, 4}, 3: {2, 3}, 4: {2, 3, 5}, 5: {2}}
    for img in range(1, 6):
        for a in range(1, 6):
            lines.append(f"{img} {a} {int(a in present[img])} {4 if img != 4 else 1} 3.0")
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")


def test_attribute_table_backend(tmp_path):
    root = tmp_path / "CUB_200_2011"
    _write_cub(root)
    res = generate_descriptions(["Red Finch", "Blue Jay"], "attributes", root=root, n_per_class=2,
                                out_path=tmp_path / "d.jsonl", progress=False)
    by = {c: [r["text"] for r in res.records if r["class"] == c] for c in ("Red Finch", "Blue Jay")}
    assert by["Red Finch"] == ["The Red Finch has red wings, cone bill and notched tail."]
    # the test image (5) has blue wings: test labels never leak into descriptions
    # image 4 is "not visible" certainty: only image 3 counts for Blue Jay
    assert by["Blue Jay"] == ["The Blue Jay has blue wings and hooked seabird bill."]
    assert res.metrics["unmatched_table_classes"] == ["003.Ghost_Bird"]


def test_attribute_backend_on_the_cub_loader(tmp_path):
    from fixtures_datasets import CUB_ATTRIBUTES, make_mini_cub

    from workbench.data import load_dataset
    from workbench.describe.tables import _phrase

    root = make_mini_cub(tmp_path, n_classes=3)
    ds = load_dataset("cub", root)
    phrase = [_phrase(*a.split("::")) for a in CUB_ATTRIBUTES]
    for source in ({}, {"root": root}):  # the loader's attribute extras, or the files themselves
        res = generate_descriptions(ds, "attributes", n_per_class=3, min_freq=0.1, progress=False, **source)
        assert {r["class"] for r in res.records} == set(ds.classnames)
        for r in res.records:
            c = ds.classnames.index(r["class"])
            # the fixture marks attribute a (1-based) present in class c iff (a + c) % 3 == 0
            allowed = {phrase[a - 1] for a in range(1, 7) if (a + c) % 3 == 0}
            said = set(r["text"].removeprefix(f"The {r['class']} has ").rstrip(".").replace(" and ", ", ").split(", "))
            assert said <= allowed, (r["text"], allowed)


def test_import_long_captions_normalises_and_reports(tmp_path):
    data = {
        "black-footed-albatross\n": ["The male Black-footed Albatross has dark plumage and a dark bill."],
        "chuck-will's-widow\n": ["The Chuck-will's-widow is mottled brown with a small bill."],
        "brewers-blackbird\n": ["The male Brewer's Blackbird is glossy black with yellow eyes."],
        "dodo\n": ["A large flightless grey bird with a hooked bill."],
    }
    path = tmp_path / "long_captions.json"
    path.write_text(json.dumps(data))
    classes = ["Black footed Albatross", "Chuck will Widow", "Brewer Blackbird", "Laysan Albatross"]
    mapping, unmatched = match_classnames(list(data), classes)
    assert mapping == {"black-footed-albatross\n": "Black footed Albatross", "chuck-will's-widow\n": "Chuck will Widow",
                       "brewers-blackbird\n": "Brewer Blackbird"}
    assert unmatched == ["dodo\n"]
    with pytest.warns(UserWarning, match="dodo"), pytest.raises(DescriptionsIncomplete, match="Laysan Albatross"):
        import_long_captions(path, classes, run_dir=tmp_path / "run", progress=False)
    m = read_json(tmp_path / "run" / "metrics.json")["describe"]
    assert m["unmatched_keys"] == ["dodo\n"] and m["classes_without"] == ["Laysan Albatross"]
    recs = read_jsonl(tmp_path / "run" / "descriptions.jsonl")
    assert sorted(r["class"] for r in recs) == ["Black footed Albatross", "Brewer Blackbird", "Chuck will Widow"]
    assert all(r["backend"] == "import" and r["prompt_id"] == "gist-long-captions" for r in recs)
