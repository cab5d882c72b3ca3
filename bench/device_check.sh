#!/usr/bin/env bash
# One check on a lent GPU machine (Python 3.12, torch CUDA, triton, nvcc, ninja, no internet):
# install (builds the C++/CUDA extension), info, the benchmarks on the three full layouts, the
# GPU tests, launch geometry candidates and the exact gate without its early telemetry pass,
# each step split into host prefix, kernels and gaps (timeline.txt), a host-time profile and
# the step's Python path on this host's CPU alone, the torch-free CUDA build (memory floor,
# test binary), verify. Everything lands in the output folder: one
# log per phase, bench JSON+PNG per layout, results/ (the JSON under the names bench/results/
# keeps), targets.md (targets-eager.md then targets-graphs.md), timeline.txt and timeline.jsonl
# (timeline-<layout>.*, one layout after the other), tune-N/, tune.txt, tune_table.md and
# summary.txt with each phase's exit status and time. Each file is written afresh by the phase
# that makes it (the combined ones rebuilt from their parts), so a rerun into the same folder
# replaces what it reruns instead of mixing two runs in one file.
#
#   bash bench/device_check.sh [OUTPUT_FOLDER]      # default: $OUT, else ./device-check
#
# Each phase runs under its own time limit, and all of them under LBW_CHECK_BUDGET whole
# seconds (default 450: under 8 minutes on an H100 with margin; anything else is refused,
# exit 2, before any phase runs); a phase's limit leaves room for timeout's 10 s between
# SIGTERM and SIGKILL, so no phase ends past the budget. A phase that fails or times out is
# recorded and the next one runs ("TIMED OUT or KILLED": rc 137, a SIGKILL, from timeout or
# from the kernel's OOM killer alike). The exit status is non-zero when any phase failed.
# Order: the timing targets (TinyLlama, then 2000 x 65,536, and their verdicts) come before the
# long test phases, so a hanging test cannot cost the numbers; then the tests; then what says whether a
# row's distance to its target is host time (the steps captured in CUDA graphs, the timelines,
# the host profiles); then the tuning candidates, GPT-2's layout (no target of its own), the
# CUDA build and verify (results already on record last). Every phase's output is kept either way.
# LBW_CHECK_ARCHIVE=FILE.tgz: after every phase, the whole folder is packed into FILE (and
# summary.txt and results/*.json copied beside it): for hosts that return only a few files,
# and so that a kill from outside still leaves everything up to the last finished phase.
# Knobs for a dry run elsewhere: LBW_CHECK_SKIP_INSTALL=1, LBW_CHECK_LAYOUTS="gpt2-quick",
# LBW_CHECK_BENCH_BACKENDS="cpp".
# For a second, shorter run in the same lease (after a fix): LBW_CHECK_SKIP="bench_* tune_*"
# (phases whose names match one of these patterns, separated by spaces or newlines, are
# recorded as skipped, not run; the targets phase then fails unless the folder holds the bench
# JSON of a first run) and
# LBW_CHECK_TESTS="tests/test_x.py" (what tests_gpu runs instead of every GPU test).
# LBW_COMMIT=<sha>: the commit to record where the checkout's .git is not its tree's (the
# device tool's copy of a working tree kept the session's first .git).
set -u

# Checked before anything runs: inside phase() a budget that is not a number is an arithmetic
# error, which skipped every phase without a line in summary.txt and still exited 0.
BUDGET="${LBW_CHECK_BUDGET:-450}"
if [[ ! $BUDGET =~ ^[0-9]+$ ]]; then
    echo "LBW_CHECK_BUDGET must be whole seconds, got '$BUDGET'" >&2
    exit 2
fi
BUDGET=$((10#$BUDGET))  # (a leading 0 would read as octal in the arithmetic below)
# Split on spaces, tabs and newlines alike (read -d '': up to a NUL there is none of, so read
# returns 1 at the end of its input: harmless without set -e), no file globbing.
read -d '' -ra SKIP_PATTERNS <<<"${LBW_CHECK_SKIP:-}"

OUT_DIR="${1:-${OUT:-./device-check}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."

# The Python that holds torch: python3 on the GPU machines (a bare `python` may not exist).
PY="${PYTHON:-python3}"
START=$(date +%s)
SUMMARY="$OUT_DIR/summary.txt"
FAILED=0
: >"$SUMMARY"
KILL_AFTER=10  # timeout's grace between SIGTERM and SIGKILL, part of a phase's worst case

# phase NAME LIMIT_S COMMAND...: run COMMAND with at most LIMIT_S seconds (less when the
# overall budget is nearly spent), output to NAME.log, one line in summary.txt.
phase() {
    local name=$1 limit=$2
    shift 2
    local pattern
    for pattern in "${SKIP_PATTERNS[@]}"; do
        if [[ $name == $pattern ]]; then  # (unquoted on the right: a pattern)
            echo "$name SKIPPED (LBW_CHECK_SKIP)" | tee -a "$SUMMARY"
            return
        fi
    done
    # A command that ignores SIGTERM runs KILL_AFTER seconds past its limit: taken off here,
    # so that even then the phase ends within the budget.
    local left=$((BUDGET - ($(date +%s) - START) - KILL_AFTER))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "$name SKIPPED (overall budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"
        FAILED=1
        return
    fi
    local t0=$(date +%s)
    timeout --kill-after=$KILL_AFTER "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    ((rc == 124)) && verdict="TIMED OUT"
    # 137 is SIGKILL: timeout's, after the grace, or the OOM killer's; the rc cannot tell which.
    ((rc == 137)) && verdict="TIMED OUT or KILLED"
    ((rc != 0 && rc != 124 && rc != 137)) && verdict=FAILED
    # pytest's 5: nothing collected (no GPU-marked tests yet): recorded, not a failure.
    if [[ $rc == 5 && $name == tests_* ]]; then verdict="NO TESTS COLLECTED"; rc=0; fi
    ((rc != 0)) && FAILED=1
    echo "$name $verdict rc=$rc $(($(date +%s) - t0))s (limit ${limit}s)" | tee -a "$SUMMARY"
    snapshot
}

# The bench JSON under the names bench/results/ keeps (<device>-<layout>-<date>.json).
collect_results() {
    "$PY" - "$OUT_DIR" <<'PY' || true
import json, re, shutil, sys
from pathlib import Path
out = Path(sys.argv[1])
for src in sorted(out.glob("bench-*/bench.json")):
    rep = json.loads(src.read_text())
    dev = re.sub(r"[^a-z0-9]+", "-", rep["environment"]["device_name"].lower()).strip("-")
    date = rep["environment"]["date"][:10].replace("-", "")
    (out / "results").mkdir(exist_ok=True)
    for table in rep["tables"]:
        variant = src.parent.name.removeprefix(f"bench-{table['layout']}")  # "" or e.g. "-direct"
        dst = out / "results" / f"{dev}-{table['layout']}{variant}-{date}.json"
        shutil.copyfile(src, dst)
        print(f"results: {dst}")
PY
}

# concat DEST FILE...: DEST rebuilt from those of the FILEs that exist, in order (the
# combined files other instructions read, each part written afresh by its own phase).
concat() {
    local dest=$1 part
    shift
    for part; do
        [[ -f $part ]] && cat "$part"
    done >"$dest"
    return 0
}

# targets_md KIND PY OUT_DIR: bench/targets.py on the eager (KIND eager) or captured (graphs)
# bench JSON of OUT_DIR, its Markdown to targets-KIND.md. Run as a phase (bash -c), so the
# script's exit status is the phase's (pipefail); no JSON at all fails with a line saying so
# rather than passing an unmatched glob on as a file name (which left an empty targets.md
# beside "targets ok").
targets_md() {
    set -o pipefail
    shopt -s nullglob
    local kind=$1 py=$2 out=$3 json reports=()
    for json in "$out"/bench-*/bench.json; do
        # (bench-*-graphs/: the captured rows, judged by the graphs phase alone)
        case $json in
            */bench-*-graphs/bench.json) [[ $kind == graphs ]] && reports+=("$json") ;;
            *) [[ $kind == eager ]] && reports+=("$json") ;;
        esac
    done
    if ((${#reports[@]} == 0)); then
        echo "targets ($kind): no bench JSON in $out (no bench phase left one)" >&2
        return 1
    fi
    "$py" bench/targets.py "${reports[@]}" | tee "$out/targets-$kind.md"
}
export -f targets_md

snapshot() {
    [[ -z "${LBW_CHECK_ARCHIVE:-}" ]] && return
    collect_results >/dev/null
    local dest
    dest="$(dirname "$LBW_CHECK_ARCHIVE")"
    mkdir -p "$dest"
    tar czf "$LBW_CHECK_ARCHIVE.tmp" -C "$OUT_DIR" . && mv "$LBW_CHECK_ARCHIVE.tmp" "$LBW_CHECK_ARCHIVE"
    cp "$SUMMARY" "$dest/" 2>/dev/null
    cp "$OUT_DIR"/results/*.json "$dest/" 2>/dev/null
    return 0
}

# Build only for this GPU's architecture unless told otherwise: half the nvcc time.
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")' 2>/dev/null || true)"
    [[ -n "$TORCH_CUDA_ARCH_LIST" ]] && export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export FORCE_CUDA="${FORCE_CUDA:-1}"
# The system's g++ (LBW_CHECK_CXX names another). The lent GPU image (2026-11-28) sets
# CXX=/opt/gcc/bin/g++ (and CC=/opt/gcc/bin/gcc, nvcc's host compiler, which stays), and the
# extension it built carried its own static copy of libstdc++: an error message that formats a
# number (a TORCH_CHECK naming "exp_avg_sqs[0]") then crashed the process inside ostream's
# number formatting (the process's other libstdc++ owns the locale), taking the test session
# with it. Built with CXX=/usr/bin/g++, the same sources raise their errors (the
# extension_errors phase checks that).
if [[ -n "${LBW_CHECK_CXX:-}" ]]; then
    export CXX="$LBW_CHECK_CXX"
elif [[ -x /usr/bin/g++ ]]; then
    export CXX=/usr/bin/g++
fi
# A crash prints the Python stack of every thread (segfaults at exit were seen once).
export PYTHONFAULTHANDLER=1

{
    echo "date      $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit    ${LBW_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)')}"
    echo "gpu       $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
    echo "arch list ${TORCH_CUDA_ARCH_LIST:-unset}"
    echo "c++       ${CXX:-c++}: $("${CXX:-c++}" --version 2>/dev/null | head -1)"
} | tee "$OUT_DIR/machine.txt"

if [[ "${LBW_CHECK_SKIP_INSTALL:-0}" == 1 ]]; then
    echo "install SKIPPED (LBW_CHECK_SKIP_INSTALL=1)" | tee -a "$SUMMARY"
else
    phase install 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
fi
phase info 30 "$PY" -m lbw_kernels info
# An error raised by the extension reaches Python as itself (see CXX above), not as a crash.
phase extension_errors 30 "$PY" -c '
import torch
from lbw_kernels import _C
z = torch.zeros
try:
    _C._check_update_([z(4)], [z(4)], [z(4)], [z(3)], [z(())])
except RuntimeError as err:
    assert "exp_avg_sqs[0]" in str(err), err
    print("raised as itself:", err)
else:
    raise SystemExit("a state of the wrong shape was not refused")
'
# pytest-timeout (when installed) ends one hanging test instead of the whole phase.
PYTEST_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout 90)
# Three rounds, samples pooled (bench.bench_layout): the rows' sequence runs three times, so a
# stretch of a slow host lands on every row's samples, not on one row's. On 2000 x 65,536,
# where a step is host time, torch fused's median moved from 6.99 to 8.02 to 9.91 ms between
# runs on the same H200 (bench/results/nvidia-h200-2000x65536-*), more than any row's distance
# to its target. The reference backend is left out of these tables (one row took 58-440 ms a
# step; its GPU rows are on record in bench/results/nvidia-h200-*-20261127.json): the time
# goes to the rounds. LBW_CHECK_BENCH_BACKENDS (default "cuda triton") names them; a dry run
# on a CPU machine sets "cpp" (Triton's interpreter would take minutes a row).
BENCH_BACKENDS=()
for b in ${LBW_CHECK_BENCH_BACKENDS-cuda triton}; do BENCH_BACKENDS+=(--backend "$b"); done
bench_layout() {
    phase "bench_$1" "$2" "$PY" -m lbw_kernels bench --layout "$1" "${BENCH_BACKENDS[@]}" --rounds 3 \
        --reps 20 --budget 1.5 --out "$OUT_DIR/bench-$1"
}
# One process per layout, so a failure or timeout in one keeps the others' JSON. TinyLlama
# first: it carries the issue's headline targets.
LAYOUTS=(${LBW_CHECK_LAYOUTS:-tinyllama-1.1b gpt2-124m 2000x65536})
bench_layout "${LAYOUTS[0]}" 90
# Then the many-tensors layout, also before the tests: with 295+ GPU tests (200 + 90 s of
# limits) after install (~150 s), a run that waited for them could lose this layout's numbers
# to the budget, and they are the other target.
for layout in "${LAYOUTS[@]:1}"; do
    [[ $layout != gpt2-124m ]] && bench_layout "$layout" 60
done
# (Triton's direct launches, LBW_TRITON_DIRECT_LAUNCH=1, are no longer timed here: on the H200
# on 2026-11-27 they gained nothing on 2000 tensors; triton_kernels/launch.py.)
collect_results
# The issues' targets read off those tables, alone and back to back (bench/targets.py).
phase targets 20 bash -c 'targets_md eager "$@"' _ "$PY" "$OUT_DIR"
concat "$OUT_DIR/targets.md" "$OUT_DIR"/targets-{eager,graphs}.md
# -v: one line per test as it ends, so a phase cut by its limit still says which passed (with
# -q pytest's summary comes only at the end); the slowest tests' times, for the next budget.
# The 8 compiled training steps (inductor compiles forward, backward and step: the slowest
# cases; 6 of the 8 new since the last GPU run) run in a phase of their own after the others
# (where LBW_CHECK_TESTS leaves one of the two with nothing to run, it records "NO TESTS
# COLLECTED").
# Tests that have never run on a GPU first (tests/gpu_tests_run_before.txt lists those that
# have; tests/conftest.py orders by it): a phase cut by the budget then loses tests that passed
# before. The ids that pass go to gpu_tests_passed.txt, to add to that list after the run.
# (The compiled steps: 60-150 s estimated, 6 of the 8 never run; 150 s, the budget permitting.)
export LBW_GPU_TESTS_RUN_BEFORE="$PWD/tests/gpu_tests_run_before.txt"
GPU_TESTS=(-m gpu ${LBW_CHECK_TESTS:-tests} -v -rfEs --durations=20 "${PYTEST_TIMEOUT[@]}")
phase tests_gpu 200 "$PY" -m pytest "${GPU_TESTS[@]}" -k "not test_gpu_compiled_training_step_runs"
phase tests_gpu_compiled 150 "$PY" -m pytest "${GPU_TESTS[@]}" -k test_gpu_compiled_training_step_runs
# (-v prints "<node id> PASSED" as each ends)
cat "$OUT_DIR"/tests_gpu.log "$OUT_DIR"/tests_gpu_compiled.log 2>/dev/null | sed -nE 's/^([^ ]+::[^ ]+) PASSED.*/\1/p' |
    sort -u >"$OUT_DIR/gpu_tests_passed.txt"
# Phases in the order of what they answer, so that a run squeezed by its budget loses the least:
# the targets and the tests (above), then whether the distance to them is host time (captured steps, the
# timeline, the host profiles), then the tuning candidates, GPT-2's layout, the CUDA build.
# The guard's steps and torch fused AdamW (capturable=True) captured in CUDA graphs, each timed
# call one replay (lbw-kernels bench --graphs only): what a training loop that captures its
# optimizer step gets, with no host time per step; beside the eager rows above, how much of
# each row's distance to its target is host time. TinyLlama and the many-tensors layout,
# the issues' targets read off them too (the "captured" column of targets.md). (Not in a dry
# run without CUDA: bench refuses --graphs there.)
"$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null && for layout in "${LAYOUTS[@]}"; do
    [[ $layout == gpt2-124m ]] && continue
    phase "bench_graphs_$layout" 40 "$PY" -m lbw_kernels bench --layout "$layout" "${BENCH_BACKENDS[@]}" \
        --graphs only --stats-freq 1 --rounds 1 --reps 20 --budget 1 --no-plot --out "$OUT_DIR/bench-$layout-graphs"
done
collect_results
if compgen -G "$OUT_DIR/bench-*-graphs/bench.json" >/dev/null; then
    phase targets_graphs 20 bash -c 'targets_md graphs "$@"' _ "$PY" "$OUT_DIR"
    concat "$OUT_DIR/targets.md" "$OUT_DIR"/targets-{eager,graphs}.md
fi
# Each step split on the device's timeline (bench/step_timeline.py): host prefix before the
# first kernel, the kernels' own time against the floor, idle gaps between them; TinyLlama
# (are its rows over 1.05x in the kernels or in host time?) and the many-tensors layout. With
# stats_freq 10 too: on the H200 (2026-11-27) the cuda rows' sf=10 medians (calls without
# telemetry) were 0.22 ms (exact) and 0.28 ms (single_pass) below their sf=1 ones on
# TinyLlama, within 1.05x of the floor where sf=1 was not; the Triton rows were not.
# One pair of files per layout (step_timeline.py --json appends: its file is removed first),
# then timeline.txt / timeline.jsonl rebuilt from them.
TIMELINES=()
for layout in "${LAYOUTS[@]}"; do
    [[ $layout == gpt2-124m ]] && continue
    TIMELINES+=("$OUT_DIR/timeline-$layout")
    phase "timeline_$layout" 60 bash -c 'set -o pipefail; rm -f "$2.jsonl"; "$0" bench/step_timeline.py --layout "$1" \
        --steps 5 --stats-freq 1 --stats-freq 10 --json "$2.jsonl" | tee "$2.txt"' "$PY" "$layout" \
        "$OUT_DIR/timeline-$layout"
done
concat "$OUT_DIR/timeline.txt" "${TIMELINES[@]/%/.txt}"
concat "$OUT_DIR/timeline.jsonl" "${TIMELINES[@]/%/.jsonl}"
# Where the host time of a step goes (cProfile, torch.profiler op/launch counts per step) on
# the first layout (TinyLlama: 0.4-0.5 ms of host time before the first launch per step in the
# 2026-11-27 run; the 2000-tensor layout's profile is in bench/results/, twice). Then the same
# step's host work on this host's CPU with the Triton launches stubbed out (CPU tensors,
# TRITON_INTERPRET=1: no CUDA call at all): how fast this host runs the Python step path, to set
# beside the same command's output on the 2-core CI machine (bench/results/cpu-*-profile-host-
# stub-*) and beside the prefix the timeline measures. (The host time of one launch by route,
# bench/launch_overhead.py, is recorded in ...-launch-overhead-20261127.jsonl; not rerun.)
phase "profile_host_${LAYOUTS[0]}" 60 "$PY" bench/profile_step.py --layout "${LAYOUTS[0]}" --steps 20 --top 12
phase host_stub 60 env TRITON_INTERPRET=1 "$PY" bench/profile_step.py --stub-triton-kernels --layout "${LAYOUTS[0]}" \
    --steps 200 --top 0
# Launch geometry candidates on the first layout (cuda: LBW_CUDA_GEOMETRY, csrc/cuda/geometry.h;
# triton: LBW_TRITON_GEOMETRY, triton_kernels/config.py), the backend's rows beside the
# baselines of the same process: the evidence for the defaults. Each entry is
# BACKEND:GEOMETRY, or BACKEND:LBW_NAME=VALUE for another switch; output in tune-N/ (not
# results/), listed in tune.txt; LBW_CHECK_TUNE="" skips them. (Earlier candidates and what
# they gave: bench/results/nvidia-h200-cuda-geometry-20261126.json,
# ...-triton-geometry-20261126.json, ...-geometry-20261127.json. 512 x 2 at the default chunk
# came within 1% of the default in two runs, chunk 65536 against 16384 in three; CUDA's
# warp_partials 1-2% slower; Triton's chunk (16384, 8192) changed nothing; maxnreg=64 slower on
# both gates; num_stages=3 3% faster on single_pass and 0.3% slower on the exact gate, block 512
# with telemetry_fold 4 2% faster and 2% slower; single_pass_num_stages=4 not timed yet.)
# Below: pipelining in the single_pass update alone, the exact gate's kernels as the default's
# (their rows: a noise control); if single_pass gains >= 1% again, it becomes that kernel's
# default in triton_kernels/config.py. Then the same with telemetry_fold=8: at block 1024 x 4
# warps each thread holds 8 elements, so one float64 pair per thread accumulates them, as the
# CUDA kernels' per-thread sums do (fold 1 holds 8 pairs a thread; the single_pass kernel's 138
# registers give 384 threads per SM against the CUDA kernel's 1024: bench/triton_registers.py),
# beside the first candidate it says what the fold adds (the exact gate's telemetry pass folds
# too: its rows say what it costs there). Then both backends without the exact gate's early
# telemetry pass (lbw_kernels/early_telemetry.py): the same run's baseline for what launching
# it first gains.
TUNE_DEFAULT="triton:single_pass_num_stages=3 triton:single_pass_num_stages=3,telemetry_fold=8
cuda:LBW_EARLY_TELEMETRY=0 triton:LBW_EARLY_TELEMETRY=0"
i=0
: >"$OUT_DIR/tune.txt"  # (this run's entries only: tune_table.py reads every line)
for entry in ${LBW_CHECK_TUNE-$TUNE_DEFAULT}; do
    i=$((i + 1))
    backend=${entry%%:*}
    setting=${entry#*:}
    if [[ $setting == LBW_* ]]; then
        var=${setting%%=*} value=${setting#*=}
    else
        var=LBW_$(echo "$backend" | tr a-z A-Z)_GEOMETRY value=$setting
    fi
    echo "tune_$i $backend $var=$value" >>"$OUT_DIR/tune.txt"
    phase "tune_$i" 45 env "$var=$value" "$PY" -m lbw_kernels bench --layout "${LAYOUTS[0]}" \
        --backend "$backend" --stats-freq 1 --reps 10 --budget 1 --no-plot --out "$OUT_DIR/tune-$i"
done
# The candidates beside the defaults in one table (tune_table.md).
[[ -s "$OUT_DIR/tune.txt" ]] && phase tune_table 20 bash -c 'set -o pipefail; "$0" bench/tune_table.py "$1" \
    | tee "$1/tune_table.md"' "$PY" "$OUT_DIR"
# GPT-2 124M (no target of its own: the layout between the two above) after the phases that
# answer the targets, so a squeezed run loses it first.
for layout in "${LAYOUTS[@]:1}"; do
    [[ $layout == gpt2-124m ]] && bench_layout "$layout" 60
done
collect_results
# The torch-free CUDA build (csrc + tests + bench/memory_floor.cu): the update and telemetry
# kernels, every launch geometry, beside plain kernels that move the same bytes with no math
# (memory_floor.jsonl: whether 4-read/3-write traffic itself can come within 1.05x of a copy).
CMAKE_GPU=(cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLBW_CUDA=ON -DLBW_CUDA_TESTS=ON)
[[ -n "${TORCH_CUDA_ARCH_LIST:-}" ]] && CMAKE_GPU+=("-DCMAKE_CUDA_ARCHITECTURES=${TORCH_CUDA_ARCH_LIST//./}")
phase csrc_cuda_build 150 bash -c '"$@" >/dev/null && cmake --build build/gpu -j "${MAX_JOBS:-16}"' _ "${CMAKE_GPU[@]}"
phase memory_floor 60 bash -c 'set -o pipefail; build/gpu/bench_memory_floor | tee "$0"' "$OUT_DIR/memory_floor.jsonl"
# The torch-free CUDA kernels' own test binary (csrc/tests), from the build above.
phase csrc_cuda_test 60 ctest --test-dir build/gpu --output-on-failure
# lbw-kernels verify on CUDA (every backend against the reference, as a user would run it).
# (90 s: its CPU backends alone took 59 s in the 2-core dry run once it checked grad_factor.)
phase verify 90 "$PY" -m lbw_kernels verify

echo "total $(($(date +%s) - START))s" | tee -a "$SUMMARY"
snapshot
exit $FAILED
