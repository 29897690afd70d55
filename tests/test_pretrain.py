"""The tiny CLIP pretrained on the synthetic benchmark: loss, captions, caching, zero-shot figures."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench import pretrain as P
from workbench.clip import load_clip
from workbench.data import load_dataset
from workbench.data import synthetic as syn
from workbench.finetune.losses import multi_positive_loss


def test_loss_is_clip_loss_with_one_positive():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    scale = torch.tensor(10.0)
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    ref = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    got = multi_positive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, torch.eye(8, dtype=torch.bool))
    assert torch.allclose(got, ref, atol=1e-6)
    # two positives for image 0: its target splits evenly between captions 0 and 1
    pos = torch.eye(8, dtype=torch.bool)
    pos[0, 1] = True
    got = multi_positive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale, pos)
    lp = logits.log_softmax(1)
    i2t = torch.stack([-(lp[0, 0] + lp[0, 1]) / 2] + [-lp[i, i] for i in range(1, 8)]).mean()
    lpt = logits.T.log_softmax(1)  # caption 1 is true of images 0 and 1
    t2i = torch.stack([-lpt[0, 0], -(lpt[1, 0] + lpt[1, 1]) / 2] + [-lpt[i, i] for i in range(2, 8)]).mean()
    assert torch.allclose(got, (i2t + t2i) / 2, atol=1e-6)


def test_loss_with_several_captions_per_image():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(4, 16, generator=g), torch.randn(8, 16, generator=g)
    pos = torch.zeros(4, 8, dtype=torch.bool)
    pos[torch.arange(8) // 2, torch.arange(8)] = True  # captions 2i and 2i+1 belong to image i
    logits = 5.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    i2t = -(logits.log_softmax(1)[pos].view(4, 2).mean(1)).mean()
    t2i = F.cross_entropy(logits.T, torch.arange(8) // 2)
    got = multi_positive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(5.0), pos)
    assert torch.allclose(got, (i2t + t2i) / 2, atol=1e-6)


def test_captions_are_true_never_name_species_and_come_with_a_hard_negative():
    """Every pretraining caption names one attribute; the first of each pair is true of its image, the
    second names another value of that attribute; no word of any species name is in the vocabulary;
    shape attributes are named more often (WEIGHTS), and every value of every attribute occurs."""
    from collections import Counter

    rng = np.random.default_rng(0)
    vocab = P.caption_vocabulary()
    named, seen = Counter(), set()
    for _ in range(600):
        attrs = {a: str(rng.choice(v)) for a, v in syn.ATTRIBUTE_VALUES.items()}
        caps = P.training_captions(attrs, rng, 4)
        assert len(caps) == 8
        for (pos_text, pos_d), (neg_text, neg_d) in zip(caps[::2], caps[1::2]):
            (a, v), = pos_d.items()
            (b, w), = neg_d.items()
            assert a == b and v == attrs[a] and w != v and w in syn.ATTRIBUTE_VALUES[a]
            assert pos_text.replace(v, w, 1) == neg_text  # the value word is the only difference
            for t in (pos_text, neg_text):
                assert set(t.replace(".", " ").split()) <= vocab
            named[a] += 1
            seen |= {(a, v), (a, w)}
    names = syn.make_species(syn.MAX_SPECIES)["species"]
    assert not {w for n in names for w in n.replace("-", " ").split()} & vocab
    assert named["tail_size"] > 2 * named["crown_color"] and named["beak_shape"] > 1.5 * named["wing_color"]
    assert seen == {(a, v) for a, vals in syn.ATTRIBUTE_VALUES.items() for v in vals}


def test_truth_table_marks_every_image_a_caption_is_true_of():
    attrs = [{"crown_color": "red", "tail_size": "long"}, {"crown_color": "red", "tail_size": "short"},
             {"crown_color": "blue", "tail_size": "long"}]
    full = [{a: (r.get(a) or syn.ATTRIBUTE_VALUES[a][0]) for a in syn.ATTRIBUTES} for r in attrs]
    codes = np.array([[syn.ATTRIBUTE_VALUES[a].index(r[a]) for a in syn.ATTRIBUTES] for r in full])
    pos = P.truth_table(codes, [{"crown_color": "red"}, {"tail_size": "long"}, {"crown_color": "yellow"}])
    assert pos.tolist() == [[True, True, False], [True, False, False], [False, True, False]]


def test_trimmed_token_table_roundtrip(tmp_path):
    """A weights file keeps the token rows training moved; loading restores them exactly (to fp16) and
    fills the others with the same seeded draw on every machine."""
    from safetensors.torch import save_file

    from workbench.clip.weights import ROWS, load_into, trim_token_table

    torch.manual_seed(3)
    src = load_clip("tiny", device="cpu").model
    rows = [0, 5, 320, 49406, 49407]
    state = trim_token_table({k: v.half() for k, v in src.state_dict().items()}, rows)
    assert state["token_embedding.weight"].shape[0] == len(rows) and state[ROWS].tolist() == rows
    save_file(state, str(tmp_path / "w.safetensors"))
    a, b = (load_clip("tiny", device="cpu").model for _ in range(2))
    load_into(a, tmp_path / "w.safetensors")
    load_into(b, tmp_path / "w.safetensors")
    table = a.token_embedding.weight
    assert torch.equal(table[rows], src.token_embedding.weight[rows].half().float())
    assert torch.equal(table, b.token_embedding.weight)  # the untrained rows: one seeded draw
    assert 0.015 < table[1000:2000].std() < 0.025  # open_clip's initialisation scale
    for k, v in src.state_dict().items():
        if k != "token_embedding.weight":
            assert torch.equal(a.state_dict()[k], v.half().float()), k


def test_a_provided_tag_without_its_file_says_how_to_rebuild(monkeypatch, tmp_path):
    from workbench.clip import weights

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="workbench pretrain"):
        load_clip("tiny", pretrained="synthetic", device="cpu")


@pytest.fixture(scope="session")
def pretrained_figures(tmp_path_factory):
    """The shipped tiny CLIP's zero-shot figures on a small synthetic dataset at the benchmark's (and the
    pretraining's) default pose."""
    bundle = load_clip("tiny", pretrained="synthetic", device="cpu")
    ds = load_dataset("synthetic", tmp_path_factory.mktemp("syn") / "data", n_species=8, n_train=2, n_val=1, n_test=10)
    return P.evaluate_pretrained(bundle, dataset=ds, n_heldout=240)


def test_pretrained_knows_the_taught_attributes_not_the_withheld_ones_nor_species(pretrained_figures):
    """The shipped weights on a small draw (240 held-out birds, the 80 test images of a small dataset): every
    colour the captions named at least 0.85 (full size, 600 held-out and 1,200 test images: 0.98 to 1.00), and
    the attributes they never named near chance on the held-out birds (values drawn uniformly), at most
    chance + 0.3 (full size: pattern 0.36 against chance 0.33, beak 0.30 against 0.33, tail 0.51 against
    0.5), and on the dataset's images no better than always answering its commonest value (a species table
    of 8 is mostly plain-breasted). At n = 240 one binomial standard deviation is about 3 points, so no
    bound fails by luck."""
    f = pretrained_figures
    attrs = f["attributes"]
    assert set(attrs) == set(syn.ATTRIBUTES) == set(f["dataset_attributes"])
    withheld = P.DEFAULTS["withhold"]
    assert withheld == ["breast_pattern", "beak_shape", "tail_size"]
    for a in syn.ATTRIBUTES:
        for figures, n in ((attrs[a], 240), (f["dataset_attributes"][a], 80)):
            assert figures["n"] == n
            if a in withheld:
                bound = figures["chance"] + 0.3 if n == 240 else figures["majority"] + 0.05
                assert figures["top1"] <= bound, (a, figures)
            else:
                assert figures["top1"] >= 0.85, (a, figures)
    sp = f["species"]
    assert sp["chance"] == 1 / 8 and sp["n"] == 80
    assert sp["null95"][0] <= sp["top1"] <= sp["null95"][1] and abs(sp["null_mean"] - sp["chance"]) < 0.01
    assert "synthetic" in f["model"]


def test_label_permutation_null():
    """Predictions all on one name score exactly chance under every renaming; predictions split by a
    trait on two hub names spread widely around chance; a perfect predictor sits far above its null."""
    labels = np.repeat(np.arange(6), 20)
    one = P.label_permutation_null(np.full(120, 3), labels, 6)
    assert one["null95"] == [1 / 6, 1 / 6] and one["top_name_share"] == 1.0
    two = P.label_permutation_null(np.where(labels < 3, 0, 1), labels, 6)
    assert two["null95"][0] == 0.0 and two["null95"][1] >= 1 / 3 and abs(two["null_mean"] - 1 / 6) < 0.01
    assert 0.0 < two["null_quantile"] < 1.0  # top-1 is 1/6 here: inside the null
    perfect = P.label_permutation_null(labels, labels, 6)
    assert perfect["null_quantile"] == 1.0 and perfect["null95"][1] < 1.0
    note = P.species_note({"top1": 1 / 6, "chance": 1 / 6, **two})
    assert "16.7% against 16.7% chance" in note and "50% of the images land on a single name" in note
    assert "within what luck gives" in note
    assert "outside that range" in P.species_note({"top1": 1.0, "chance": 1 / 6, **perfect})


def test_shipped_weights_record_how_they_were_made():
    """fp16, at most 10 MB, trimmed to the token rows training uses (every prompt word among them), and
    the recipe, generator and package versions in the file. The recipe in the file must be today's
    DEFAULTS: changing the recipe or the generator means rebuilding the weights (`workbench pretrain`)."""
    import re

    from safetensors.torch import load_file

    from workbench.clip import weights as W

    path = W.package_weights("wb-tiny", "synthetic")
    assert path.stat().st_size <= 10 * 2**20
    sd = load_file(str(path))
    assert {v.dtype for k, v in sd.items() if k != W.ROWS} == {torch.float16}
    meta = W.metadata(path)
    assert meta["recipe"] == P.DEFAULTS and meta["training"]["config"] == P.DEFAULTS
    assert meta["pretrain_version"] == P.PRETRAIN_VERSION and meta["generator_version"] == syn.GENERATOR_VERSION
    assert re.fullmatch(r"\d+\.\d+\S*", meta["workbench_version"]) and meta["torch_version"]
    assert meta["training"]["loss_last"] < meta["training"]["loss_first"] - 0.5
    tok = load_clip("tiny", device="cpu").tokenizer
    assert set(sd[W.ROWS].tolist()) == P.trained_tokens(tok, P.DEFAULTS)


def test_a_short_run_of_the_recipe_learns(tmp_path, capsys):
    """`workbench pretrain`, the command the package's weights come from, shortened (200 steps on 512 birds,
    ~40 s on 2 cores): the written file loads as a local checkpoint, its loss falls, and colours are learnt
    first (measured: wing 0.95, crown 0.24, breast 0.39 on 300 held-out birds; chance 0.17, 0.14, 0.20)."""
    from workbench.cli import main
    from workbench.clip.weights import metadata

    out = tmp_path / "short.safetensors"
    assert main(["pretrain", "--out", str(out), "--set", "stepz=3"]) == 2
    assert "unknown pretraining option(s) ['stepz']" in capsys.readouterr().err and not out.exists()
    assert main(["pretrain", "--out", str(out), "--set", "steps=200", "--set", "n_images=512",
                 "--set", "text_freeze=50", "--set", "warmup=20"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    meta = metadata(out)
    assert meta["recipe"]["steps"] == 200 and meta["recipe"]["lr"] == P.DEFAULTS["lr"]
    assert meta["training"]["loss_last"] < meta["training"]["loss_first"] - 0.1
    ds = load_dataset("synthetic", tmp_path / "data", n_species=4, n_train=1, n_val=1, n_test=2)
    f = P.evaluate_pretrained(load_clip("tiny", pretrained=str(out), device="cpu"), dataset=ds, n_heldout=300)
    colours = [f["attributes"][a] for a in ("crown_color", "wing_color", "breast_color")]
    assert f["attributes"]["wing_color"]["top1"] >= 0.6
    assert np.mean([c["top1"] for c in colours]) >= np.mean([c["chance"] for c in colours]) + 0.2


def test_notebook_runs_and_writes_metrics(pretrained_figures, tmp_path):
    """00_pretrain with the cached model (the fixture trained it): metrics section and figures."""
    from pathlib import Path

    from workbench.io import read_json
    from workbench.pipeline import run_notebook

    nb = Path(__file__).resolve().parents[1] / "notebooks" / "00_pretrain.ipynb"
    params = {"run_dir": str(tmp_path), "progress": False, "n_heldout": 120,
              "dataset_options": {"n_species": 4, "n_train": 2, "n_val": 1, "n_test": 3}}
    run_notebook(nb, tmp_path / "00_pretrain.ipynb", params, cwd=tmp_path, html=False)
    m = read_json(tmp_path / "metrics.json")["pretrain"]
    assert set(m["attributes"]) == set(syn.ATTRIBUTES) and m["species"]["n"] == 4 * 3
    assert m["training"]["train_seconds"] > 0 and m["recipe"] == P.DEFAULTS
    assert m["training"]["workbench_version"] and set(m["dataset_attributes"]) == set(syn.ATTRIBUTES)
    assert m["species"]["null95"][0] <= m["species"]["null_mean"] <= m["species"]["null95"][1]
    assert (tmp_path / "figures" / "pretrain_samples.png").exists()
    assert (tmp_path / "figures" / "pretrain_zeroshot.png").exists()
    run_notebook(nb, tmp_path / "skip.ipynb", {**params, "pretrained": None}, cwd=tmp_path, html=False)
    assert read_json(tmp_path / "metrics.json")["pretrain"]["skipped"] is True


def test_withheld_attributes_are_never_named(monkeypatch):
    """The recipe's ``withhold`` (the shipped weights: pattern, beak, tail): the captions of a pretraining
    batch never name a withheld attribute, and name the others."""
    from workbench.pretrain import recipe

    named = set()

    def spy(*args, **kwargs):  # what CaptionSource.batch draws, seen from inside the batch
        caps = P.training_captions(*args, **kwargs)
        named.update(a for _, d in caps for a in d)
        return caps

    monkeypatch.setattr(recipe, "training_captions", spy)
    bundle = load_clip("tiny", None, "cpu")
    rng = np.random.default_rng(1)
    attrs = [{a: str(rng.choice(v)) for a, v in syn.ATTRIBUTE_VALUES.items()} for _ in range(16)]
    images = torch.zeros(16, 3, 64, 64, dtype=torch.uint8)
    config = recipe.pretrain_config(batch_size=16, withhold="tail_size,beak_shape")
    assert config["withhold"] == ["beak_shape", "tail_size"]  # attribute order, from the --set spelling
    weights = recipe.caption_weights(config)
    assert weights["beak_shape"] == weights["tail_size"] == 0 and weights["wing_color"] == P.WEIGHTS["wing_color"]
    source = recipe.CaptionSource(images, attrs, bundle.tokenizer, config, weights)
    for _ in range(5):
        x, ids, pos = source.batch(bundle.model)
        assert x.shape[0] == 16 and pos.shape == (16, ids.shape[0])
    assert named == set(syn.ATTRIBUTES) - {"beak_shape", "tail_size"}


@pytest.mark.parametrize("bad, msg", [({"withhold": ["tail"]}, r"unknown attribute\(s\) \['tail'\]"),
                                      ({"withhold": list(syn.ATTRIBUTES)}, "every attribute"),
                                      ({"pose": 2}, r"pose must be in \[0, 1\]")])
def test_a_recipe_that_cannot_work_is_refused(bad, msg, capsys):
    from workbench.cli import main

    with pytest.raises(ValueError, match=msg):
        P.pretrain_config(**bad)
    key, value = next(iter(bad.items()))
    value = ",".join(value) if isinstance(value, list) else value
    assert main(["pretrain", "--out", "/nonexistent/x.safetensors", "--set", f"{key}={value}"]) == 2
    assert "workbench pretrain:" in capsys.readouterr().err
