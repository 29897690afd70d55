"""Fine-tuning: augmentation, pairs, schedule, exact resume, non-finite stop, stage outputs, DDP == one process."""
import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from toydata import make_matches, make_toy_dataset  # noqa: E402

from workbench import finetune as ft  # noqa: E402
from workbench.finetune import step, trainer  # noqa: E402
from workbench.finetune.augment import apply_crops, crop_params, random_resized_crop  # noqa: E402
from workbench.finetune.checkpoint import load_state  # noqa: E402
from workbench.io import read_json, read_jsonl, write_jsonl  # noqa: E402

MEAN, STD = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # normalisation that leaves pixel values as they are


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return make_toy_dataset(root, n_classes=3, n_train=4, n_val=2, n_test=1)


def _tiny(seed=0):
    from workbench.clip import load_clip

    torch.manual_seed(seed)
    return load_clip("tiny", None, "cpu")


def _run_inputs(toy, k=2):
    from workbench.data.images import image_cache

    tr = toy.split("train")
    images = image_cache(tr.paths(), 64)
    rows, texts, labels = ft.build_pairs(tr, "gist", k, make_matches(toy, 3))
    return tr, images, rows, texts, labels


# ------------------------------------------------------------------ augmentation
def test_crop_params_ranges_and_determinism():
    p1 = crop_params(500, (0.25, 1.0), generator=torch.Generator().manual_seed(3))
    p2 = crop_params(500, (0.25, 1.0), generator=torch.Generator().manual_seed(3))
    assert torch.equal(p1, p2)
    cx, cy, w, h, sign = p1.unbind(1)
    assert ((w > 0) & (w <= 1) & (h > 0) & (h <= 1)).all()
    assert ((cx - w / 2 >= -1e-6) & (cx + w / 2 <= 1 + 1e-6) & (cy - h / 2 >= -1e-6) & (cy + h / 2 <= 1 + 1e-6)).all()
    area = w * h
    assert area.min() >= 0.25 - 1e-5 and area.max() <= 1 + 1e-6
    assert 0.4 < (sign < 0).float().mean() < 0.6
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5


def test_whole_image_crop_is_identity_and_flip_mirrors():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = apply_crops(x, torch.tensor([[0.5, 0.5, 1, 1, 1.0], [0.5, 0.5, 1, 1, -1.0]]), 16, MEAN, STD)
    assert torch.allclose(out[0], x[0].float(), atol=1e-3)
    assert torch.allclose(out[1], x[1].flip(-1).float(), atol=1e-3)
    norm = apply_crops(x, torch.tensor([[0.5, 0.5, 1, 1, 1.0]]).expand(2, 5), 16)  # the model's default mean/std
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    assert torch.allclose(norm, (x.float() / 255 - mean) / std, atol=1e-5)


def test_crop_matches_interpolate_of_the_box():
    """A box on pixel edges, resampled 2x down, equals bilinear interpolate of that sub-image."""
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    top, left, hh, ww = 4, 8, 16, 20  # box in pixels
    p = torch.tensor([[(left + ww / 2) / 32, (top + hh / 2) / 32, ww / 32, hh / 32, 1.0]])
    out = apply_crops(x, p, 8, MEAN, STD)  # aspect differs: 20 -> 8 and 16 -> 8
    ref = F.interpolate(x[..., top : top + hh, left : left + ww].float(), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out, ref, atol=1e-3)


def test_random_resized_crop_shapes_dtype_and_bad_input():
    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    a = random_resized_crop(x, 48, generator=torch.Generator().manual_seed(0))
    b = random_resized_crop(x, 48, generator=torch.Generator().manual_seed(0))
    c = random_resized_crop(x, 48, generator=torch.Generator().manual_seed(1))
    assert a.shape == (5, 3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="uint8"):
        random_resized_crop(x.float(), 48)
    with pytest.raises(ValueError, match="scale"):
        crop_params(2, (0.0, 1.0))


# ------------------------------------------------------------------ data, config, schedule
def test_build_pairs(toy):
    tr = toy.split("train")
    rows, texts, labels = ft.build_pairs(tr, "gist", 2, make_matches(toy, 3))
    assert len(rows) == 2 * len(tr) and texts[0].startswith(toy.classnames[int(labels[0])] + ": ")
    assert torch.equal(labels, torch.tensor(tr.labels)[rows])
    rows, texts, labels = ft.build_pairs(tr, "finetune-classname", 4)
    assert len(rows) == len(tr) and texts[0] == f"a photo of a {toy.classnames[int(labels[0])]}."
    with pytest.raises(ValueError, match="no matched captions"):
        ft.build_pairs(tr, "gist", 2, make_matches(toy, 3)[1:])
    bad = make_matches(toy, 3)
    bad[0]["class"] = "toy species 2" if bad[0]["class"] != "toy species 2" else "toy species 0"
    with pytest.raises(ValueError, match="dataset says"):
        ft.build_pairs(tr, "gist", 2, bad)


def test_config_errors_and_schedule():
    with pytest.raises(ValueError, match="loss"):
        ft.FinetuneConfig(loss="triplet")
    with pytest.raises(ValueError, match="method"):
        ft.FinetuneConfig(method="flyp")
    with pytest.raises(ValueError, match=r"compile=True with grad_checkpointing=True .*144637"):
        ft.FinetuneConfig(compile=True, grad_checkpointing=True)
    ft.FinetuneConfig(compile=True), ft.FinetuneConfig(grad_checkpointing=True)  # each alone is fine
    lrs = [ft.lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


# ------------------------------------------------------------------ resume, non-finite
def _losses(log, run):
    return [r["loss"] for r in read_jsonl(log) if r["run"] == run and "loss" in r]


def test_resume_continues_exactly(toy, tmp_path):
    tr, images, rows, texts, labels = _run_inputs(toy)  # 24 pairs, batch 8: 3 steps per epoch
    cfg = dict(epochs=2, batch_size=8, lr=1e-3, validate=False, log_every=1)
    base = _tiny()
    init = {k: v.clone() for k, v in base.model.state_dict().items()}
    full = ft.train_run(base.model, base.tokenizer, ft.FinetuneConfig(**cfg), images, rows, texts, labels,
                        out_dir=tmp_path / "a", log_path=tmp_path / "log.jsonl", run="a")
    assert full["steps"] == 6 and full["status"] == "done"

    m = _tiny()
    m.model.load_state_dict(init)
    part = ft.train_run(m.model, m.tokenizer, ft.FinetuneConfig(**cfg, max_steps=4, checkpoint_every=2), images, rows,
                        texts, labels, out_dir=tmp_path / "b", log_path=tmp_path / "log.jsonl", run="b")
    assert part["status"] == "interrupted" and part["steps"] == 4
    m2 = _tiny(seed=123)  # a fresh process would start from other weights: resume must overwrite them
    rest = ft.train_run(m2.model, m2.tokenizer, ft.FinetuneConfig(**cfg), images, rows, texts, labels,
                        out_dir=tmp_path / "b", log_path=tmp_path / "log.jsonl", run="b")
    assert rest["status"] == "done"
    la, lb = _losses(tmp_path / "log.jsonl", "a"), _losses(tmp_path / "log.jsonl", "b")
    assert len(la) == len(lb) == 6
    assert la == lb  # bit-identical: the resume state holds everything the run depends on
    for k, v in base.model.state_dict().items():
        assert torch.equal(v, m2.model.state_dict()[k]), k
    # a checkpoint written with other settings is refused, not silently mixed
    with pytest.raises(ValueError, match="other settings"):
        ft.train_run(m2.model, m2.tokenizer, ft.FinetuneConfig(**{**cfg, "lr": 5e-4}), images, rows, texts, labels,
                     out_dir=tmp_path / "b", run="b")
    state = load_state(tmp_path / "b" / trainer.STATE_FILE)
    assert state["step"] == 6 and set(state) >= {"model", "optimizer", "scheduler", "rng"}


def test_resume_state_of_another_optimizer_layout_is_refused_clearly(toy, tmp_path, monkeypatch):
    """A resume state written when the optimizer had two groups (before they were split by tower) cannot
    be loaded into today's: the run says so and how to start over, instead of torch's bare ValueError."""
    tr, images, rows, texts, labels = _run_inputs(toy)
    cfg = dict(epochs=2, batch_size=8, lr=1e-3, validate=False, log_every=1)

    def two_groups(clip, weight_decay):
        ps = [p for p in clip.parameters() if p.requires_grad]
        return [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": weight_decay, "tower": "all"},
                {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0, "tower": "all"}]

    monkeypatch.setattr(step, "param_groups", two_groups)  # what make_optimizer groups by
    m = _tiny()
    part = ft.train_run(m.model, m.tokenizer, ft.FinetuneConfig(**cfg, max_steps=2, checkpoint_every=2), images, rows,
                        texts, labels, out_dir=tmp_path / "b", run="b")
    assert part["status"] == "interrupted"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="does not fit this version's optimizer.*resume=False"):
        ft.train_run(m.model, m.tokenizer, ft.FinetuneConfig(**cfg), images, rows, texts, labels,
                     out_dir=tmp_path / "b", run="b")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path, monkeypatch):
    tr, images, rows, texts, labels = _run_inputs(toy)
    calls = {"n": 0}
    real = trainer.compute_loss

    def flaky(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] >= 4 else loss

    monkeypatch.setattr(trainer, "compute_loss", flaky)
    m = _tiny()
    cfg = ft.FinetuneConfig(epochs=2, batch_size=8, validate=False, log_every=1, checkpoint_every=2)
    with pytest.raises(ft.NonFiniteLossError, match=r"loss became nan at step 4.*last good checkpoint.*step 3\)"):
        ft.train_run(m.model, m.tokenizer, cfg, images, rows, texts, labels,
                     out_dir=tmp_path / "c", log_path=tmp_path / "log.jsonl", run="c")
    state = load_state(tmp_path / "c" / trainer.STATE_FILE)
    assert state["step"] == 3  # written at the end of epoch 1, after its losses were checked
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("loss,freeze", [("class-aware", True), ("filip", False)])
def test_other_losses_train(toy, tmp_path, loss, freeze):
    tr, images, rows, texts, labels = _run_inputs(toy)
    m = _tiny()
    text_before = m.model.text_projection.detach().clone()
    vis_before = m.model.visual.proj.detach().clone()
    cfg = ft.FinetuneConfig(loss=loss, freeze_text=freeze, epochs=1, batch_size=12, validate=False, log_every=1)
    r = ft.train_run(m.model, m.tokenizer, cfg, images, rows, texts, labels, log_path=tmp_path / "l.jsonl", run="x")
    assert r["steps"] == 2 and all(math.isfinite(v) for v in _losses(tmp_path / "l.jsonl", "x"))
    assert torch.equal(m.model.text_projection, text_before) == freeze
    assert not torch.equal(m.model.visual.proj, vis_before)


# ------------------------------------------------------------------ the stage
def test_finetune_all_writes_index_log_metrics(toy, tmp_path):
    from workbench.clip import load_clip

    write_jsonl(tmp_path / "matches.jsonl", make_matches(toy, 3))
    rows = ft.finetune_all(tmp_path, toy, model="tiny", pretrained=None, methods=["gist", "finetune-classname"],
                           shots=["full", 1], seeds=[0, 1], epochs=1, batch_size=8, captions_per_image=2,
                           device="cpu", progress=False)
    index = read_json(tmp_path / "checkpoints" / "index.json")
    assert index == json.loads(json.dumps(rows))
    got = sorted((r["method"], str(r["shots"]), r["seed"]) for r in index)
    assert got == sorted([(m, s, sd) for m in ("gist", "finetune-classname") for s, sd in
                          (("full", 0), ("1", 0), ("1", 1))])
    for r in index:
        assert set(r) == {"method", "shots", "seed", "path", "model", "pretrained", "epoch", "val_top1", "loss",
                          "train_images", "train_images_sha256", "val_policy", "identity_digest", "identity"}
        assert r["train_images"] == (3 if r["shots"] == 1 else len(toy.split("train").table))
        assert r["path"].endswith(".safetensors") and (tmp_path / r["path"]).exists()
        assert r["epoch"] in (0, 1) and 0 <= r["val_top1"] <= 100
    load_clip("tiny", pretrained=str(tmp_path / index[0]["path"]), device="cpu")  # loads through the contract
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert {r["run"] for r in log} == {ft.run_name(*k) for k in
                                        [("gist", "full", 0), ("gist", 1, 0), ("gist", 1, 1), ("finetune-classname", "full", 0),
                                         ("finetune-classname", 1, 0), ("finetune-classname", 1, 1)]}
    assert all({"run", "epoch", "step"} <= set(r) and ("loss" in r or "val_top1" in r) for r in log)
    fin = read_json(tmp_path / "metrics.json")["finetune"]
    assert len(fin["runs"]) == 6 and fin["model"] == "tiny"
    assert all(r["attention"] == "default" for r in fin["runs"])  # the kernel each run used (CPU: PyTorch's)
    # 1-shot runs train on exactly one image per class: 3 images x 2 captions for GIST
    one = [r for r in fin["runs"] if r["run"] == "gist-1-s0"][0]
    assert one["pairs"] == 6
    # a second call resumes finished runs without training again (and without duplicate log rows)
    n_log = len(log)
    ft.finetune_all(tmp_path, toy, model="tiny", pretrained=None, methods=["gist"], shots=["full"], seeds=[0],
                    epochs=1, batch_size=8, captions_per_image=2, device="cpu", progress=False)
    assert len(read_jsonl(tmp_path / "train_log.jsonl")) == n_log
    # the index holds this configuration's runs; the others' entries move aside (their files stay)
    assert [r["method"] for r in read_json(tmp_path / "checkpoints" / "index.json")] == ["gist"]
    assert len(read_json(tmp_path / "checkpoints" / "index.stale.json")) == 5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_validation_encodes_at_the_runs_precision(toy, tmp_path, monkeypatch, precision):
    """Validation ran under "auto" whatever the run's precision: bf16 on a GPU even for fp32 runs."""
    from workbench.clip import encode

    seen = []
    real = encode.autocast
    monkeypatch.setattr(encode, "autocast", lambda device, p="auto": seen.append(p) or real(device, p))
    ft.finetune_all(tmp_path, toy, model="tiny", pretrained=None, methods=["finetune-classname"], shots=["full"],
                    seeds=[0], epochs=1, batch_size=8, device="cpu", progress=False, precision=precision)
    assert seen and set(seen) == {precision}


def test_finetune_all_errors_before_work(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="match stage"):
        ft.finetune_all(tmp_path, toy, pretrained=None, methods=["gist"], shots=["full"], device="cpu")
    with pytest.raises(ValueError, match="unknown fine-tuning option"):
        ft.finetune_all(tmp_path, toy, pretrained=None, methods=["finetune-classname"], epoch=3)
    with pytest.raises(ValueError, match="fewer"):
        ft.finetune_all(tmp_path, toy, pretrained=None, methods=["finetune-classname"], shots=[50])


# ------------------------------------------------------------------ DDP
def _ddp_worker(rank, world, port, tmp):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = torch.load(Path(tmp) / "inputs.pt", weights_only=False)
        m = _tiny()
        m.model.load_state_dict(d["init"])
        cfg = ft.FinetuneConfig(**d["cfg"])
        ft.train_run(m.model, m.tokenizer, cfg, d["images"], d["rows"], d["texts"], d["labels"],
                     out_dir=Path(tmp) / "ddp", log_path=Path(tmp) / "ddp.jsonl", run="ddp")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss", ["class-aware", "filip"])
def test_ddp_two_processes_equal_one_process(toy, tmp_path, loss):
    """2 gloo ranks x 6 pairs == 1 process x 12 pairs: same losses, same weights after 2 steps."""
    import torch.multiprocessing as mp

    tr, images, rows, texts, labels = _run_inputs(toy)
    cfg = dict(loss=loss, epochs=1, batch_size=12, validate=False, log_every=1, lr=1e-3)
    m = _tiny()
    init = {k: v.clone() for k, v in m.model.state_dict().items()}
    torch.save({"init": init, "cfg": cfg, "images": images, "rows": rows, "texts": texts, "labels": labels},
               tmp_path / "inputs.pt")
    ft.train_run(m.model, m.tokenizer, ft.FinetuneConfig(**cfg), images, rows, texts, labels,
                 out_dir=tmp_path / "one", log_path=tmp_path / "one.jsonl", run="one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the imported modules (spawning two fresh interpreters costs ~30 s here)
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    l1, l2 = _losses(tmp_path / "one.jsonl", "one"), _losses(tmp_path / "ddp.jsonl", "ddp")
    assert len(l1) == len(l2) == 2
    assert l1 == pytest.approx(l2, rel=1e-5)
    from safetensors.torch import load_file

    w1, w2 = load_file(tmp_path / "one" / "best.safetensors"), load_file(tmp_path / "ddp" / "best.safetensors")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


def _rng_worker(rank, world, port, tmp):
    import torch.distributed as dist

    from workbench.finetune.checkpoint import gather_rng, restore_rng, save_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # each rank's generator in its own state
        torch.rand(3)
        mine = torch.get_rng_state()
        rng = gather_rng(torch.device("cpu"), world)
        if rank == 0:
            save_state(Path(tmp) / "s.safetensors",
                       {"model": {}, "optimizer": {"state": {}, "param_groups": []}, "rng": rng, "step": 1})
        dist.barrier()
        torch.manual_seed(999)
        restore_rng(load_state(Path(tmp) / "s.safetensors")["rng"], rank, torch.device("cpu"))
        torch.save({"mine": mine, "restored": torch.get_rng_state()}, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_resume_state_keeps_each_ranks_rng(tmp_path):
    """The resume state holds every rank's RNG (it held rank 0's and restored it on every rank), and each
    rank restores its own. Checked with the CPU generator over gloo; the CUDA one takes the same path."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rng_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert not torch.equal(got[0]["mine"], got[1]["mine"])
    for g in got:
        assert torch.equal(g["restored"], g["mine"])
    rows = load_state(tmp_path / "s.safetensors")["rng"]["cpu"]
    assert len(rows) == 2 and all(torch.equal(rows[r], got[r]["mine"]) for r in range(2))


def _abort_worker(rank, port, mode):
    import time

    import torch.distributed as dist

    from workbench.finetune.distributed import abort_on_error, init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    init_distributed(use_cuda=False)
    with abort_on_error(poll_s=0.2, grace_s=1.0):
        if mode != "finish" and rank == 0:
            raise RuntimeError("rank 0 fails on purpose")
        if mode == "busy":
            time.sleep(120)  # blocked where it cannot notice a dead peer, as in an NCCL collective
        elif mode == "barrier":
            dist.barrier()
        else:
            time.sleep(rank)  # both succeed, rank 1 a second after rank 0
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["busy", "barrier", "finish"])
def test_ddp_error_on_rank0_ends_every_rank_within_seconds(mode, monkeypatch):
    """torchrun -m workbench.finetune: a rank that raises used to leave the others waiting for the
    collective timeout (10 minutes with NCCL). Here the timeout is 300 s and every rank must end within
    20 s, with an error; ranks that succeed at different times both exit 0."""
    import multiprocessing
    import time

    monkeypatch.setenv("WORKBENCH_DDP_TIMEOUT_S", "300")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_abort_worker, args=(r, port, mode)) for r in range(2)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=60)
        took, codes = time.monotonic() - t0, [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert codes == ([0, 0] if mode == "finish" else [1, 1]), codes
    assert took < 20


def test_ddp_timeout_is_configurable(monkeypatch):
    from datetime import timedelta

    from workbench.finetune.distributed import ddp_timeout

    monkeypatch.delenv("WORKBENCH_DDP_TIMEOUT_S", raising=False)
    assert ddp_timeout() == timedelta(seconds=1800)
    monkeypatch.setenv("WORKBENCH_DDP_TIMEOUT_S", "90")
    assert ddp_timeout() == timedelta(seconds=90)
    for bad in ("0", "ten"):
        monkeypatch.setenv("WORKBENCH_DDP_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="WORKBENCH_DDP_TIMEOUT_S"):
            ddp_timeout()


def test_benchmark_flops_reproduce_open_clip_profile():
    """MFU in the benchmark rests on these: open_clip's profile gives 381.9 + 13.3 and 35.1 + 6.0 GFLOPs."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_finetune import forward_flops

    assert [round(x / 1e9, 1) for x in forward_flops("ViT-L-14-336")] == [381.9, 13.3]
    assert [round(x / 1e9, 1) for x in forward_flops("ViT-B-16")] == [35.1, 6.0]
    assert forward_flops("ViT-B-16", 32)[1] < forward_flops("ViT-B-16")[1] / 2


def test_notebook_runs_and_writes_outputs(tmp_path):
    from workbench.data import load_dataset
    from workbench.pipeline import run_notebook

    small = dict(n_species=3, seed=3, n_train=2, n_val=1, n_test=1)
    ds = load_dataset("synthetic", tmp_path / "syn", **small)
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "matches.jsonl", make_matches(ds, 2))
    params = dict(run_dir=str(run), dataset="synthetic", data_root=str(tmp_path / "syn"), dataset_options=small,
                  pretrained=None, shots=["full"], seeds=[0], epochs=1, batch_size=8, captions_per_image=2,
                  progress=False)
    run_notebook(Path(__file__).parents[1] / "notebooks" / "03_finetune.ipynb", run / "03_finetune.ipynb", params,
                 cwd=run, html=False)
    index = read_json(run / "checkpoints" / "index.json")
    assert sorted(r["method"] for r in index) == ["finetune-classname", "gist"]
    assert (run / "figures" / "finetune_curves.png").stat().st_size > 5000
    assert {r["run"] for r in read_json(run / "metrics.json")["finetune"]["runs"]} == {"gist-full-s0", "finetune-classname-full-s0"}


def test_batches_are_even_and_cover_the_epoch(toy):
    tr_, images, rows, texts, labels = _run_inputs(toy)  # 24 pairs
    m = _tiny()
    t = trainer.Trainer(m.model, m.tokenizer, ft.FinetuneConfig(batch_size=10, epochs=2), images, rows, texts, labels)
    assert (t.steps_per_epoch, t.B, t.total) == (3, 8, 6)
    b = t.batch(0)
    assert b["images"].shape == (8, 3, 64, 64) and b["labels"].shape == (8,)
    # text ids are trimmed to the longest caption in the batch (the causal tower ignores the rest)
    assert b["text"].shape[1] == int(t.eot[t._perm[:8]].max()) + 1 < 77
    seen = torch.cat([t._perm[i * 8:(i + 1) * 8] for i in range(3)])
    assert sorted(seen.tolist()) == list(range(24))


def test_image_cache_goes_to_the_gpu_only_when_training_still_fits(toy):
    """The placement rule, with an H200's numbers on the CPU (ViT-L/14@336 built on the meta device: shapes,
    no memory). The old rule (cache < 30% of the free memory, measured before activations and optimizer
    state exist) put a 34 GB cache on the GPU beside ViT-L at batch 192, whose activations take ~100 GB."""
    import open_clip
    from open_clip.model import CLIP

    from workbench.finetune.memory import Tower, cache_fits, place_images, towers, training_need

    with torch.device("meta"):
        vit_l = CLIP(**open_clip.get_model_config("ViT-L-14-336"))
    assert towers(vit_l) == [Tower(24 * 24 + 1, 1024, 24, 4096), Tower(77, 768, 12, 3072)]
    free = 139e9 - 1.7e9  # an H200 with the fp32 weights loaded
    need = training_need(vit_l, 192, bf16=True, checkpointing=False, text_trains=True)
    assert need > 100e9 and not cache_fits(34e9, free, need)
    assert cache_fits(34e9, free, training_need(vit_l, 20, True, False, True))  # GIST's batch
    ckpt = training_need(vit_l, 192, True, checkpointing=True, text_trains=True)  # keeps block inputs only
    assert ckpt < need / 3 and cache_fits(34e9, free, ckpt)
    assert training_need(vit_l, 192, False, False, True) > need  # fp32 activations take more
    assert training_need(vit_l, 192, True, False, text_trains=False) < need  # a frozen text tower keeps none
    assert not cache_fits(1, free, None)  # an architecture it cannot size: the cache stays on the host
    m = _tiny()
    tr_, images, rows, texts, labels = _run_inputs(toy)
    assert place_images(images, torch.device("cpu"), 0) is images  # on the CPU: as it is, not pinned
    t = trainer.Trainer(m.model, m.tokenizer, ft.FinetuneConfig(batch_size=8), images, rows, texts, labels)
    assert t.images is images


def test_validation_accuracies_are_percent_and_match_a_direct_computation(toy):
    """validate(): zero-shot top-1 equals class-prompt argmax; the ridge probe equals sklearn's Ridge."""
    from sklearn.linear_model import RidgeClassifier

    from workbench.clip import encode_images, encode_texts
    from workbench.data.images import image_cache

    clip, _, tok = _tiny(3)
    tr, va = toy.split("train"), toy.split("val")
    xtr, xva = image_cache(tr.paths(), 64), image_cache(va.paths(), 64)
    ytr, yva = torch.tensor(tr.table["label"].values), torch.tensor(va.table["label"].values)
    r = ft.validate(clip, tok, toy.classnames, xtr, ytr, xva, yva)
    fva, ftr = encode_images(clip, xva), encode_images(clip, xtr)
    per_class = [F.normalize(encode_texts(clip, tok, [t.format(c) for t in ft.ZEROSHOT_TEMPLATES]).mean(0), dim=0)
                 for c in toy.classnames]
    zs = 100 * ((fva @ torch.stack(per_class).T).argmax(1) == yva).double().mean().item()
    assert r["val_zeroshot_top1"] == pytest.approx(zs)
    scale = ((ftr - ftr.mean(0)) ** 2).sum(0).mean().item()  # the probe's ridge is relative to the Gram diagonal
    best = max(100 * (RidgeClassifier(alpha=lam * scale).fit(ftr.double(), ytr).predict(fva.double()) == yva.numpy()).mean()
               for lam in (1e-3, 1e-2, 1e-1, 1.0))
    assert r["val_top1"] == r["val_probe_top1"] == pytest.approx(best)
    assert 0 <= r["val_top1"] <= 100 and r["val_top1"] in {100 * i / len(yva) for i in range(len(yva) + 1)}


def test_compiled_training_steps_equal_eager(toy):
    """Regional torch.compile (the GPU default of the benchmark) changes no number: same losses and
    weights as eager over a few steps, with the text bucketed to multiples of 8 tokens."""
    tr_, images, rows, texts, labels = _run_inputs(toy)  # 24 pairs
    losses, weights = {}, {}
    for comp in (False, True):
        m = _tiny(5)
        cfg = ft.FinetuneConfig(batch_size=8, epochs=2, lr=1e-4, warmup=1, compile=comp, precision="fp32")
        t = trainer.Trainer(m.model, m.tokenizer, cfg, images, rows, texts, labels)
        losses[comp] = [float(t.train_step(s)[0]) for s in range(3)]
        weights[comp] = m.model.visual.proj.detach().clone()
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    torch.testing.assert_close(weights[True], weights[False], atol=1e-5, rtol=1e-4)
    assert losses[False][0] != losses[False][-1]  # it did train


def test_bf16_autocast_keeps_fp32_master_weights(toy):
    """The GPU recipe (bf16 autocast, fp32 master weights), run on CPU: weights and optimizer state stay
    fp32, and updates far below bf16's resolution are not rounded away (GIST's fp16 weights lose them)."""
    tr_, images, rows, texts, labels = _run_inputs(toy)
    out = {}
    for precision in ("fp32", "bf16"):
        m = _tiny(7)
        before = m.model.visual.proj.detach().clone()
        cfg = ft.FinetuneConfig(batch_size=8, epochs=2, lr=1e-6, warmup=0, precision=precision)
        t = trainer.Trainer(m.model, m.tokenizer, cfg, images, rows, texts, labels)
        losses = [float(t.train_step(s)[0]) for s in range(2)]
        assert all(p.dtype == torch.float32 for p in m.model.parameters())
        assert all(v.dtype == torch.float32 for st in t.opt.state.values() for v in st.values() if v.is_floating_point())
        out[precision] = (losses, m.model.visual.proj.detach() - before)
    (l32, d32), (l16, d16) = out["fp32"], out["bf16"]
    assert l16 == pytest.approx(l32, rel=2e-2)
    # lr 1e-6: each update is ~1e-6, far below the bf16 spacing of these weights (~5e-4) - yet it lands
    assert d16.abs().max() < 1e-4 and (d16 != 0).float().mean() > 0.9
    assert torch.nn.functional.cosine_similarity(d16.flatten(), d32.flatten(), dim=0) > 0.9


def test_filip_towers_leave_the_model_as_they_found_it():
    """The FILIP forward returns projected patch tokens, but the vision tower is not left returning
    them: validation (encode_image) must still get the pooled feature."""
    from workbench.finetune.trainer import Towers

    clip, _, tok = _tiny()
    towers = Towers(clip, tokens=True)
    ids = tok(["a red bird", "a blue bird with a long tail"])
    x = torch.randn(2, 3, 64, 64)
    out = towers(x, ids[:, : int(ids.argmax(-1).max()) + 1])
    gh, gw = clip.visual.grid_size
    assert out["image_tokens"].shape == (2, gh * gw, out["image"].shape[1]) and out["text_tokens"].shape[:2] == (2, 9)
    assert clip.visual.output_tokens is False
    with torch.no_grad():
        assert clip.encode_image(x).shape == (2, out["image"].shape[1])


# ------------------------------------------------------------------ runs that learned nothing
def test_run_warnings_say_which_run_and_why():
    healthy = {"run": "gist-full-s0", "status": "done", "steps": 30, "batch_size": 128, "best_epoch": 3,
               "loss_first_epoch": 4.1, "loss_last_epoch": 2.2, "loss_chance": math.log(128), "start_val_top1": 40.0}
    assert ft.run_warnings(healthy) is None
    collapsed = {**healthy, "loss_last_epoch": math.log(128) - 0.01}
    w = ft.run_warnings(collapsed)
    assert w.startswith("run gist-full-s0 collapsed") and f"{math.log(128):.3f}" in w and "unmoved" not in w
    assert "collapsed" in ft.run_warnings({**healthy, "loss_last_epoch": 9.0})  # diverged above chance
    unmoved = ft.run_warnings({**healthy, "best_epoch": 0})
    assert unmoved.startswith("run gist-full-s0 unmoved") and "40.0%" in unmoved
    both = ft.run_warnings({**collapsed, "best_epoch": 0})
    assert "collapsed" in both and "unmoved" in both
    # metrics.json rows of older runs (no loss figures): ln(batch_size) stands in, missing checks are skipped
    old = {"run": "r", "status": "done", "steps": 4, "batch_size": 8, "best_epoch": 2, "val_top1": 50.0}
    assert ft.run_warnings(old) is None and "collapsed" in ft.run_warnings({**old, "loss_last_epoch": math.log(8)})
    assert ft.run_warnings({**healthy, "best_epoch": 0, "status": "interrupted"}) is None  # stopped, not done
    note = ft.warnings_note([healthy, {**healthy, "run": "x", "best_epoch": 0}], runs=["x", "gist-full-s0"])
    assert note.count("**Warning:**") == 1 and "run x unmoved" in note


def test_a_collapsed_run_is_flagged_in_metrics(toy, tmp_path, monkeypatch):
    """Scores that cannot tell captions apart (logit scale 0) keep the loss at ln(batch) exactly and the
    weights still: the run used to pass silently; now its metrics row says collapsed and unmoved."""
    orig = trainer.compute_loss
    monkeypatch.setattr(trainer, "compute_loss",
                        lambda cfg, out, *a, **kw: orig(cfg, {**out, "logit_scale": out["logit_scale"] * 0}, *a, **kw))
    ft.finetune_all(tmp_path, toy, model="tiny", pretrained=None, methods=["finetune-classname"], shots=["full"],
                    seeds=[0], epochs=2, batch_size=6, weight_decay=0.0, device="cpu", progress=False)
    [r] = read_json(tmp_path / "metrics.json")["finetune"]["runs"]
    assert r["loss_chance"] == pytest.approx(math.log(r["batch_size"]))
    assert r["loss_first_epoch"] == pytest.approx(r["loss_chance"], rel=1e-5)
    assert r["loss_last_epoch"] == pytest.approx(r["loss_chance"], rel=1e-5)
    assert r["best_epoch"] == 0
    assert r["warning"] == ft.run_warnings(r)
    assert r["warning"].startswith("run finetune-classname-full-s0 collapsed") and "unmoved" in r["warning"]


def test_torchrun_entry_warns_about_an_unmoved_run(tmp_path):
    """Through `python -m workbench.finetune` (what torchrun starts): a learning rate too small to move
    any weight leaves the starting weights best; the run exits 0 but says so, and metrics.json keeps it."""
    import subprocess

    run = tmp_path / "run"
    sets = ["methods=[finetune-classname]", "shots=[full]", "seeds=[0]", "epochs=1", "batch_size=8", "lr=1e-12",
            "pretrained=null", "device=cpu", "progress=false",
            "dataset_options={n_species: 3, n_train: 2, n_val: 1, n_test: 1, seed: 3}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "workbench.finetune", "--run-dir", str(run),
                          *sum((["--set", s] for s in sets), [])], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    [r] = read_json(run / "metrics.json")["finetune"]["runs"]
    assert r["best_epoch"] == 0 and "unmoved" in r["warning"]
    assert f"workbench.finetune: warning: {r['warning']}" in out.stderr and r["warning"].startswith(f"run {r['run']} ")


def test_notebook_shows_the_warning(tmp_path):
    """03_finetune shows an unmoved run's warning (the sentence comes from the package)."""
    import nbformat

    from workbench.pipeline import run_notebook

    run = tmp_path / "run"
    run.mkdir()
    params = dict(run_dir=str(run), dataset_options=dict(n_species=3, seed=3, n_train=2, n_val=1, n_test=1),
                  pretrained=None, methods=["finetune-classname"], shots=["full"], seeds=[0], epochs=1,
                  batch_size=8, lr=1e-12, progress=False)
    run_notebook(Path(__file__).parents[1] / "notebooks" / "03_finetune.ipynb", run / "03_finetune.ipynb", params,
                 cwd=run, html=False)
    [r] = read_json(run / "metrics.json")["finetune"]["runs"]
    cells = [c for c in nbformat.read(run / "03_finetune.ipynb", 4).cells if c.cell_type == "code"]
    shown = [o["data"]["text/markdown"] for c in cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert f"- **Warning:** {r['warning']}" in shown and "unmoved" in r["warning"]
    # the summary counts unmoved runs per method and shots: 1 of 1 here
    [table] = [o["data"]["text/plain"] for o in cells[-1].outputs if "text/plain" in o.get("data", {})]
    assert "unmoved" in table and "finetune-classname" in table and "finetune-classname-full-s0" in table
    assert ft.unmoved_counts([r])[0] | {"unmoved_runs": None} == {
        "method": "finetune-classname", "shots": "full", "unmoved": 1, "runs": 1, "unmoved_runs": None, "fraction": 1.0}
