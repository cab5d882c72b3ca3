"""Mixed precision: GradScaler's unscale_/step around GuardedAdamW (its own path, and the fused
path the exact gate takes: _step_supports_amp_scaling); fp16/bf16 params with fp32 state and
fp32 math."""

import math

import pytest
import torch

from lbw_kernels import GuardedAdamW
from lbw_kernels.reference import adamw_
from lbw_kernels.verify import PARAM_TOLERANCES, worst
from gpu_checks import assert_steps_never_sync, kernel_gpu_backends, record_cuda_exact_calls, require_backend
from torch_compat import needs_grad_dtype


def test_grad_scaler_unscale_then_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    opt = GuardedAdamW(model.parameters(), lr=1e-2, stats_freq=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    # telemetry saw unscaled gradients: the norm is the model's, not 1024x it
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert opt.telemetry()["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_grad_scaler_step_the_guard_reads_unscaled_gradients(gate):
    """Without an explicit unscale_: the exact gate takes GradScaler's fused path (the grads
    arrive scaled, and stay so; the guard and the update unscale them as they read them),
    single_pass GradScaler's own (scaler.step unscales .grad first)."""
    p = torch.nn.Parameter(torch.ones(10))
    opt = GuardedAdamW([p], lr=1e-2, stats_freq=1, gate=gate, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale((p * torch.arange(10.0)).sum()).backward()
    scaler.step(opt)
    assert opt.telemetry()["grad_ms"] == pytest.approx((torch.arange(10.0) ** 2).mean().item())
    fused = gate == "exact"
    assert opt._step_supports_amp_scaling is fused
    assert torch.equal(p.grad, torch.arange(10.0) * (2.0**10 if fused else 1.0))


class ScalersOwnPath(GuardedAdamW):
    """GuardedAdamW on GradScaler's own path (unscale_, a host read, step or no step)."""

    _step_supports_amp_scaling = False


def _scaled_training(cls, backend, options, overflow_at=(4, 9), spike_at=(6,), init_scale=2.0**10, set_to_none=True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    opt = cls(model.parameters(), lr=1e-2, backend=backend, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for i in range(12):
        opt.zero_grad(set_to_none=set_to_none)
        factor = float("inf") if i in overflow_at else 30.0 if i in spike_at else 1.0
        loss = torch.nn.functional.mse_loss(model(x), y) * factor
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return model, opt, scaler


@pytest.mark.parametrize("options", [
    dict(stats_freq=1), dict(stats_freq=3), dict(stats_freq=1, max_grad_norm=0.5),
    # the skip then comes from found_inf alone (rule 1 is off)
    dict(stats_freq=10, skip_nonfinite=False), dict(auto_enabled=False, skip_nonfinite=False),
], ids=["sf1", "sf3", "clip", "sf10-no-finite-check", "guard-off"])
def test_grad_scalers_fused_path_equals_its_own_path(backend, options):
    """Bitwise, with GradScaler's power-of-two scales: params, AdamW state and the guard's
    state after overflowed calls (skipped on both paths, the guard untouched by them: no
    decision, no count, no cut), scale growth, a spike the guard cuts on, stats_freq's schedule
    and clipping (its norm from the unscaled gradients)."""
    fused = _scaled_training(GuardedAdamW, backend, options)
    own = _scaled_training(ScalersOwnPath, backend, options)
    assert fused[1]._schedule_on_device and not own[1]._schedule_on_device  # the paths differed
    for p, q in zip(fused[0].parameters(), own[0].parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(fused[1].state[p][key], own[1].state[q][key]), key
    assert torch.equal(fused[1]._guard.nan_to_num(7.0), own[1]._guard.nan_to_num(7.0))
    t = fused[1].telemetry()
    assert t["step"] == 10 and t["skipped_steps"] == 0  # 2 overflowed calls of 12
    if options.get("stats_freq") in (1, 3):
        assert t["scale"] < 1  # the spike was cut
    assert fused[2].get_scale() == own[2].get_scale()
    assert all(torch.isfinite(p).all() for p in fused[0].parameters())


@pytest.mark.parametrize("set_to_none", [True, False], ids=["new grads", "grads kept"])
@pytest.mark.parametrize("options", [dict(stats_freq=1), dict(stats_freq=1, skip_nonfinite=False, max_grad_norm=0.5)],
                         ids=["sf1", "clip-no-finite-check"])
def test_grad_scalers_fused_path_at_a_scale_whose_squares_overflow_float32(backend, options, set_to_none):
    """A scale GradScaler reaches after ~45 growth intervals without an overflow (2**62; it
    never backs off while the scaled gradients stay finite): the squares of the still-scaled
    float32 gradients overflow float32, which the reference sums in. Its telemetry must not
    read those sums as a non-finite gradient (a skipped call on every call), nor clip by an
    infinite norm (a factor of 0): the same bits as GradScaler's own path at the same scale.
    With the grads kept in place (zero_grad(set_to_none=False)) the exact gate's early
    telemetry pass serves the calls, and must not read them in fp32 either."""
    fused = _scaled_training(GuardedAdamW, backend, options, overflow_at=(), init_scale=2.0**62, set_to_none=set_to_none)
    own = _scaled_training(ScalersOwnPath, backend, options, overflow_at=(), init_scale=2.0**62, set_to_none=set_to_none)
    for p, q in zip(fused[0].parameters(), own[0].parameters()):
        assert torch.equal(p, q)
    assert torch.equal(fused[1]._guard.nan_to_num(7.0), own[1]._guard.nan_to_num(7.0))
    t = fused[1].telemetry()
    assert t["skipped_steps"] == 0 and t["regime"] != "nonfinite" and math.isfinite(t["grad_norm"])
    if "max_grad_norm" in options:
        assert math.isfinite(fused[1].last_grad_norm.item())


def test_fused_path_unscales_fp16_gradients_in_the_update(backend):
    """Pure fp16 params, whose gradients GradScaler's own path refuses to unscale: with
    grad_scale set, the update reads each fp16 gradient times 1/scale in fp32. Against
    reference.adamw_ on those gradients unscaled in fp32, with eps large enough that a gradient
    left scaled would move the params elsewhere (the control)."""
    from lbw_kernels import reference as ref

    scale = 2.0**12
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(300, generator=gen).half().requires_grad_()
    control = p.detach().clone().requires_grad_()
    expected, m, v, step = p.detach().clone(), torch.zeros(300), torch.zeros(300), torch.zeros(())
    kw = dict(lr=1e-2, eps=0.1, weight_decay=0.01, auto_enabled=False, backend=backend)
    opt, control_opt = GuardedAdamW([p], **kw), GuardedAdamW([control], **kw)
    for _ in range(3):
        scaled = (torch.randn(300, generator=gen) * 0.05 * scale).half()
        p.grad, control.grad = scaled.clone(), scaled.clone()
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)  # as GradScaler.step sets them
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        control_opt.step()
        ref.adamw_([expected], [scaled.float() / scale], [m], [v], [step], lr=torch.tensor(1e-2, dtype=torch.float64),
                   beta1=0.9, beta2=0.999, eps=0.1, weight_decay=0.01)
    torch.testing.assert_close(p.detach(), expected, rtol=2**-10, atol=2**-14)
    assert not torch.allclose(control.detach().float(), expected.float(), rtol=2**-8, atol=2**-12)


def test_a_backend_without_the_gradient_factor_keeps_grad_scalers_own_path():
    from lbw_kernels.backends import _FACTORIES, _INSTANCES, ReferenceBackend, register_backend

    class OlderBackend(ReferenceBackend):  # an update written before the gradient factor
        def adamw_(self, groups, *, scale, skip):
            super().adamw_(groups, scale=scale, skip=skip)

    register_backend("older", OlderBackend)
    try:
        p = torch.nn.Parameter(torch.ones(4))
        opt = GuardedAdamW([p], lr=1e-2, backend="older")
        assert not opt._step_supports_amp_scaling
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(p.sum()).backward()
        scaler.step(opt)
        assert opt.telemetry()["step"] == 1 and torch.equal(p.grad, torch.ones(4))  # unscaled by unscale_
        assert GuardedAdamW([torch.nn.Parameter(torch.ones(2))], backend="reference")._step_supports_amp_scaling
    finally:
        _FACTORIES.pop("older")
        _INSTANCES.pop("older", None)


def test_an_overflowed_call_changes_nothing_but_the_skip_flag(backend):
    from lbw_kernels import reference as ref

    p = torch.nn.Parameter(torch.ones(5))
    opt = GuardedAdamW([p], lr=1e-2, stats_freq=1, backend=backend)
    p.grad = torch.randn(5)
    opt.step()
    guard, state = opt._guard.clone(), {k: v.clone() for k, v in opt.state[p].items() if k in ("step", "exp_avg")}
    before = p.detach().clone()
    p.grad = torch.full((5,), float("inf"))
    opt.grad_scale, opt.found_inf = torch.tensor(2.0**16), torch.tensor(1.0)  # as GradScaler.step sets them
    try:
        opt.step()
    finally:
        del opt.grad_scale, opt.found_inf
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    expected = guard.clone()
    expected[ref.SKIP] = 1.0
    assert torch.equal(opt._guard.nan_to_num(7.0), expected.nan_to_num(7.0))


def test_grad_scalers_fused_path_reads_nothing_on_the_host(backend):
    from test_no_sync import host_reads_forbidden

    p = torch.nn.Parameter(torch.ones(5))
    opt = GuardedAdamW([p], lr=1e-2, stats_freq=2, backend=backend, max_grad_norm=1.0)
    for flag in (0.0, 1.0, 0.0):
        p.grad = torch.randn(5) * 2.0**8
        opt.grad_scale, opt.found_inf = torch.tensor(2.0**8), torch.tensor(flag)
        with host_reads_forbidden():
            opt.step()
    assert opt.telemetry()["step"] == 2


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_grad_scaler_skips_inf_steps(gate):
    """An overflowed call changes nothing: on GradScaler's own path (single_pass) step() is not
    called; on its fused path (exact) it is, and leaves params and the guard's count alone."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1, gate=gate)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(p.sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.telemetry()["step"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_low_precision_params_keep_fp32_state_and_round_once(dtype, gate):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4097, generator=gen).to(dtype)
    opt = GuardedAdamW([p], lr=1e-2, gate=gate, stats_freq=1, backend="reference")
    master = p.float()  # fp32 copy of the bf16/fp16 value the optimizer starts from
    m, v, step = torch.zeros(4097), torch.zeros(4097), torch.zeros(())
    for _ in range(5):
        g = torch.randn(4097, generator=gen).to(dtype)
        p.grad = g
        scale_before = opt.telemetry()["scale"]
        opt.step()
        scale = opt.telemetry()["scale"] if gate == "exact" else scale_before
        # the same update in fp32, starting from the bf16/fp16 value, rounded once at the end
        start = master.to(dtype).float()
        adamw_([start], [g.float()], [m], [v], [step], lr=torch.tensor(1e-2 * scale, dtype=torch.float64),
               beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
        master = start
        assert torch.equal(p, master.to(dtype))
    state = opt.state[p]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(state["exp_avg"], m) and torch.equal(state["exp_avg_sq"], v)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_param_cast_after_the_plan_was_built_keeps_stepping(gate, backend):
    """``p.data = p.data.to(bf16)`` (what ``module.to(dtype)`` does) on one param of a group
    after the first steps: the step plan recorded one param dtype, so the kernels must notice
    the mixed group (it then goes to the reference) rather than fail or misread the param.
    Compared with the reference backend on the same sequence (fp32 state throughout), within
    the tolerances verify documents (x 5 steps)."""
    def trajectory(name):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(5, generator=gen), torch.randn(33, generator=gen), torch.randn(7, generator=gen)]
        opt = GuardedAdamW(params, lr=1e-2, gate=gate, stats_freq=1, backend=name)
        for k in range(5):
            if k == 2:
                params[1].data = params[1].data.to(torch.bfloat16)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        return params

    got, want = trajectory(backend), trajectory("reference")
    assert got[1].dtype == torch.bfloat16
    for a, b in zip(got, want):
        atol, rtol = PARAM_TOLERANCES[b.dtype]
        assert worst(a, b, 5 * atol, 5 * rtol) is None, worst(a, b, 5 * atol, 5 * rtol)


def _grads_of_another_dtype(backend, gate, dtype, device="cpu", one_group=False):
    """Params and states after a stream (a spike on call 4) over three low-precision params in
    two groups, two of them holding fp32 grads (``grad_dtype``), one its own dtype's. With
    ``one_group``: the three in one group, all holding fp32 grads (the cuda backend's one-call
    exact step takes one group of one param and one grad dtype)."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(5, 7), (4097,), (3,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
    for p in params if one_group else params[:2]:
        p.grad_dtype = torch.float32
    groups = [{"params": params}] if one_group else [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]
    opt = GuardedAdamW(groups, lr=1e-2, gate=gate, stats_freq=1, backend=backend)
    for k in range(6):
        for p in params:
            g = torch.randn(p.shape, generator=gen) * (30.0 if k == 3 else 1.0)
            p.grad = g.to(device, p.grad_dtype)
        opt.step()
    return [t.clone() for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])], opt


@needs_grad_dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_low_precision_params_with_fp32_grads_match_the_reference(dtype, gate, backend, monkeypatch):
    """torch >= 2.10 lets a bf16/fp16 param hold fp32 grads (``p.grad_dtype = torch.float32``:
    grads accumulated in fp32). Every backend takes them, reading the grad in fp32 (not rounded
    to the param's dtype): the Triton kernels (G_CODE; nothing delegated) and the C++ kernels
    (a (param, grad) type pair; nothing left to the reference, and bitwise its foreach chain,
    as for their other low-precision params). Against the reference: verify's tolerances, and
    the guard within its telemetry's summing (float64 in the kernels, the grads' fp32 in the
    reference)."""
    from lbw_kernels import reference

    updated_by_reference = []
    with monkeypatch.context() as patch:
        run_update = reference.adamw_
        patch.setattr(reference, "adamw_", lambda params, grads, *a, **k: (
            updated_by_reference.append((params[0].dtype, grads[0].dtype)), run_update(params, grads, *a, **k))[1])
        got, opt = _grads_of_another_dtype(backend, gate, dtype)
    want, ref_opt = _grads_of_another_dtype("reference", gate, dtype)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for a, b in zip(got, want):
        atol, rtol = PARAM_TOLERANCES[b.dtype]
        assert worst(a, b, 6 * atol, 6 * rtol) is None, worst(a, b, 6 * atol, 6 * rtol)
    if backend in ("cpp", "triton"):
        assert updated_by_reference == []
    # (bitwise where torch's CPU lerp/addcmul, the reference's, are fused multiply-adds as the
    # kernels' are: not in torch's baseline build, csrc/guard_math.h)
    if backend == "cpp" and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if backend == "triton":
        from lbw_kernels.triton_kernels import ops
        from lbw_kernels.triton_kernels.pointers import DTYPE_CODES

        groups = opt._plan.group_tensors(opt.param_groups, [[p.grad for p in g["params"]] for g in opt.param_groups])
        plan, _ = ops._update_plan(groups)
        pair = (DTYPE_CODES[dtype], DTYPE_CODES[torch.float32])
        assert not plan.delegated and pair in {(lst.code, lst.g_code) for lst in plan.updates}
    t, r = opt.telemetry(), ref_opt.telemetry()
    assert t["regime"] == r["regime"] and t["grad_ms"] == pytest.approx(r["grad_ms"], rel=1e-6)


def _two_param_dtypes_in_one_group(backend, gate, device="cpu"):
    """The guard's telemetry after 3 calls on one group: a large fp32 param with small grads,
    then a small bf16 param holding large fp32 grads (``grad_dtype``)."""
    gen = torch.Generator().manual_seed(4)
    big = torch.nn.Parameter(torch.randn(1000, generator=gen).to(device))
    small = torch.nn.Parameter(torch.randn(7, generator=gen).to(device, torch.bfloat16))
    small.grad_dtype = torch.float32
    opt = GuardedAdamW([big, small], lr=1e-2, gate=gate, stats_freq=1, backend=backend)
    for _ in range(3):
        big.grad = (torch.randn(1000, generator=gen) * 0.01).to(device)
        small.grad = (torch.randn(7, generator=gen) * 10).to(device)
        opt.step()
    return opt.telemetry()


@needs_grad_dtype
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_group_of_two_param_dtypes_with_fp32_grads_keeps_its_telemetry_rows_in_order(gate, backend):
    """Backends that split a group by param dtype put the parts' rows back in the group's order;
    ordered by the grads' dtypes instead (both fp32 here), each row met the other tensor's
    element count and single_pass's grad_ms came out ~140x too small (the C++ backends, before)."""
    got, want = _two_param_dtypes_in_one_group(backend, gate), _two_param_dtypes_in_one_group("reference", gate)
    assert got["grad_ms"] == pytest.approx(want["grad_ms"], rel=1e-6)
    assert got["scale"] == want["scale"] and got["regime"] == want["regime"]


@needs_grad_dtype
@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", kernel_gpu_backends())
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_a_group_of_two_param_dtypes_with_fp32_grads_keeps_its_telemetry_rows_in_order(gpu_backend, gate):
    require_backend(gpu_backend)
    got = _two_param_dtypes_in_one_group(gpu_backend, gate, "cuda")
    want = _two_param_dtypes_in_one_group("reference", gate, "cuda")
    # (the reference sums its telemetry on the GPU in fp32, the kernels in float64)
    assert got["grad_ms"] == pytest.approx(want["grad_ms"], rel=1e-5)
    assert got["regime"] == want["regime"]


@needs_grad_dtype
@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", kernel_gpu_backends())
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("one_group", [False, True], ids=["two groups", "one group"])
def test_gpu_bf16_params_with_fp32_grads_match_the_reference(gpu_backend, gate, one_group, monkeypatch):
    """(With one group, the cuda exact gate runs in its one-call step, which takes every call.)"""
    require_backend(gpu_backend)
    calls = record_cuda_exact_calls(monkeypatch)
    got, _ = _grads_of_another_dtype(gpu_backend, gate, torch.bfloat16, "cuda", one_group)
    if gpu_backend == "cuda" and gate == "exact" and one_group:
        assert [taken for taken, _ in calls] == [True] * 6, calls
    want, _ = _grads_of_another_dtype("reference", gate, torch.bfloat16, "cuda", one_group)
    for a, b in zip(got, want):  # (verify's tolerances: the reference sums its telemetry on the GPU in fp32)
        atol, rtol = PARAM_TOLERANCES[b.dtype]
        assert worst(a, b, 6 * atol, 6 * rtol) is None, worst(a, b, 6 * atol, 6 * rtol)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # (Triton's interpreter, in numpy)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_low_precision_stores_of_overflow_and_nonfinite_params_match_the_reference(dtype, gate, backend):
    """A bf16/fp16 param whose fp32 result overflows its dtype becomes Inf, and a NaN or Inf
    param stays so, on every backend as in the reference: the kernels' conversion of
    non-finite and out-of-range floats (no test stored one before)."""
    big = torch.finfo(dtype).max
    values = [big, -big, float("nan"), float("inf"), -float("inf"), 0.5, big / 2, -1e-3]
    out = {}
    for name in (backend, "reference"):
        p = torch.nn.Parameter(torch.tensor(values * 5, dtype=dtype))
        # (a step of lr: past half an ulp of max, where rounding to the dtype overflows)
        opt = GuardedAdamW([p], lr=big / 64, weight_decay=0.0, betas=(0.9, 0.999), gate=gate, stats_freq=1, backend=name)
        for k in range(2):
            p.grad = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, -2.0, -1.0, 0.25] * 5, dtype=dtype) * (k + 1)
            opt.step()
        out[name] = p.detach()
    assert out["reference"][0] == float("inf") and out["reference"][1] == -float("inf")  # overflowed
    torch.testing.assert_close(out[backend], out["reference"], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------ GPU

@pytest.mark.parametrize("gpu_backend", kernel_gpu_backends())
def test_gpu_grad_scalers_fused_path_equals_its_own_path_and_never_syncs(gpu_backend):
    require_backend(gpu_backend)
    runs = []
    for cls in (GuardedAdamW, ScalersOwnPath):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).cuda()
        opt = cls(model.parameters(), lr=1e-2, stats_freq=1, backend=gpu_backend, max_grad_norm=0.5)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=3)
        x, y = torch.randn(64, 8, device="cuda"), torch.randn(64, 1, device="cuda")
        for i in range(10):
            opt.zero_grad()
            factor = float("inf") if i == 4 else 30.0 if i == 6 else 1.0
            scaler.scale(torch.nn.functional.mse_loss(model(x), y) * factor).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((model, opt))
    (fused, fused_opt), (own, own_opt) = runs
    for p, q in zip(fused.parameters(), own.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(fused_opt._guard.nan_to_num(7.0), own_opt._guard.nan_to_num(7.0))
    assert fused_opt.telemetry()["step"] == 9
    # the step itself, as GradScaler's fused path calls it, never waits for the device
    for p in fused.parameters():
        p.grad = torch.randn_like(p) * 2.0**10
    fused_opt.grad_scale, fused_opt.found_inf = torch.tensor(2.0**10, device="cuda"), torch.zeros((), device="cuda")
    try:
        assert_steps_never_sync(fused_opt)
    finally:
        del fused_opt.grad_scale, fused_opt.found_inf
