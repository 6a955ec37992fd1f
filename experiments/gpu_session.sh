#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks. Usage: bash experiments/gpu_session.sh "<bench args>"
set -o pipefail
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
python3 experiments/bench_attention.py $1 --out="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
