"""Telemetry partials: per gradient tensor ``(sum g^2, sum g, nonfinite)`` in float64.

Two deterministic stages, no atomics, so the same gradients give bitwise the same partials:

1. :func:`_telemetry_chunks_kernel` - one program per chunk of ``CHUNK`` elements writes the
   chunk's ``(sum g^2, sum g)`` (float64; per-lane accumulators then a fixed tree) into its
   own row of a workspace. The fused AdamW kernel writes the same rows when it reads the
   gradients for the update (single_pass).
2. :func:`_reduce_partials_kernel` - each tensor's chunk rows are added in a fixed order and
   derives the non-finite flag from the float64 sum, exactly like
   :func:`lbw_kernels.reference.telemetry_partials`.

Math: ``sumsq_t = sum_i float64(g_ti)^2``, ``sum_t = sum_i float64(g_ti)``,
``nonfinite_t = 1.0 if sum_t is NaN or +-Inf else 0.0`` (a float64 sum of fp32/bf16/fp16
values overflows only if an element is non-finite).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunk_table import TelemetryLayout
from .config import COMPILE_OPTIONS, geometry, pass_options, poison_enabled
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
def _telemetry_chunks_kernel(
    chunks,  # [C, 4] int64: gradient address, numel, first element, workspace row
    workspace,  # [*, 2] float64
    G_CODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    FOLD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = chunks + pid * 4
    numel = tl.load(row + 1)
    start = tl.multiple_of(tl.load(row + 2), CHUNK)
    out = tl.load(row + 3)
    g_ptr = as_pointer(tl.load(row), G_CODE, ALIGNED) + start
    n = tl.minimum(numel - start, CHUNK)
    offs = tl.arange(0, BLOCK)
    acc_sq = tl.zeros([BLOCK // FOLD], dtype=tl.float64)
    acc_sum = tl.zeros([BLOCK // FOLD], dtype=tl.float64)
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
    tl.store(workspace + out * 2, tl.sum(acc_sq, axis=0))
    tl.store(workspace + out * 2 + 1, tl.sum(acc_sum, axis=0))


@triton.jit
def _reduce_partials_kernel(
    workspace,  # [C, 2] float64 chunk partials
    first_chunk,  # [T + 1] int64
    out,  # [T, 3] partials (float64 or float32)
    n_tensors,
    ITERS: tl.constexpr,  # >= ceil(most chunks of one tensor / RBLOCK), a power of two
    TENSORS: tl.constexpr,  # tensors per program
    RBLOCK: tl.constexpr,  # chunk rows per tensor per iteration
):
    t = tl.program_id(0).to(tl.int64) * TENSORS + tl.arange(0, TENSORS)
    live = t < n_tensors
    c0 = tl.load(first_chunk + t, mask=live, other=0)
    c1 = tl.load(first_chunk + t + 1, mask=live, other=0)
    offs = tl.arange(0, RBLOCK)
    acc_sq = tl.zeros([TENSORS, RBLOCK], dtype=tl.float64)
    acc_sum = tl.zeros([TENSORS, RBLOCK], dtype=tl.float64)
    # Every tensor's rows are added in the same fixed order: lane j takes rows j, j+RBLOCK, ...
    for i in range(0, ITERS):
        rows = c0[:, None] + i * RBLOCK + offs[None, :]
        mask = rows < c1[:, None]
        acc_sq += tl.load(workspace + rows * 2, mask=mask, other=0.0)
        acc_sum += tl.load(workspace + rows * 2 + 1, mask=mask, other=0.0)
    sumsq = tl.sum(acc_sq, axis=1)
    total = tl.sum(acc_sum, axis=1)
    # s * 0 is 0 for finite s and NaN for NaN/Inf (no fast-math here, so it is not folded).
    nonfinite = tl.where(total * 0.0 == 0.0, 0.0, 1.0).to(tl.float64)
    dt = out.dtype.element_ty
    tl.store(out + t * 3, sumsq.to(dt), mask=live)
    tl.store(out + t * 3 + 1, total.to(dt), mask=live)
    tl.store(out + t * 3 + 2, nonfinite.to(dt), mask=live)


def telemetry_chunks_(layout: TelemetryLayout) -> None:
    """Launch the telemetry-only pass of every chunk list in ``layout`` (one launch per dtype)."""
    geo = geometry()
    for lst in layout.lists:
        _telemetry_chunks_kernel[(lst.n_chunks,)](
            lst.table, layout.workspace, G_CODE=lst.code, ALIGNED=lst.aligned,
            CHUNK=geo.chunk, BLOCK=geo.block, FOLD=geo.telemetry_fold, **pass_options(geo),
        )


def reduce_partials(layout: TelemetryLayout, partials_dtype: torch.dtype) -> Tensor:
    """Chunk partials -> ``[T, 3]`` partials (fresh tensor, O(T)) in ``partials_dtype``."""
    out = torch.empty((layout.n_tensors, 3), dtype=partials_dtype, device=layout.workspace.device)
    if poison_enabled():
        out.fill_(float("nan"))
    if layout.n_tensors:
        geo = geometry()
        _reduce_partials_kernel[(triton.cdiv(layout.n_tensors, geo.reduce_tensors),)](
            layout.workspace, layout.first_chunk, out, layout.n_tensors,
            # A power of two: few specialisations across layouts; surplus iterations are masked.
            ITERS=triton.next_power_of_2(triton.cdiv(layout.max_chunks, geo.reduce_block)),
            TENSORS=geo.reduce_tensors, RBLOCK=geo.reduce_block, num_warps=geo.reduce_warps, **COMPILE_OPTIONS,
        )
    return out


def poison_workspace_(layout: TelemetryLayout) -> None:
    if poison_enabled():
        layout.workspace.fill_(float("nan"))


def telemetry_partials(layout: TelemetryLayout, partials_dtype: torch.dtype) -> Tensor:
    """The exact gate's telemetry: two launches (chunks per dtype, then the reduction)."""
    poison_workspace_(layout)
    telemetry_chunks_(layout)
    return reduce_partials(layout, partials_dtype)
