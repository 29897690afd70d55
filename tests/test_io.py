"""Atomic writes: the umask is honoured, concurrent writers never share a temp file, large tensor files
are streamed one tensor at a time."""
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench import cache
from workbench.io import atomic_write_bytes, atomic_writer, write_json, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mask, want):
    """metrics.json, JSONL rewrites, tensor files: created as open() would (mkstemp's 0600 was owner-only)."""
    umask(mask)
    write_json(tmp_path / "metrics.json", {"a": 1})
    write_jsonl(tmp_path / "matches.jsonl", [{"a": 1}])
    atomic_write_bytes(tmp_path / "report.html", b"<html/>")
    cache.save_tensors(tmp_path / "best.safetensors", {"w": torch.ones(2)})
    for name in ("metrics.json", "matches.jsonl", "report.html", "best.safetensors"):
        assert _mode(tmp_path / name) == want, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "matches.jsonl", "metrics.json",
                                                         "report.html"]  # no temp file left


def test_two_writers_of_one_path_do_not_share_a_temp_file(tmp_path):
    """A second writer of the same file (another run, another DDP rank) finishing in the middle of the first
    one's write neither truncates nor mixes into it: each streams to a temp file of its own."""
    p = tmp_path / "x.safetensors"
    with atomic_writer(p) as a:
        a.write(b"A" * 1000)
        with atomic_writer(p) as b:
            b.write(b"B" * 10)
        assert p.read_bytes() == b"B" * 10
        a.write(b"A" * 1000)
    assert p.read_bytes() == b"A" * 2000
    with pytest.raises(RuntimeError), atomic_writer(p) as a:
        a.write(b"half")
        raise RuntimeError("writer died")
    assert p.read_bytes() == b"A" * 2000 and [q.name for q in tmp_path.iterdir()] == ["x.safetensors"]


def test_save_tensors_round_trips_every_dtype_and_layout(tmp_path):
    t = {"t": torch.randn(3, 4).T, "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 5),
         "bf16": torch.randn(7).bfloat16(), "i64": torch.arange(10), "bool": torch.rand(4) > 0.5,
         "u8": torch.randint(0, 255, (2, 3), dtype=torch.uint8), "f16": torch.randn(2).half()}
    cache.save_tensors(tmp_path / "a.safetensors", t, {"k": "v"})
    back = load_file(tmp_path / "a.safetensors")
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_cached_tensors_writes_once_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(6).view(2, 3)}

    a = cache.cached_tensors("kind", "key", compute)
    b = cache.cached_tensors("kind", "key", compute)
    assert len(calls) == 1 and torch.equal(a["x"], b["x"])
    assert [p.name for p in (tmp_path / "kind").iterdir()] == ["key.safetensors"]


def test_save_tensors_holds_one_tensor_copy_at_a_time(tmp_path, monkeypatch):
    """Device tensors reach the host one piece at a time: each host copy is freed before the next is made
    (simulated on CPU by making the host copy a real clone and counting the clones still alive)."""
    alive, peak, copied = set(), [0], [0]

    def to_host(part):
        c = part.clone()
        alive.add(id(c))
        weakref.finalize(c, alive.discard, id(c))
        peak[0] = max(peak[0], len(alive))
        copied[0] += c.numel()
        return c

    monkeypatch.setattr(cache, "_to_host", to_host)
    monkeypatch.setattr(cache, "CHUNK_BYTES", 1 << 16)  # big tensors go in several pieces
    state = {f"layer{i}": torch.randn(64, 1024 if i % 2 else 8) for i in range(40)}
    cache.save_tensors(tmp_path / "s.safetensors", state)
    assert peak[0] == 1
    assert copied[0] == sum(v.numel() * 4 for v in state.values())  # every byte went through it once
    back = load_file(tmp_path / "s.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_saving_a_resume_state_does_not_copy_it_in_memory(tmp_path):
    """Peak RSS growth while the resume state is saved, in a fresh process: 48 tensors of 4 MB (192 MB,
    non-contiguous, so each needs a copy, as a device tensor would) may add one tensor's copy plus slack,
    far below the whole state that building the file in a BytesIO holds (the old save_state: +196 MB).
    Slack: 24 MB for allocator and Python noise (the total growth measured 10 MB)."""
    code = textwrap.dedent(f"""
        import resource, torch
        from workbench.finetune.checkpoint import load_state, save_state
        torch.manual_seed(0)
        model = {{f"w{{i}}": torch.randn(1024, 1024).T for i in range(48)}}
        state = {{"model": model, "optimizer": {{"state": {{}}, "param_groups": []}}, "rng": {{}}, "step": 1}}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        save_state({str(tmp_path / "s.safetensors")!r}, state)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        back = load_state({str(tmp_path / "s.safetensors")!r})
        assert all(torch.equal(back["model"][k], v) for k, v in model.items()) and back["step"] == 1
        print(grew // 1024)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    grew_mb = int(out.stdout.split()[-1])
    assert grew_mb <= 4 + 24, f"saving 192 MB of tensors grew the peak RSS by {grew_mb} MB"


def test_an_append_after_a_killed_writer_drops_the_fragment_not_the_file(tmp_path):
    """A writer killed mid-line leaves a fragment; the next append used to glue its record onto it,
    leaving a mid-file line that no reader can parse (train_log.jsonl after kill -9, then a resume)."""
    from workbench.io import append_jsonl, read_jsonl

    p = tmp_path / "train_log.jsonl"
    append_jsonl(p, [{"step": 1}, {"step": 2}])
    with open(p, "a") as f:
        f.write('{"step": 3, "lo')  # killed here
    append_jsonl(p, {"step": 3, "loss": 0.5})
    append_jsonl(p, {"step": 4})
    assert read_jsonl(p) == [{"step": 1}, {"step": 2}, {"step": 3, "loss": 0.5}, {"step": 4}]
    assert p.read_text().count("\n") == 4
