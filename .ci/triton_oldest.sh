#!/usr/bin/env bash
# The Triton kernels on the oldest Triton we support (3.6, the GPU machines'), beside the newest
# that scripts/setup.sh installs: a venv that sees the installed torch and lbw_kernels but has
# its own triton==3.6.0, running the Triton backend's tests (interpreter against the
# reference, and every kernel variant compiled for sm_80/sm_90). Called by scripts/test.sh;
# LBW_SKIP_TRITON_OLDEST=1 skips it (for example offline: it downloads triton once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OLDEST=3.6.0
if [[ "${LBW_SKIP_TRITON_OLDEST:-0}" == 1 ]]; then
  echo "== triton $OLDEST: SKIPPED (LBW_SKIP_TRITON_OLDEST=1)"
  exit 0
fi
venv=build/venv-triton-$OLDEST
if ! "$venv/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$OLDEST')" 2>/dev/null; then
  rm -rf "$venv"
  "$PY" -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --no-deps "triton==$OLDEST"
fi
echo "== triton $("$venv/bin/python" -c 'import triton; print(triton.__version__)'): tests/test_triton_backend.py"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py "$@"
