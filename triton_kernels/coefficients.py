"""Per-tensor AdamW coefficients and step counts, on the device.

One tiny launch (O(tensors), not a pass over parameters) before the update: every program
of the update kernel then reads its tensor's coefficients instead of re-deriving them, and
the step counts are advanced exactly once per tensor (the update's programs could not do it
without racing each other).

For tensor ``i`` of group ``j`` (float64, like ``torch.optim.AdamW``'s Python floats, then
rounded once to float32 as :func:`lbw_kernels.reference.adamw_` does)::

    advance   = 0 if skip != 0 else 1          (skip: the exact gate's rule 1; absent -> 1)
    step_i   += advance                        (0-dim float32 state['step'], written here)
    t         = max(step_i, 1);  lr_t = lr_j * scale
    coefs[i]  = [-lr_t / (1 - beta1^t), sqrt(1 - beta2^t), 1 - lr_t * wd_j,
                 1 - beta1, beta2, 1 - beta2, eps, sign, advance]
    sign      = (-1 if maximize else 1) * grad_factor     (grad_factor: the clipping; absent -> 1)

The update multiplies each gradient element by ``sign`` in float32: for the clipping factor
that is the reference's ``g * float32(factor)`` (and ``clip_grad_norm_``'s on fp32 gradients).

``beta^t`` is ``exp(t * log(beta))`` in float64 (beta = 0 gives exp(-inf) = 0, as 0^t).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .chunk_table import BETA1, BETA2, COEF_COLS, EPS, GROUP, GROUP_COLS, SIGN, STEP, TENSOR_COLS, WEIGHT_DECAY, UpdatePlan
from .config import COMPILE_OPTIONS, geometry, poison_enabled
from .launch import Launcher

# Columns of the coefficient rows (float32).
STEP_SIZE, BC2_SQRT, DECAY, ONE_MINUS_BETA1, BETA2_C, ONE_MINUS_BETA2, EPS_C, SIGN_C, APPLY = range(9)


@triton.jit
def _adamw_coefficients_kernel(
    tensors,  # [N, TENSOR_COLS] int64
    hyper,  # [G, GROUP_COLS] float64
    lr_ptrs,  # [G] int64 addresses of float64 learning rates
    scale_ptr,  # 0-dim guard scale (float64)
    skip_ptr,  # 0-dim guard skip flag (float64), read when HAS_SKIP
    factor_ptr,  # 0-dim gradient factor (float64), read when HAS_FACTOR
    coefs,  # [N, COEF_COLS] float32 out
    n_tensors,
    HAS_SKIP: tl.constexpr,
    HAS_FACTOR: tl.constexpr,
    TENSOR_COLS_: tl.constexpr,
    GROUP_COLS_: tl.constexpr,
    COEF_COLS_: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = t < n_tensors
    trow = tensors + t.to(tl.int64) * TENSOR_COLS_
    step_ptr = tl.load(trow + 4, mask=live, other=0).to(tl.pointer_type(tl.float32))  # STEP
    group = tl.load(trow + 6, mask=live, other=0)  # GROUP
    hrow = hyper + group * GROUP_COLS_
    lr = tl.load(tl.load(lr_ptrs + group, mask=live, other=0).to(tl.pointer_type(tl.float64)), mask=live, other=0.0)
    beta1 = tl.load(hrow + 1, mask=live, other=0.5)  # BETA1 ... SIGN (dead lanes: log-safe)
    beta2 = tl.load(hrow + 2, mask=live, other=0.5)
    eps = tl.load(hrow + 3, mask=live, other=0.0)
    wd = tl.load(hrow + 4, mask=live, other=0.0)
    sign = tl.load(hrow + 5, mask=live, other=1.0)
    if HAS_FACTOR:
        sign = sign * tl.load(factor_ptr).to(tl.float64)
    scale = tl.load(scale_ptr).to(tl.float64)
    advance = tl.full([BLOCK_T], 1.0, tl.float32)
    if HAS_SKIP:
        advance = tl.where(tl.load(skip_ptr) != 0, 0.0, advance)
    step = tl.load(step_ptr, mask=live, other=0.0) + advance
    tl.store(step_ptr, step, mask=live)
    # A skipped first call leaves step at 0; clamping keeps the unused coefficients finite.
    t64 = tl.maximum(step.to(tl.float64), 1.0)
    lr_t = lr * scale
    bias_correction1 = 1.0 - tl.exp(t64 * tl.log(beta1))
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(t64 * tl.log(beta2)))
    crow = coefs + t.to(tl.int64) * COEF_COLS_
    tl.store(crow + 0, (-lr_t / bias_correction1).to(tl.float32), mask=live)
    tl.store(crow + 1, bc2_sqrt.to(tl.float32), mask=live)
    tl.store(crow + 2, (1.0 - lr_t * wd).to(tl.float32), mask=live)
    tl.store(crow + 3, (1.0 - beta1).to(tl.float32), mask=live)
    tl.store(crow + 4, beta2.to(tl.float32), mask=live)
    tl.store(crow + 5, (1.0 - beta2).to(tl.float32), mask=live)
    tl.store(crow + 6, eps.to(tl.float32), mask=live)
    tl.store(crow + 7, sign.to(tl.float32), mask=live)
    tl.store(crow + 8, advance, mask=live)


_COEFFICIENTS = Launcher(_adamw_coefficients_kernel)


def adamw_coefficients_(plan: UpdatePlan, scale: Tensor, skip: Tensor | None, grad_factor: Tensor | None = None) -> None:
    """Advance every step count of ``plan`` and write its coefficient rows (one launch)."""
    if plan.n_tensors == 0:
        return
    if poison_enabled():
        plan.coefs.fill_(float("nan"))
    geo = geometry()
    _COEFFICIENTS(
        (triton.cdiv(plan.n_tensors, geo.tensors_per_program),),
        (plan.tensors, plan.hyper, plan.lr_ptrs, scale, scale if skip is None else skip,
         scale if grad_factor is None else grad_factor, plan.coefs, plan.n_tensors),
        dict(HAS_SKIP=skip is not None, HAS_FACTOR=grad_factor is not None, TENSOR_COLS_=TENSOR_COLS, GROUP_COLS_=GROUP_COLS, COEF_COLS_=COEF_COLS,
             BLOCK_T=geo.tensors_per_program),
        dict(num_warps=4, **COMPILE_OPTIONS),
    )


# The kernel reads these table columns by number; keep them in step with chunk_table.py.
assert (STEP, GROUP) == (4, 6) and (BETA1, BETA2, EPS, WEIGHT_DECAY, SIGN) == (1, 2, 3, 4, 5)
