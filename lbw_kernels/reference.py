"""The guard, in plain PyTorch: telemetry, controller and guarded AdamW update.

This file is the specification (``DESIGN.md``, rules 1-6, from the published
Learn-by-Wire Guard eval rules, arXiv 2605.19008) and the fallback backend that
runs on any device. Every kernel backend is tested against it.

The pieces, in the order one ``step()`` uses them:

* :func:`telemetry_partials` - per gradient tensor ``(sum g^2, sum g, non-finite flag)``:
  the only thing a backend has to reduce over memory.
* :func:`summarize` - partials -> ``(x, signed_mean, grad_norm, nonfinite)``, where ``x`` is
  the max (or mean) over tensors of the per-tensor mean square ``grad_ms``.
* :func:`guard_decide` - the analyzer and controller (rules 1-4) as branch-free tensor math
  on a small state vector, so ``step()`` never waits for the device.
* :func:`adamw_` - AdamW exactly as ``torch.optim.AdamW`` computes it (rule 5), with the
  guard's learning rate and the two ways of leaving elements untouched: the exact gate's
  whole-call skip and single_pass's per-element non-finite mask (rule 6).

All inputs are lists of tensors; nothing here loops over elements in Python or syncs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------
# Guard state: one small vector per optimizer, living on the parameters' device.
# Slots are named so every backend and the optimizer read the same layout.
# ---------------------------------------------------------------------------------------
SCALE = 0  # the learning-rate multiplier in [min_scale, 1]
EMA = 1  # EMA of the telemetry statistic x
PREV_SIGN = 2  # signed mean of the previous analysed call (0 before the first)
ANALYZED = 3  # how many calls reached the analyzer (0 -> the next one starts the EMA)
SKIPPED = 4  # calls skipped because a gradient was non-finite
REGIME = 5  # code of the regime of the latest call that decided (see REGIMES)
SKIP = 6  # 1 when the current call is skipped (read by the exact gate's update)
GRAD_MS = 7  # x of the latest analysed call (max or mean over tensors of mean(g^2))
RATIO = 8  # x / (ema + 1e-12) of the latest analysed call
SIGNED_MEAN = 9  # sum(g) / numel over all tensors, latest analysed call
GRAD_NORM = 10  # global L2 norm of the gradients, latest analysed call
CALLS = 11  # step() calls so far: a CUDA graph replays device work only, so the count lives here
# (exact up to 2^53 calls in float64; on MPS, whose state is float32, up to 2^24 = 16.7M)
STATE_SIZE = 12  # the shared slots; a policy appends its own (policy.extra_slots)

REGIMES = (None, "calm", "oscillation", "spike", "nonfinite", "stress")
CALM, OSCILLATION, SPIKE, NONFINITE, STRESS = 1, 2, 3, 4, 5  # STRESS: policies.ZScorePolicy

# The published analyzer divides by (ema + 1e-12) so a zero gradient stream cannot divide by 0.
RATIO_EPS = 1e-12


@dataclass(frozen=True)
class GuardConfig:
    """Optimizer-wide guard hyper-parameters (same names and defaults as the published ``Guard``)."""

    auto_enabled: bool = True
    stress_threshold: float = 1.1
    spike_threshold: float = 1.5
    min_scale: float = 0.1
    recovery_fast: float = 0.01
    use_max_rms: bool = True
    stats_freq: int = 10
    ema_decay: float = 0.85
    skip_nonfinite: bool = True
    # clip_grad_norm_(max_norm=max_grad_norm) inside the step (exact gate): the update reads every
    # gradient times clip_factor() of the call's global norm; the guard reads them unclipped.
    max_grad_norm: Optional[float] = None
    # Who reads the telemetry and moves the scale: LBWPolicy (the published rules above) or
    # one of lbw_kernels.policies. Rule 1 (non-finite calls) is the same for all.
    policy: Any = field(default_factory=lambda: LBWPolicy())

    def is_telemetry_call(self, call: int) -> bool:
        """Rule 2's schedule: calls 1, f, 2f, ... (counted from 1) read telemetry."""
        return self.auto_enabled and (call == 1 or call % self.stats_freq == 0)

    def telemetry_due(self, calls_before: Tensor) -> Tensor:
        """:meth:`is_telemetry_call` for the call after ``calls_before`` (the ``CALLS`` slot),
        decided on the device: a captured CUDA graph replays the host's choice of one call, so
        a captured step reads telemetry every call and lets this decide whether it counts."""
        call = calls_before + 1
        due = (call == 1) | (torch.fmod(call, self.stats_freq) == 0)
        return due & self.auto_enabled


def state_dtype(device: torch.device) -> torch.dtype:
    """Guard state and telemetry are float64 wherever the device has it (MPS does not)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def state_size(policy) -> int:
    return STATE_SIZE + len(policy.extra_slots)


def new_guard_state(device: torch.device, policy) -> Tensor:
    state = torch.zeros(state_size(policy), dtype=state_dtype(device), device=device)
    state[SCALE] = 1.0
    state[GRAD_MS : GRAD_NORM + 1] = float("nan")  # nothing measured yet; CALLS and a policy's own slots start at 0
    return state


# ---------------------------------------------------------------------------------------
# Telemetry
# ---------------------------------------------------------------------------------------
def _sums(g: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(sum g^2, sum g) of one gradient, read twice, never copied. fp32/fp64 accumulate in their
    own dtype: asking CPU torch for a float64 sum of fp32 materialises a float64 copy of every
    gradient (2.7x the cost of a foreach AdamW step). ``dot`` is ~20x more accurate than
    ``vector_norm`` on fp32 CPU tensors of millions of elements; fp16/bf16 accumulate in fp32."""
    if g.dtype in (torch.float32, torch.float64):
        flat = g.reshape(-1)
        return torch.dot(flat, flat).to(dtype), g.sum().to(dtype)
    return (
        torch.linalg.vector_norm(g, dtype=torch.float32).to(dtype).square(),
        g.sum(dtype=torch.float32).to(dtype),
    )


def telemetry_partials(grads: Sequence[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """Per tensor ``(sum g^2, sum g, nonfinite)`` as a ``[len(grads), 3]`` tensor of ``dtype``.

    ``nonfinite`` is 1.0 when one of the two sums is NaN or Inf, else 0.0: a NaN or Inf element
    makes one so. (So do finite gradients whose sum of squares overflows: above 3.4e38 for
    fp32/fp16/bf16 here, where it is summed in fp32, so a tensor's L2 norm beyond ~1.8e19 skips
    the call as if a gradient were Inf; the kernels sum those in float64 and do not. Squares
    below fp32's range, every |g| under ~1e-23, sum to 0 here and not in the kernels. fp64 sums overflow above
    ~1.3e154 everywhere, and the kernels flag that as this function does.)
    Sums accumulate in the gradients' precision (fp32 for fp16/bf16): relative error ~1e-6 on
    fp32 tensors of millions of elements, none on float64. The kernel backends accumulate in
    float64 and are verified against this function run on float64 copies.
    Grads must be non-empty tensors; the optimizer leaves zero-element ones out.
    """
    return _rows([_sums(g, dtype) for g in grads], dtype)


def _rows(pairs: Sequence[Tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """``[T, 3]`` rows from each gradient's ``(sum g^2, sum g)``: the flag from both sums."""
    sumsq = torch.stack([q for q, _ in pairs])
    sums = torch.stack([s for _, s in pairs])
    nonfinite = (~torch.isfinite(sums) | ~torch.isfinite(sumsq)).to(dtype)
    return torch.stack([sumsq, sums, nonfinite], dim=1)


def scaled_telemetry_partials(grads: Sequence[Tensor], inv_scale: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """:func:`telemetry_partials` of gradients still scaled by ``1/inv_scale`` (GradScaler's
    fused path hands them over so), without the scale's overflow: the squares of fp32 gradients
    scaled by 2**64 overflow the fp32 sums however small the gradients, and GradScaler, whose
    scale doubles every growth interval while the scaled gradients stay finite, gets there in a
    long run. Each gradient is read times ``inv_scale`` as GradScaler's own ``unscale_`` writes
    it (in its dtype; fp16 in float32, which ``unscale_`` refuses), one temporary of one gradient
    at a time, and its sums are scaled back in ``dtype`` (fp64 gradients are summed as they are:
    their squares cannot overflow at a float32 scale). So these are the rows of the scaled
    gradients, which the caller unscales (:func:`unscale_partials`); with a power-of-two scale,
    bitwise the rows of the gradients ``unscale_`` would have written."""
    inv32 = inv_scale.to(torch.float32)
    back = inv_scale.to(dtype).reciprocal()
    pairs = []
    for g in grads:
        if g.dtype == torch.float64:
            pairs.append(_sums(g, dtype))
        else:
            sumsq, total = _sums((g.to(torch.float32) if g.dtype == torch.float16 else g) * inv32, dtype)
            pairs.append((sumsq * back * back, total * back))
    return _rows(pairs, dtype)


def summarize(partials: Tensor, numels: Tensor, use_max_rms: bool, numel_total: Optional[Tensor] = None) -> Tensor:
    """Partials ``[T, 3]`` and element counts ``[T]`` -> ``[x, signed_mean, grad_norm, nonfinite]``.

    ``x`` is ``max_i mean(g_i^2)`` (``use_max_rms``) or the mean over tensors of it; the
    published sensor calls it ``grad_rms`` although it is a mean square. ``numel_total``:
    ``numels.sum()`` when the caller keeps it (the step plan does: one launch less per call;
    a float64 sum of integers below 2**53 is exact in any order, so the bits are the same).
    """
    sumsq, sums, nonfinite = partials.unbind(1)
    grad_ms = sumsq / numels
    x = grad_ms.amax() if use_max_rms else grad_ms.mean()
    signed_mean = sums.sum() / (numels.sum() if numel_total is None else numel_total)
    return torch.stack([x, signed_mean, sumsq.sum().sqrt(), nonfinite.sum()])


# ---------------------------------------------------------------------------------------
# Gradient clipping inside the step (GuardConfig.max_grad_norm)
# ---------------------------------------------------------------------------------------
# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing by it.
CLIP_EPS = 1e-6


def rows_norm(partials: Optional[Tensor], out: Optional[Tensor] = None) -> Optional[Tensor]:
    """Global L2 norm of the gradients whose telemetry rows are ``partials`` [T, 3] (None: no
    rows), written into ``out`` (0-dim, the rows' dtype) when given."""
    return None if partials is None else torch.sqrt(partials[:, 0].sum(), out=out)


def clip_factor(grad_norm: Optional[Tensor], max_norm: float) -> Optional[Tensor]:
    """``clip_grad_norm_``'s factor, ``min(1, max_norm / (norm + 1e-6))``, from the telemetry's
    float64 norm (torch's own is in the gradients' dtype: the factors agree within its
    rounding). A NaN/Inf norm gives a NaN or zero factor, as it does in torch; rule 1 skips
    such a call anyway when ``skip_nonfinite``. None when there is no norm (no rows)."""
    if grad_norm is None:
        return None
    return (max_norm / (grad_norm + CLIP_EPS)).clamp(max=1.0)


# ---------------------------------------------------------------------------------------
# GradScaler's fused path (GuardedAdamW._step_supports_amp_scaling): scaled gradients
# ---------------------------------------------------------------------------------------
def unscale_partials(partials: Tensor, inv_scale: Tensor) -> Tensor:
    """Telemetry rows of gradients scaled by ``1/inv_scale``, as rows of the unscaled ones:
    ``sum g^2`` times ``inv^2``, ``sum g`` times ``inv``. For a power-of-two scale (GradScaler's,
    unless told otherwise) these are the bits the rows of unscaled gradients would have."""
    one = torch.ones_like(inv_scale)
    return partials * torch.stack([inv_scale * inv_scale, inv_scale, one]).to(partials.dtype)


def kept_on_overflow(decided: Tensor, before: Tensor, found_inf: Tensor) -> Tensor:
    """GradScaler found an Inf/NaN (``found_inf != 0``): the call changes nothing, as a call
    GradScaler's own path would not have made (no decision, no count, no cut); only ``SKIP``
    is set, so the update skips too. Else the state ``decided``."""
    kept = before.clone()
    # (fill_, not ``kept[SKIP] = 1.0``: on CUDA, torch 2.11 sends that Python number through a
    # host-to-device copy that waits, seen under set_sync_debug_mode("error"))
    kept.narrow(0, SKIP, 1).fill_(1.0)
    return torch.where(found_inf != 0, kept, decided)


# ---------------------------------------------------------------------------------------
# Analyzer + controller (rules 1-4)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LBWPolicy:
    """The published analyzer and controller (rules 3-4); its thresholds live in GuardConfig
    under the published names. ``policy="lbw"``, the default."""

    name = "lbw"
    extra_slots = ()  # uses the shared slots only

    def telemetry(self, state: Tensor) -> dict:
        return {}

    def check_slots(self, values: Sequence[float], where: str) -> None:
        """A loaded state's own slots (validation.check_guard_values): none here."""

    def analyze(self, state: Sequence[Tensor], x: Tensor, sign: Tensor, norm: Tensor, cfg: "GuardConfig"):
        """Rules 3-4 on one finite telemetry reading -> ({slot: new value}, regime code)."""
        scale = state[SCALE]
        # Analyzer: the EMA is updated before the ratio, and starts at x on its first call.
        prev_ema, prev_sign = state[EMA], state[PREV_SIGN]
        first = state[ANALYZED] == 0
        ema = torch.where(first, x, cfg.ema_decay * prev_ema + (1.0 - cfg.ema_decay) * x)
        ratio = x / (ema + RATIO_EPS)
        # A flip needs one strictly positive and one strictly negative sign; prev_sign is 0
        # before the first analysed call, so that call never flips.
        flip = ((prev_sign > 0) & (sign < 0)) | ((prev_sign < 0) & (sign > 0))
        spike = ratio > cfg.spike_threshold
        oscillation = ~spike & ((ratio > cfg.stress_threshold) | flip)
        decided_scale = torch.where(
            spike,
            (0.7 * scale).clamp_min(cfg.min_scale),
            torch.where(
                oscillation,
                (0.85 * scale).clamp_min(cfg.min_scale),
                (scale + cfg.recovery_fast).clamp_max(1.0),
            ),
        )
        regime = torch.where(spike, SPIKE, torch.where(oscillation, OSCILLATION, CALM)).to(x.dtype)
        return {EMA: ema, PREV_SIGN: sign, RATIO: ratio, SCALE: decided_scale}, regime


def guard_decide(
    state: Tensor,
    summary: Optional[Tensor],
    *,
    analyze: Union[bool, Tensor],
    check_finite: bool,
    cfg: GuardConfig,
) -> Tensor:
    """Return the guard state after one call; ``state`` itself is not modified.

    ``analyze`` (a telemetry call with the guard on) and ``check_finite`` (``skip_nonfinite``)
    are facts of the call, known on the host; ``analyze`` may instead be a device bool
    (:meth:`GuardConfig.telemetry_due`, for captured steps). Everything that depends on the
    gradients is chosen with ``torch.where``. ``summary`` is :func:`summarize`'s output (None
    when neither flag is set). The policy (``cfg.policy``) decides a finite call; rule 1 is the
    same for every policy.
    """
    new = list(state.unbind())
    new[CALLS] = new[CALLS] + 1
    analyze_on_device = isinstance(analyze, Tensor)
    if not (analyze_on_device or analyze or check_finite):
        new[SKIP] = torch.zeros_like(new[SKIP])
        return torch.stack(new)
    x, sign, norm, nonfinite_count = summary.to(state.dtype).unbind()
    nonfinite = (nonfinite_count > 0) if check_finite else torch.zeros_like(x, dtype=torch.bool)
    scale = new[SCALE]

    if analyze_on_device or analyze:
        decided, regime = cfg.policy.analyze(new, x, sign, norm, cfg)
        # Rule 1 comes first: a non-finite call leaves the policy's history as it was.
        ok = ~nonfinite & analyze if analyze_on_device else ~nonfinite
        for slot, value in (
            (GRAD_MS, x),
            (SIGNED_MEAN, sign),
            (GRAD_NORM, norm),
            *decided.items(),
            (REGIME, regime),
        ):
            new[slot] = torch.where(ok, value, new[slot])
        new[ANALYZED] = new[ANALYZED] + ok.to(x.dtype)

    if check_finite:
        skipped_scale = (0.7 * scale).clamp_min(cfg.min_scale) if cfg.auto_enabled else scale
        new[SCALE] = torch.where(nonfinite, skipped_scale, new[SCALE])
        new[REGIME] = torch.where(nonfinite, torch.full_like(x, NONFINITE), new[REGIME])
        new[SKIPPED] = new[SKIPPED] + nonfinite.to(x.dtype)
    new[SKIP] = nonfinite.to(x.dtype)
    return torch.stack(new)


# ---------------------------------------------------------------------------------------
# Guarded AdamW update (rules 5, 6)
# ---------------------------------------------------------------------------------------
def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Float64 params are updated in float64; fp32, bf16 and fp16 params in fp32."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def state_tensor_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """exp_avg / exp_avg_sq dtype: the param's, except fp32 for bf16/fp16 params."""
    return math_dtype(param_dtype)


@torch.no_grad()
def adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    weight_decay: float | Tensor,
    maximize: bool = False,
    skip: Optional[Tensor] = None,
    mask_nonfinite: bool = False,
    grad_factor: Optional[Tensor] = None,
) -> None:
    """One AdamW step, in place, as ``torch.optim.AdamW`` computes it (decoupled decay)::

        p *= 1 - lr*wd;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
        p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps),   bc = 1 - beta**step

    ``lr`` is a 0-dim tensor: the group's learning rate times the guard's scale.
    ``skip`` (0-dim, non-zero = skip) is the exact gate's rule 1: when set, no p, m, v or step
    changes. ``mask_nonfinite`` is single_pass's rule 6: an element whose gradient is NaN/Inf
    keeps its p, m, v while the others update and the step count advances. ``grad_factor``
    (0-dim, e.g. :func:`clip_factor`) multiplies every gradient element as it is read, rounded
    once to the math dtype, as ``clip_grad_norm_`` multiplies fp32 gradients by its fp32
    factor; the gradients themselves are left as they are.
    Params share one dtype (fp16, bf16, fp32 or fp64); ``exp_avg``/``exp_avg_sq`` are fp32 for
    fp16/bf16 params, and the math runs in fp32 (fp64 for fp64 params). ``steps`` are 0-dim
    float32 tensors, one per param, advanced here.
    """
    if not params:
        return
    # A tensor hyper-parameter (torch.optim's tensor betas; 0-dim: StepPlan.group_tensors) counts
    # as the number it holds, as a Python float would: in lr's dtype, so its own dtype does not
    # promote the coefficients below (a bf16 weight_decay would round the decay to bf16).
    beta1, beta2, eps, weight_decay = (
        x.to(lr.dtype) if isinstance(x, Tensor) else x for x in (beta1, beta2, eps, weight_decay)
    )
    md = math_dtype(params[0].dtype)
    low_precision = params[0].dtype != md
    p = [x.to(md) for x in params] if low_precision else list(params)
    g = [x.to(md) for x in grads]
    if grad_factor is not None:  # (a new list: .to(md) may have returned the gradients themselves)
        g = torch._foreach_mul(g, grad_factor.to(md))
    if maximize:
        g = torch._foreach_neg(g)

    # Which elements update: all (None), all-or-nothing (exact gate) or the finite ones.
    if skip is not None:
        apply = [(skip == 0)] * len(p)
    elif mask_nonfinite:
        apply = [torch.isfinite(x) for x in g]
    else:
        apply = None
    if apply is not None:
        # Zeros where nothing applies make the identity coefficients below exact (NaN*0 is NaN).
        g = [torch.where(a, x, 0) for a, x in zip(apply, g)]

    advance = 1.0 if skip is None else (skip == 0).to(torch.float32)
    # (a tensor once per step count: foreach's one-tensor overload reads it on the host, which
    # a meta tensor, stepped by memory-estimation and tracing tools, cannot do)
    torch._foreach_add_(list(steps), advance if skip is None else [advance] * len(steps))
    # Per-tensor coefficients are computed in lr's dtype (float64 but on MPS), as
    # torch.optim.AdamW computes them in Python floats, then rounded once to the math dtype.
    # A skipped first call leaves step at 0; clamping keeps the unused coefficients finite.
    steps = list(steps)
    try:
        step = torch.stack(steps)
    except RuntimeError:  # one-element steps of several shapes ([1] beside 0-dim: the checks take any)
        step = torch.stack([s.reshape(()) for s in steps])
    step = step.to(lr.dtype).clamp_min(1)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step).sqrt().to(md)
    step_size = (-lr / bias_correction1).to(md).unbind()
    decay = (1 - lr * weight_decay).to(md)
    one = torch.ones((), dtype=md, device=lr.device)

    def in_math(x):  # a coefficient, rounded once to the math dtype (a float: by the multiply)
        return x.to(md) if isinstance(x, Tensor) else one * x

    def where_applied(value, identity):
        if apply is None:
            return [value] * len(p)
        return [torch.where(a, value, identity) for a in apply]

    torch._foreach_mul_(p, where_applied(decay, one))
    torch._foreach_lerp_(list(exp_avgs), g, where_applied(in_math(1 - beta1), 0 * one))
    torch._foreach_mul_(list(exp_avg_sqs), where_applied(in_math(beta2), one))
    if isinstance(beta2, Tensor):  # addcmul's value is a host number: scale one factor instead
        torch._foreach_addcmul_(list(exp_avg_sqs), torch._foreach_mul(g, in_math(1 - beta2)), g)
    else:
        torch._foreach_addcmul_(list(exp_avg_sqs), g, g, value=1 - beta2)
    # p += m / denom with denom = (sqrt(v)/sqrt(bc2) + eps) / step_size (step_size < 0):
    # folding the step size into denom needs no temporary the size of m. Where nothing
    # applies, eps is replaced by inf: m / inf = 0 leaves p exactly as it was.
    if apply is not None:
        # The zeroed gradients are ours and no longer needed: reuse them for denom (one fresh
        # buffer per tensor per call instead of two; CPU torch page-faults fresh ones in).
        denom = [torch.sqrt(v, out=buf) for v, buf in zip(exp_avg_sqs, g)]
    else:
        denom = torch._foreach_sqrt(list(exp_avg_sqs))
    torch._foreach_div_(denom, list(bias_correction2_sqrt.unbind()))
    torch._foreach_add_(denom, where_applied(in_math(eps), one * float("inf")))
    torch._foreach_div_(denom, list(step_size))
    torch._foreach_addcdiv_(p, list(exp_avgs), denom)
    if low_precision:
        torch._foreach_copy_(list(params), p)
