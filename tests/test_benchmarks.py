"""The GPU benchmark scripts' own logic, on the CPU: the fine-tuning benchmark times no compile and prints
each model's figures before its reference run; gpu_checks.sh fits its budget and writes only JSON."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_finetune as bf  # noqa: E402

from workbench.clip import load_clip  # noqa: E402
from workbench.data.images import image_cache  # noqa: E402
from workbench.finetune import FinetuneConfig  # noqa: E402
from workbench.finetune.trainer import Trainer  # noqa: E402

CPU = torch.device("cpu")
SHORT, LONG = "species 1: red.", "species 2: " + " ".join(["dark wings long tail"] * 5) + "."


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.set_num_threads(1)


def test_warm_up_compiles_every_text_length_so_the_timed_loop_recompiles_nothing(tmp_path):
    """ViT-L's timing could include a recompile: with 14-34-token captions the compiled text tower meets a
    second trimmed length only after the 4 warm-up steps. Here a compiled tiny CLIP on two caption lengths
    (8 and 32 tokens once bucketed): the old warm-up (the first steps only) leaves a compile in the timed
    loop, and ``timed_recompiles``' counter sees it; the planned warm-up leaves none."""
    paths = bf.write_jpegs(tmp_path, 16, 64, workers=1)
    texts = [LONG if i % 6 == 5 else SHORT for i in range(32)]  # 8-pair batches, some with a long caption
    torch.manual_seed(0)
    clip, _, tok = load_clip("tiny", None, "cpu")
    cfg = FinetuneConfig(batch_size=8, epochs=100, compile=True, validate=False)
    tr = Trainer(clip, tok, cfg, image_cache(paths, 64), torch.arange(32) // 2, texts, torch.arange(32) % 4, CPU)
    warm, candidates = bf.plan_warmup(tr, 1, 6)
    lengths = {tr.text_length(s) for s in candidates}
    first = tr.text_length(0)
    assert lengths | {first} == {8, 32} and len(warm) == 2  # one length is first met after the warm-up step
    bf.warm_up(tr, [0], CPU, math.inf)
    _, recompiles, _ = bf.time_steps(tr, [next(s for s in candidates if tr.text_length(s) != first)], CPU)
    assert recompiles >= 1
    warmed, n, _ = bf.warm_up(tr, warm, CPU, math.inf)
    assert warmed == lengths | {first} and n == 2
    seconds, recompiles, loss = bf.time_steps(tr, candidates, CPU)
    assert recompiles == 0 and seconds > 0 and math.isfinite(loss)


def test_warm_up_stops_at_the_deadline():
    """Warm-up respects the deadline: after the first (compiling) step, a step that would end past it is
    not started."""
    calls = []

    class Slow:
        cfg = FinetuneConfig(compile=True)

        def train_step(self, s):
            calls.append(s)

        def text_length(self, s):
            return 8 * (s + 1)

    warmed, n, _ = bf.warm_up(Slow(), [0, 1, 2], CPU, until=0.0)  # the deadline has passed
    assert calls == [0] and n == 1 and warmed == {8}


def test_each_models_workbench_line_comes_before_its_reference_run(monkeypatch, capsys):
    """The workbench figures are printed the moment they are measured (a timeout during the reference run
    used to lose them), then the full line with today's keys."""
    printed_before_reference = []

    def fake_reference(*a, **k):
        printed_before_reference.append(capsys.readouterr().out)
        return {"reference_pairs_per_s": 10.0, "reference_steps_timed": 3}

    monkeypatch.setattr(bf, "bench_reference", fake_reference)
    bf.main(["--quick", "--images", "16", "--batch-size", "16", "--steps", "2"])
    (before,) = printed_before_reference
    wb = json.loads(before.strip())
    assert wb["part"] == "workbench" and wb["model"] == "tiny" and wb["timed_recompiles"] == 0
    assert {"pairs_per_s", "mfu"} <= set(wb) and "speedup" not in wb
    full = json.loads(capsys.readouterr().out.strip())
    assert {"model", "pairs_per_s", "mfu", "reference_pairs_per_s", "speedup"} <= set(full)
    assert full["speedup"] == pytest.approx(full["pairs_per_s"] / 10.0, rel=1e-3) and "part" not in full


def test_a_model_without_enough_time_is_skipped_with_a_line(monkeypatch, capsys):
    monkeypatch.setattr(bf, "bench_workbench", lambda *a, **k: pytest.fail("started without time"))
    bf.main(["--quick", "--images", "16", "--deadline-s", "1", "--models", "tiny,tiny"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["model"] for x in lines] == ["tiny", "tiny"] and all("skipped" in x for x in lines)


# ------------------------------------------------------------------ gpu_checks.sh
SCRIPT = ROOT / "benchmarks" / "gpu_checks.sh"


def _steps() -> list[tuple[str, int, str]]:
    return [(m[1], int(m[2]), m[3]) for m in re.finditer(r"^\s*step (\S+) (\d+) (.*)$", SCRIPT.read_text(), re.M)]


def test_gpu_checks_fits_480_s_in_the_order_of_value():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    steps = _steps()
    assert sum(limit for _, limit, _ in steps) <= 480, steps
    assert "480 s" in SCRIPT.read_text().split("\n\n")[0]  # the header says so
    order = [cmd for _, _, cmd in steps if "benchmarks/" in cmd or "pytest" in cmd]
    assert "ViT-L-14-336" in order[0] and "bench_match" in order[1] and "ViT-B-16" in order[2]
    assert "bench_probe" in order[3] and "pytest" in order[4]
    for _, limit, cmd in steps:  # the fine-tuning benchmark gets its deadline plus 60 s
        if "bench_finetune" in cmd:
            assert limit == int(re.search(r"--deadline-s (\d+)", cmd)[1]) + 60, cmd


def test_gpu_checks_step_writes_only_json_to_results(tmp_path):
    """results.jsonl got pytest's summary text; now each step's JSON lines and a JSON status line, the rest
    goes to log.txt."""
    step_fn = re.search(r"^step\(\) \{.*?^\}", SCRIPT.read_text(), re.M | re.S)[0]
    script = f"""
        out={tmp_path}; log=$out/log.txt; res=$out/results.jsonl
        {step_fn}
        step mixed 5 bash -c 'echo "3 passed in 1.2s"; echo "{{\\"a\\": 1}}"; echo oops >&2; exit 3'
        step slow 1 sleep 5
    """
    subprocess.run(["bash", "-c", script], check=False)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows[0] == {"a": 1}
    assert rows[1]["step"] == "mixed" and rows[1]["rc"] == 3
    assert rows[2]["step"] == "slow" and rows[2]["rc"] == 124
    log = (tmp_path / "log.txt").read_text()
    assert "3 passed" in log and "oops" in log
