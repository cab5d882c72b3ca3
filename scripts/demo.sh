#!/usr/bin/env bash
# The main job: set up, check every available backend against the reference, time the kernels
# beside torch's AdamW, and train a small LM at stress learning rates with and without the guard.
# Results (JSON + PNG) land in lbw-runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m lbw_kernels info
"$PY" -m lbw_kernels verify
"$PY" -m lbw_kernels bench --quick --out lbw-runs/bench
"$PY" -m lbw_kernels stress --quick --out lbw-runs/stress
echo
echo "demo: plots and JSON are in $(pwd)/lbw-runs/bench and $(pwd)/lbw-runs/stress"
ls lbw-runs/bench/*.png lbw-runs/stress/*.png 2>/dev/null || true
