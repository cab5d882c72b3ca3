"""Launch geometry and test switches for the Triton kernels.

Every pass is memory-bound (AdamW: 28 B read+written per fp32 parameter, 2 flops per byte),
so the geometry is chosen to keep enough bytes in flight, not for arithmetic:

* ``BLOCK`` elements per loop iteration of one program. 1024 with 4 warps is 8 fp32 per
  thread: two 16-byte vector loads per stream (p, g, m, v), i.e. 8 independent 16-byte loads
  in flight per thread. Measured on an H200 (TinyLlama layout, same process as torch fused
  AdamW at 9.3 ms; bench/results/nvidia-h200-triton-geometry-20261126.json): 2048 x 8 warps
  took 9.58 ms for single_pass and 9.13 ms for exact, 1024 x 4 warps 8.09 and 8.88 ms; 4096 x
  16 warps with 65536-element chunks 8.21 and 8.99 ms. (Why 2048 x 8 loses, not measured: a
  guess is the occupancy its fp64 telemetry accumulators cost.)
* ``CHUNK`` elements per program (a multiple of ``BLOCK``). 32 blocks = 32768 elements: a
  1.1B-parameter model is ~34k programs (tail of the last wave < 1%), a 65536-element tensor
  is 2 programs (2000 such tensors fill an H100's 132 SMs many times over), and the per-chunk
  telemetry workspace is 16 B per 32768 parameters (0.002% of the traffic).
* Under ``TRITON_INTERPRET=1`` (CPU tests) each program runs as Python, so programs and loop
  iterations cost far more than elements: few, small programs keep test problems quick while
  still giving multi-chunk tensors and multi-iteration loops (4097 = a chunk of two whole
  blocks + a chunk with a 1-element tail).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields, replace

from lbw_kernels.validation import parse_int_overrides


@dataclass(frozen=True)
class Geometry:
    block: int  # elements per loop iteration (power of two)
    chunk: int  # elements per program (multiple of block)
    num_warps: int
    reduce_block: int  # telemetry: chunk rows per iteration of a tensor's last program (telemetry.finish_tensor)
    tensors_per_program: int  # per-tensor coefficient kernel: tensors per program
    # Telemetry accumulators per loop iteration: BLOCK // telemetry_fold float64 pairs, each
    # the sum of telemetry_fold adjacent elements (1: one pair per element, 2 float64 per
    # element a thread holds). With a fold up to the elements per thread the sums stay inside
    # a thread: fewer registers (bench/triton_registers.py: single_pass under Triton 3.6,
    # block 1024 x 4 warps, 138 -> 114 at fold 4), so more programs per SM. Another fixed
    # order (bits differ from fold 1), as deterministic. Timed on an H200 (2026-11-27, block 512
    # x 4 warps, fold 4; bench/results/nvidia-h200-geometry-20261127.json): single_pass 2%
    # faster, exact 2% slower than the default, so not the default.
    telemetry_fold: int = 1
    # Registers per thread the single_pass update kernel may use (ptxas .maxnreg; 0: the
    # compiler's choice). Under Triton 3.6, block 512 x 4 warps with telemetry_fold 4 gives
    # it 71 registers (7 programs of 128 threads per SM); 64 fits 8 (1024 threads, as the
    # CUDA kernels) for 4 bytes of spill stores (bench/triton_registers.py). Not applied to
    # the other kernels: given 64, ptxas took 63 for the exact update (56 without: 9
    # programs). Registers only: the results are the same bits. Timed on an H200 (2026-11-27,
    # with block 512 and fold 4): single_pass 4% slower than the default, exact 1% slower.
    maxnreg: int = 0
    # Software pipelining of the passes' loops over a chunk (1: off). With num_stages S > 1 the
    # whole blocks run in a branch-free loop (blocks past them masked off, uniformly, so the
    # accesses stay 16-byte) that Triton pipelines: the loads of the next S - 1 blocks are in
    # flight as cp.async copies into shared memory while a block's math runs. Bytes in flight
    # then cost shared memory (S - 1 blocks of p, g, m, v: 32 KB for S=3 at block 1024, fp32)
    # instead of registers, which bound Triton's occupancy (bench/triton_registers.py). The
    # same per-lane order: bits as num_stages=1 but for the sign of an all-zero sum. Checked
    # in the PTX (cp.async under Triton 3.6 and 3.9). Timed on an H200 (2026-11-27, S=3): 3%
    # faster on single_pass, 0.3% slower on the exact gate, in one run. Why it may pay:
    # with num_stages=1 each iteration issues its block's loads only after the previous
    # block's stores (SASS of the fp32 exact update, Triton 3.6 and 3.9, sm_90: 8 LDG.128 at
    # the top of the loop body of ~500 instructions, 6 STG.128 at its end), so a program has
    # nothing in flight while it computes, at 5 programs per SM (86-87 registers); the CUDA
    # kernel keeps 1024 threads per SM with half the elements per thread between loads.
    num_stages: int = 1
    # num_stages for the single_pass update kernel alone, the launches that also read the
    # telemetry (0: num_stages; a single_pass call that measures nothing runs the plain update,
    # with num_stages). On the H200 on 2026-11-27 num_stages=3 made single_pass 3% faster and
    # the exact gate 0.3% slower: this times the one without the other (the exact rows of such
    # a run are the default's, a control for the noise between processes).
    single_pass_num_stages: int = 0


# The reduction reads 16 B per chunk (~0.1% of the update's traffic): 128 rows per iteration
# (one per thread of 4 warps) cover a 65M-element embedding (2000 chunks) in 16 iterations.
# It runs inside the update kernel, whose registers it adds to: 256 rows cost 6 more at block
# 512 under Triton 3.6 (80 -> 86 for fp32 single_pass; bench/triton_registers.py).
GPU = Geometry(block=1024, chunk=32768, num_warps=4, reduce_block=128, tensors_per_program=256)
INTERPRETER = Geometry(block=2048, chunk=4096, num_warps=4, reduce_block=4, tensors_per_program=64)


# Compile options of every launch. No implicit floating-point contraction (a*b+c rounded twice):
# the GPU then computes what the CPU tests verify, since the interpreter (numpy) does not
# contract either, and the numbers do not change with Triton's default, which 3.9 announces will
# flip in 3.10. Where the reference's ops round once (torch's lerp and CPU addcmul), the update
# says so with tl.fma (guarded_adamw._adamw_block): the only fmas in the PTX. The kernels move
# ~28 B per ~15 flops, so the extra instructions should hide behind memory (not yet measured on
# a GPU).
COMPILE_OPTIONS = dict(enable_fp_fusion=False)


# The switches below are read from the environment at each launch, so that tests (and a tuning
# run's bench) can change them in-process. os.environ.get of a name that is not set raises and
# catches a KeyError inside: ~2 us on the 2-core CI VM, and a Triton step asked ~15 times (5
# geometry() calls of 2 reads, 2 poison checks, one direct-launch check per launch), ~30 us
# of host time per step, most of it before the first launch. os.environ keeps its values in
# `_data` under encoded names (bytes on POSIX); a dict lookup there is ~0.1 us, and sees what
# os.environ[...] = ... and monkeypatch.setenv write. Elsewhere (Windows keys are upper-cased
# str), os.environ.get.
_ENVIRON_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


@functools.cache
def _encoded(name: str) -> bytes:
    return os.fsencode(name)


def environ_get(name: str):
    """``os.environ.get(name)`` without its cost for a name that is not set (see above)."""
    if _ENVIRON_DATA is None:
        return os.environ.get(name)
    value = _ENVIRON_DATA.get(_encoded(name))
    return None if value is None else os.fsdecode(value)


def interpreting() -> bool:
    return environ_get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=8)
def _overridden(base: Geometry, spec: str) -> Geometry:
    """``base`` with the ``name=value`` pairs of ``spec`` (comma-separated) applied, checked."""
    geo = replace(base, **parse_int_overrides("LBW_TRITON_GEOMETRY", spec, {f.name for f in fields(Geometry)}))
    fold = geo.telemetry_fold

    def power_of_two(n: int) -> bool:
        return n > 0 and not n & (n - 1)

    # (tl.arange takes powers of two: block, reduce_block and tensors_per_program are its lengths)
    if (not all(map(power_of_two, (geo.block, geo.num_warps, fold, geo.reduce_block, geo.tensors_per_program)))
            or geo.chunk < geo.block or geo.chunk % geo.block or fold > geo.block
            or not (geo.maxnreg == 0 or 24 <= geo.maxnreg <= 255)
            or not 1 <= geo.num_stages <= 8 or not 0 <= geo.single_pass_num_stages <= 8):
        raise ValueError(
            "LBW_TRITON_GEOMETRY: block, num_warps, telemetry_fold, reduce_block and tensors_per_program must be "
            "powers of two, chunk a positive multiple of block, telemetry_fold at most block, maxnreg 0 (none) or "
            f"24 to 255, num_stages 1 to 8, single_pass_num_stages 0 (num_stages) to 8, got {geo}"
        )
    return geo


def pass_options(geo: Geometry, single_pass: bool = False) -> dict:
    """Launch options of the kernels that stream parameters (update, telemetry pass); the
    register cap for the single_pass update only."""
    options = dict(num_warps=geo.num_warps, **COMPILE_OPTIONS)
    if single_pass and geo.maxnreg:
        options["maxnreg"] = geo.maxnreg
    return options


def pass_stages(geo: Geometry, single_pass: bool = False) -> int:
    """The software-pipelining depth of a pass's loop (the kernels' STAGES)."""
    return (geo.single_pass_num_stages or geo.num_stages) if single_pass else geo.num_stages


def geometry() -> Geometry:
    """The geometry launches use. ``LBW_TRITON_GEOMETRY="block=1024,num_warps=4"`` overrides
    fields of the GPU geometry, for tuning runs (bench/device_check.sh compares a few)."""
    if interpreting():
        return INTERPRETER
    spec = environ_get("LBW_TRITON_GEOMETRY")
    return _overridden(GPU, spec) if spec else GPU


def poison_enabled() -> bool:
    """``LBW_POISON=1``: fill every workspace and output with NaN before each launch, so a row
    a kernel forgot to write shows up as NaN in the result (tests set it; off in production)."""
    return environ_get("LBW_POISON") == "1"
