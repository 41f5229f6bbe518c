#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU box whose python3 already has torch:
#   bash bench/gpu.sh [OUT_DIR]
# Runs the test suite (CUDA tests included) and the sampler benchmark in bf16.
set -uo pipefail
out=${1:-${OUT:-/tmp}}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt" | tail -n 15
python3 bench/sampler.py --device=cuda --dtype=bfloat16 2>&1 | tee "$out/gpu_bench_sampler.txt" | tail -n 6
