"""Guarded AdamW: one launch per param dtype over every tensor of every group.

Per element, in float32 (the math ``torch.optim.AdamW`` and
:func:`lbw_kernels.reference.adamw_` do; DESIGN.md rule 5), with the per-tensor coefficients
of :mod:`.coefficients` (``c``) and ``g`` the gradient times ``c.sign`` (-1 when maximizing,
times the step's clipping factor when it clips)::

    p  = p * c.decay                                   decay = 1 - lr*scale*wd
    m  = lerp(m, g, 1 - beta1)                         torch.lerp's two-sided formula, one rounding
    v  = fma((1 - beta2) * g, g, v * beta2)            torch's CPU addcmul, one rounding
    p  = p + (m * c.step_size) / (sqrt(v) / c.bc2_sqrt + eps)   step_size = -lr*scale/bc1

Leaving elements untouched (rules 1 and 6): the exact gate's ``skip`` turns every store off
(``c.apply = 0``; uniform, so stores stay vectorised); single_pass's ``MASK_NONFINITE`` keeps
the old p, m, v of an element whose gradient is NaN/Inf (selected, then stored unmasked).
With ``TELEMETRY`` the same gradient loads also feed the float64 telemetry accumulators,
written per chunk and finished per tensor like :mod:`.telemetry` does (single_pass: one read
of each gradient, and no launch after the update).

Shapes/dtypes: params fp32, bf16 or fp16 (one dtype per launch, ``P_CODE``), grads of the
params' dtype or, for bf16/fp16 params, fp32 (torch >= 2.10's ``grad_dtype``; ``G_CODE``);
exp_avg/exp_avg_sq fp32; all dense, in one element order. fp64 params never reach this
kernel, nor params whose four tensors differ in order: the backend delegates them to the
reference (chunk_table.build_update).
Memory traffic per fp32 element: read p, g, m, v and write p, m, v = 28 bytes.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from .chunk_table import COEF_COLS, TENSOR_COLS, UpdatePlan
from .coefficients import adamw_coefficients_
from .config import geometry, pass_options, pass_stages
from .launch import Launcher
from .pointers import BF16, FP32, as_pointer, round_to_bf16
from .telemetry import accumulate_telemetry, finish_tensor


@triton.jit
def _adamw_block(
    p_ptr, g_ptr, m_ptr, v_ptr, offs, mask,
    step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps, sign, apply,
    acc_sq, acc_sum,
    P_CODE: tl.constexpr, EVEN: tl.constexpr, TELEMETRY: tl.constexpr, MASK_NONFINITE: tl.constexpr,
    HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr, FOLD: tl.constexpr,
):
    """One block of elements; ``EVEN`` blocks are whole (no bounds mask: vector access)."""
    if EVEN:
        p_raw = tl.load(p_ptr + offs)
        g_raw = tl.load(g_ptr + offs)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    else:
        p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g_raw = tl.load(g_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if TELEMETRY:
        acc_sq, acc_sum = accumulate_telemetry(g_raw, acc_sq, acc_sum, BLOCK, FOLD)
    p = p_raw.to(tl.float32)
    g = g_raw.to(tl.float32) * sign
    # torch.lerp: self + w*(end - self) for w < 0.5, else end - (end - self)*(1 - w), each
    # rounded once (an fma, as torch's lerp kernels and csrc/guard_math.h round it); and
    # addcmul's v*beta2 + ((1 - beta2)*g)*g with one rounding of the sum, as torch's CPU kernel
    # and guard_math.h. With fp fusion off these are the kernel's only fmas: written out, so
    # the update has the C++/CUDA kernels' bits (tests: the same bits as cpp under the
    # interpreter where it rounds tl.fma once; cuda's on a GPU).
    d = g - m
    m_new = tl.where(one_minus_beta1 < 0.5, tl.fma(one_minus_beta1, d, m), tl.fma(-d, 1.0 - one_minus_beta1, g))
    v_new = tl.fma(one_minus_beta2 * g, g, v * beta2)
    denom = tl.div_rn(tl.sqrt_rn(v_new), bc2_sqrt) + eps
    p_new = p * decay + tl.div_rn(m_new * step_size, denom)
    if MASK_NONFINITE:
        finite = g * 0.0 == 0.0  # false exactly for NaN and +-Inf
        p_new = tl.where(finite, p_new, p)
        m_new = tl.where(finite, m_new, m)
        v_new = tl.where(finite, v_new, v)
    if P_CODE == 1:  # BF16
        p_out = round_to_bf16(p_new)
    else:
        p_out = p_new.to(p_ptr.dtype.element_ty)
    if EVEN:
        if HAS_SKIP:
            write = (tl.zeros_like(offs).to(tl.float32) + apply) != 0.0  # uniform per program
            tl.store(p_ptr + offs, p_out, mask=write)
            tl.store(m_ptr + offs, m_new, mask=write)
            tl.store(v_ptr + offs, v_new, mask=write)
        else:
            tl.store(p_ptr + offs, p_out)
            tl.store(m_ptr + offs, m_new)
            tl.store(v_ptr + offs, v_new)
    else:
        write = mask
        if HAS_SKIP:
            write = mask & ((tl.zeros_like(offs).to(tl.float32) + apply) != 0.0)
        tl.store(p_ptr + offs, p_out, mask=write)
        tl.store(m_ptr + offs, m_new, mask=write)
        tl.store(v_ptr + offs, v_new, mask=write)
    return acc_sq, acc_sum


@triton.jit
def _guarded_adamw_kernel(
    chunks,  # [C, 4] int64: tensor row, first element, telemetry workspace row, telemetry row
    tensors,  # [N, TENSOR_COLS] int64: p, g, m, v, step addresses, numel, group
    coefs,  # [N, COEF_COLS] float32 from the coefficient kernel
    workspace,  # [*, 2] float64 chunk telemetry (written when TELEMETRY)
    first_chunk,  # [T + 1] int64 (read when TELEMETRY)
    counters,  # [T] int32 (when TELEMETRY)
    out,  # [T, 3] partials (written when TELEMETRY)
    P_CODE: tl.constexpr,
    G_CODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    TELEMETRY: tl.constexpr,
    MASK_NONFINITE: tl.constexpr,
    HAS_SKIP: tl.constexpr,
    TENSOR_COLS_: tl.constexpr,
    COEF_COLS_: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    FOLD: tl.constexpr,
    RBLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = chunks + pid * 4
    t = tl.load(row)
    start = tl.multiple_of(tl.load(row + 1), CHUNK)
    trow = tensors + t * TENSOR_COLS_
    p_ptr = as_pointer(tl.load(trow + 0), P_CODE, ALIGNED) + start
    g_ptr = as_pointer(tl.load(trow + 1), G_CODE, ALIGNED) + start
    m_ptr = as_pointer(tl.load(trow + 2), 0, ALIGNED) + start
    v_ptr = as_pointer(tl.load(trow + 3), 0, ALIGNED) + start
    n = tl.minimum(tl.load(trow + 5) - start, CHUNK)
    crow = coefs + t * COEF_COLS_
    step_size = tl.load(crow + 0)
    bc2_sqrt = tl.load(crow + 1)
    decay = tl.load(crow + 2)
    one_minus_beta1 = tl.load(crow + 3)
    beta2 = tl.load(crow + 4)
    one_minus_beta2 = tl.load(crow + 5)
    eps = tl.load(crow + 6)
    sign = tl.load(crow + 7)
    apply = tl.load(crow + 8)

    offs = tl.arange(0, BLOCK)
    acc_sq = tl.zeros([BLOCK // FOLD], dtype=tl.float64)
    acc_sum = tl.zeros([BLOCK // FOLD], dtype=tl.float64)
    if STAGES > 1:  # (config.Geometry.num_stages)
        # Whole blocks in a branch-free loop Triton pipelines: the loads of the next STAGES - 1
        # blocks are in flight (cp.async into shared memory) while one block's math runs. Blocks
        # past the chunk's whole ones are masked off by a mask uniform over the block (accesses
        # stay 16-byte), then the partial block, masked.
        for i in tl.range(0, CHUNK // BLOCK, num_stages=STAGES):
            lo = i * BLOCK
            acc_sq, acc_sum = _adamw_block(
                p_ptr, g_ptr, m_ptr, v_ptr, lo + offs, (tl.zeros_like(offs) + lo + BLOCK) <= n,
                step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps, sign, apply,
                acc_sq, acc_sum, P_CODE, False, TELEMETRY, MASK_NONFINITE, HAS_SKIP, BLOCK, FOLD,
            )
        lo = (n // BLOCK) * BLOCK
        if lo < n:
            acc_sq, acc_sum = _adamw_block(
                p_ptr, g_ptr, m_ptr, v_ptr, lo + offs, lo + offs < n,
                step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps, sign, apply,
                acc_sq, acc_sum, P_CODE, False, TELEMETRY, MASK_NONFINITE, HAS_SKIP, BLOCK, FOLD,
            )
    else:
        # Whole blocks unmasked (vector loads/stores), the last partial one masked. The trip
        # count is a constant (never a value read from memory) and the branch is uniform per
        # program.
        for i in range(0, CHUNK // BLOCK):
            lo = i * BLOCK
            if lo + BLOCK <= n:
                acc_sq, acc_sum = _adamw_block(
                    p_ptr, g_ptr, m_ptr, v_ptr, lo + offs, None,
                    step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps, sign, apply,
                    acc_sq, acc_sum, P_CODE, True, TELEMETRY, MASK_NONFINITE, HAS_SKIP, BLOCK, FOLD,
                )
            elif lo < n:
                acc_sq, acc_sum = _adamw_block(
                    p_ptr, g_ptr, m_ptr, v_ptr, lo + offs, lo + offs < n,
                    step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps, sign, apply,
                    acc_sq, acc_sum, P_CODE, False, TELEMETRY, MASK_NONFINITE, HAS_SKIP, BLOCK, FOLD,
                )
    if TELEMETRY:
        ws_row = tl.load(row + 2)
        tl.store(workspace + ws_row * 2, tl.sum(acc_sq, axis=0))
        tl.store(workspace + ws_row * 2 + 1, tl.sum(acc_sum, axis=0))
        finish_tensor(workspace, first_chunk, counters, out, tl.load(row + 3), RBLOCK)


_UPDATE = Launcher(_guarded_adamw_kernel)


def guarded_adamw_(
    plan: UpdatePlan, *, scale: Tensor, skip: Optional[Tensor], mask_nonfinite: bool, out: Optional[Tensor] = None,
    grad_factor: Optional[Tensor] = None,
) -> None:
    """Rule 5 over every non-fp64 tensor of ``plan``: the coefficient launch, then one update
    launch per param dtype; with ``out`` (single_pass), the telemetry rows of the gradients
    it reads into ``out`` (``telemetry.new_partials(plan.telemetry, ...)``). ``grad_factor``
    reaches the update through each tensor's ``sign`` coefficient (:mod:`.coefficients`)."""
    adamw_coefficients_(plan, scale, skip, grad_factor)
    geo = geometry()
    tel = plan.telemetry
    for lst in plan.updates:
        _UPDATE(
            (lst.n_chunks,),
            (lst.table, plan.tensors, plan.coefs, tel.workspace, tel.first_chunk, tel.counters,
             tel.workspace if out is None else out),  # (out: not written without telemetry)
            dict(P_CODE=lst.code, G_CODE=lst.g_code, ALIGNED=lst.aligned, TELEMETRY=out is not None,
                 MASK_NONFINITE=mask_nonfinite,
                 HAS_SKIP=skip is not None, TENSOR_COLS_=TENSOR_COLS, COEF_COLS_=COEF_COLS,
                 CHUNK=geo.chunk, BLOCK=geo.block, FOLD=geo.telemetry_fold,
                 RBLOCK=geo.reduce_block, STAGES=pass_stages(geo, single_pass=out is not None)),
            pass_options(geo, single_pass=out is not None),
        )


assert (FP32, BF16) == (0, 1)  # codes used by number in the kernels above
