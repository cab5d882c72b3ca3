#!/usr/bin/env bash
# C++/CUDA sources in CI (CPU-only machine), so CUDA code cannot rot where no GPU is:
# 1. the torch-free core (CMake) and its ctest suite;
# 2. the CUDA kernels compiled by nvcc for sm_80 and sm_90 (CMake; not run);
# 3. the extension's CUDA bindings compiled against torch's headers, and the kernels once more
#    with the nvcc flags torch's CUDAExtension adds (as setup.py builds them on a GPU machine).
# Called by scripts/test.sh (the README's test command, which .ci/run runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
jobs="${MAX_JOBS:-2}"

if command -v cmake >/dev/null; then
  generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  echo "== csrc: CPU core + ctest"
  cmake -S . -B build/ci-csrc "${generator[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build/ci-csrc -j "$jobs"
  ctest --test-dir build/ci-csrc --output-on-failure
  if command -v nvcc >/dev/null; then
    echo "== csrc: CUDA kernels compiled with $(nvcc --version | tail -1) for sm_80, sm_90 (not run)"
    cmake -S . -B build/ci-cuda "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DLBW_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="80;90" >/dev/null
    cmake --build build/ci-cuda -j "$jobs"
  else
    echo "== csrc: nvcc not found; CUDA compile check SKIPPED"
  fi
else
  echo "== csrc: cmake not found; C++ ctest and CMake CUDA build SKIPPED"
fi

# The bindings (ops_cuda.cpp: ATen/c10 CUDA APIs) are otherwise only compiled by setup.py on a
# CUDA torch. The CPU wheel ships the c10/ATen CUDA headers but not one generated header, and
# no CUDA libraries to link: compile for errors only, against the installed torch's headers
# and the CUDA toolkit's, with a stand-in for that header where torch lacks it.
torch_include="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
cuda_include=
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  [[ -n "$home" && -f "$home/include/cuda_runtime.h" ]] && { cuda_include="$home/include"; break; }
done
if [[ -n "$cuda_include" && -n "$torch_include" ]] && command -v "${CXX:-g++}" >/dev/null; then
  echo "== csrc: CUDA bindings (csrc/bindings/ops_cuda.cpp) compiled against torch's headers (not linked)"
  out=build/ci-cuda-bindings
  rm -rf "$out" && mkdir -p "$out/include/c10/cuda/impl"
  [[ -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]] ||
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out/include/c10/cuda/impl/cuda_cmake_macros.h"
  "${CXX:-g++}" -std=c++20 -fsyntax-only -Wall -DLBW_WITH_CUDA -DUSE_CUDA -isystem "$out/include" \
    -isystem "$torch_include" -isystem "$torch_include/torch/csrc/api/include" -isystem "$cuda_include" \
    -Icsrc csrc/bindings/ops_cuda.cpp
  if command -v nvcc >/dev/null; then
    # no implicit half/bfloat16 conversions or operators under these flags
    echo "== csrc: CUDA kernels compiled with torch's extension nvcc flags (sm_90, not run)"
    read -ra torch_nvcc_flags < <("$PY" -c 'import torch.utils.cpp_extension as e; print(" ".join(e.COMMON_NVCC_FLAGS))')
    for cu in multi_tensor_cuda controller_cuda; do
      nvcc -c "csrc/cuda/$cu.cu" "${torch_nvcc_flags[@]}" -std=c++20 -O3 -lineinfo --fmad=false \
        -gencode arch=compute_90,code=sm_90 -DLBW_WITH_CUDA -Icsrc -o "$out/$cu.o"
    done
  fi
else
  echo "== csrc: CUDA toolkit headers or torch not found; CUDA bindings compile check SKIPPED"
fi
