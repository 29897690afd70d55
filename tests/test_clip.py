import time

import pytest
import torch
from safetensors.torch import save_file

from workbench.clip import WeightsUnavailableError, encode_images, encode_texts, load_clip, normalize_images


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


def test_normalisation_constants_are_built_once_per_device(tiny, monkeypatch):
    """mean/std tensors were built with torch.tensor(..., device=...) on every call: on CUDA a blocking copy
    (a host-device sync) per training step and per encoded batch. Now once per (values, device)."""
    from workbench.clip import channel_constants
    from workbench.finetune.augment import apply_crops, crop_params

    model, _, _ = tiny
    x, boxes = _images(4, 64, 64), crop_params(4, generator=torch.Generator().manual_seed(0))
    mean, std = (0.25, 0.5, 0.75), (0.2, 0.3, 0.4)  # values no other test uses: the first call builds them
    made, real = [], torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    first = apply_crops(x, boxes, 32, mean, std)
    assert len(made) == 2  # mean and std, once
    assert torch.equal(apply_crops(x, boxes, 32, mean, std), first) and len(made) == 2
    normalize_images(x, model)
    n = len(made)
    normalize_images(x, model)
    assert len(made) == n
    assert channel_constants(mean, std, x.device) is channel_constants(mean, std, x.device)


def test_features_stay_on_the_device_until_the_end(tiny, monkeypatch):
    """encode_uint8 copied each chunk's features to the host (.cpu(), a sync per chunk), encode_texts each
    batch's: now one copy at the end, with the same features."""
    from workbench.clip import encode_uint8

    model, _, tok = tiny
    x = _images(10, 64, 64)
    one_pass = encode_images(model, x, batch_size=10)
    texts = ["a red bird", "a bird with a blue crown", "x"]
    one_text = encode_texts(model, tok, texts)
    calls, real = [], torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    feats = encode_uint8(model, x, batch_size=3, chunk=4)  # 3 chunks, 4 batches
    assert len(calls) == 1
    torch.testing.assert_close(feats, one_pass, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(encode_texts(model, tok, texts, batch_size=1), one_text, atol=1e-5, rtol=1e-4)
    assert len(calls) == 2


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


def test_the_one_text_forward_equals_open_clip():
    """text_forward: pooled = encode_text whether or not the batch is cut after its last EOT; the
    token states' EOT row is the pooled feature; a run_blocks hook sees exactly the transformer's input."""
    from workbench.clip import text_forward, token_mask, trim

    torch.manual_seed(0)
    model, _, tok = load_clip("tiny", device="cpu")
    ids = tok(["toy species 1: a red square", "toy species 2: a much longer caption about a green square"])
    L = int(ids.argmax(-1).max()) + 1
    with torch.no_grad():
        full = model.encode_text(ids)
        pooled, tokens = text_forward(model, ids, tokens=True)
        untrimmed, _ = text_forward(model, ids, trim_eot=False)
        seen = []
        hooked, _ = text_forward(model, ids, run_blocks=lambda x, m: seen.append((x.shape, m.shape)) or model.transformer(x, attn_mask=m))
    assert torch.allclose(pooled, full, atol=1e-5) and torch.allclose(untrimmed, full, atol=1e-5)
    assert trim(ids).shape == (2, L) and tokens.shape == (2, L, full.shape[1])
    assert torch.allclose(tokens[torch.arange(2), ids.argmax(-1)], full, atol=1e-5)  # the EOT row is the pooled feature
    assert seen == [(torch.Size([2, L, model.token_embedding.embedding_dim]), torch.Size([L, L]))]
    assert torch.equal(hooked, pooled)
    # the token mask is by position (SOT..EOT), not by id: id 0 ("!") inside a caption is a real token
    mask = token_mask(tok(["hi ! there", "a"]))
    assert mask.sum(1).tolist() == [5, 3]


def test_feature_cache_tells_random_init_models_apart(tmp_path, monkeypatch):
    """Two random-init models of one architecture share a name and tag but not their weights: the one
    feature cache keys by the weights, so each gets its own features (and a re-run reads them back)."""
    from PIL import Image

    from workbench.clip import image_features

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(_images(1, 64, 64, seed=i)[0].permute(1, 2, 0).numpy()).save(paths[-1])
    torch.manual_seed(1)
    a = load_clip("tiny", device="cpu")
    torch.manual_seed(2)
    b = load_clip("tiny", device="cpu")
    assert a.model_id == b.model_id
    fa, fb = image_features(a, paths), image_features(b, paths)
    assert not torch.allclose(fa, fb)
    assert torch.allclose(fa, encode_images(a.model, torch.stack([_images(1, 64, 64, seed=i)[0] for i in range(3)]),
                                            normalize=False), atol=1e-6)
    assert torch.equal(image_features(b, paths), fb)  # from the cache
    assert len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 2


def test_weights_digest_is_exact_and_thread_independent():
    """The feature cache's key: the same on any thread count (a float sum of the weights was not, so a
    cache written by a 2-thread run missed in a 1-thread one), and changed by one changed weight."""
    from workbench.clip import weights_digest

    torch.manual_seed(3)
    m = load_clip("tiny", device="cpu").model
    saved = torch.get_num_threads()
    try:
        digests = set()
        for n in (1, 2):
            torch.set_num_threads(n)
            digests.add(weights_digest(m))
    finally:
        torch.set_num_threads(saved)
    assert len(digests) == 1
    with torch.no_grad():
        m.visual.proj[0, 0] += 1e-3
    assert weights_digest(m) not in digests
