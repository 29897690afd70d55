"""Alignment maps, attention rollout/relevance and the pointing game, on the tiny CLIP (random init)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from workbench.align import attention as att
from workbench.align import features as feat
from workbench.align import pointing, regions, report
from workbench.clip import load_clip, normalize_images
from workbench.data import Dataset


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("tiny", device="cpu")


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)


CAPTIONS = ["a red crown", "a blue-winged albatross: long tail, short beak !~"]


def test_text_mask_excludes_padding_for_different_lengths(clip):
    _, _, tok = clip
    tt = feat.tokenize(tok, CAPTIONS)
    inner = tok.encode(CAPTIONS[1])
    assert tok.encode("!~") == [0, 349]  # id 0 is a real token ("!"), so masking by id != 0 would be wrong
    assert 0 in inner
    lengths = [len(tok.encode(c)) + 2 for c in CAPTIONS]  # + SOT, EOT
    assert tt.mask.sum(1).tolist() == lengths
    for row, n in zip(tt.mask, lengths):
        assert row[:n].all() and not row[n:].any()
    assert tt.eot.tolist() == [n - 1 for n in lengths]
    assert tt.special.sum(1).tolist() == [2, 2] and tt.special[:, 0].all()
    # words come back from the pieces, with the special tokens marked
    words = [w.text for w in tt.words[1]]
    assert words[0] == "<sot>" and words[-1] == "<eot>"
    assert words[1:-1] == ["a", "blue", "-", "winged", "albatross", ":", "long", "tail", ",", "short", "beak", "!~"]
    alb = next(w for w in tt.words[1] if w.text == "albatross")
    assert len(alb.positions) == 2  # two BPE pieces, one word
    assert feat.find_phrase(tok, tt.ids[1], "albatross") == alb.positions


def test_similarity_maps_nan_at_padding(clip, images):
    model, _, tok = clip
    sim, tt = feat.similarity_maps(model, tok, images, CAPTIONS)
    assert sim.shape == (2, 77, 8, 8)
    assert torch.isnan(sim[~tt.mask]).all() and not torch.isnan(sim[tt.mask]).any()


def test_eot_token_equals_encode_text_and_pooled_equals_encode_image(clip, images):
    model, _, tok = clip
    ids = tok(CAPTIONS)
    with torch.no_grad():
        states = feat.text_tokens(model, ids)
        ref = model.encode_text(ids)
        pooled, patches = feat.image_tokens(model, images)
        ref_img = model.encode_image(normalize_images(images, model))
    torch.testing.assert_close(states[torch.arange(2), ids.argmax(-1)], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_img, atol=1e-5, rtol=1e-5)
    assert patches.shape == (2, 64, 64)
    assert model.visual.output_tokens is False  # restored


def test_token_patch_similarity_equals_independent_computation(clip, images):
    """Patch tokens and token states taken with forward hooks on ln_post / ln_final during the model's
    own encode_image / encode_text, projected and compared by hand."""
    model, _, tok = clip
    got = {}
    h1 = model.visual.ln_post.register_forward_hook(lambda m, i, o: got.__setitem__("img", o))
    h2 = model.ln_final.register_forward_hook(lambda m, i, o: got.__setitem__("txt", o))
    ids = tok(CAPTIONS)
    with torch.no_grad():
        model.encode_image(normalize_images(images, model))
        model.encode_text(ids)
    h1.remove()
    h2.remove()
    patches = got["img"][:, 1:] @ model.visual.proj
    states = got["txt"] @ model.text_projection
    ref = torch.zeros(2, 77, 64)
    for b in range(2):
        for t in range(77):
            ref[b, t] = F.cosine_similarity(states[b, t][None], patches[b], dim=-1)
    sim, tt = feat.similarity_maps(model, tok, images, CAPTIONS)
    m = tt.mask
    torch.testing.assert_close(sim.reshape(2, 77, 64)[m], ref[m], atol=1e-5, rtol=1e-5)
    # a word map is the mean of its pieces' maps
    alb = next(w for w in tt.words[1] if w.text == "albatross")
    torch.testing.assert_close(feat.word_map(sim[1], tt.words[1], "albatross"), ref[1, alb.positions].mean(0).reshape(8, 8))
    # argmax token per patch over the non-special valid tokens
    am = feat.argmax_token_map(sim[0], tt.mask[0], tt.special[0])
    assert am.flatten().tolist() == (ref[0, 1:4].argmax(0) + 1).tolist()


def test_recomputed_attention_matches_model(clip, images):
    model, _, tok = clip
    with torch.no_grad():
        emb, attns = att.image_forward(model, images)
        torch.testing.assert_close(emb, model.encode_image(normalize_images(images, model)), atol=1e-5, rtol=1e-5)
        ids = tok(CAPTIONS)
        temb, tattns = att.text_forward(model, ids)
        torch.testing.assert_close(temb, model.encode_text(ids), atol=1e-5, rtol=1e-5)
        # our softmax(q k^T / sqrt d) equals nn.MultiheadAttention's own per-head weights
        blk = model.visual.transformer.resblocks[0]
        x = att._visual_embeds(model.visual, normalize_images(images, model))
        h = blk.ln_1(x)
        _, ref = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
    assert len(attns) == 4 and attns[0].shape == (2, 4, 65, 65)
    torch.testing.assert_close(attns[0], ref, atol=1e-6, rtol=1e-5)
    assert torch.all(tattns[0][0, :, 0, 1:] == 0)  # causal text attention


def test_rollout_two_layer_hand_example():
    # layer 1: heads attend to token 0 / token 1 -> mean [[.5,.5],[.5,.5]] -> (+I, renorm) [[.75,.25],[.25,.75]]
    a1 = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    # layer 2: identity and "all to token 0" -> mean [[1,0],[.5,.5]] -> [[1,0],[.25,.75]]
    a2 = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]]])
    r = att.rollout([a1, a2])
    torch.testing.assert_close(r[0], torch.tensor([[0.75, 0.25], [0.375, 0.625]]))
    torch.testing.assert_close(att.rollout([a1, a2], add_identity=False)[0], torch.tensor([[0.5, 0.5], [0.5, 0.5]]))


def test_relevance_hand_example():
    a1 = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    g1 = torch.tensor([[[[2.0, -2.0], [0.0, 4.0]]]])  # relu(g*A) = [[1,0],[0,2]] -> R = I + that = diag(2, 3)
    a2 = torch.eye(2)[None, None].repeat(1, 2, 1, 1)  # heads: relu(g*A) = I and [[1,0],[0,0]]; mean [[1,0],[0,.5]]
    g2 = torch.stack([torch.ones(2, 2), torch.tensor([[1.0, 1.0], [-1.0, -1.0]])])[None]
    r = att.relevance([a1, a2], [g1, g2])
    # R += [[1,0],[0,.5]] @ diag(2,3) = diag(2, 1.5) -> diag(4, 4.5)
    torch.testing.assert_close(r[0], torch.tensor([[4.0, 0.0], [0.0, 4.5]]))


def test_pair_relevance_gradients(clip, images):
    """Relevance explains the pair's cosine; pairs in a batch are independent of each other."""
    model, _, tok = clip
    ids = tok(CAPTIONS)
    rel, trel, s = att.pair_relevance(model, images, ids)
    with torch.no_grad():
        ref = F.cosine_similarity(model.encode_image(normalize_images(images, model)), model.encode_text(ids))
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)
    assert rel.shape == (2, 8, 8) and (rel >= 0).all() and rel.sum() > 0
    assert (trel[0, 5:] == 0).all() and trel[0, :5].sum() > 0
    one, _, _ = att.pair_relevance(model, images[1:], ids[1:])
    torch.testing.assert_close(one[0], rel[1], atol=1e-6, rtol=1e-4)


def test_pointing_game_known_hot_spot():
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[17:20, 42:45] = True  # inside patch (row 2, col 5) of an 8 x 8 grid of 8-px patches
    m = torch.zeros(8, 8)
    m[2, 5] = 1.0
    r = pointing.point_hits(m, region)
    assert r["hit"].item() == 1.0
    assert r["chance"].item() == pytest.approx(1 / 64)
    assert r["area"].item() == pytest.approx(9 / 4096)
    moved = torch.roll(m, shifts=(3, -2), dims=(0, 1))
    assert pointing.point_hits(moved, region)["hit"].item() == 0.0
    # a region straddling two patches: either one counts, and chance counts both
    region2 = torch.zeros(64, 64, dtype=torch.bool)
    region2[20:22, 6:10] = True
    m2 = torch.zeros(8, 8)
    m2[2, 1] = 1
    r2 = pointing.point_hits(m2, region2)
    assert r2["hit"].item() == 1.0 and r2["chance"].item() == pytest.approx(2 / 64)


def test_pointing_game_end_to_end_structure(clip, images, monkeypatch):
    model, _, tok = clip
    reg = torch.zeros(64, 64, dtype=torch.bool)
    reg[:8, :8] = True  # patch (0, 0)
    items = [pointing.PartItem(0, "crown", "a bird with a red crown", "crown", reg),
             pointing.PartItem(1, "tail", "a bird with a long tail", "tail", ~reg)]
    # with maps forced hot at patch (0, 0), crown hits and tail (everything but that patch) misses
    def fake(model, tok, images, items, method, *args):
        m = torch.zeros(len(items), 8, 8)
        m[:, 0, 0] = 1
        return m
    monkeypatch.setattr(pointing, "item_maps", fake)
    res = pointing.pointing_game(model, tok, images, items, methods=("similarity",))
    assert res["similarity"]["per_part"] == {"crown": {"score": 1.0, "chance": 1 / 64, "n": 1},
                                             "tail": {"score": 0.0, "chance": 1.0 - 1 / 64, "n": 1}}
    assert res["similarity"]["other_parts"] is None  # one part per image: no control
    # same image, two parts: the crown hit also counts as landing on "another part" for the tail query
    tail = torch.zeros(64, 64, dtype=torch.bool)
    tail[56:, 56:] = True
    same = [items[0], pointing.PartItem(0, "tail", "a bird with a long tail", "tail", tail)]
    res = pointing.pointing_game(model, tok, images, same, methods=("similarity", "rollout"))
    assert res["similarity"]["score"] == 0.5 and res["similarity"]["other_parts"] == 0.5
    lo, hi = res["similarity"]["score_ci95"]
    assert lo < 0.5 < hi and hi - lo > 0.5  # two queries say little: a wide interval
    # rollout is the same map for every caption: no word-specificity control is computed for it
    assert res["rollout"]["other_parts"] is None and res["rollout"]["word_specific"] is False
    assert res["similarity"]["word_specific"] is True
    assert res["similarity"]["_hit"].tolist() == [True, False]  # per query, in memory
    monkeypatch.undo()
    res = pointing.pointing_game(model, tok, images, items)
    assert set(res) == set(pointing.METHODS)
    for r in res.values():
        assert r["n"] == 2 and 0 <= r["score"] <= 1 and r["chance"] == pytest.approx(0.5)
    # the deduplicated batch computation equals the plain per-pair one
    items3 = items + [pointing.PartItem(0, "tail", "a bird with a long tail", "tail", reg)]
    for method in pointing.METHODS:
        fast = pointing.item_maps(model, tok, images, items3, method, batch_size=2)
        plain = pointing.method_maps(model, tok, images[[0, 1, 0]], [it.text for it in items3], [it.word for it in items3], method)
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)


def test_region_transforms_follow_the_image_cache(tmp_path):
    """A part drawn in a 100 x 80 image lands where the decoded 64 px image shows it: masks, boxes,
    keypoints and tensors all go through the one geometry of workbench.data.geometry."""
    from workbench.data.geometry import map_mask, map_points, resize_crop_tensor
    from workbench.data.images import decode_images

    arr = np.zeros((80, 100, 3), dtype=np.uint8)
    arr[30:50, 70:90] = 255  # a white box (x 70..90, y 30..50)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = decode_images([tmp_path / "a.png"], 64)[0]
    white = img.float().mean(0) > 127
    mask = np.zeros((80, 100), bool)
    mask[30:50, 70:90] = True
    m = map_mask(mask, 64)
    assert (m ^ white).float().mean() < 0.01
    b = regions.box((70, 30, 90, 50), (100, 80), 64)
    assert (b ^ white).float().mean() < 0.01
    lab = np.zeros((80, 100), np.uint8)
    lab[30:50, 70:90] = 3
    torch.testing.assert_close(map_mask(lab, 64, labels=True) == 3, m)
    (cx, cy), = map_points([[80, 40]], (100, 80), 64).tolist()
    assert white[int(cy), int(cx)]
    # a tensor of the original size is resized and cropped like the PIL decode (bicubic, antialiased)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    t = resize_crop_tensor(x.float() / 255, 64)[0].mean(0) > 0.5
    assert t.shape == (64, 64) and (t ^ white).float().mean() < 0.01


def _tiny_dataset(tmp_path, extras, name="toy"):
    for f in ("a.png", "b.png"):
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / f)
    table = pd.DataFrame({"filename": ["a.png", "b.png"], "split": ["test", "test"], "label": [0, 1],
                          "species": ["x", "y"], "crown_color": ["red", "blue"]})
    return Dataset(name, tmp_path, table, ["x", "y"], extras)


def test_part_items_from_masks_boxes_and_keypoints(tmp_path):
    # the synthetic benchmark's contract: a label map per image, ids indexing extras["parts"]
    lab = np.zeros((64, 64), np.uint8)
    lab[10:30, 10:40] = 1  # body: not a part
    lab[2:6, 30:36] = 2
    lab[40:44, 8:20] = 4  # eye, occluded in b
    lab_b = np.where(lab == 4, 5, lab)
    extras = {"parts": ["background", "body", "crown", "tail", "eye", "occluder"],
              "part_mask": lambda fn: {"a.png": lab, "b.png": lab_b}[fn]}
    items, files = regions.part_items(_tiny_dataset(tmp_path, extras), 64)
    assert files == ["a.png", "b.png"]
    assert [(it.index, it.part, it.text, it.word) for it in items] == [
        (0, "crown", "a bird with a red crown", "crown"), (0, "eye", "a bird with an eye", "eye"),
        (1, "crown", "a bird with a blue crown", "crown")]  # empty tail and occluded eye dropped
    assert torch.equal(items[0].region, torch.from_numpy(lab == 2))
    extras["attribute_part"] = {"crown_color": "eye"}  # explicit attribute -> part mapping wins over names
    items, _ = regions.part_items(_tiny_dataset(tmp_path, extras), 64, parts=["eye"])
    assert [it.text for it in items] == ["a bird with a red eye"]
    boxes = pd.DataFrame({"filename": ["a.png"], "part": ["beak"], "x0": [10], "y0": [20], "x1": [14], "y1": [22]})
    items, files = regions.part_items(_tiny_dataset(tmp_path, {"part_boxes": boxes}), 64)
    assert files == ["a.png"] and items[0].region.sum() == 8
    locs = pd.DataFrame({"filename": ["a.png", "a.png", "b.png"], "part": ["eye", "eye", "eye"],
                         "x": [10, 50, 5], "y": [10, 10, 5], "visible": [1, 1, 0]})
    items, files = regions.part_items(_tiny_dataset(tmp_path, {"part_locs": locs}), 64, radius=3)
    assert files == ["a.png"] and len(items) == 1
    assert items[0].region[10, 10] and items[0].region[10, 50] and not items[0].region[30, 30]
    with pytest.raises(ValueError, match="no part annotations"):
        regions.part_items(_tiny_dataset(tmp_path, {}), 64)
    with pytest.raises(ValueError, match="unknown parts"):
        regions.part_items(_tiny_dataset(tmp_path, {"part_locs": locs}), 64, parts=["wing"])


def test_cub_keypoints_from_the_cub_loader(tmp_path):
    """The CUB loader's part table (original pixels) -> disks in model-input pixels, left/right merged."""
    from fixtures_datasets import make_mini_cub

    from workbench.data import load_dataset

    ds = load_dataset("cub", make_mini_cub(tmp_path, n_classes=2, n_train=1, n_val=0, n_test=1, attributes=False))
    ds = ds.split("test")
    regs = regions.part_regions(ds, 64, radius=3)
    parts = ds.extras["parts"]
    for fn in ds.table["filename"]:
        reg = regs[fn]
        assert "crown" in reg and not any(k.startswith(("left", "right")) for k in reg)
        # images are 40 x 32 -> scale 2, width 80, crop 8 px each side
        crown = parts[(parts["filename"] == fn) & (parts["part"] == "crown")].iloc[0]
        x, y = crown["x"] * 2 - 8, crown["y"] * 2
        assert reg["crown"][int(y), int(x)]
        assert reg["crown"].sum() <= math.pi * 9 + 12
    assert any("wing" in r for r in regs.values())
    items, files = regions.part_items(ds, 64, parts=["crown", "beak"])
    assert {it.text for it in items} <= {"a bird with a crown", "a bird with a beak"} and len(files) == 2


def test_finetuned_checkpoint_row(tmp_path):
    """The best full-shot row of the method (by val_top1), read through the one index reader."""
    assert report.finetuned_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    rows = [{"method": "finetune-classname", "shots": "full", "seed": 0, "path": "checkpoints/c.safetensors", "val_top1": 0.9},
            {"method": "gist", "shots": 5, "seed": 0, "path": "checkpoints/g5.safetensors", "val_top1": 0.9},
            {"method": "gist", "shots": "full", "seed": 1, "path": "checkpoints/g1.safetensors", "val_top1": 0.5},
            {"method": "gist", "shots": "full", "seed": 0, "path": "checkpoints/g0.safetensors", "val_top1": 0.7}]
    for r in rows:
        r["model"] = "tiny"
        (tmp_path / r["path"]).touch()
    (tmp_path / "checkpoints" / "index.json").write_text(json.dumps(rows))
    row = report.finetuned_checkpoint(tmp_path)
    assert row["path"] == str(tmp_path.resolve() / "checkpoints" / "g0.safetensors")
    assert report.finetuned_checkpoint(tmp_path, seed=1)["val_top1"] == 0.5
    assert report.finetuned_checkpoint(tmp_path, shots=1) is None
    (tmp_path / "checkpoints" / "g1.safetensors").unlink()  # a broken index is an error, not "pretrained only"
    with pytest.raises(ValueError, match="entry 2: checkpoint file not found"):
        report.finetuned_checkpoint(tmp_path)


def test_word_figure_shares_one_scale_and_saves(clip, images, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from workbench.align import plots

    model, _, tok = clip
    maps = report.pair_maps(clip, images[0], "black albatross: red crown", classname="black albatross")
    assert maps["highlight"] == [1, 2, 3]
    fig = plots.plot_word_maps(images[0], maps["words"])
    clims = {im.get_clim() for ax in fig.axes for im in ax.get_images() if im.get_alpha() is not None}
    lo = min(m.min().item() for m in maps["words"].values())
    hi = max(m.max().item() for m in maps["words"].values())
    assert len(clims) == 1
    assert list(clims)[0] == (pytest.approx(lo), pytest.approx(hi))
    assert plots.save(fig, tmp_path, "words").exists()
    fig = plots.plot_before_after(images[0], maps["words"], {k: v * 2 for k, v in maps["words"].items()})
    assert len({im.get_clim() for ax in fig.axes for im in ax.get_images() if im.get_alpha() is not None}) == 1
    plots.plot_argmax_tokens(images[0], maps["argmax"], maps["pieces"], maps["highlight"])
    # FILIP's argmax map only for a FILIP-trained checkpoint: its token-wise loss is what gives it a meaning
    bundle = load_clip("tiny", device="cpu")
    plain = report.example_figures(tmp_path, {"pretrained": bundle}, images[0], "a red crown", None, tag="p")
    assert set(plain) == {"words", "methods"}
    filip = report.example_figures(tmp_path, {"pretrained": bundle}, images[0], "a red crown", None, tag="f", argmax=True)
    assert set(filip) == {"words", "methods", "argmax"} and filip["argmax"].name == "align_argmax_f.png"


def test_notebook_runs_with_tiny_parameters(tmp_path):
    """notebooks/05_align.ipynb end to end: random-init tiny CLIP vs a 'fine-tuned' checkpoint, tiny synthetic set."""
    from pathlib import Path

    from safetensors.torch import save_file

    from workbench.io import read_json
    from workbench.pipeline import run_notebook

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(5)
    model = load_clip("tiny", device="cpu").model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "checkpoints" / "g.safetensors"))
    (run / "checkpoints" / "index.json").write_text(json.dumps([
        {"method": "gist", "shots": "full", "seed": 0, "path": "checkpoints/g.safetensors", "model": "tiny",
         "pretrained": None, "epoch": 1, "val_top1": 0.5, "loss": "filip"}]))
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "05_align.ipynb"
    params = {"run_dir": str(run), "pretrained": None, "progress": False, "max_images": 4, "n_examples": 1,
              "dataset_options": {"n_species": 3, "n_train": 1, "n_val": 1, "n_test": 2}}
    run_notebook(nb, run / "05_align.ipynb", params, cwd=run, html=False)
    pg = read_json(run / "metrics.json")["alignment"]["pointing_game"]
    assert set(pg) == set(pointing.METHODS) | {"prior", "random_bird_patch"}  # the notebook's default: every method
    for name in ("prior", "random_bird_patch"):  # no model: stored once, marked as reading no alignment
        assert set(pg[name]) == {"baseline"} and pg[name]["baseline"]["image_agnostic"] and "_hit" not in pg[name]["baseline"]
    prior = pg["prior"]["baseline"]["score"]
    for method in pointing.METHODS:
        by_model = pg[method]
        assert set(by_model) == {"pretrained", "finetuned"}
        for r in by_model.values():
            assert 0 <= r["score"] <= 1 and 0 < r["chance"] < 1 and r["n"] > 0 and "_hit" not in r
            assert r["vs_prior"]["diff"] == pytest.approx(100 * (r["score"] - prior))
        change = by_model["finetuned"]["change"]
        assert change["diff"] == pytest.approx(100 * (by_model["finetuned"]["score"] - by_model["pretrained"]["score"]))
    figs = {p.name for p in (run / "figures").glob("align_*.png")}
    assert {"align_default.png", "align_words_0.png", "align_argmax_0.png", "align_before_after_0.png",
            "align_pointing.png"} <= figs


def test_bad_method_fails_fast():
    with pytest.raises(ValueError, match="unknown pointing-game methods \\['gradcam'\\]"):
        pointing.check_methods(["similarity", "gradcam"])


def test_relevance_on_the_shipped_model_points_at_the_taught_parts_only(tmp_path, monkeypatch):
    """Ground truth of the synthetic benchmark: with the shipped tiny CLIP and 05_align's caption template and
    part nouns, Chefer relevance finds the parts whose colours the pretraining captions named (crown, wing,
    breast) well above chance and above a random patch of the bird; beak and tail, whose words it was never
    taught (the recipe's ``withhold``), it does not find at all, below a random bird patch. Full size (200
    test images at the default pose): taught 0.47 (other parts 0.39, prior 0.38, random bird patch 0.28,
    chance 0.08); beak and tail 0.05 (random bird patch 0.17, chance 0.05). Here 40 images (about 120 and
    80 queries), so the thresholds leave room for the small draw."""
    from workbench.align import stage
    from workbench.config import stage_params

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    scores = {}
    for parts in (["crown", "wing", "breast"], ["beak", "tail"]):
        p = stage_params("align", run_dir=str(tmp_path / "run"), progress=False, max_images=40, methods=["relevance"],
                         parts=parts, dataset_options={"n_species": 12, "n_train": 1, "n_val": 1, "n_test": 4})
        s = stage.prepare(p)
        assert set(s.bundles) == {"pretrained"} and len(s.files) == 40 and sorted(s.parts) == sorted(parts)
        model, _, tok = s.bundles["pretrained"]
        r = pointing.pointing_game(model, tok, s.images, s.items, ["relevance"])["relevance"]
        scores[parts[0]] = (r, s.baselines["random_bird_patch"]["score"])
    taught, bird = scores["crown"]
    assert taught["n"] >= 100 and taught["score"] >= 0.3 and taught["score"] >= 3 * taught["chance"], taught
    assert taught["score"] >= bird + 0.05, (taught, bird)
    untaught, bird = scores["beak"]
    assert untaught["n"] >= 60 and untaught["score"] < bird, (untaught, bird)


def test_pointing_change_is_paired_and_never_written_per_query(tmp_path):
    """The change fine-tuning makes to a score is the mean of paired per-query differences, with an interval
    that contains it; the per-query hits stay in memory (metrics.json gets the summary only)."""
    from workbench.runs import read_metrics, update_metrics

    rng = np.random.default_rng(0)
    before = rng.random(400) < 0.5
    after = before.copy()
    after[rng.choice(400, 60, replace=False)] = True  # fine-tuning adds hits on some queries
    c = report.pointing_change({"_hit": before}, {"_hit": after})
    assert c["diff"] == pytest.approx(100 * (after.mean() - before.mean()))
    assert 0 < c["ci95"][0] < c["diff"] < c["ci95"][1] and c["p"] < 0.001
    same = report.pointing_change({"_hit": before}, {"_hit": before})
    assert same == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0}
    update_metrics(tmp_path, "alignment", {"pointing_game": {"relevance": {"finetuned": {"score": 0.6, "_hit": after,
                                                                                        "change": c}}}})
    stored = read_metrics(tmp_path)["alignment"]["pointing_game"]["relevance"]["finetuned"]
    assert stored == {"score": 0.6, "change": c}
