#!/usr/bin/env bash
# The Triton kernels on the oldest Triton we support (3.6, the GPU machines'), beside the newest
# that scripts/setup.sh installs: triton==3.6.0 goes into its own folder, put first on
# PYTHONPATH, and the Triton backend's tests (and its launch route's) run again with the same Python, torch and
# lbw_kernels (interpreter against the reference, and every kernel variant compiled for
# sm_80/sm_90). Called by scripts/test.sh. Skipped where triton has no wheels (not Linux) and,
# with a message, when the download fails (offline); LBW_SKIP_TRITON_OLDEST=1 skips it too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OLDEST=3.6.0
target=build/triton-$OLDEST
if [[ "${LBW_SKIP_TRITON_OLDEST:-0}" == 1 ]]; then
  echo "== triton $OLDEST: SKIPPED (LBW_SKIP_TRITON_OLDEST=1)"
  exit 0
fi
if [[ "$(uname -s)" != Linux ]]; then
  echo "== triton $OLDEST: SKIPPED (triton publishes Linux wheels only)"
  exit 0
fi
version() { PYTHONPATH="$target" "$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || true; }
if [[ "$(version)" != "$OLDEST" ]]; then
  rm -rf "$target"
  if ! "$PY" -m pip install -q --no-deps --target "$target" "triton==$OLDEST"; then
    echo "== triton $OLDEST: SKIPPED: could not install it (offline?); the newest Triton was tested above"
    exit 0
  fi
fi
echo "== triton $(version) ($target first on PYTHONPATH): tests/test_triton_backend.py tests/test_triton_launch.py"
PYTHONPATH="$PWD/$target${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_triton_launch.py "$@"
