#!/usr/bin/env bash
# Every GPU check in one bounded run on a lent H200: at most 480 s of command time, install included
# (the step limits below add up to 480 s; call it with a timeout of 500 s or more). For a machine that
# has PyTorch but not open_clip: carry its wheels in .whl/ (open_clip_torch, ftfy, wcwidth;
# benchmarks/fetch_wheels.sh). Checks run in order of value, so a cut-short run loses the least:
# ViT-L-14-336 fine-tuning, matching, ViT-B-16 fine-tuning, the probe, the CUDA tests.
# $OUT/results.jsonl (or benchmarks/out/) receives JSON lines only: each check's own lines and one
# {"step", "rc", "limit_s", "seconds"} line per step (rc 124: the step hit its limit); all other output
# goes to $OUT/log.txt. bench_finetune.py gets its --deadline-s plus 60 s: compiling cannot be interrupted.

set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}; mkdir -p "$out"
log=$out/log.txt; res=$out/results.jsonl
export PYTHONUNBUFFERED=1 WORKBENCH_CACHE=/tmp/wbcache

step() {  # step <name> <seconds> <command...>: bounded; JSON lines of its stdout to results, all to the log
  local name=$1 limit=$2 t0=$SECONDS rc; shift 2
  echo "== $name (limit $limit s): $*" >>"$log"
  timeout "$limit" "$@" 2>>"$log" | tee -a "$log" | grep --line-buffered -E '^\{.*\}$' >>"$res"
  rc=${PIPESTATUS[0]}
  printf '{"step": "%s", "rc": %d, "limit_s": %d, "seconds": %d}\n' "$name" "$rc" "$limit" $((SECONDS - t0)) >>"$res"
  return "$rc"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  step install 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step versions 15 python3 -c "import json, torch, open_clip; p = torch.cuda.get_device_properties(0)
print(json.dumps({'gpu': p.name, 'memory_gb': round(p.total_memory / 2**30, 1), 'torch': torch.__version__,
                  'cuda': torch.version.cuda, 'open_clip': open_clip.__version__}))"
step finetune-vit-l 210 python3 benchmarks/bench_finetune.py --device cuda --models ViT-L-14-336 --deadline-s 150 --budget-s 90
step match 60 python3 benchmarks/bench_match.py --device cuda --model ViT-B-32 --quick --time-limit 35
step finetune-vit-b 115 python3 benchmarks/bench_finetune.py --device cuda --models ViT-B-16 --deadline-s 55 --images 1200
step probe 25 python3 benchmarks/bench_probe.py --device cuda --epochs 100
step cuda-tests 25 python3 -m pytest -q -p no:cacheprovider tests/test_evaluate.py -k cuda
exit 0
