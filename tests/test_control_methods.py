"""The controls that bracket GIST (issue 23): the oracle, random own-class and WaffleCLIP-style caption
sources (``workbench.finetune.sources``), their run identity, their paired comparisons with Holm p-values
and the GIST question, and all of it through `workbench run`."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from toydata import QUICK_DEMO, make_toy_dataset

from workbench import cli
from workbench.clip.text import count_tokens, get_tokenizer
from workbench.data import load_dataset
from workbench.data import synthetic as syn
from workbench.describe.template import synthetic_descriptions
from workbench.evaluate import PAIRS, comparisons, gist_question
from workbench.finetune import build_pairs, finetune_all, sources
from workbench.identity import digest
from workbench.io import read_jsonl
from workbench.match.captions import truncate_caption

OPTS = {"n_species": 4, "n_train": 4, "n_val": 2, "n_test": 2}
NEW_PAIRS = {("oracle", "finetune-classname"), ("gist", "random-own-class"), ("oracle", "gist"), ("waffle", "gist")}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return load_dataset("synthetic", str(tmp_path_factory.mktemp("synth")), **OPTS)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("tiny")


def _parse(body: str) -> dict:
    """The attributes a caption names, read back independently of how it was written (breast pattern and
    colour in one phrase, or either alone)."""
    out = {}
    for a, noun in {"crown_color": "crown", "wing_color": "wings", "beak_shape": "beak", "tail_size": "tail"}.items():
        found = re.findall(rf"\b({'|'.join(syn.ATTRIBUTE_VALUES[a])}) {noun}\b", body)
        assert len(found) <= 1, (a, body)
        out.update({a: found[0]} if found else {})
    breasts = re.findall(r"\ba ((?:\w+ )?\w+) breast\b", body)
    assert len(breasts) <= 1, body
    for word in breasts[0].split() if breasts else []:
        a = "breast_pattern" if word in syn.ATTRIBUTE_VALUES["breast_pattern"] else "breast_color"
        assert word in syn.ATTRIBUTE_VALUES[a] and a not in out, (word, body)
        out[a] = word
    return out


def test_oracle_captions_are_the_true_attributes(synth, tok):
    train = synth.split("train")
    recs = sources.oracle_captions(train, 3, seed=5, tokenizer=tok)
    table = train.table.set_index("filename")
    assert [r["image"] for r in recs] == list(train.table["filename"])
    for r in recs:
        row = table.loc[r["image"]]
        assert len(r["captions"]) == 3 and r["class"] == row["species"]
        for c in r["captions"]:
            assert c.startswith(f"{row['species']}: ") and count_tokens(tok, c) <= 77
            assert _parse(c.split(": ", 1)[1]) == {a: row[a] for a in syn.ATTRIBUTES}
    assert sources.oracle_captions(train, 3, seed=5, tokenizer=tok) == recs  # deterministic given the seed
    assert sources.oracle_captions(train, 3, seed=6, tokenizer=tok) != recs
    # an image's captions do not depend on which other images the draw holds
    sub = train.subset([2])
    assert sources.oracle_captions(sub, 3, seed=5, tokenizer=tok)[0] == recs[2]


@pytest.mark.parametrize("named", [["breast_pattern", "beak_shape", "tail_size"], ["breast_pattern"],
                                   ["breast_color", "breast_pattern"], ["crown_color"]])
def test_an_oracle_of_some_attributes_names_those_and_no_other(synth, tok, named):
    train = synth.split("train")
    table = train.table.set_index("filename")
    for r in sources.oracle_captions(train, 2, seed=1, tokenizer=tok, attributes=named):
        row = table.loc[r["image"]]
        for c in r["captions"]:
            assert c.startswith(f"{row['species']}: ")
            assert _parse(c.split(": ", 1)[1]) == {a: row[a] for a in named}, c


def test_which_attributes_the_oracle_names():
    """"untaught" reads the starting weights' recipe: the shipped tiny CLIP was never taught pattern, beak and
    tail in words; weights that record no recipe (random init, open_clip tags) get every attribute."""
    from workbench.clip.weights import metadata, package_weights

    shipped = metadata(package_weights("wb-tiny", "synthetic"))["recipe"]["withhold"]
    assert shipped == ["breast_pattern", "beak_shape", "tail_size"]
    assert sources.oracle_attributes("untaught", "tiny", "synthetic") == shipped
    assert sources.oracle_attributes("untaught", "tiny", None) == list(syn.ATTRIBUTES)
    assert sources.oracle_attributes("untaught", "ViT-B-32", "openai") == list(syn.ATTRIBUTES)
    assert sources.oracle_attributes("all", "tiny", "synthetic") == list(syn.ATTRIBUTES)
    assert sources.oracle_attributes(["tail_size", "crown_color"]) == ["crown_color", "tail_size"]  # table order
    for bad, msg in (([], "non-empty list"), ("tails", "'untaught', 'all'"), (["tail"], r"unknown attribute\(s\) \['tail'\]")):
        with pytest.raises(ValueError, match=msg):
            sources.oracle_attributes(bad)


def test_a_bad_oracle_setting_fails_before_any_run(tmp_path):
    toy = make_toy_dataset(tmp_path / "toy")
    with pytest.raises(ValueError, match=r"unknown attribute\(s\) \['tail'\]"):
        finetune_all(tmp_path / "run", toy, model="tiny", pretrained=None, methods=["finetune-classname"], shots=["full"],
                     seeds=[0], progress=False, oracle_attributes=["tail"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_oracle_refuses_a_dataset_without_attributes(tmp_path, tok):
    toy = make_toy_dataset(tmp_path / "toy", n_classes=2, n_train=2, n_val=1, n_test=1)
    with pytest.raises(ValueError, match="dataset 'toy'"):
        sources.oracle_captions(toy.split("train"), 2, 0, tok)
    with pytest.raises(ValueError, match="dataset 'toy'.*oracle|oracle.*dataset 'toy'"):
        finetune_all(tmp_path / "run", toy, methods=["oracle"], shots=["full"], seeds=[0], progress=False)


def test_random_own_class_draws_own_class_texts_only(synth, tok):
    train = synth.split("train")
    descs = synthetic_descriptions(synth)
    mine = {c: {truncate_caption(c, d["text"], tok) for d in descs if d["class"] == c} for c in synth.classnames}
    recs = sources.random_own_class_captions(train, descs, 3, seed=0, tokenizer=tok)
    for r in recs:
        assert len(r["captions"]) == 3 and len(set(r["captions"])) == 3  # without replacement: enough texts
        assert set(r["captions"]) <= mine[r["class"]]
        others = set().union(*(v for c, v in mine.items() if c != r["class"]))
        assert not set(r["captions"]) & others
    for c in synth.classnames:  # draws differ across the images of a class
        per_image = {tuple(r["captions"]) for r in recs if r["class"] == c}
        assert len(per_image) > 1, c
    assert recs == sources.random_own_class_captions(train, descs, 3, seed=0, tokenizer=tok)
    with pytest.raises(ValueError, match="no descriptions"):
        sources.random_own_class_captions(train, [d for d in descs if d["class"] != synth.classnames[0]], 3, 0, tok)


def test_waffle_matches_gist_token_counts(synth, tok):
    train = synth.split("train")
    descs = synthetic_descriptions(synth)
    matches = sources.random_own_class_captions(train, descs, 2, seed=3, tokenizer=tok)  # stand-in matches
    matches = [{**m, "captions": m["captions"] + [f"{m['class']}: a bird"]} for m in matches]  # 3 captions each
    vocab = set(sources.waffle_vocabulary(sources._class_words(train.classnames)))
    class_words = {w for c in train.classnames for w in c.replace("-", " ").split()}
    by_file = {m["image"]: m["captions"] for m in matches}
    # the first per_image matched captions (the ones GIST trains on), in turn when there are fewer
    for per_image, used in ((2, [0, 1]), (5, [0, 1, 2, 0, 1])):
        recs = sources.waffle_captions(train, per_image, seed=0, tokenizer=tok, matches=matches)
        for r in recs:
            want = [count_tokens(tok, by_file[r["image"]][i]) for i in used]
            assert [count_tokens(tok, c) for c in r["captions"]] == want
            for c in r["captions"]:
                head, words = c.split(": ", 1)
                assert head == r["class"] and set(words.split()) <= vocab and not set(words.split()) & class_words
    # without matches: the rounded mean count of the class's descriptions as GIST captions
    recs = sources.waffle_captions(train, 2, seed=0, tokenizer=tok, descriptions=descs)
    for r in recs:
        texts = [d["text"] for d in descs if d["class"] == r["class"]]
        mean = int(round(np.mean([count_tokens(tok, truncate_caption(r["class"], t, tok)) for t in texts])))
        assert [count_tokens(tok, c) for c in r["captions"]] == [mean, mean]
    assert len({c for r in recs for c in r["captions"]}) == 2 * len(recs)  # random words: no two alike
    with pytest.raises(ValueError, match="waffle"):
        sources.waffle_captions(train, 2, 0, tok)


class _CharTokenizer:
    """A stand-in HF tokenizer whose counts do not add up word by word (one token per 5 characters)."""

    context_length = 77

    def tokenizer(self, text):
        return {"input_ids": [0] * (2 + -(-len(text) // 5))}


def test_waffle_hits_the_count_when_a_tokenizer_does_not_add_up():
    tok, vocab = _CharTokenizer(), sources.waffle_vocabulary(frozenset())
    rng = np.random.default_rng(0)
    for target in range(5, 30):
        c = sources.waffle_caption("toy bird", target, rng, vocab, tok)
        assert count_tokens(tok, c) == target and c.startswith("toy bird: ")


def test_caption_source_identity_follows_the_inputs(synth, tok):
    train = synth.split("train")
    descs = synthetic_descriptions(synth)

    def ident(method, seed=0, d=descs, ds=train):
        return digest(sources.caption_records(method, ds, 2, seed, tok, None, d)[1])

    for m in sources.SOURCES:
        assert ident(m) == ident(m) and ident(m) != ident(m, seed=1)
    edited = [dict(descs[0], text=descs[0]["text"] + " Note it."), *descs[1:]]
    assert ident("random-own-class", d=edited) != ident("random-own-class")
    assert ident("waffle", d=edited) != ident("waffle")
    t = train.table.copy()
    t.loc[0, "tail_size"] = "long" if t.loc[0, "tail_size"] == "short" else "short"
    other = dataclasses.replace(train, table=t)
    assert ident("oracle", ds=other) != ident("oracle")
    # build_pairs reaches the sources too: captions_per_image pairs per image
    rows, texts, labels = build_pairs(train, "oracle", 2, tokenizer=tok, seed=0)
    assert len(texts) == 2 * len(train.table) and rows.tolist() == sorted(list(range(len(train.table))) * 2)


def _holm_by_hand(p):
    """Holm's adjusted p-values, written out without workbench.stats."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adj, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def _rows(methods, accs, shots=("full", 1)):
    test, rows = np.arange(300), []
    for j, (m, acc) in enumerate(zip(methods, accs)):
        for s in shots:
            correct = np.random.default_rng([j, len(str(s))]).random(300) < acc
            rows.append({"method": m, "shots": s, "seed": 0, "_test": {"rows": test, "correct": correct}})
    return rows


def test_new_pairs_and_holm_over_all_rows():
    methods = ["zero-shot", "linear-probe", "finetune-classname", "waffle", "random-own-class", "gist", "oracle"]
    comps = comparisons(_rows(methods, [0.2, 0.5, 0.55, 0.5, 0.6, 0.65, 0.8]), n_boot=300)
    assert len(comps) == 2 * len(PAIRS)  # every pair at both shots settings
    for s in ("full", 1):
        assert NEW_PAIRS <= {(c["a"], c["b"]) for c in comps if c["shots"] == s}
    for c in comps:
        assert {"a", "b", "shots", "diff", "ci95", "p", "p_holm", "n_test", "seeds"} == set(c)
        assert c["ci95"][0] <= c["diff"] <= c["ci95"][1] and c["p"] <= c["p_holm"] <= 1
    assert [c["p_holm"] for c in comps] == pytest.approx(_holm_by_hand([c["p"] for c in comps]), abs=1e-12)
    # pairs whose methods did not run are left out, and Holm counts only the rows there are
    few = comparisons(_rows(["finetune-classname", "gist"], [0.5, 0.6]), n_boot=300)
    assert {(c["a"], c["b"]) for c in few} == {("gist", "finetune-classname")}
    assert [c["p_holm"] for c in few] == pytest.approx(_holm_by_hand([c["p"] for c in few]))


def test_gist_question_answers_from_the_numbers():
    methods = ["finetune-classname", "random-own-class", "gist", "oracle"]
    comps = comparisons(_rows(methods, [0.4, 0.5, 0.6, 0.9]), n_boot=300)
    table, sentences = gist_question(comps)
    assert len(table) == 6 and set(table["shots"]) == {"full", 1}
    assert set(table["difference"]) == {"GIST − FLYP-style", "GIST − random own-class", "oracle − GIST"}
    pair = {"GIST − FLYP-style": ("gist", "finetune-classname"), "GIST − random own-class": ("gist", "random-own-class"),
            "oracle − GIST": ("oracle", "gist")}
    for r in table.to_dict("records"):
        c = next(c for c in comps if (c["a"], c["b"]) == pair[r["difference"]] and c["shots"] == r["shots"])
        assert (r["diff"], r["ci95_low"], r["ci95_high"]) == (round(c["diff"], 2), *(round(x, 2) for x in c["ci95"]))
        assert (r["p"], r["p_holm"]) == (c["p"], c["p_holm"])
    flyp = next(c for c in comps if (c["a"], c["b"], c["shots"]) == ("gist", "finetune-classname", 1))
    s = next(t for t in sentences if t.startswith("1 shot, does GIST beat FLYP-style"))
    assert f"{flyp['diff']:+.1f} points [{flyp['ci95'][0]:+.1f}, {flyp['ci95'][1]:+.1f}]" in s and "Holm p" in s
    assert any("% of the oracle's" in t for t in sentences)  # the share of the oracle's gain GIST captures
    # a method that did not run: its row is missing and a sentence says which
    table, sentences = gist_question([c for c in comps if "oracle" not in (c["a"], c["b"])])
    assert len(table) == 4 and "oracle − GIST" not in set(table["difference"])
    assert sum("`oracle` did not run" in t for t in sentences) == 2
    assert gist_question([])[1] and gist_question([])[0].empty


def test_control_methods_through_workbench_run(tmp_path, capsys):
    """Every new method trains through `workbench run` on the tiny demo; evaluation probes it, compares
    it with Holm p-values and answers the GIST question in 04_evaluate. Edited descriptions then retire
    the random own-class run's checkpoints (its caption_source identity)."""
    base = ["run", "demo", "--name", "ctl", "--reports", str(tmp_path),
            "--set", "dataset_options={n_species: 4, n_train: 4, n_val: 2, n_test: 2}", "--set", "model=tiny",
            "--set", "progress=false", "--set", "describe.per_class=4", "--set", "epochs=1",
            "--set", "seeds=[0]", "--set", "shots=[1]", "--set", "bootstrap_n=100",
            "--set", "finetune.batch_size=16", "--set", "evaluate.weight_decays=[0.1]",
            *sum((["--set", s] for s in QUICK_DEMO), [])]
    rc = cli.main([*base, "--stages", "describe,match,finetune,evaluate",
                   "--set", "finetune.methods=[gist, finetune-classname, oracle, random-own-class, waffle]"])
    assert rc == 0
    run = tmp_path / "ctl"
    index = json.loads((run / "checkpoints" / "index.json").read_text())
    assert {e["method"] for e in index} == {"gist", "finetune-classname", *sources.SOURCES}
    for e in index:
        source = e["identity"].get("caption_source")
        assert (source is None) == (e["method"] in ("gist", "finetune-classname"))
        if source:
            assert source["method"] == e["method"] and source["version"] == sources.VERSION
    waffle = next(e for e in index if e["method"] == "waffle")["identity"]["caption_source"]
    assert waffle["matches_sha256"] and waffle["descriptions_sha256"] is None  # token counts from the matches
    metrics = json.loads((run / "metrics.json").read_text())
    assert {r["method"] for r in metrics["accuracy"]} == {"zero-shot", "linear-probe", "gist", "finetune-classname",
                                                           *sources.SOURCES}
    comps = metrics["comparisons"]
    assert NEW_PAIRS <= {(c["a"], c["b"]) for c in comps}
    assert all("p_holm" in c and c["p"] <= c["p_holm"] <= 1 for c in comps)
    assert [c["p_holm"] for c in comps] == pytest.approx(_holm_by_hand([c["p"] for c in comps]))
    nb = json.loads((run / "04_evaluate.ipynb").read_text())
    out = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    for q in ("does GIST beat FLYP-style", "does matching help", "how much of the possible gain"):
        assert f"1 shot, {q}" in out, q
    log = read_jsonl(run / "train_log.jsonl")
    assert {r["run"] for r in log} >= {f"{m}-1-s0" for m in sources.SOURCES}

    descs = read_jsonl(run / "descriptions.jsonl")
    descs[0]["text"] += " Note its call."
    (run / "descriptions.jsonl").write_text("".join(json.dumps(d) + "\n" for d in descs))
    capsys.readouterr()
    rc = cli.main([*base, "--stages", "finetune", "--set", "finetune.methods=[random-own-class]"])
    out = "".join(capsys.readouterr())
    assert rc == 1 and "IdentityMismatch: run random-own-class-1-s0" in out
    assert "caption_source: made with {\"descriptions_sha256\"" in out
