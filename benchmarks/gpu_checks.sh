#!/usr/bin/env bash
# Every GPU check in one bounded run, for a lent GPU machine that has PyTorch but not
# open_clip: carry its wheels in .whl/ (open_clip_torch, ftfy, wcwidth; benchmarks/fetch_wheels.sh). JSON lines go to
# $OUT/results.jsonl (or benchmarks/out/), logs to $OUT/log.txt. At most about 8 minutes on one H200.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WORKBENCH_CACHE=/tmp/wbcache
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
} 2>&1 | tee "$out/log.txt"
step() {  # step <seconds> <command...>: bounded; stdout (JSON) appended to results.jsonl
  local limit=$1; shift
  echo "== $*" | tee -a "$out/log.txt"
  timeout "$limit" "$@" 2>>"$out/log.txt" | tee -a "$out/results.jsonl"
  echo "rc=${PIPESTATUS[0]}" | tee -a "$out/log.txt"
}
step 90 python3 benchmarks/bench_match.py --device cuda --model ViT-B-32 --quick
step 60 python3 -m pytest -q -p no:cacheprovider tests/test_evaluate.py -k cuda
step 45 python3 benchmarks/bench_probe.py --device cuda --epochs 100
step 45 python3 benchmarks/bench_align.py --device cuda --model ViT-B-16 --pairs 1024 --batch 128
step 290 python3 benchmarks/bench_finetune.py --device cuda --models ViT-B-16,ViT-L-14-336 --deadline-s 270
