"""Telemetry partials: per gradient tensor ``(sum g^2, sum g, nonfinite)`` in float64.

Deterministic, with no floating-point atomics, so the same gradients give bitwise the same
partials from the same kernel variant (the sums' association follows the layout Triton picks:
a gradient's 16-byte alignment, the geometry and the Triton version can change their bits),
in one launch per dtype (and alignment: chunk_table.ChunkList):

1. each program (one chunk of ``CHUNK`` elements; :func:`_telemetry_chunks_kernel`, or the
   fused AdamW kernel as it reads the gradients for the update in single_pass) writes the
   chunk's ``(sum g^2, sum g)`` (float64; per-lane accumulators then a fixed tree) into its
   own row of a workspace, then counts itself done on its tensor's counter (an integer
   atomic);
2. the program that counts last (:func:`finish_tensor`) adds the tensor's chunk rows in a
   fixed order (the same whichever program it is), derives the non-finite flag from the
   float64 sums like :func:`lbw_kernels.reference.telemetry_partials`, writes the
   tensor's row and sets the counter back to 0 for the next pass (and CUDA-graph replays).

(The reduction was a launch of its own until 2026-11-26: a Triton launch took ~50 us of host
time under cProfile on the H200 machine, bench/results/nvidia-h200-profile-host-2000x65536-
20261126.txt, and with thousands of small tensors a step is host-bound.)

Math: ``sumsq_t = sum_i float64(g_ti)^2``, ``sum_t = sum_i float64(g_ti)``,
``nonfinite_t = 1.0 if sum_t or sumsq_t is NaN or +-Inf else 0.0`` (float64 sums of
fp32/bf16/fp16 values overflow only if an element is non-finite; fp64 squares above ~1.3e154
overflow, and the reference flags those too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunk_table import TelemetryLayout
from .config import geometry, pass_options, pass_stages, poison_enabled
from .launch import Launcher
from .pointers import as_pointer


@triton.jit
def accumulate_telemetry(g_raw, acc_sq, acc_sum, BLOCK: tl.constexpr, FOLD: tl.constexpr):
    """Add one block of gradient values (any float dtype; masked lanes loaded as 0) to the
    ``[BLOCK // FOLD]`` float64 accumulators: each takes the sum of FOLD adjacent elements
    (config.Geometry.telemetry_fold)."""
    g64 = g_raw.to(tl.float64)
    sq = g64 * g64
    s = g64
    if FOLD > 1:
        sq = tl.sum(tl.reshape(sq, [BLOCK // FOLD, FOLD]), axis=1)
        s = tl.sum(tl.reshape(s, [BLOCK // FOLD, FOLD]), axis=1)
    return acc_sq + sq, acc_sum + s


@triton.jit
def finish_tensor(workspace, first_chunk, counters, out, t, RBLOCK: tl.constexpr):
    """After a program has stored its chunk's partial: count the chunk done on tensor ``t``'s
    counter and, in the program that counts last, write tensor t's row of ``out``."""
    # The barrier orders every thread's stores before the release below (a scalar store and a
    # scalar atomic need not run on the same thread).
    tl.debug_barrier()
    done = tl.atomic_add(counters + t, 1, sem="acq_rel", scope="gpu")
    c0 = tl.load(first_chunk + t)
    c1 = tl.load(first_chunk + t + 1)
    if done == c1 - c0 - 1:  # every other chunk of t is written (acquired above)
        offs = tl.arange(0, RBLOCK)
        acc_sq = tl.zeros([RBLOCK], dtype=tl.float64)
        acc_sum = tl.zeros([RBLOCK], dtype=tl.float64)
        # Lane j takes rows c0 + j, c0 + j + RBLOCK, ...: a fixed order. A while loop: its
        # bound comes from memory, which Triton 3.6's interpreter takes in no `range`, and a
        # loop of constant trip count would be unrolled into the update kernel (registers,
        # and code growing with the largest tensor). .cg: read at L2, where the other
        # programs' stores are.
        base = c0
        while base < c1:
            rows = base + offs
            mask = rows < c1
            acc_sq += tl.load(workspace + rows * 2, mask=mask, other=0.0, cache_modifier=".cg")
            acc_sum += tl.load(workspace + rows * 2 + 1, mask=mask, other=0.0, cache_modifier=".cg")
            base += RBLOCK
        sumsq = tl.sum(acc_sq, axis=0)
        total_t = tl.sum(acc_sum, axis=0)
        # s * 0 is 0 for finite s and NaN for NaN/Inf (no fast-math here, so it is not folded);
        # both sums, as the reference reads its own (an fp64 grad above ~1.3e154 overflows sumsq).
        nonfinite = tl.where((total_t * 0.0 == 0.0) & (sumsq * 0.0 == 0.0), 0.0, 1.0).to(tl.float64)
        dt = out.dtype.element_ty
        tl.store(out + t * 3, sumsq.to(dt))
        tl.store(out + t * 3 + 1, total_t.to(dt))
        tl.store(out + t * 3 + 2, nonfinite.to(dt))
        tl.store(counters + t, 0)


@triton.jit
def _telemetry_chunks_kernel(
    chunks,  # [C, 5] int64: gradient address, numel, first element, workspace row, tensor row
    workspace,  # [*, 2] float64
    first_chunk,  # [T + 1] int64
    counters,  # [T] int32, 0 before the launch (and after)
    out,  # [T, 3] partials (float64 or float32)
    G_CODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    FOLD: tl.constexpr,
    RBLOCK: tl.constexpr,  # chunk rows per iteration of finish_tensor
    STAGES: tl.constexpr,  # config.Geometry.num_stages (see guarded_adamw.py's loop)
):
    pid = tl.program_id(0).to(tl.int64)
    row = chunks + pid * 5
    numel = tl.load(row + 1)
    start = tl.multiple_of(tl.load(row + 2), CHUNK)
    ws_row = tl.load(row + 3)
    g_ptr = as_pointer(tl.load(row), G_CODE, ALIGNED) + start
    n = tl.minimum(numel - start, CHUNK)
    offs = tl.arange(0, BLOCK)
    acc_sq = tl.zeros([BLOCK // FOLD], dtype=tl.float64)
    acc_sum = tl.zeros([BLOCK // FOLD], dtype=tl.float64)
    if STAGES > 1:  # whole blocks pipelined, masked off past the chunk's whole ones, then the rest
        for i in tl.range(0, CHUNK // BLOCK, num_stages=STAGES):
            lo = i * BLOCK
            whole = (tl.zeros_like(offs) + lo + BLOCK) <= n
            acc_sq, acc_sum = accumulate_telemetry(
                tl.load(g_ptr + lo + offs, mask=whole, other=0.0), acc_sq, acc_sum, BLOCK, FOLD
            )
        lo = (n // BLOCK) * BLOCK
        if lo < n:
            acc_sq, acc_sum = accumulate_telemetry(
                tl.load(g_ptr + lo + offs, mask=lo + offs < n, other=0.0), acc_sq, acc_sum, BLOCK, FOLD
            )
    else:
        # Whole blocks unmasked (vectorised), the last partial one masked. The trip count is a
        # constant (the loop bound never comes from memory) and the branch is uniform per program.
        for i in range(0, CHUNK // BLOCK):
            lo = i * BLOCK
            if lo + BLOCK <= n:
                acc_sq, acc_sum = accumulate_telemetry(tl.load(g_ptr + lo + offs), acc_sq, acc_sum, BLOCK, FOLD)
            elif lo < n:
                acc_sq, acc_sum = accumulate_telemetry(
                    tl.load(g_ptr + lo + offs, mask=lo + offs < n, other=0.0), acc_sq, acc_sum, BLOCK, FOLD
                )
    tl.store(workspace + ws_row * 2, tl.sum(acc_sq, axis=0))
    tl.store(workspace + ws_row * 2 + 1, tl.sum(acc_sum, axis=0))
    finish_tensor(workspace, first_chunk, counters, out, tl.load(row + 4), RBLOCK)


_TELEMETRY = Launcher(_telemetry_chunks_kernel)


def new_partials(layout: TelemetryLayout, partials_dtype: torch.dtype) -> Tensor:
    """The ``[T, 3]`` output of a pass (fresh, O(T)); NaN-filled when poisoning."""
    out = torch.empty((layout.n_tensors, 3), dtype=partials_dtype, device=layout.workspace.device)
    if poison_enabled():
        out.fill_(float("nan"))
        layout.workspace.fill_(float("nan"))
    return out


def telemetry_chunks_(layout: TelemetryLayout, out: Tensor) -> None:
    """Launch the telemetry-only pass of every chunk list in ``layout`` (one launch per dtype and alignment)."""
    geo = geometry()
    for lst in layout.lists:
        _TELEMETRY(
            (lst.n_chunks,),
            (lst.table, layout.workspace, layout.first_chunk, layout.counters, out),
            dict(G_CODE=lst.code, ALIGNED=lst.aligned, CHUNK=geo.chunk, BLOCK=geo.block, FOLD=geo.telemetry_fold,
                 RBLOCK=geo.reduce_block, STAGES=pass_stages(geo)),
            pass_options(geo),
        )


def telemetry_partials(layout: TelemetryLayout, partials_dtype: torch.dtype) -> Tensor:
    """The exact gate's telemetry: one launch per gradient dtype."""
    out = new_partials(layout, partials_dtype)
    telemetry_chunks_(layout, out)
    return out
