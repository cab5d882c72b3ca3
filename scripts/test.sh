#!/usr/bin/env bash
# The test command: set up, then run the whole CPU test suite (Triton kernels through its
# interpreter, the C++ extension as built here; GPU tests skip with their reason).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m pytest -q tests "$@"
