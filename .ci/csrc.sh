#!/usr/bin/env bash
# C++/CUDA sources in CI (CPU-only machine): build the torch-free core and run its ctest
# suite, then compile the CUDA kernels for sm_80 and sm_90 with nvcc without running them, so
# CUDA code cannot rot where no GPU is. Called by scripts/test.sh (the README's test command,
# which .ci/run runs).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${MAX_JOBS:-2}"
if ! command -v cmake >/dev/null; then
  echo "== csrc: cmake not found; C++ ctest and CUDA compile check SKIPPED"
  exit 0
fi
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
