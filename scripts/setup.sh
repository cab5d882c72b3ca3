#!/usr/bin/env bash
# Installs lbw-kernels and what it needs into the current Python, on a fresh machine or a
# user's GPU machine alike. A torch that is already importable is kept (a CUDA build stays);
# only where there is none is torch==2.13.0 installed (the CPU wheel where pip is pointed at
# one, as on the CI machines; PyPI's default for Linux is its CUDA build, several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch importable; installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi
# The installed torch is pinned while the rest installs: pip would otherwise replace it to
# satisfy the extras. The CUDA wheels of torch < 2.10 pin a triton older than the Triton
# backend's 3.6 (torch 2.9.1: triton 3.5.1), for which pip took the newest torch, a CUDA build
# of several GB: such a torch is refused here, before anything is installed.
keep="$(mktemp)"
trap 'rm -f "$keep"' EXIT
"$PY" - "$keep" <<'PYEOF'
import re
import sys
from importlib.metadata import requires, version

torch = version("torch")
for req in requires("torch") or []:
    pin = re.match(r"triton\s*\(?\s*==\s*(\d+)\.(\d+)", req)
    if pin and (int(pin[1]), int(pin[2])) < (3, 6):
        sys.exit(f"setup: torch {torch} pins triton {pin[1]}.{pin[2]}; the Triton backend and the tests need "
                 f"triton >= 3.6 (torch >= 2.10). Nothing was installed. Without the Triton backend: "
                 f"pip install --no-build-isolation -e .")
open(sys.argv[1], "w").write(f"torch=={torch}\n")
PYEOF
# Build tools for the C++ extension, then the package itself against the installed torch.
"$PY" -m pip install -q setuptools wheel ninja pybind11 numpy -c "$keep"
"$PY" -m pip install -q --no-build-isolation -e ".[test,plots]" -c "$keep"
"$PY" -c "import torch, lbw_kernels; print(f'setup: lbw_kernels {lbw_kernels.__version__}, torch {torch.__version__}')"
