"""Local transformers backend with a tiny random Llama and a tokenizer built here (no downloads)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from workbench.describe import ChatRequest, generate_descriptions  # noqa: E402
from workbench.describe.hf_local import TransformersBackend  # noqa: E402
from workbench.io import read_json, read_jsonl  # noqa: E402

CLASSES = ["Red Crowned Finch", "Blue Winged Warbler"]
TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_lm():
    corpus = [
        "the male has a red crown and blue wings with a white breast and dark tail",
        "describe the appearance of an adult female juvenile bird species in a photograph",
        "plumage colours patterns head crown back wings tail bill eyes legs feet start with",
        "system user assistant : expert ornithologist precise field guide descriptions",
    ]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<s>", "</s>"]))
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="<s>", eos_token="</s>")
    fast.chat_template = TEMPLATE
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # special tokens get logit 0 (others are random around it), so greedy output is real words
    with torch.no_grad():
        model.lm_head.weight[: len(fast.all_special_ids)] = 0.0
    return model, fast


def _reqs(backend, n=3):
    from workbench.describe.prompts import BIRDS_V1

    out = []
    for i in range(n):
        msgs = BIRDS_V1.messages(CLASSES[i % 2], BIRDS_V1.variants[i % 3])
        out.append(ChatRequest(f"k{i}", msgs, {"seed": i}, {}))
    return out


def test_chat_template_and_batched_greedy_matches_single(tiny_lm):
    model, tok = tiny_lm
    be = TransformersBackend(model, tok, device="cpu", batch_size=3, max_new_tokens=6, temperature=0.0)
    reqs = _reqs(be)
    rendered = be.render(reqs[0].messages)
    assert rendered == tok.apply_chat_template(reqs[0].messages, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<s> system : ") and rendered.endswith("<s> assistant : ")
    batched = be.complete(reqs)
    # independent reference: each prompt alone, no padding, plain greedy argmax loop
    for req, got in zip(reqs, batched):
        ids = tok(be.render(req.messages), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(6):
                nxt = model(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        want = tok.decode(ids[0, -6:], skip_special_tokens=True).strip()
        assert got == want
    lengths = {len(tok(be.render(r.messages), add_special_tokens=False)["input_ids"]) for r in reqs}
    assert len(lengths) > 1  # prompts of different lengths: left padding was exercised


def test_generate_descriptions_deterministic(tiny_lm, tmp_path):
    model, tok = tiny_lm
    runs = []
    for name in ("a", "b"):
        be = TransformersBackend(model, tok, device="cpu", batch_size=4, max_new_tokens=8, temperature=1.0,
                                 deterministic=True)
        res = generate_descriptions(CLASSES, be, domain="birds", n_per_class=3, run_dir=tmp_path / name,
                                    progress=False, seed=1)
        runs.append(res)
        recs = read_jsonl(tmp_path / name / "descriptions.jsonl")
        assert Counter(r["class"] for r in recs) == {c: 3 for c in CLASSES}
        assert all(r["backend"] == "transformers" and r["params"]["deterministic"] for r in recs)
        assert len({r["id"] for r in recs}) == 6
        m = read_json(tmp_path / name / "metrics.json")["describe"]
        assert m["descriptions"] == 6 and m["session"]["requests"] >= 6
    assert [r["text"] for r in runs[0].records] == [r["text"] for r in runs[1].records]
    assert len({r["text"] for r in runs[0].records}) == 6
    # resuming a complete run generates nothing
    be = TransformersBackend(model, tok, device="cpu", batch_size=4, max_new_tokens=8, temperature=1.0,
                             deterministic=True)
    again = generate_descriptions(CLASSES, be, domain="birds", n_per_class=3, run_dir=tmp_path / "a",
                                  progress=False, seed=1)
    assert be.stats()["requests"] == 0 and len(again.records) == 6


def test_loads_straight_onto_the_device_and_records_top_k(tiny_lm, tmp_path, monkeypatch):
    """A model given by name is loaded with ``device_map``/``dtype`` onto its device (not built in host
    memory, then moved); ``top_k``, which ``generate`` applies, is passed explicitly and recorded."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny_lm
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    calls = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    be = TransformersBackend(str(tmp_path / "lm"), device="cpu", dtype="fp32", max_new_tokens=4)
    assert calls[0]["device_map"] == "cpu" and calls[0]["dtype"] == torch.float32
    assert model.generation_config.top_k in (None, 50)
    assert be.sampling()["top_k"] == 50  # what generate applies when the model sets none

    be = TransformersBackend(model, tok, device="cpu", top_k=3, temperature=1.0, max_new_tokens=4)
    assert be.sampling()["top_k"] == 3
    seen = []
    real_generate = be.lm.generate
    monkeypatch.setattr(be.lm, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
    be.complete(_reqs(be, 1))
    assert seen[0]["top_k"] == 3 and seen[0]["do_sample"] is True
