#!/usr/bin/env bash
# Download the wheels that gpu_checks.sh installs on a lent GPU machine (Python 3.12, x86-64, which
# has torch but not open_clip) into .whl/, kept out of git. Run here, then carry ".whl" in the call.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
ls .whl
