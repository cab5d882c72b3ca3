"""With the guard off, GuardedAdamW is torch.optim.AdamW (DESIGN.md rule 5)."""

import pytest
import torch

from lbw_kernels import GuardedAdamW
from gpu_checks import kernel_gpu_backends, require_backend

# float64: the same math in another rounding order; float32: a few ulps over 50 steps.
TOL = {torch.float64: 1e-12, torch.float32: 1e-6}


def close(actual, expected, tol):
    """Relative to each element and to the tensor's scale: elements of m that nearly cancel
    carry the rounding of their larger terms, not of their own size."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def model_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (5,), (1,), (33, 4), (0,), (2, 3, 4)]
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def groups_of(params, maximize):
    return [
        {"params": params[:2], "lr": 3e-2, "weight_decay": 0.1},
        {"params": params[2:4], "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0, "maximize": maximize},
        {"params": params[4:], "lr": 1e-2},
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("maximize", [False, True])
def test_guard_off_equals_torch_adamw_over_50_steps(dtype, gate, maximize, backend):
    ours, theirs = model_params(dtype), model_params(dtype)
    opt = GuardedAdamW(groups_of(ours, maximize), lr=1e-3, weight_decay=0.05, auto_enabled=False, gate=gate,
                       backend=backend)
    ref = torch.optim.AdamW(groups_of(theirs, maximize), lr=1e-3, weight_decay=0.05, foreach=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=7, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
    for a, b in zip(ours, theirs):
        close(a, b, TOL[dtype])
    for a, b in zip(ours, theirs):
        sa, sb = opt.state[a], ref.state[b]
        close(sa["exp_avg"], sb["exp_avg"], TOL[dtype])
        close(sa["exp_avg_sq"], sb["exp_avg_sq"], TOL[dtype])
        assert sa["step"].item() == sb["step"].item() == 50
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 3e-2 * 0.5**7


def test_guard_scale_multiplies_the_scheduled_lr(backend):
    """With the guard on, each call's update is AdamW's with lr = scheduled lr x scale."""
    dtype = torch.float64
    ours, theirs = model_params(dtype)[:2], model_params(dtype)[:2]
    opt = GuardedAdamW(ours, lr=1e-2, stats_freq=1, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    gen = torch.Generator().manual_seed(2)
    for k in range(12):
        amp = 20.0 if k in (4, 5, 9) else 1.0  # spikes make the scale drop
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=dtype) * amp
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()  # exact gate: this call's decision applies to this call
        ref.param_groups[0]["lr"] = 1e-2 / (1 + k) * opt.telemetry()["scale"]
        ref.step()
        sched.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert opt.telemetry()["scale"] < 1.0


def test_every_torch_adamw_argument_is_taken_and_the_switches_change_nothing():
    """A call written for torch.optim.AdamW works unchanged, positional amsgrad included; its
    implementation switches (foreach, fused, capturable) leave the steps bitwise as they were.
    A keyword torch adds later fails here first."""
    import inspect

    torch_args = {
        name: param.default
        for name, param in inspect.signature(torch.optim.AdamW.__init__).parameters.items()
        if name not in ("self", "params")
    }
    params = model_params(torch.float64)
    GuardedAdamW(params, **torch_args)
    GuardedAdamW(params, 1e-3, (0.9, 0.999), 1e-8, 0.01, False)  # AdamW's positional order
    named = [(f"w{i}", p) for i, p in enumerate(params)]  # as model.named_parameters() gives
    try:
        names = torch.optim.AdamW(named).param_groups[0]["param_names"]
    except TypeError as e:  # torch < 2.6 takes no (name, tensor) pairs: nor does GuardedAdamW
        with pytest.raises(TypeError, match=str(e)):
            GuardedAdamW(named)
    else:
        assert GuardedAdamW(named).param_groups[0]["param_names"] == names
    with pytest.raises(TypeError, match="set"):
        GuardedAdamW([{"params": set(params)}])  # as torch refuses it

    runs = []
    for switches in ({}, dict(foreach=False, fused=True, capturable=True), dict(foreach=True, fused=False)):
        ps = model_params(torch.float64)
        opt = GuardedAdamW(ps, lr=1e-2, stats_freq=1, **switches)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for q in ps:
                q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype)
            opt.step()
        runs.append((ps, opt.telemetry()))
    for ps, t in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ps, runs[0][0]))
        assert t == runs[0][1]


def test_differentiable_or_amsgrad_in_a_group_is_refused_as_the_argument_is():
    """A group's own differentiable=True (or amsgrad=True), given to the constructor,
    add_param_group or a loaded checkpoint, was taken and ignored: refused, nothing added."""
    opt = GuardedAdamW(model_params(torch.float32), lr=1e-2)
    for bad in ({"differentiable": True}, {"amsgrad": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GuardedAdamW([{"params": model_params(torch.float32), **bad}])
        with pytest.raises(ValueError, match=next(iter(bad))):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))], **bad})
    assert len(opt.param_groups) == 1


def _edit_state(opt, params, how, gen_seed):
    """One edit of ``opt.state`` as resets, checkpoint loaders and ZeRO make them; drawn from
    ``gen_seed`` so both optimizers get the same values."""
    gen = torch.Generator().manual_seed(gen_seed)
    p = params[3]
    if how == "clear":
        opt.state.clear()
    elif how == "del one":
        opt.state.pop(params[0])
    elif how == "new moment":  # a tensor replaced inside a param's dict
        opt.state[p]["exp_avg"] = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    elif how == "new step":
        opt.state[p]["step"] = torch.tensor(40.0)
    elif how == "new dict":  # ZeroRedundancyOptimizer.load_state_dict: state[p] = {...}, then an entry
        opt.state[p] = {k: v.clone() for k, v in opt.state[p].items() if k in ("step", "exp_avg", "exp_avg_sq")}
        opt.state[p]["exp_avg_sq"] = torch.rand(p.shape, generator=gen, dtype=p.dtype)
    elif how == "new state":  # the whole mapping assigned (plain dicts, same tensors but one)
        from collections import defaultdict

        fresh = defaultdict(dict, {k: dict(v) for k, v in opt.state.items()})
        fresh[p]["exp_avg"] = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.state = fresh
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("reset", ["clear", "del one", "new moment", "new step", "new dict", "new state"])
def test_reset_state_starts_fresh_moments_as_torch_adamw_does(reset, backend):
    """``opt.state.clear()`` (an optimizer reset), ``del opt.state[p]``, or new tensors or dicts
    put into the state: the next step uses what the state holds, as torch.optim.AdamW does; the
    cached step plan must notice (optimizer_state.py). Edits after the first plan and again
    after the second, so a plan built from adopted (copied) dicts is checked too."""
    ours, theirs = model_params(torch.float64), model_params(torch.float64)
    opt = GuardedAdamW(ours, lr=1e-2, auto_enabled=False, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(2)
    for k in range(8):
        if k in (3, 5):
            for o, ps in ((opt, ours), (ref, theirs)):
                _edit_state(o, ps, reset, gen_seed=k)
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ours]
        for ps, o in ((ours, opt), (theirs, ref)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
    for a, b in zip(ours, theirs):
        close(a, b, TOL[torch.float64])
    assert [opt.state[p]["step"].item() for p in ours if p.numel()] == [ref.state[q]["step"].item() for q in theirs if q.numel()]
    assert len(opt.state_dict()["state"]) == len(ref.state_dict()["state"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lr_as_a_tensor_of_shape_one_with_a_0_dim_param(backend, dtype):
    """torch.optim.AdamW takes ``lr=torch.tensor([1e-2])``; the reference's foreach chain once
    broadcast it against 0-dim steps and raised half-way through the step."""
    def run(cls, squeeze=False, **kw):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(3, dtype=dtype)), torch.nn.Parameter(torch.randn((), dtype=dtype))]
        lr = torch.tensor([1e-2], dtype=torch.float64)
        opt = cls(params, lr=lr.squeeze() if squeeze else lr, **kw)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for q in params:
                q.grad = torch.randn(q.shape, generator=gen, dtype=dtype)
            opt.step()
        return params

    # torch.optim.AdamW gets the 0-dim lr that newer torch makes of a shape-[1] one itself
    # (optimizer._to_scalar; torch 2.5's single-tensor step raises on shape [1]): the same bits
    for a, b in zip(run(GuardedAdamW, backend=backend, auto_enabled=False), run(torch.optim.AdamW, foreach=False, squeeze=True)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tensor_dtype, shape", [(torch.float64, ()), (torch.bfloat16, ()), (torch.float32, (1,))])
def test_tensor_hyperparameters_update_as_the_numbers_they_hold(backend, gate, param_dtype, tensor_dtype, shape):
    """lr, betas, eps and weight_decay as one-element tensors of any float dtype, 0-dim or of
    shape [1], give the update of the Python floats they hold: their dtype and shape promote
    nothing. (The reference once rounded the decay to a bf16 weight_decay's dtype, and raised
    half-way through the step for a shape-[1] beta2, or for a float64 beta1 with single_pass.)"""
    values = dict(lr=3e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    as_tensors = {k: torch.tensor(v, dtype=tensor_dtype).reshape(shape) for k, v in values.items()}
    held = {k: float(t) for k, t in as_tensors.items()}  # the value each tensor holds, as a float

    def run(h):
        params = model_params(param_dtype)
        opt = GuardedAdamW(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                           weight_decay=h["weight_decay"], gate=gate, stats_freq=1, backend=backend)
        gen = torch.Generator().manual_seed(2)
        for _ in range(4):
            for q in params:
                q.grad = torch.randn(q.shape, generator=gen, dtype=param_dtype)
            opt.step()
        return params, opt.telemetry()

    (got, got_t), (want, want_t) = run(as_tensors), run(held)
    assert (got_t["regime"], got_t["scale"]) == (want_t["regime"], want_t["scale"])
    for a, b in zip(got, want):
        close(a, b, 4 * TOL[param_dtype])


def test_closure_and_step_hooks_work_as_on_torch_optim(backend):
    """``step(closure)`` runs the closure with grad enabled and returns its loss, the step
    bitwise the one after ``backward(); step()``; step hooks (the optimizer's own pre and post
    hooks, the global pre hook) run around every step, as torch.optim's do. The guard is on:
    the inputs grow, so it meets spikes."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    torch.manual_seed(0)
    net, twin = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    twin.load_state_dict(net.state_dict())
    kw = dict(lr=0.05, stats_freq=1, backend=backend)
    opt, opt_twin = GuardedAdamW(net.parameters(), **kw), GuardedAdamW(twin.parameters(), **kw)
    events = []
    # (torch passes step's own arguments: (self, closure))
    opt.register_step_pre_hook(lambda o, args, kwargs: events.append(("pre", o is opt, args[0] is opt, callable(args[1]))))
    opt.register_step_post_hook(lambda o, args, kwargs: events.append(("post", o is opt)))
    handle = register_optimizer_step_pre_hook(lambda o, args, kwargs: events.append(("global",)) if o is opt else None)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    loss_of = lambda model, k: torch.nn.functional.mse_loss(model(x * 4.0**k), y)  # noqa: E731
    try:
        for k in range(5):
            def closure():
                assert torch.is_grad_enabled()
                opt.zero_grad()
                loss = loss_of(net, k)
                loss.backward()
                return loss
            loss = opt.step(closure)
            opt_twin.zero_grad()
            twin_loss = loss_of(twin, k)
            twin_loss.backward()
            opt_twin.step()
            assert torch.equal(loss.detach(), twin_loss.detach())
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    assert torch.equal(opt._guard.nan_to_num(), opt_twin._guard.nan_to_num())
    assert opt.telemetry()["scale"] < 1.0  # the guard acted
    assert events == [("global",), ("pre", True, True, True), ("post", True)] * 5


@pytest.mark.parametrize("betas", [(0.0, 0.99), (0.3, 0.9), (0.5, 0.999)])
def test_beta1_at_most_one_half_equals_torch_adamw(betas, backend):
    """m = beta1*m + (1-beta1)*g is a lerp whose kernels switch form at a weight of 0.5 (as
    torch's lerp does, for accuracy): beta1 <= 0.5 takes the other form, which the usual betas
    never reach."""
    ours, theirs = model_params(torch.float32), model_params(torch.float32)
    opt = GuardedAdamW(ours, lr=1e-2, betas=betas, auto_enabled=False, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, betas=betas, foreach=False)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        close(a, b, TOL[torch.float32])
        close(opt.state[a]["exp_avg"], ref.state[b]["exp_avg"], TOL[torch.float32])


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("change", ["resized", "grown from empty"])
def test_a_param_resized_through_data_is_followed(backend, gate, change):
    """A param given new storage of another size through ``.data`` (its moments moved with it,
    as a model surgery does) under the same Parameter object: the step plan's element counts
    are rebuilt, so the telemetry divides by the new counts (DESIGN.md rule 2: mean(g^2) per
    tensor) and the update is torch's. (A stale plan divided by the old counts; one grown
    from 0 elements had a telemetry row more than its counts, and every call raised.)"""
    size = {"resized": 8, "grown from empty": 6}[change]
    runs = []
    for opt_class in (GuardedAdamW, torch.optim.AdamW):
        p = torch.nn.Parameter(torch.zeros(0) if change == "grown from empty" else torch.ones(3))
        q = torch.nn.Parameter(torch.full((5,), 0.5))
        # (the guard on, reading telemetry every call, with thresholds no reading crosses: the
        # scale stays 1, so the update is AdamW's)
        kwargs = dict(backend=backend, gate=gate, stats_freq=1, stress_threshold=1e9,
                      spike_threshold=1e9) if opt_class is GuardedAdamW else {}
        opt = opt_class([q, p], lr=1e-2, **kwargs)
        p.grad, q.grad = torch.full_like(p, 2.0), torch.full_like(q, 2.0)
        opt.step()
        p.data = torch.linspace(-1, 1, size)
        state = opt.state[p]
        state["exp_avg"].data = torch.zeros(size)
        state["exp_avg_sq"].data = torch.zeros(size)
        telemetry = []
        for k in range(3):
            p.grad = torch.full((size,), 2.0 + k)
            q.grad = torch.full((5,), 1.0)
            opt.step()
            if opt_class is GuardedAdamW:
                telemetry.append(opt.telemetry())
        runs.append((p.detach().clone(), q.detach().clone(), telemetry))
    (p_ours, q_ours, telemetry), (p_torch, q_torch, _) = runs
    torch.testing.assert_close(p_ours, p_torch, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q_ours, q_torch, rtol=1e-6, atol=1e-6)
    for k, t in enumerate(telemetry):  # (max over tensors of mean(g^2); the signed mean of all)
        assert t["scale"] == 1.0 and t["regime"] == "calm", (k, t)
        assert t["grad_ms"] == pytest.approx((2.0 + k) ** 2, rel=1e-6), (k, t)
        assert t["signed_mean"] == pytest.approx(((2.0 + k) * size + 5.0) / (size + 5), rel=1e-6), (k, t)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_param_cast_through_data_is_updated_as_its_new_dtype(backend, gate):
    """A float32 param cast to bfloat16 in place (``p.data = p.data.bfloat16()``, its fp32
    moments kept) after a step: the plan's split by dtype is rebuilt, so it is updated as a
    bf16 param (math in fp32, rounded once), bitwise as by an optimizer built after the cast
    from the same state. (A stale plan kept it in the fp32 param's part, which went to the
    reference's bf16 foreach ops: several roundings a step.)"""
    def run(rebuild):
        gen = torch.Generator().manual_seed(2)
        p = torch.nn.Parameter(torch.randn(1000, generator=gen))
        q = torch.nn.Parameter(torch.full((5,), 0.5))
        opt = GuardedAdamW([q, p], lr=3e-3, backend=backend, gate=gate, stats_freq=1)  # (fp32 first)
        p.grad, q.grad = torch.randn(1000, generator=gen), torch.full_like(q, 2.0)
        opt.step()
        p.data = p.data.bfloat16()
        if rebuild:
            saved = opt.state_dict()
            opt = GuardedAdamW([q, p], lr=3e-3, backend=backend, gate=gate, stats_freq=1)
            opt.load_state_dict(saved)
        for k in range(3):
            p.grad = torch.randn(1000, generator=gen).bfloat16()
            q.grad = torch.full((5,), 1.0)
            opt.step()
        return p.detach().clone(), opt.state[p]["exp_avg_sq"].clone()

    for a, b in zip(run(rebuild=False), run(rebuild=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_step_count_of_shape_one_is_taken(backend, gate):
    """A state's step of shape [1] (a hand-built or converted state: the checks take any
    one-element float32 step) beside 0-dim ones: every backend updates as torch.optim.AdamW,
    the float64 params included (which the Triton backend hands to the reference, whose stack
    of the step counts raised halfway through the call, the counts already advanced)."""
    runs = []
    for opt_class in (GuardedAdamW, torch.optim.AdamW):
        dtypes = (torch.float32, torch.float64, torch.float64)
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=dt)) for dt in dtypes]
        kwargs = dict(backend=backend, gate=gate, auto_enabled=False) if opt_class is GuardedAdamW else {}
        opt = opt_class(params, lr=1e-2, **kwargs)
        for k in range(3):
            for p in params:
                p.grad = torch.full_like(p, 1.0 + k)
            opt.step()
            if k == 0:  # (one of the two float64 params': the reference stacks their counts)
                opt.state[params[1]]["step"] = opt.state[params[1]]["step"].reshape(1).clone()
        runs.append([p.detach().clone() for p in params] + [opt.state[p]["step"] for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _steps_under_a_default_device(backend, gate, policy, default_device, device):
    """Three steps, a state_dict and its load, with ``default_device`` as torch's default
    device, on params on ``device``: the params and the guard."""
    params = [p.to(device) for p in model_params(torch.float32)]
    again_params = [p.to(device) for p in model_params(torch.float32)]
    with torch.device(default_device):
        opt = GuardedAdamW(params, lr=1e-2, stats_freq=1, backend=backend, gate=gate, policy=policy,
                           max_grad_norm=1.0 if gate == "exact" else None)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            for q in params:
                q.grad = torch.randn(q.shape, generator=gen, device="cpu").to(device)
            opt.step()
        saved = opt.state_dict()
        again = GuardedAdamW(again_params, lr=1e-2, backend=backend, gate=gate, policy=policy)
        again.load_state_dict(saved)
    return params, opt._guard


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("policy", ["lbw", "zscore"])
def test_a_default_device_other_than_the_params_changes_nothing(backend, gate, policy):
    """torch.set_default_device (a model built on cuda by default; meta here, which no tensor
    of the step can live on) set before the optimizer is made and while it steps: the
    optimizer's own host tensors (element counts, row orders, Triton's tables, the policy tag
    that rides in checkpoints) were made on the default device, so the first step raised on
    meta, and on CUDA would pin a CUDA tensor. Bitwise the steps made without it."""
    plain, guard = _steps_under_a_default_device(backend, gate, policy, "cpu", "cpu")
    other, other_guard = _steps_under_a_default_device(backend, gate, policy, "meta", "cpu")
    assert all(torch.equal(a, b) for a, b in zip(plain, other))
    assert torch.equal(guard.nan_to_num(7.0), other_guard.nan_to_num(7.0))


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", kernel_gpu_backends())
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_cuda_as_the_default_device_changes_nothing(gpu_backend, gate):
    """The common case: torch.set_default_device("cuda") with the model on the GPU. The host
    sources of the tables and element counts were made on the GPU, which their pinned upload
    refuses."""
    require_backend(gpu_backend)
    plain, guard = _steps_under_a_default_device(gpu_backend, gate, "lbw", "cpu", "cuda")
    other, other_guard = _steps_under_a_default_device(gpu_backend, gate, "lbw", "cuda", "cuda")
    assert all(torch.equal(a, b) for a, b in zip(plain, other))
    assert torch.equal(guard.nan_to_num(7.0), other_guard.nan_to_num(7.0))
