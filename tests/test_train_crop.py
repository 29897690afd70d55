"""Training's random resized crop samples the whole image (as open_clip, FLYP and GIST train), not only its
centre square; evaluation keeps the centre crop. Square images train on the very bits they did before."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from workbench import finetune as ft
from workbench.clip import load_clip
from workbench.data import Dataset
from workbench.data.images import WholeImages, image_cache, whole_image_cache, whole_size
from workbench.finetune import stage
from workbench.finetune.augment import apply_crops, crop_params

RED, BLUE = (255, 0, 0), (0, 0, 255)
MEAN, STD = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # normalisation that leaves pixel values as they are


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def banded(w: int, h: int, band: int) -> np.ndarray:
    """A blue image whose two ends along its long side (``band`` pixels each) are pure red: its centre
    square is all blue."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = BLUE
    if w >= h:
        img[:, :band], img[:, w - band :] = RED, RED
    else:
        img[:band], img[h - band :] = RED, RED
    return img


def noise(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 236, (h, w, 3), dtype=np.uint8)


def dataset(root, images: dict) -> Dataset:
    """``images``: {name: (split, H x W x 3 array)}, one class per image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, (split, arr)) in enumerate(images.items()):
        Image.fromarray(arr).save(root / "images" / f"{name}.png")
        rows.append({"filename": f"images/{name}.png", "split": split, "label": i % 2, "species": f"s{i % 2}"})
    return Dataset("crops", root, pd.DataFrame(rows), ["s0", "s1"])


def trainer(cache, n_images: int, **cfg):
    torch.manual_seed(0)
    clip, _, tok = load_clip("tiny", None, "cpu")
    rows = torch.arange(2 * n_images) % n_images
    texts = [f"s{int(r) % 2}: a bird" for r in rows]
    return ft.Trainer(clip, tok, ft.FinetuneConfig(batch_size=len(rows), epochs=50, **cfg), cache, rows, texts,
                      rows % 2)


def pixels(tr, x: torch.Tensor) -> torch.Tensor:
    """A batch back in 0-255 pixel values."""
    mean, std = torch.tensor(tr.mean).view(1, 3, 1, 1), torch.tensor(tr.std).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def red(x: torch.Tensor) -> torch.Tensor:
    """Pixels that are plainly red (a resampled red-blue edge is not)."""
    return (x[:, 0] > 200) & (x[:, 1] < 60) & (x[:, 2] < 60)


def test_training_crops_see_outside_the_centre_square_and_evaluation_does_not(tmp_path):
    """A landscape 96 x 48 and a portrait 48 x 96 image, red at both ends of the long side: the stage's
    training cache keeps them whole, so training batches show red; the centre crops (the probe's train
    images and the val images) never do."""
    ds = dataset(tmp_path, {"wide": ("train", banded(96, 48, 16)), "tall": ("train", banded(48, 96, 16)),
                            "wide_val": ("val", banded(96, 48, 16))})
    whole, centre, val = stage._image_caches("tiny", None, ds.split("train"), ds.split("val"), False)
    assert isinstance(whole, WholeImages) and whole.images.shape == (2, 3, 64, 85)  # the long side capped at 4/3
    assert whole.sizes.tolist() == [[42, 85], [85, 42]]  # (h, w) as shown: 2:1 resized down whole to fit
    assert not red(centre.float()).any() and not red(val.float()).any()
    tr = trainer(whole, 2)
    seen = [int(red(pixels(tr, tr.batch(s)["images"])).sum()) for s in range(6)]
    assert sum(seen) > 100 and sum(s > 0 for s in seen) >= 3, seen
    # the old path (the centre crops) never shows red
    tr_old = trainer(centre, 2)
    assert all(not red(pixels(tr_old, tr_old.batch(s)["images"])).any() for s in range(6))


def test_square_images_train_on_the_same_bits_as_the_centre_crops(tmp_path):
    """A square image's whole image is its centre crop: the same cache pixels, bit-identical batches."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"sq{i}.png")
        Image.fromarray(noise(80, 80, i)).save(paths[-1])
    whole, centre = whole_image_cache(paths, 64), image_cache(paths, 64)
    assert torch.equal(whole.images, centre) and whole.sizes.tolist() == [[64, 64]] * 3
    new, old = trainer(whole, 3), trainer(centre, 3)
    for s in range(4):
        assert torch.equal(new.batch(s)["images"], old.batch(s)["images"])


def test_a_square_image_beside_wider_ones_samples_what_it_did(tmp_path):
    """On a canvas widened by other images, a square image's crops equal its centre-crop crops up to
    float rounding (its coordinates are renormalised to the wider canvas)."""
    paths = [tmp_path / "sq.png", tmp_path / "wide.png"]
    Image.fromarray(noise(64, 64, 0)).save(paths[0])
    Image.fromarray(noise(85, 64, 1)).save(paths[1])
    whole, centre = whole_image_cache(paths, 64), image_cache(paths[:1], 64)
    assert whole.images.shape[-1] == 85 and torch.equal(whole.images[0, :, :, :64], centre[0])
    p = crop_params(200, (0.08, 1.0), generator=torch.Generator().manual_seed(0))
    new = apply_crops(whole.images[[0] * 200], p, 64, MEAN, STD, sizes=whole.sizes[[0] * 200])
    old = apply_crops(centre[[0] * 200], p, 64, MEAN, STD)
    assert (new - old).abs().max() < 0.5 and (new - old).abs().mean() < 1e-3


@pytest.mark.parametrize("w,h", [(96, 48), (48, 96), (80, 60), (60, 80), (72, 64), (50, 120)])
def test_crops_stay_inside_each_images_region(tmp_path, w, h):
    """Boxes keep within each image's own region, with its own aspect; the canvas outside it is never read:
    painting it another colour changes no output bit (landscape and portrait, capped or not)."""
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "square.png"]
    Image.fromarray(noise(w, h, 0)).save(paths[0])
    Image.fromarray(noise(h, w, 1)).save(paths[1])  # the other orientation
    Image.fromarray(noise(64, 64, 2)).save(paths[2])  # narrower than the canvas: padding to its right
    whole = whole_image_cache(paths, 64)
    nw, nh = whole_size(w, h, 64, 85)
    assert whole.sizes.tolist() == [[nh, nw], [nw, nh], [64, 64]] and whole.images.shape[-1] == max(nw, nh) > 64
    n = 300
    rows = torch.arange(n) % 3
    hw = whole.sizes[rows].float()
    aspect = hw[:, 1] / hw[:, 0]
    p = crop_params(n, (0.08, 1.0), generator=torch.Generator().manual_seed(1), aspect=aspect)
    cx, cy, bw, bh, _ = p.unbind(1)
    eps = 1e-6
    assert ((cx - bw / 2 >= -eps) & (cx + bw / 2 <= 1 + eps) & (cy - bh / 2 >= -eps) & (cy + bh / 2 <= 1 + eps)).all()
    shown = bw * aspect / bh  # width / height of the box in pixels
    assert (shown >= 3 / 4 - 1e-4).all() and (shown <= 4 / 3 + 1e-4).all()
    painted = []
    for value in (0, 255):
        canvas = whole.images.clone()
        for i, (sh, sw) in enumerate(whole.sizes.tolist()):
            sh, sw = (sw, sh) if sh > sw else (sh, sw)  # portrait images lie transposed on the canvas
            canvas[i, :, sh:], canvas[i, :, :, sw:] = value, value
        painted.append(apply_crops(canvas[rows], p, 64, MEAN, STD, sizes=whole.sizes[rows]))
    assert torch.equal(painted[0], painted[1])


def test_a_transposed_portrait_image_is_cropped_upright(tmp_path):
    """A portrait image lies transposed on the canvas; the whole-image crop (no flip) gives it back upright."""
    arr = noise(48, 64, 3)  # 48 wide, 64 tall: short side already 64 -> kept as it is, uncapped
    Image.fromarray(arr).save(tmp_path / "p.png")
    whole = whole_image_cache([tmp_path / "p.png"], 64)
    assert whole.sizes.tolist() == [[85, 64]] and whole.images.shape == (1, 3, 64, 85)
    p = torch.tensor([[0.5, 0.5, 1.0, 1.0, 1.0]])
    out = apply_crops(whole.images, p, 64, MEAN, STD, sizes=whole.sizes)
    h, w = 85, 64  # the image as shown after its resize, squeezed to 64 x 64 by the crop
    upright = torch.from_numpy(np.array(Image.open(tmp_path / "p.png").resize((w, h), Image.BICUBIC)))
    ref = torch.nn.functional.interpolate(upright.permute(2, 0, 1)[None].float(), size=(64, 64), mode="bilinear",
                                          align_corners=False)
    diff = (out - ref).abs()
    # exact but at the far edges, which are sampled a thousandth of a pixel inside (augment.EDGE)
    assert diff[..., :-1, :-1].max() < 1e-3 and diff.max() < 0.5


def test_the_whole_image_cache_is_kept_on_disk_under_its_own_key(tmp_path, monkeypatch):
    """Decoded once: the second call reads the disk (no decode), and the decode also stored the centre crops
    (validation decodes nothing). The key names the layout and the long-side cap, so an entry of another
    layout, or the centre-crop entry of the same files, is never read as this one."""
    from workbench.data import images as im

    paths = [tmp_path / "wide.png", tmp_path / "tall.png"]
    Image.fromarray(noise(96, 48, 0)).save(paths[0])
    Image.fromarray(noise(48, 96, 1)).save(paths[1])
    first = whole_image_cache(paths, 64)
    assert im.image_cache_exists(paths, 64)
    monkeypatch.setattr(im, "decode_whole", lambda *a, **k: pytest.fail("decoded again"))
    again = whole_image_cache(paths, 64)
    assert torch.equal(again.images, first.images) and torch.equal(again.sizes, first.sizes)
    keys = {im._whole_cache_key([str(p) for p in paths], 64, 85), im._whole_cache_key([str(p) for p in paths], 64, 96),
            im._image_cache_key([str(p) for p in paths], 64)}
    assert len(keys) == 3
    monkeypatch.setattr(im, "WHOLE_LAYOUT", im.WHOLE_LAYOUT + 1)
    assert im._whole_cache_key([str(p) for p in paths], 64, 85) not in keys
