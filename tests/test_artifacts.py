"""Reading run artifacts back: local .npz checkpoints (numpy state dicts, big_vision SigLIP exports), and every
unreadable artifact (a checkpoint cut off by a crash, a broken metrics.json, a corrupt cache entry) named in
its error, set aside, or recomputed."""
import json
import warnings

import numpy as np
import open_clip
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from workbench import cache, runs
from workbench.clip import load_clip
from workbench.clip.load import FORMATS
from workbench.finetune.checkpoint import load_state, save_state, save_weights, state_step
from workbench.io import CorruptFileError, read_json, read_jsonl


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("tiny", device="cpu")


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- .npz checkpoints
def test_a_numpy_state_dict_loads_as_other_local_files(tmp_path, tiny):
    path = tmp_path / "weights.npz"
    np.savez(path, **{k: v.numpy() for k, v in tiny.model.state_dict().items()})
    torch.manual_seed(1)  # another random init underneath
    b = load_clip("tiny", pretrained=str(path), device="cpu")
    _same_weights(b.model, tiny.model)
    assert str(path.resolve()) in b.model_id

    sd = {k: v.numpy() for k, v in tiny.model.state_dict().items()}
    sd.pop("logit_scale")
    np.savez(tmp_path / "missing.npz", **sd)
    with pytest.raises(ValueError, match=r"missing\.npz does not fit 'tiny'.*logit_scale"):
        load_clip("tiny", pretrained=str(tmp_path / "missing.npz"), device="cpu")


def test_npz_of_no_accepted_format_is_refused_naming_the_file(tmp_path):
    np.savez(tmp_path / "foreign.npz", foo=np.ones(3), bar=np.zeros((2, 2)))
    with pytest.raises(ValueError) as e:
        load_clip("tiny", pretrained=str(tmp_path / "foreign.npz"), device="cpu")
    msg = str(e.value)
    assert str(tmp_path / "foreign.npz") in msg and FORMATS in msg and "'bar'" not in msg and "bar" in msg
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"objects\.npz.*accepted: \.safetensors, \.npz"):
        load_clip("tiny", pretrained=str(tmp_path / "objects.npz"), device="cpu")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"text\.npz"):
        load_clip("tiny", pretrained=str(tmp_path / "text.npz"), device="cpu")


def test_cut_off_npz_names_the_file(tmp_path, tiny):
    path = tmp_path / "w.npz"
    np.savez(path, **{k: v.numpy() for k, v in tiny.model.state_dict().items()})
    with pytest.raises(CorruptFileError, match=r"w\.npz: not a readable \.npz archive, truncated or corrupt"):
        load_clip("tiny", pretrained=str(_cut(path)), device="cpu")


# A SigLIP-family model small enough for a test: open_clip's SigLIP layout (timm ViT with a MAP head, text
# tower without causal mask, logit bias) at width 32. timm registers only full-size SigLIP ViTs, so the
# tiny trunk is built here; the name has no "siglip" in it, which would make open_clip fetch its tokenizer.
ARCH = "wbtest-bigvision"
_CFG = {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": "wbtest_vit_map", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2,
                     "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}}


@pytest.fixture
def siglip(monkeypatch):
    real = timm.create_model

    def create(name, pretrained=False, **kw):
        if name != "wbtest_vit_map":
            return real(name, pretrained=pretrained, **kw)
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False,
                                 no_embed_class=True, **kw)

    monkeypatch.setattr(timm, "create_model", create)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, ARCH, _CFG)
    torch.manual_seed(0)
    return load_clip(ARCH, device="cpu").model


def _heads(w, heads):  # (out, in) torch weight -> big_vision (in, heads, head_dim) kernel
    return w.T.reshape(w.shape[1], heads, -1)


def _attention(out: dict, p: str, q, k, v, qb, kb, vb, proj, proj_b, heads=2):
    for n, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
        out[f"{p}{n}/kernel"], out[f"{p}{n}/bias"] = _heads(w, heads), b.reshape(heads, -1)
    out[f"{p}out/kernel"] = proj.reshape(proj.shape[0], heads, -1).permute(1, 2, 0)
    out[f"{p}out/bias"] = proj_b


def _big_vision(model) -> dict[str, np.ndarray]:
    """``model``'s weights as big_vision writes a SigLIP checkpoint (the inverse of open_clip's conversion)."""
    t, out = model.visual.trunk, {}
    out["img/embedding/kernel"] = t.patch_embed.proj.weight.permute(2, 3, 1, 0)
    out["img/embedding/bias"], out["img/pos_embedding"] = t.patch_embed.proj.bias, t.pos_embed
    for i, b in enumerate(t.blocks):
        p = f"img/Transformer/encoderblock_{i}/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = b.norm1.weight, b.norm1.bias
        out[p + "LayerNorm_1/scale"], out[p + "LayerNorm_1/bias"] = b.norm2.weight, b.norm2.bias
        _attention(out, p + "MultiHeadDotProductAttention_0/", *b.attn.qkv.weight.chunk(3), *b.attn.qkv.bias.chunk(3),
                   b.attn.proj.weight, b.attn.proj.bias)
        for r, fc in enumerate((b.mlp.fc1, b.mlp.fc2)):
            out[f"{p}MlpBlock_0/Dense_{r}/kernel"], out[f"{p}MlpBlock_0/Dense_{r}/bias"] = fc.weight.T, fc.bias
    out["img/Transformer/encoder_norm/scale"], out["img/Transformer/encoder_norm/bias"] = t.norm.weight, t.norm.bias
    ap, p = t.attn_pool, "img/MAPHead_0/"
    out[p + "probe"] = ap.latent
    _attention(out, p + "MultiHeadDotProductAttention_0/", ap.q.weight, *ap.kv.weight.chunk(2), ap.q.bias,
               *ap.kv.bias.chunk(2), ap.proj.weight, ap.proj.bias)
    out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = ap.norm.weight, ap.norm.bias
    for r, fc in enumerate((ap.mlp.fc1, ap.mlp.fc2)):
        out[f"{p}MlpBlock_0/Dense_{r}/kernel"], out[f"{p}MlpBlock_0/Dense_{r}/bias"] = fc.weight.T, fc.bias
    tx = model.text
    out["txt/Embed_0/embedding"], out["txt/pos_embedding"] = tx.token_embedding.weight, tx.positional_embedding[None]
    for i, b in enumerate(tx.transformer.resblocks):
        p = f"txt/Encoder_0/encoderblock_{i}/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = b.ln_1.weight, b.ln_1.bias
        out[p + "LayerNorm_1/scale"], out[p + "LayerNorm_1/bias"] = b.ln_2.weight, b.ln_2.bias
        _attention(out, p + "MultiHeadDotProductAttention_0/", *b.attn.in_proj_weight.chunk(3),
                   *b.attn.in_proj_bias.chunk(3), b.attn.out_proj.weight, b.attn.out_proj.bias)
        for r, fc in enumerate((b.mlp.c_fc, b.mlp.c_proj)):
            out[f"{p}MlpBlock_0/Dense_{r}/kernel"], out[f"{p}MlpBlock_0/Dense_{r}/bias"] = fc.weight.T, fc.bias
    out["txt/Encoder_0/encoder_norm/scale"], out["txt/Encoder_0/encoder_norm/bias"] = tx.ln_final.weight, tx.ln_final.bias
    out["txt/head/kernel"], out["txt/head/bias"] = tx.text_projection.weight.T, tx.text_projection.bias
    out["b"], out["t"] = model.logit_bias.reshape(1), model.logit_scale.reshape(1)
    return {k: v.detach().numpy().copy() for k, v in out.items()}


def test_a_big_vision_export_loads_through_open_clip(tmp_path, siglip, tiny):
    with torch.no_grad():  # weights unlike any init, so a tensor left at its init would show
        for v in siglip.state_dict().values():
            v.copy_(torch.randn_like(v))
    arrays = _big_vision(siglip)
    np.savez(tmp_path / "bv.npz", **arrays)
    torch.manual_seed(1)
    _same_weights(load_clip(ARCH, pretrained=str(tmp_path / "bv.npz"), device="cpu").model, siglip)

    np.savez(tmp_path / "params.npz", **{f"params/{k}": v for k, v in arrays.items()})  # the root big_vision saves
    _same_weights(load_clip(ARCH, pretrained=str(tmp_path / "params.npz"), device="cpu").model, siglip)

    del arrays["txt/head/bias"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(ValueError, match=rf"partial\.npz does not fit '{ARCH}'.*txt/head/bias"):
        load_clip(ARCH, pretrained=str(tmp_path / "partial.npz"), device="cpu")
    with pytest.raises(ValueError, match=r"bv\.npz is a big_vision export.*not 'tiny'"):
        load_clip("tiny", pretrained=str(tmp_path / "bv.npz"), device="cpu")


# ----------------------------------------------------------------------------- unreadable artifacts
def test_cut_off_checkpoints_name_their_file(tmp_path, tiny):
    best = tmp_path / "checkpoints" / "best.safetensors"
    save_weights(best, tiny.model, {"method": "gist"})
    load_clip("tiny", pretrained=str(best), device="cpu")  # whole, it loads
    with pytest.raises(CorruptFileError, match="truncated or corrupt") as e:
        load_clip("tiny", pretrained=str(_cut(best)), device="cpu")
    assert str(best) in str(e.value) and e.value.path == best
    pt = tmp_path / "w.pt"
    torch.save(tiny.model.state_dict(), pt)
    with pytest.raises(CorruptFileError, match=r"w\.pt: unreadable, truncated or corrupt"):
        load_clip("tiny", pretrained=str(_cut(pt)), device="cpu")


def test_a_cut_off_resume_state_names_its_file_and_what_rewrites_it(tmp_path):
    path = tmp_path / "resume.safetensors"
    save_state(path, {"model": {"w": torch.randn(64, 64)}, "optimizer": {"state": {}, "param_groups": []},
                      "rng": {}, "step": 7})
    assert state_step(path) == 7 and load_state(path)["step"] == 7
    _cut(path)
    for read in (load_state, state_step):
        with pytest.raises(CorruptFileError) as e:
            read(path)
        assert str(path) in str(e.value) and "truncated" in str(e.value) and "03_finetune" in str(e.value)


def test_a_broken_metrics_json_is_set_aside_and_the_stage_goes_on(tmp_path):
    runs.update_metrics(tmp_path, "accuracy", [{"method": "gist", "shots": 1, "seed": 0, "top1": 0.5}])
    metrics = tmp_path / runs.METRICS
    _cut(metrics)
    with pytest.warns(UserWarning) as w:
        assert runs.read_metrics(tmp_path) == {}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("metrics.json.broken-")]
    assert len(aside) == 1 and not metrics.exists()
    msg = str(w[0].message)
    assert str(metrics) in msg and str(aside[0]) in msg and "truncated" in msg
    assert runs.update_metrics(tmp_path, "timing", {"match": 1.0}) == {"timing": {"match": 1.0}}
    assert read_json(metrics) == {"timing": {"match": 1.0}}

    metrics.write_text("[1, 2]\n")  # valid JSON, but not sections
    with pytest.warns(UserWarning, match="holds a JSON list"):
        runs.update_metrics(tmp_path, "timing", {"match": 2.0})
    assert read_json(metrics) == {"timing": {"match": 2.0}}
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("metrics.json.broken-")]) == 2


def test_a_corrupt_cache_entry_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(1000.0)}

    cache.cached_tensors("features", "k", compute)
    entry = _cut(tmp_path / "features" / "k.safetensors")
    with pytest.warns(UserWarning, match=r"k\.safetensors: not a complete safetensors file.*recomputing"):
        got = cache.cached_tensors("features", "k", compute)
    assert len(calls) == 2 and torch.equal(got["x"], torch.arange(1000.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cache.cached_tensors("features", "k", compute)["x"], got["x"])  # healed: read back
    assert len(calls) == 2 and entry.exists()


def test_json_errors_name_the_file_and_line(tmp_path):
    p = tmp_path / "index.json"
    p.write_text(json.dumps([{"a": 1}, {"b": 2}], indent=2)[:-5])
    with pytest.raises(CorruptFileError, match=r"index\.json: truncated: the JSON ends early at line \d+ .*; rerun X"):
        read_json(p, hint="rerun X")
    p.write_text('{\n  "a": 1,\n  oops\n}\n')
    with pytest.raises(ValueError, match=r"index\.json: not valid JSON at line 3, column 3"):
        read_json(p)
    p.write_text("")
    with pytest.raises(CorruptFileError, match="empty file"):
        read_json(p)
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CorruptFileError, match="not UTF-8"):
        read_json(p)


def test_jsonl_keeps_its_recovery_and_names_the_file(tmp_path):
    p = tmp_path / "train_log.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"st')  # the last line cut by a crash: skipped, as before
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}]
    p.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(CorruptFileError, match=r"train_log\.jsonl: line 2 of 3 is not valid JSON"):
        read_jsonl(p)
