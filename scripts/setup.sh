#!/usr/bin/env bash
# Installs lbw-kernels and what it needs into the current Python, on a fresh machine or a
# user's GPU machine alike. A torch that is already importable is kept (a CUDA build stays);
# only where there is none is the CPU build torch==2.13.0 installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch importable; installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi
# Build tools for the C++ extension, then the package itself against the installed torch.
"$PY" -m pip install -q setuptools wheel ninja pybind11 numpy
"$PY" -m pip install -q --no-build-isolation -e ".[test,plots]"
"$PY" -c "import torch, lbw_kernels; print(f'setup: lbw_kernels {lbw_kernels.__version__}, torch {torch.__version__}')"
