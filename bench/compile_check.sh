#!/usr/bin/env bash
# Compile kernels.cu with nvcc against the installed torch's headers: compile only, no GPU and
# no CUDA build of torch needed, so an error in the .cu file fails CI on a CPU machine.
#   bash bench/compile_check.sh [PYTHON]
set -euo pipefail
PY=${1:-.venv/bin/python}
if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile check SKIPPED: nvcc not on PATH"
  exit 0
fi
inc=$($PY -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
pyinc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
abi=$($PY -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
out=$(mktemp -d)
# A CPU wheel of torch ships the c10/cuda headers but not this one header that a CUDA build of
# torch generates at build time; supply the same one-line content for the check.
if ! $PY -c "import torch.utils.cpp_extension as e, os, sys; sys.exit(not any(os.path.exists(os.path.join(p, 'c10/cuda/impl/cuda_cmake_macros.h')) for p in e.include_paths()))"; then
  mkdir -p "$out/inc/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/inc/c10/cuda/impl/cuda_cmake_macros.h"
  inc="$inc -I$out/inc"
fi
nvcc -c kernels.cu -o "$out/kernels.o" -std=c++17 -arch=sm_90 -Xcompiler -fPIC \
  -DTORCH_EXTENSION_NAME=kernels_cuda -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=$abi \
  $inc -I"$pyinc" -Xptxas -v 2> "$out/ptxas.txt" || { cat "$out/ptxas.txt"; exit 1; }
grep -E "Compiling entry|registers|spill" "$out/ptxas.txt" | sed 's/^ptxas info *: //' | head -n 48
echo "compile check OK: kernels.cu compiled with $(nvcc --version | tail -n 1)"
rm -rf "$out"
