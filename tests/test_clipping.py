"""``max_grad_norm``: clip_grad_norm_ inside the step, from the telemetry's own norm.

What it must equal: ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` then the same
step without it, for AdamW (the guard off: ``torch.optim.AdamW``) and for the guard's update
(with the scale the guard decided on gradients read before clipping). Tolerances: the factor
comes from the telemetry's float64 norm where torch computes it in the gradients' dtype, so
the fp32 factors differ in the last bit at most. Params are compared within 1e-6 (fp32; bf16
within one bf16 rounding, 2**-7 relative), but AdamW's update hardly changes when every
gradient is scaled alike, so the factor itself is checked through ``exp_avg``, which is linear
in it: within 1e-5 of each tensor's largest value (a factor off by 1e-4 fails; agreement is
~2e-7).
"""

import copy
import math

import pytest
import torch

from lbw_kernels import GuardedAdamW
from lbw_kernels import reference as ref
from gpu_checks import assert_graph_replay_matches_eager, assert_step_never_syncs, kernel_gpu_backends, require_backend
from test_no_sync import host_reads_forbidden

SHAPES = [(5, 4), (0,), (4097,), (1,), (3, 3)]
MAX_NORM = 2.0


def grad_stream(calls, dtype, seed=1):
    """Gradients whose global norm is above MAX_NORM on odd calls (clipped: factor < 1) and
    below it on even ones (factor 1: nothing to clip), independent of the params."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(calls):
        size = 5.0 if k % 2 == 0 else 0.002
        out.append([(torch.randn(s, generator=gen, dtype=torch.float64) * size).to(dtype) for s in SHAPES])
    return out


def new_params(dtype, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_() for s in SHAPES]


def feed(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.device).clone()


def assert_same_exp_avg(ours, theirs, ours_opt, theirs_opt, rel=1e-5):
    for a, b in zip(ours, theirs):
        if a.numel() == 0:
            continue
        m, want = ours_opt.state[a]["exp_avg"].double(), theirs_opt.state[b]["exp_avg"].double()
        torch.testing.assert_close(m, want, rtol=0, atol=rel * float(want.abs().max()))


def tolerance(dtype):
    """One bf16 rounding of a param (8 significant bits); for fp32, the factor's last bit."""
    return dict(rtol=2**-7, atol=2**-10) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_guard_off_equals_clip_grad_norm_then_torch_adamw(backend, dtype, maximize):
    stream = grad_stream(6, dtype)
    ours, theirs = new_params(dtype), new_params(dtype)
    kw = dict(lr=1e-2, weight_decay=0.1, maximize=maximize)
    opt = GuardedAdamW([{"params": ours[:3]}, {"params": ours[3:], "lr": 3e-3}], auto_enabled=False,
                       max_grad_norm=MAX_NORM, backend=backend, **kw)
    theirs_groups = [{"params": theirs[:3]}, {"params": theirs[3:], "lr": 3e-3}]
    # (torch's AdamW keeps bf16 params' moments in bf16, ours in fp32: bf16 is compared with our
    # unclipped reference after clip_grad_norm_, which rounds the clipped gradients to bf16)
    torch_opt = (GuardedAdamW(theirs_groups, auto_enabled=False, backend="reference", **kw)
                 if dtype == torch.bfloat16 else torch.optim.AdamW(theirs_groups, **kw))
    factors = []
    for grads in stream:
        feed(ours, grads)
        feed(theirs, grads)
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, MAX_NORM)
        factors.append(min(1.0, MAX_NORM / (float(norm) + 1e-6)))
        torch_opt.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **tolerance(dtype))
        # (bf16: torch's clip rounds the clipped gradients to bf16, ours reads them in fp32)
        assert_same_exp_avg(ours, theirs, opt, torch_opt, rel=2**-5 if dtype == torch.bfloat16 else 1e-5)
    # both branches of the clamp were taken, so a factor of 1 (no clipping) could not pass
    assert min(factors) < 0.01 and max(factors) == 1.0, factors


@pytest.mark.parametrize("stats_freq, skip_nonfinite", [(1, True), (3, False)])
def test_guard_reads_unclipped_gradients_and_scales_the_clipped_update(backend, stats_freq, skip_nonfinite):
    """The guard's decisions are those of the same run without clipping (its telemetry is read
    before clipping, and these gradients do not depend on the params), and the params are
    torch's AdamW on clip_grad_norm_'s gradients at the guard's lr. stats_freq=3 without the
    finite check: the norm is still read on every call (calls the guard does not analyse)."""
    dtype = torch.float32
    stream = grad_stream(9, dtype)
    stream[4] = [g * 40 for g in stream[4]]  # a spike: the guard cuts the scale
    kw = dict(lr=1e-2, weight_decay=0.1, stats_freq=stats_freq, skip_nonfinite=skip_nonfinite, backend=backend)
    clipped, unclipped, theirs = new_params(dtype), new_params(dtype), new_params(dtype)
    opt = GuardedAdamW(clipped, max_grad_norm=MAX_NORM, **kw)
    plain = GuardedAdamW(unclipped, **kw)
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for grads in stream:
        feed(clipped, grads)
        feed(unclipped, grads)
        feed(theirs, grads)
        opt.step()
        plain.step()
        torch.testing.assert_close(opt._guard, plain._guard, rtol=0, atol=0, equal_nan=True)
        torch.nn.utils.clip_grad_norm_(theirs, MAX_NORM)
        torch_opt.param_groups[0]["lr"] = 1e-2 * opt.telemetry()["scale"]
        torch_opt.step()
        for a, b in zip(clipped, theirs):
            torch.testing.assert_close(a, b, **tolerance(dtype))
        assert_same_exp_avg(clipped, theirs, opt, torch_opt)
    t = opt.telemetry()
    assert t["scale"] < 1 and t["skipped_steps"] == 0
    # the norm the guard reports (call 9 is analysed on both schedules) is the unclipped one, what
    # clip_grad_norm_ returns (within the reference's fp32 sums: 1e-6; the kernels' are float64)
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in stream[-1]))
    assert expected > 10 * MAX_NORM and t["grad_norm"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("auto_enabled, stats_freq", [(True, 1), (True, 3), (False, 1)])
def test_last_grad_norm_is_each_calls_norm_as_clip_grad_norm_returns_it(backend, auto_enabled, stats_freq):
    """For logging every step: after each call, the norm of its gradients before clipping, on
    calls the guard does not analyse (stats_freq=3) and with the guard off too (where
    ``telemetry()["grad_norm"]`` stays NaN); Inf for a call with an Inf gradient (skipped), as
    clip_grad_norm_ returns; NaN before the first call; each value a copy later calls leave
    alone. Within 1e-6 of the float64 norm (the reference sums fp32 gradients in fp32)."""
    params = new_params(torch.float32)
    opt = GuardedAdamW(params, lr=1e-2, max_grad_norm=MAX_NORM, auto_enabled=auto_enabled, stats_freq=stats_freq,
                       backend=backend)
    first = opt.last_grad_norm
    assert first.shape == () and first.dtype == opt._guard.dtype and first.device == params[0].device
    assert math.isnan(float(first))
    stream = grad_stream(6, torch.float32)
    stream[4][2][7] = float("inf")
    seen, expected = [], []
    for grads in stream:
        feed(params, grads)
        opt.step()
        seen.append(opt.last_grad_norm)
        expected.append(math.sqrt(sum(float(g.double().square().sum()) for g in grads)))
    assert opt.telemetry()["skipped_steps"] == 1 and math.isinf(float(seen[4]))
    assert [float(n) for n in seen] == pytest.approx(expected, rel=1e-6)
    assert len({float(n) for n in seen}) == len(seen)  # (every call's own value)
    assert float(copy.deepcopy(opt).last_grad_norm) == float(seen[-1])  # (copies and pickles keep it)
    assert math.isnan(float(first))
    # Calls without gradient elements, each after a call with a norm: clip_grad_norm_'s norm of
    # them, 0 (not the last call's)
    for grads in ([g if g.numel() == 0 else None for g in stream[0]], [None] * len(params)):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        assert float(opt.last_grad_norm) == 0.0
        feed(params, stream[0])
        opt.step()
        assert float(opt.last_grad_norm) == pytest.approx(expected[0], rel=1e-6)
    assert GuardedAdamW(new_params(torch.float32), backend=backend).last_grad_norm is None


def test_gradients_are_left_as_they_are(backend):
    """The update reads each gradient times the factor; ``.grad`` keeps the unclipped values
    (clip_grad_norm_ would have scaled them in place: README, Use)."""
    params = new_params(torch.float32)
    opt = GuardedAdamW(params, lr=1e-2, max_grad_norm=MAX_NORM, backend=backend)
    grads = grad_stream(1, torch.float32)[0]
    feed(params, grads)
    opt.step()
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert MAX_NORM / (norm + 1e-6) < 0.01  # (clipped: a factor far from 1)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


def test_nonfinite_gradient_still_skips_the_call(backend):
    params = new_params(torch.float32)
    before = [p.detach().clone() for p in params]
    opt = GuardedAdamW(params, lr=1e-2, max_grad_norm=MAX_NORM, backend=backend)
    grads = grad_stream(1, torch.float32)[0]
    grads[2][7] = float("inf")
    feed(params, grads)
    opt.step()
    assert opt.telemetry()["skipped_steps"] == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert float(opt.state[params[0]]["step"]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipping_step_never_reads_device_values(backend, dtype):
    params = new_params(dtype)
    opt = GuardedAdamW(params, lr=1e-2, stats_freq=2, max_grad_norm=MAX_NORM, backend=backend)
    for grads in grad_stream(4, dtype):
        feed(params, grads)
        with host_reads_forbidden():
            opt.step()


def test_compiled_step_equals_eager(backend):
    eager, compiled = new_params(torch.float32), new_params(torch.float32)
    kw = dict(lr=1e-2, stats_freq=2, max_grad_norm=MAX_NORM, backend=backend)
    opt, opt_c = GuardedAdamW(eager, **kw), GuardedAdamW(compiled, **kw)
    step = torch.compile(opt_c.step, backend="aot_eager")
    for grads in grad_stream(4, torch.float32):
        feed(eager, grads)
        feed(compiled, grads)
        opt.step()
        step()
        # (the compiled step writes each call's norm too: into the tensor made before tracing)
        assert float(opt_c.last_grad_norm) == pytest.approx(float(opt.last_grad_norm), rel=1e-12)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt._guard, opt_c._guard, rtol=1e-12, atol=0, equal_nan=True)


def test_compiled_step_writes_each_calls_norm_with_or_without_gradients(backend):
    """Calls with gradients, then none at all, alternately: last_grad_norm is each call's norm,
    then 0 (clip_grad_norm_'s of no gradients), in a compiled step as in an eager one. (torch
    2.13's compiler dropped in-place writes to a 0-dim float64 tensor that is a graph input,
    except where it held NaN when traced: the compiled step kept the previous call's norm.)"""
    params = new_params(torch.float32)
    opt = GuardedAdamW(params, lr=1e-2, stats_freq=1, max_grad_norm=MAX_NORM, backend=backend)
    step = torch.compile(opt.step, backend="aot_eager")
    for grads in grad_stream(3, torch.float32):
        feed(params, grads)
        step()
        want = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))
        assert float(opt.last_grad_norm) == pytest.approx(float(want), rel=1e-6)
        for p in params:
            p.grad = None
        step()
        assert float(opt.last_grad_norm) == 0.0
    assert opt.last_grad_norm.dim() == 0 and opt.last_grad_norm.dtype == torch.float64


def test_options_are_kept_in_state_dict_and_checkpoints_resume():
    params = new_params(torch.float32)
    opt = GuardedAdamW(params, lr=1e-2, max_grad_norm=MAX_NORM, backend="reference")
    stream = grad_stream(4, torch.float32)
    for grads in stream[:2]:
        feed(params, grads)
        opt.step()
    saved = opt.state_dict()
    assert saved["guard"]["config"]["max_grad_norm"] == MAX_NORM
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = GuardedAdamW(resumed_params, lr=1e-2, max_grad_norm=MAX_NORM, backend="reference")
    resumed.load_state_dict(saved)
    for grads in stream[2:]:
        feed(params, grads)
        feed(resumed_params, grads)
        opt.step()
        resumed.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value, error, match", [
    (0.0, ValueError, "max_grad_norm must be a positive finite number"),
    (-1.0, ValueError, "max_grad_norm must be a positive finite number"),
    (float("inf"), ValueError, "max_grad_norm must be a positive finite number"),
    (float("nan"), ValueError, "max_grad_norm must not be NaN"),
    (True, TypeError, "max_grad_norm must be a number"),
    ("1.0", TypeError, "max_grad_norm must be a number"),
    (torch.tensor(1.0), TypeError, "max_grad_norm must be a number, got a tensor"),
])
def test_bad_max_grad_norm_is_refused(value, error, match):
    with pytest.raises(error, match=match):
        GuardedAdamW(new_params(torch.float32), max_grad_norm=value)


def test_single_pass_gate_is_refused():
    with pytest.raises(ValueError, match="max_grad_norm needs gate='exact'"):
        GuardedAdamW(new_params(torch.float32), max_grad_norm=1.0, gate="single_pass")


def test_clip_factor_is_clip_grad_norm_s():
    norm = torch.tensor(8.0, dtype=torch.float64)
    assert float(ref.clip_factor(norm, 2.0)) == 2.0 / (8.0 + 1e-6)
    assert float(ref.clip_factor(norm, 100.0)) == 1.0
    assert ref.clip_factor(None, 2.0) is None


@pytest.mark.parametrize("backend", ["cpp", *kernel_gpu_backends()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_clipping_matches_the_reference(backend, dtype):
    require_backend(backend)
    device = "cpu" if backend == "cpp" else "cuda"
    stream = grad_stream(6, dtype)
    stream[3] = [g * 40 for g in stream[3]]
    ours, theirs = new_params(dtype, device), new_params(dtype, device)
    kw = dict(lr=1e-2, weight_decay=0.1, stats_freq=1, max_grad_norm=MAX_NORM)
    opt = GuardedAdamW(ours, backend=backend, **kw)
    ref_opt = GuardedAdamW(theirs, backend="reference", **kw)
    for grads in stream:
        feed(ours, grads)
        feed(theirs, grads)
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tolerance(dtype))
    # The reference sums fp32/bf16 gradients in fp32 (telemetry_partials), the kernels in
    # float64: the guard's telemetry slots differ by fp32 summation error, seen up to 7e-7
    # relative on these tensors of <= 4097 elements (its bound n * 2^-24 is 2.4e-4); the
    # scale, counts and regime are the same.
    torch.testing.assert_close(opt._guard, ref_opt._guard, rtol=1e-5, atol=1e-12, equal_nan=True)
    exact_slots = [ref.SCALE, ref.ANALYZED, ref.SKIPPED, ref.REGIME, ref.CALLS]
    assert torch.equal(opt._guard[exact_slots], ref_opt._guard[exact_slots])
    assert opt.telemetry()["scale"] < 1


# ------------------------------------------------------------------------------ GPU

def _gpu_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 8)).cuda()


@pytest.mark.parametrize("gpu_backend", kernel_gpu_backends())
def test_gpu_clipping_step_never_syncs(gpu_backend):
    require_backend(gpu_backend)
    assert_step_never_syncs(_gpu_model(), backend=gpu_backend, max_grad_norm=0.01)


@pytest.mark.parametrize("gpu_backend", kernel_gpu_backends())
def test_gpu_captured_clipping_step_replays_like_eager(gpu_backend):
    require_backend(gpu_backend)
    assert_graph_replay_matches_eager(_gpu_model(), rtol=1e-6, atol=1e-7, stats_freq=2, backend=gpu_backend,
                                      max_grad_norm=0.5)
