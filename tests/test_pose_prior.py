"""Pose variation of the synthetic benchmark and the pointing game's baselines that read no alignment:
the part-location prior and a random patch on the bird (checked by hand and on a small draw)."""
import math

import numpy as np
import pytest
import torch

from workbench.align import pointing
from workbench.align.regions import object_regions, part_items, part_regions
from workbench.data import synthetic as syn
from workbench.data.synthetic_render import PART_ID, render_bird, sample_nuisance

ATTRS = {"crown_color": "red", "wing_color": "blue", "breast_color": "yellow", "breast_pattern": "spotted",
         "beak_shape": "hooked", "tail_size": "long"}


def _draws(pose, n=200, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_nuisance(rng, 64, occlusion=0.0, pose=pose) for _ in range(n)]


def test_pose_draws_come_after_the_old_ones():
    """The pose is drawn after every other nuisance, so a posed image keeps its background, texture,
    noise and occluder, and pose 0 draws nothing more (test_synthetic pins pose 0's bytes to version 2's)."""
    moved = ("scale", "x", "y", "rotation")
    for seed in range(20):
        flat = sample_nuisance(np.random.default_rng(seed), 64)
        posed = sample_nuisance(np.random.default_rng(seed), 64, pose=1.0)
        assert "rotation" not in flat and "rotation" in posed
        assert {k: v for k, v in posed.items() if k not in moved} == {k: v for k, v in flat.items() if k not in moved}


def test_pose_ranges_on_a_draw():
    nz = _draws(1.0)
    rot = np.array([z["rotation"] for z in nz])
    scale = np.array([z["scale"] for z in nz])
    assert np.abs(rot).max() <= math.radians(20) + 1e-6 and rot.std() > math.radians(8)
    assert 0.30 <= scale.min() and scale.max() <= 0.46 and scale.min() < 0.32
    # where a part lies varies far more: the spread of the crown's centroid, in pixels (birds facing right)
    def spread(draws):
        c = np.array([np.argwhere(render_bird(ATTRS, z, 64)[1] == PART_ID["crown"]).mean(0)
                      for z in draws if not z["flip"]])
        return np.linalg.norm(c.std(0))
    assert spread(nz) > 2.5 * spread(_draws(0.0))  # 10.3 against 3.2 pixels
    with pytest.raises(ValueError, match="pose must be in"):
        sample_nuisance(np.random.default_rng(0), 64, pose=1.5)


def test_posed_birds_stay_in_the_frame_and_turn():
    """At least 80% of the bird's pixels stay in the image, and a rotation moves the head."""
    for nz in _draws(1.0, 40, seed=1):
        _, lab = render_bird(ATTRS, nz, 64)
        _, full = render_bird(ATTRS, {**nz, "x": 0.5, "y": 0.5, "rotation": 0.0}, 64)
        assert (lab > 0).sum() >= 0.8 * (full > 0).sum()
    base = {**_draws(0.0, 1)[0], "flip": False, "x": 0.5, "y": 0.5, "noise": 0.0}
    crown = lambda r: np.argwhere(render_bird(ATTRS, {**base, "rotation": r}, 64)[1] == PART_ID["crown"]).mean(0)  # noqa: E731
    # Positive rotation lifts the head (rows grow downwards): the crown's centroid moves up.
    assert crown(0.3)[0] < crown(0.0)[0] - 1


def test_dataset_option_pose(tmp_path):
    opts = dict(n_species=3, n_train=2, n_val=1, n_test=1)
    flat = syn.load(tmp_path / "flat", **opts, pose=0.0)
    posed = syn.load(tmp_path / "posed", **opts)  # the default
    assert syn.DEFAULTS["pose"] == 1.0
    assert "rotation" not in flat.table.columns and "pose" not in (tmp_path / "flat" / "config.json").read_text()
    assert posed.table["rotation"].abs().max() > 0 and posed.extras["config"]["pose"] == 1.0
    assert syn.config_key(**opts, pose=0.0) != syn.config_key(**opts)
    assert syn.load(tmp_path / "flat").extras["config"]["pose"] == 0.0  # a config.json without pose: pose 0
    with pytest.raises(ValueError, match="other options"):
        syn.load(tmp_path / "flat", **opts, pose=1.0)
    with pytest.raises(ValueError, match="pose must be in"):
        syn.load(tmp_path / "bad", pose=-0.1)


def _item(index, part, region):
    return pointing.PartItem(index, part, f"a bird with a {part}", part, region)


def test_part_prior_and_baselines_by_hand():
    """4 x 4 pixels, a 2 x 2 grid. The prior is the mean patch cover; its hottest patch is scored like a map;
    a random bird patch hits with the share of the bird's patches that touch the part."""
    def mask(*cells):  # patch (row, col) -> its 2 x 2 pixels
        m = torch.zeros(4, 4, dtype=torch.bool)
        for r, c in cells:
            m[2 * r: 2 * r + 2, 2 * c: 2 * c + 2] = True
        return m

    train = {"a": {"head": mask((0, 0))}, "b": {"head": mask((0, 0))}, "c": {"head": mask((0, 1)), "tail": mask((1, 1))}}
    prior = pointing.part_prior(train, (2, 2))
    assert torch.allclose(prior["head"], torch.tensor([[2 / 3, 1 / 3], [0.0, 0.0]]))
    assert torch.allclose(prior["tail"], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    items = [_item(0, "head", mask((0, 0))), _item(0, "tail", mask((1, 0))), _item(1, "head", mask((0, 1)))]
    objects = torch.stack([mask((0, 0), (1, 0), (1, 1)), mask((0, 1), (1, 1))])
    out = pointing.baseline_scores(items, (2, 2), prior, objects)
    p, r = out["prior"], out["random_bird_patch"]
    assert list(p["_hit"]) == [True, False, False] and p["score"] == pytest.approx(1 / 3)
    assert p["per_part"]["head"] == {"score": 0.5, "chance": 0.25, "n": 2}
    # prior's argmax for item 0 (head) is patch (0,0): the tail (1,0) is not there; for item 1 (tail) patch (1,1)
    assert p["other_parts"] == pytest.approx(0.0)
    assert np.allclose(r["_hit"], [1 / 3, 1 / 3, 1 / 2]) and r["score"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    assert r["other_parts"] == pytest.approx(1 / 3)  # image 0: each of its two parts is 1 of 3 bird patches
    assert p["image_agnostic"] and not p["word_specific"] and p["score_ci95"][0] <= p["score"] <= p["score_ci95"][1]
    with pytest.raises(ValueError, match="no map for parts \\['wing'\\]"):
        pointing.baseline_scores([_item(0, "wing", mask((0, 0)))], (2, 2), prior)
    # vs: paired over the same queries, in points
    v = pointing.versus({"_hit": np.array([True, True, False])}, p)
    assert v["diff"] == pytest.approx(100 / 3)


def test_pose_variation_defeats_the_prior_on_a_small_draw(tmp_path):
    """The prior built on the training split points at the part on held-out images of the centred
    benchmark (pose 0), and far less often once the pose varies (pose 1)."""
    scores = {}
    for pose in (0.0, 1.0):
        ds = syn.load(tmp_path / f"p{pose}", n_species=4, n_train=20, n_val=10, n_test=1, pose=pose)
        prior = pointing.part_prior(part_regions(ds.split("train"), 64), (8, 8))
        items, files = part_items(ds.split("val"), 64)
        objects = object_regions(ds, 64, files)
        assert objects.shape == (len(files), 64, 64)
        for it in items:  # every part lies on the bird
            assert (it.region & ~objects[it.index]).sum() == 0
        scores[pose] = pointing.baseline_scores(items, (8, 8), prior, objects)
    assert scores[0.0]["prior"]["score"] > 0.5
    assert scores[1.0]["prior"]["score"] < 0.6 * scores[0.0]["prior"]["score"]
    # the random bird patch hardly depends on the pose: the bird's share of each part stays the same
    assert abs(scores[1.0]["random_bird_patch"]["score"] - scores[0.0]["random_bird_patch"]["score"]) < 0.08
