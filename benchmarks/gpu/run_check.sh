#!/bin/bash
# On the GPU machine (its own python3, no network), from the checkout's root, with
# benchmarks/gpu/wheels carried along (benchmarks/gpu/fetch_wheels.sh made it): install the
# missing wheels into /tmp/site, then run the whole GPU check into $OUT (default
# /tmp/gpu_check); extra arguments go to the check, e.g.
# `bash benchmarks/gpu/run_check.sh --only step,stack`. The device tool's one-liner:
#   run(command="bash benchmarks/gpu/run_check.sh", carry=["benchmarks/gpu/wheels"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site benchmarks/gpu/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi -L || true
python3 -m benchmarks.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
