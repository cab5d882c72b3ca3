"""Check a backend against the float64 reference on random problems.

Used by ``python -m lbw_kernels verify`` and by the test suite, so the command a user runs
and the tests CI runs are the same checks. A problem is a list of :class:`GroupTensors` with
random, non-zero params, gradients and AdamW state (odd sizes, a zero-element tensor, several
groups with their own hyper-parameters). The reference runs on float64 copies; the backend on
the problem's dtype; the two are compared element by element within :data:`TOLERANCES`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference as ref
from .backends import Backend, GroupTensors, ReferenceBackend, nonempty_grads

# (atol, rtol) of a backend's result against the float64 reference: |got - want| must stay
# within atol + rtol*|want|. Set at about twice the error of the reference itself run in the
# low precision (measured over random problems: fp32 params 7e-8 absolute, m 6e-8 absolute,
# v 1.5e-7 relative; bf16/fp16 params half an ulp of the param dtype), so a kernel may round
# differently but not compute something else: a 1e-4 relative error in lr fails fp32.
PARAM_TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),  # same math, other rounding order: ~1e-16
    torch.float32: (2.5e-7, 2.5e-7),  # p*decay rounds at |p_old|, p_new at |p_new|: ~1 ulp of 1
    torch.bfloat16: (1e-6, 2.0**-7),  # one bf16 ulp (8 significant bits)
    torch.float16: (1e-7, 2.0**-10),  # one fp16 ulp; atol: the subnormal step is 6e-8
}
# exp_avg and exp_avg_sq live in the math dtype: fp64 for fp64 params, fp32 otherwise.
EXP_AVG_TOLERANCE = {torch.float64: (1e-12, 1e-12), "fp32": (1.5e-7, 4e-7)}
EXP_AVG_SQ_TOLERANCE = {torch.float64: (1e-15, 1e-12), "fp32": (1e-12, 4e-7)}
# Telemetry partials are float64 sums of the same gradient values (every backend accumulates
# in float64): they differ only by summation order, ~1e-13 relative for these sizes.
PARTIALS_TOLERANCE = (1e-10, 1e-9)
# A backend that sums fp32/bf16/fp16 gradients in fp32 (the reference: torch's own reductions)
# is within ~1e-6 relative on sums of squares and ~4e-5 absolute on the signed sums of these
# problems (measured: 1.5e-7 / 8e-7 relative, 4.1e-5 absolute at worst): 4x that.
PARTIALS_TOLERANCE_FP32_SUMS = (2e-4, 4e-6)

ODD_SIZES = ((1,), (3,), (4097,), (0,), (33, 65), (2, 3, 5), (1000,))


@dataclass
class Mismatch:
    what: str
    worst: str

    def __str__(self) -> str:
        return f"{self.what}: {self.worst}"


def make_problem(
    seed: int,
    shapes: Sequence[Tuple[int, ...]] = ODD_SIZES,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    n_groups: int = 2,
    nonfinite_at: Optional[Tuple[int, int, float]] = None,
) -> List[GroupTensors]:
    """Random non-zero problem; tensors are dealt round-robin into ``n_groups`` groups whose
    hyper-parameters differ. ``nonfinite_at=(group, tensor, value)`` plants one NaN/Inf."""
    gen = torch.Generator().manual_seed(seed)
    state_dtype = ref.state_tensor_dtype(dtype)

    def rand(shape, dt, low=-1.0, high=1.0):
        x = torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low
        return x.to(dt).to(device)

    groups = []
    for gi in range(n_groups):
        ps = [s for i, s in enumerate(shapes) if i % n_groups == gi]
        groups.append(
            GroupTensors(
                params=[rand(s, dtype) for s in ps],
                grads=[rand(s, dtype, -2, 2) * (1 + gi) for s in ps],
                exp_avgs=[rand(s, state_dtype, -0.1, 0.1) for s in ps],
                exp_avg_sqs=[rand(s, state_dtype, 1e-4, 1e-2) for s in ps],
                steps=[torch.tensor(float(torch.randint(0, 20, (), generator=gen)), device=device) for _ in ps],
                lr=1e-2 * (gi + 1),
                beta1=0.9 - 0.05 * gi,
                beta2=0.999 - 0.01 * gi,
                eps=1e-8 * (10**gi),
                weight_decay=0.1 * gi,
                maximize=gi % 2 == 1,
            )
        )
    if nonfinite_at is not None:
        gi, ti, value = nonfinite_at
        groups[gi].grads[ti].view(-1)[groups[gi].grads[ti].numel() // 2] = value
    return groups


def clone_problem(groups: Sequence[GroupTensors], dtype: Optional[torch.dtype] = None) -> List[GroupTensors]:
    """Deep copy; ``dtype`` converts params/grads and (for float64) the states too."""

    def c(xs, dt=None):
        return [x.detach().to(dtype=dt or x.dtype, copy=True) for x in xs]

    sdt = None if dtype is None else ref.state_tensor_dtype(dtype)
    return [
        replace(
            g,
            params=c(g.params, dtype),
            grads=c(g.grads, dtype),
            exp_avgs=c(g.exp_avgs, sdt),
            exp_avg_sqs=c(g.exp_avg_sqs, sdt),
            steps=c(g.steps),
        )
        for g in groups
    ]


def worst(actual: Tensor, expected: Tensor, atol: float | Tensor, rtol: float) -> Optional[str]:
    """None when ``|actual - expected| <= atol + rtol*|expected|`` everywhere (NaN matches NaN;
    ``atol`` may be a per-element float64 CPU tensor), else a description of the worst element."""
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    e = expected.detach().to("cpu", torch.float64).reshape(-1)
    if a.shape != e.shape:
        return f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    both_nan = torch.isnan(a) & torch.isnan(e)
    same_inf = torch.isinf(a) & (a == e)
    diff = torch.where(both_nan | same_inf, 0.0, (a - e).abs())
    diff = torch.where(torch.isnan(diff), float("inf"), diff)
    excess = diff - (atol + rtol * e.abs().nan_to_num(0.0))
    if a.numel() == 0 or excess.max() <= 0:
        return None
    i = int(excess.argmax())
    bound = atol[i].item() if isinstance(atol, Tensor) else atol
    return f"worst element {i}: got {a[i].item()!r}, expected {e[i].item()!r} (|diff| {diff[i].item():.3g}, atol {bound:.3g}, rtol {rtol})"


def compare_groups(actual, expected, dtype, what: str) -> List[Mismatch]:
    out = []
    state_key = torch.float64 if dtype == torch.float64 else "fp32"
    for gi, (a, e) in enumerate(zip(actual, expected)):
        for field, (atol, rtol) in (
            ("params", PARAM_TOLERANCES[dtype]),
            ("exp_avgs", EXP_AVG_TOLERANCE[state_key]),
            ("exp_avg_sqs", EXP_AVG_SQ_TOLERANCE[state_key]),
            ("steps", (0.0, 0.0)),
        ):
            for ti, (x, y) in enumerate(zip(getattr(a, field), getattr(e, field))):
                msg = worst(x, y, atol, rtol)
                if msg:
                    out.append(Mismatch(f"{what} group {gi} {field}[{ti}] {tuple(x.shape)}", msg))
    return out


def check_backend(
    backend: Backend,
    seed: int = 0,
    shapes: Sequence[Tuple[int, ...]] = ODD_SIZES,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    nonfinite_at: Optional[Tuple[int, int, float]] = None,
) -> List[Mismatch]:
    """Run telemetry, the exact-gate update (skip off and on) and the single_pass update of
    ``backend`` on one random problem; return every mismatch with the float64 reference."""
    problem = make_problem(seed, shapes, dtype, device, nonfinite_at=nonfinite_at)
    pdtype = ref.state_dtype(torch.device(device))
    reference = ReferenceBackend()
    scale = torch.tensor(0.73, dtype=pdtype, device=device)
    failures: List[Mismatch] = []

    # Telemetry partials.
    partials_tol = (
        PARTIALS_TOLERANCE
        if backend.telemetry_in_float64 or dtype == torch.float64
        else PARTIALS_TOLERANCE_FP32_SUMS
    )
    got = backend.telemetry(nonempty_grads(clone_problem(problem)), pdtype)
    want = reference.telemetry(nonempty_grads(clone_problem(problem, torch.float64)), pdtype)
    msg = worst(got, want, *partials_tol)
    if msg:
        failures.append(Mismatch("telemetry partials", msg))

    # Exact gate, with and without a skip.
    for skip_value in (0.0, 1.0):
        skip = torch.tensor(skip_value, dtype=pdtype, device=device)
        actual, expected = clone_problem(problem), clone_problem(problem, torch.float64)
        backend.adamw_(actual, scale=scale, skip=skip)
        reference.adamw_(expected, scale=scale, skip=skip)
        failures += compare_groups(actual, expected, dtype, f"adamw_ skip={skip_value:g}")
    # Exact gate with a gradient factor (max_grad_norm's clipping), read on the device.
    factor = torch.tensor(0.37, dtype=pdtype, device=device)
    actual, expected = clone_problem(problem), clone_problem(problem, torch.float64)
    skip = torch.tensor(0.0, dtype=pdtype, device=device)
    backend.adamw_(actual, scale=scale, skip=skip, grad_factor=factor)
    reference.adamw_(expected, scale=scale, skip=skip, grad_factor=factor)
    failures += compare_groups(actual, expected, dtype, "adamw_ grad_factor=0.37")

    # single_pass: update and telemetry in one call, non-finite elements masked.
    for mask in (True, False):
        if not mask and nonfinite_at is not None:
            continue  # unmasked NaN propagates; nothing meaningful to compare
        actual, expected = clone_problem(problem), clone_problem(problem, torch.float64)
        got = backend.adamw_telemetry_(actual, scale=scale, mask_nonfinite=mask, partials_dtype=pdtype)
        want = reference.adamw_telemetry_(expected, scale=scale, mask_nonfinite=mask, partials_dtype=pdtype)
        msg = worst(got, want, *partials_tol)
        if msg:
            failures.append(Mismatch(f"adamw_telemetry_ mask={mask} partials", msg))
        failures += compare_groups(actual, expected, dtype, f"adamw_telemetry_ mask={mask}")
    return failures


# Multi-step runs compare a backend with the reference in the SAME dtype: both round the param
# once per step, so they differ only where fp32 math ordering flips a rounding, by one ulp that
# may persist: two ulps of slack. A store that truncates instead of rounding drifts one way by
# ~half an ulp per step and leaves this band within 12 steps (a single step cannot show it).
STREAM_ULPS = 2.0
LR = 3e-2
STREAM_SHAPES = ((1,), (3,), (4097,), (0,), (33, 65))


def check_optimizer_stream(
    name: str, dtype: torch.dtype, device: str | torch.device = "cpu", calls: int = 12, seed: int = 0,
    policy: str = "lbw",
) -> List[Mismatch]:
    """``GuardedAdamW(backend=name, policy=policy)`` against ``backend="reference"`` over ``calls``
    calls of a stream with a spike of two calls (zscore cuts on the second hot call in a row), a
    sign flip and a NaN, for both gates: same regimes and skips, params within
    :data:`STREAM_ULPS` ulps of ``dtype`` (float64: 1e-12), and the scale within 1e-12 for the
    published rules (their cuts and recoveries are fixed factors and steps: equal decisions give
    equal scales) and within 1e-5 relative for zscore, whose cut exp(-0.5 (z - 2.5)) follows
    the gradient norm continuously, and the reference sums its telemetry in the gradients'
    float32 where the kernels sum in float64 (~1e-7 relative apart)."""
    from .optimizer import GuardedAdamW

    gen = torch.Generator().manual_seed(seed)
    start = [torch.rand(s, generator=gen, dtype=torch.float64).mul(2).sub(1) for s in STREAM_SHAPES]
    stream = []
    for k in range(calls):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in STREAM_SHAPES]
        if k in (2, 3):
            grads = [g * 30 for g in grads]  # spike
        if k == 4:
            grads = [g - 2 for g in grads]  # the signed mean flips
        if k == 6:
            grads[2][5] = float("nan")
        stream.append([g.to(dtype).to(device) for g in grads])
    failures: List[Mismatch] = []
    for gate in ("exact", "single_pass"):
        runs = {}
        for backend in (name, "reference"):
            params = [p.to(dtype).to(device) for p in start]
            opt = GuardedAdamW(params, lr=LR, weight_decay=0.1, stats_freq=1, gate=gate, backend=backend,
                               policy=policy)
            trace = []
            for grads in stream:
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                opt.step()
                t = opt.telemetry()
                trace.append((t["regime"], t["skipped_steps"], t["scale"]))
            runs[backend] = (params, trace)
        (params, trace), (want_params, want_trace) = runs[name], runs["reference"]
        what = f"{calls}-call stream, gate={gate}, policy={policy}"
        if [t[:2] for t in trace] != [t[:2] for t in want_trace]:
            failures.append(Mismatch(f"{what} regimes/skips", f"got {trace}, expected {want_trace}"))
        for k, (t, w) in enumerate(zip(trace, want_trace)):
            tol = 1e-12 if policy == "lbw" else 1e-5 * abs(w[2])
            if not abs(t[2] - w[2]) <= tol:  # (a NaN scale on either side is a mismatch)
                failures.append(Mismatch(f"{what} scale after call {k + 1}", f"got {t[2]!r}, expected {w[2]!r}"))
                break
        for i, (x, y) in enumerate(zip(params, want_params)):
            if dtype == torch.float64:
                atol, rtol = 1e-12, 1e-12
            else:
                # An ulp where the element has been (a value that shrank from 0.5 to 0.01
                # carries the rounding of 0.5; torch.finfo.eps is the spacing at 1), plus an ulp
                # of the updates themselves (at most lr per call), whose fp32 math may differ.
                seen = torch.maximum(start[i].abs(), y.detach().cpu().double().abs()) + LR * calls
                atol, rtol = (STREAM_ULPS * torch.finfo(dtype).eps * seen).reshape(-1), 0.0
            msg = worst(x, y, atol, rtol)
            if msg:
                failures.append(Mismatch(f"{what} params[{i}] {tuple(x.shape)}", msg))
    return failures


def verify_backend(backend: Backend, device: str | torch.device = "cpu", seeds: int = 3) -> List[Mismatch]:
    """The suite ``python -m lbw_kernels verify`` runs per backend: several seeds, every dtype,
    a planted NaN and an Inf, many small tensors; then multi-step optimizer runs against the
    reference in the same dtype."""
    failures: List[Mismatch] = []
    many = tuple((int(n),) for n in torch.randint(1, 3000, (300,), generator=torch.Generator().manual_seed(7)))
    cases = []
    for seed in range(seeds):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            cases.append(dict(seed=seed, dtype=dtype))
    cases.append(dict(seed=11, dtype=torch.float32, nonfinite_at=(0, 2, float("nan"))))
    cases.append(dict(seed=12, dtype=torch.float32, nonfinite_at=(1, 2, float("inf"))))
    cases.append(dict(seed=13, dtype=torch.float32, shapes=many))
    for case in cases:
        for m in check_backend(backend, device=device, **case):
            label = ", ".join(f"{k}={v}" for k, v in case.items() if k != "shapes")
            failures.append(Mismatch(f"[{backend.name} {label}] {m.what}", m.worst))
    if backend.name != "reference":
        # (both policies: the kernel backends run each through their own controller kernel)
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for policy in ("lbw", "zscore"):
                for m in check_optimizer_stream(backend.name, dtype, device=device, policy=policy):
                    failures.append(Mismatch(f"[{backend.name} dtype={dtype}] {m.what}", m.worst))
    return failures
