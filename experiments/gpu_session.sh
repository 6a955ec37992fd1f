#!/usr/bin/env bash
# One device call: the GPU kernel suite, then the attention benchmark; logs and JSON under $OUT.
# Usage: bash experiments/gpu_session.sh "<bench_attention.py args>" [pytest -k expression]
set -o pipefail
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -m pytest -v -m gpu tests/test_kernels_gpu.py -p no:cacheprovider --durations=5 ${2:+-k "$2"} 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -30
python3 experiments/bench_attention.py $1 --out="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
