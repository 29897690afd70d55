import time

import pytest
import torch
from safetensors.torch import save_file

from workbench.models import (WeightsUnavailableError, encode_images, encode_texts, load_clip,
                              normalize_images)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("tiny", device="cpu")


def _images(n=6, h=72, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def test_tiny_shapes_and_normalisation(tiny):
    model, _, tok = tiny
    f = encode_images(model, _images(), batch_size=4)
    assert f.shape == (6, 64) and f.dtype == torch.float32
    assert torch.allclose(f.norm(dim=-1), torch.ones(6), atol=1e-5)
    raw = encode_images(model, _images(), normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), f, atol=1e-5)
    t = encode_texts(model, tok, ["a red bird", "a bird with a blue crown", "x"])
    assert t.shape == (3, 64)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < 10e6


def test_batched_equals_one_at_a_time(tiny):
    model, _, tok = tiny
    x = _images(5)
    batched = encode_images(model, x, batch_size=5)
    single = torch.cat([encode_images(model, x[i : i + 1], batch_size=1) for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-5)
    texts = ["a", "a bird with red wings", "a small bird"]
    assert torch.allclose(encode_texts(model, tok, texts), encode_texts(model, tok, texts, batch_size=1), atol=1e-5)


def test_deterministic(tiny):
    model, _, _ = tiny
    x = _images(3)
    assert torch.equal(encode_images(model, x), encode_images(model, x))


def test_normalize_images_matches_manual(tiny):
    model, _, _ = tiny
    x = _images(2, 64, 64)  # already model size: only scaling and mean/std
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(normalize_images(x, model), (x.float() / 255 - mean) / std, atol=1e-6)
    assert normalize_images(_images(2, 90, 70), model).shape == (2, 3, 64, 64)


def test_local_checkpoints_roundtrip(tmp_path, tiny):
    model, _, tok = tiny
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "w.pt")
    x = _images(2)
    ref = encode_images(model, x)
    for f in ("w.safetensors", "w.pt"):
        b = load_clip("tiny", pretrained=str(tmp_path / f), device="cpu")
        assert torch.allclose(encode_images(b.model, x), ref, atol=1e-6)
        assert str(tmp_path / f) in b.model_id
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_clip("tiny", pretrained=str(tmp_path / "missing.safetensors"))


def test_unknown_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown CLIP architecture 'ViT-Nope'"):
        load_clip("ViT-Nope")
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope' for model 'ViT-B-32'"):
        load_clip("ViT-B-32", pretrained="nope")


def test_offline_weights_fail_fast():
    # No machine this project is built on reaches the model hub.
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as e:
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", device="cpu")
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "'ViT-B-32'" in msg and "laion2b_s34b_b79k" in msg and "local path" in msg
