#!/usr/bin/env bash
# The test command: set up, build and run the torch-free C++ core's ctest and compile the CUDA
# kernels with nvcc where it exists (.ci/csrc.sh), then the whole CPU test suite (Triton
# kernels through its interpreter, the C++ extension as built here; GPU tests skip with
# their reason), then the Triton backend's tests once more on Triton 3.6 (.ci/triton_oldest.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
bash .ci/csrc.sh
"$PY" -m pytest -q tests "$@"
bash .ci/triton_oldest.sh
