"""The exact gate's telemetry pass launched as soon as a call's gradients are gathered
(lbw_kernels/early_telemetry.py): taken when the previous call's rows and layouts hold, the
same bits as the call without it on every backend, and nothing applied by a call that raises
after it."""

import pytest
import torch

from gpu_checks import record_cuda_exact_calls
from lbw_kernels import GuardedAdamW, optimizer
from streams import random_stream

# Two groups (decay / no decay), as most training scripts have: the rows are both groups' grads.
SHAPES = [(7,), (4097,), (3,), (33, 65)]
GROUPS = [[0, 1], [2, 3]]


def _model(backend, device="cpu", dtype=torch.float32, one_group=False, **options):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in SHAPES]
    groups = [{"params": params}] if one_group else [{"params": [params[i] for i in GROUPS[0]], "weight_decay": 0.1},
                                                    {"params": [params[i] for i in GROUPS[1]], "weight_decay": 0.0}]
    opt = GuardedAdamW(groups, lr=0.05, backend=backend, gate="exact", **options)
    return params, opt


def _snapshot(params, opt):
    return [t.clone() for p in params for t in (p, *(opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "step")))] + [
        opt._guard.clone()]


@pytest.fixture
def early_launches(monkeypatch):
    """The early passes the optimizer launches: one entry per call, True where it launched one."""
    taken = []
    real = optimizer.launch
    monkeypatch.setattr(optimizer, "launch", lambda *a: taken.append(real(*a)) or taken[-1])
    return taken


def _run(backend, stream, early, monkeypatch, device="cpu", dtype=torch.float32, realloc_at=(), no_sync=False,
         **options):
    """Feed ``stream`` through grads refilled in place (so each call's layouts are the last's),
    with new grad tensors on the calls in ``realloc_at`` (the old ones kept alive, so the new
    addresses differ); each step() after the first (which builds the plan, uploading its
    sizes) under ``set_sync_debug_mode("error")`` when ``no_sync``. Returns the final snapshot
    and, per call, whether an early pass ran."""
    launched = []
    real = optimizer.launch
    monkeypatch.setattr(optimizer, "launch", lambda *a: launched.append(real(*a) if early else None) or launched[-1])
    stream = [[g.to(device=device, dtype=dtype) for g in grads] for grads in stream]
    params, opt = _model(backend, device, dtype, **options)
    kept, taken = [], []
    for call, grads in enumerate(stream, start=1):
        for p, g in zip(params, grads):
            if p.grad is None or call in realloc_at:
                kept.append(p.grad)
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        before = len(launched)
        watch = no_sync and call > 1
        if watch:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            if watch:
                torch.cuda.set_sync_debug_mode(0)
        taken.append(any(x is not None for x in launched[before:]))
    return _snapshot(params, opt), taken


def _assert_same_bits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_early_pass_is_taken_and_gives_the_bits_of_the_call_without_it(backend, dtype, monkeypatch):
    """From the second call on (the first leaves the recipe) every call launches its telemetry
    early, through spikes, a flip and a NaN call (skipped), and ends bitwise where the same
    optimizer ends without early passes."""
    stream = random_stream(8, SHAPES, seed=3, spikes=(3,), flips=(5,), nan_at=(6,))
    with_early, taken = _run(backend, stream, True, monkeypatch, dtype=dtype, stats_freq=1)
    without, not_taken = _run(backend, stream, False, monkeypatch, dtype=dtype, stats_freq=1)
    assert taken == [False] + [True] * 7
    assert not any(not_taken)
    _assert_same_bits(with_early, without)


def test_new_grad_storage_is_not_taken_for_the_old(backend, monkeypatch):
    """A call whose grads were reallocated launches nothing early (its layouts are not the
    last call's) and the next one does again; the results are those without early passes."""
    stream = random_stream(6, SHAPES, seed=4, spikes=(4,))
    with_early, taken = _run(backend, stream, True, monkeypatch, realloc_at=(4,), stats_freq=1)
    without, _ = _run(backend, stream, False, monkeypatch, realloc_at=(4,), stats_freq=1)
    assert taken == [False, True, True, False, True, True]
    _assert_same_bits(with_early, without)


@pytest.mark.parametrize("options, expected", [
    (dict(stats_freq=10), True),  # the finite check reads every call
    (dict(stats_freq=10, skip_nonfinite=False), False),  # 9 calls in 10 read nothing
    (dict(stats_freq=1, skip_nonfinite=False), True),
    (dict(stats_freq=10, skip_nonfinite=False, max_grad_norm=1.0), True),  # clipping reads every call
    (dict(stats_freq=1, auto_enabled=False, skip_nonfinite=False), False),  # nothing reads telemetry
])
def test_taken_only_where_every_call_reads_its_telemetry(options, expected, monkeypatch):
    stream = random_stream(4, SHAPES, seed=5)
    with_early, taken = _run("reference", stream, True, monkeypatch, **options)
    without, _ = _run("reference", stream, False, monkeypatch, **options)
    assert taken == [False] + [expected] * 3
    _assert_same_bits(with_early, without)


def test_rows_that_need_the_plan_leave_no_recipe():
    """A zero-element param (it has no row, so the rows are not the gathered lists) and a param
    without a grad (the plan picks positions): the next call runs its passes as usual."""
    for grad_of_second in ("zero elements", "none"):
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(5,), (0,) if grad_of_second == "zero elements" else (4,)]]
        opt = GuardedAdamW(params, lr=0.05, backend="reference", gate="exact", stats_freq=1)
        params[0].grad = torch.randn(5)
        if grad_of_second == "zero elements":
            params[1].grad = torch.randn(0)
        opt.step()
        assert opt._early_recipe is None, grad_of_second
        opt.step()
        assert opt._early_recipe is None, grad_of_second


def test_one_telemetry_pass_per_call(backend, monkeypatch):
    """The early partials are the call's: no second telemetry pass runs (the backend's own
    telemetry, or its one-call exact step's) on the calls that launched one."""
    params, opt = _model(backend, stats_freq=1)
    # (the instance the optimizer uses: another test's monkeypatch may have left instance
    # attributes on the shared backend object, which a class-level patch would not reach)
    used = opt._backend_for(params[0].device)
    passes = []
    real_telemetry, real_gathered = used.telemetry, used.gathered_telemetry
    monkeypatch.setattr(used, "telemetry", lambda *a: passes.append("telemetry") or real_telemetry(*a))
    monkeypatch.setattr(used, "gathered_telemetry", lambda *a: passes.append("early") or real_gathered(*a))
    if backend == "triton":  # (its one-call step launches through ops, not the methods above)
        from lbw_kernels.triton_kernels import ops

        real_exact = ops._exact_telemetry
        monkeypatch.setattr(ops, "_exact_telemetry", lambda *a: passes.append("exact") or real_exact(*a))
    for p in params:
        p.grad = torch.randn(p.shape)
    per_call = []
    for _ in range(3):
        passes.clear()
        opt.step()
        per_call.append(list(passes))
    one = "exact" if backend == "triton" else "telemetry"  # (the early pass runs through it too)
    assert per_call == [[one], ["early", one], ["early", one]]


def _after_an_early_pass(backend, early_launches, device="cpu", one_group=False):
    """A model whose second step launched its telemetry early."""
    params, opt = _model(backend, device, one_group=one_group)
    for p in params:
        p.grad = torch.randn(p.shape, device=device)
    opt.step()
    opt.step()
    assert early_launches[-1] is not None
    return params, opt


# How a state is swapped through ``.data`` to one the update refuses: another dtype (the cuda
# backend's one-call step declines such a call before its checks: the one-by-one path refuses
# it), or one element short (the one-call step takes the call and refuses it in its checks).
REFUSED_STATES = {
    "float64": (lambda good: good.double(), "fp32|float32|Float"),
    "one element short": (lambda good: good[:-1].clone(), "elements|size|numel|shape"),
}


def _refused_state_leaves_the_guard(backend, early_launches, how, device="cpu"):
    # (one group: the cuda backend's one-call step takes a single group; triton's any)
    params, opt = _after_an_early_pass(backend, early_launches, device, one_group=True)
    guard, calls = opt._guard.clone(), opt._calls
    exp_avg = opt.state[params[1]]["exp_avg"]
    good = exp_avg.data
    refused, message = REFUSED_STATES[how]
    exp_avg.data = refused(good)
    with pytest.raises((TypeError, RuntimeError, ValueError), match=message):
        opt.step()
    assert early_launches[-1] is not None  # (launched before the refusal)
    torch.testing.assert_close(opt._guard, guard, rtol=0, atol=0, equal_nan=True)
    assert opt._calls == calls
    exp_avg.data = good
    opt.step()
    assert opt.telemetry()["step"] == opt._calls == calls + 1


@pytest.mark.parametrize("how", list(REFUSED_STATES))
def test_a_state_refused_by_the_update_leaves_the_guard_as_it_was(backend, early_launches, how):
    """A state swapped through ``.data`` (no ``opt.state`` edit: the plan stands) to one the
    update refuses (another dtype, one element short): after an early pass, the call raises
    with the guard and call count as they were: the one-call exact steps (triton; cuda on a GPU below) check the update's tensors
    before deciding, and the one-by-one path (reference, cpp) puts the guard back when the
    update refuses them after ``decide``."""
    _refused_state_leaves_the_guard(backend, early_launches, how)


def test_a_call_that_raises_after_its_early_pass_applies_nothing(backend, early_launches):
    """The early pass writes only its own partials: a call refused afterwards (an AdamW state of
    the wrong shape put into ``opt.state``, found when the plan is rebuilt) leaves params,
    states, guard and call count as they were, and the next good call goes on."""
    params, opt = _after_an_early_pass(backend, early_launches)
    before, calls = _snapshot(params, opt), opt._calls
    good = opt.state[params[1]]["exp_avg"]
    opt.state[params[1]]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step()
    assert early_launches[-1] is not None  # (it did launch before the refusal)
    opt.state[params[1]]["exp_avg"] = good
    _assert_same_bits(_snapshot(params, opt), before)
    assert opt._calls == calls
    opt.step()
    assert opt._calls == calls + 1


@pytest.mark.gpu
@pytest.mark.parametrize("how", list(REFUSED_STATES))
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_gpu_a_state_refused_by_the_update_leaves_the_guard_as_it_was(backend_name, how, early_launches,
                                                                       monkeypatch):
    """On cuda, the state one element short reaches the one-call exact step with the early
    rows, which refuses it in its checks, before ``decide``; the float64 one is declined and
    refused by the passes one by one."""
    from lbw_kernels.backends import availability

    if availability()[backend_name] is not None:
        pytest.skip(availability()[backend_name])
    calls = record_cuda_exact_calls(monkeypatch)
    _refused_state_leaves_the_guard(backend_name, early_launches, how, "cuda")
    if backend_name == "cuda":
        refused = calls[2]  # (calls 1 and 2 built the model; then the refused call; then the good one)
        if how == "one element short":
            assert isinstance(refused[0], RuntimeError) and refused[1], calls
        else:
            assert refused == (False, True), calls
        assert calls[3] == (True, True), calls


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("one_group", [False, True], ids=["two groups", "one group"])
def test_gpu_early_pass_same_bits_and_no_sync(backend_name, dtype, one_group, monkeypatch):
    """On the GPU: the early pass is taken, its calls never wait for the device, and the
    results are bitwise those without it. With one group, the cuda backend's one-call exact
    step takes every call, with the early rows from the second on (two groups: it declines,
    and the passes run one by one)."""
    from lbw_kernels.backends import availability

    if availability()[backend_name] is not None:
        pytest.skip(availability()[backend_name])
    stream = random_stream(8, SHAPES, seed=6, spikes=(3,), flips=(5,), nan_at=(6,))
    calls = record_cuda_exact_calls(monkeypatch)
    with_early, taken = _run(backend_name, stream, True, monkeypatch, device="cuda", dtype=dtype, no_sync=True,
                             stats_freq=1, one_group=one_group)
    if backend_name == "cuda":
        assert calls == ([(True, False)] + [(True, True)] * 7 if one_group else []), calls
    without, _ = _run(backend_name, stream, False, monkeypatch, device="cuda", dtype=dtype, stats_freq=1,
                      one_group=one_group)
    assert taken == [False] + [True] * 7
    _assert_same_bits(with_early, without)


def test_switched_off_by_the_environment(monkeypatch):
    """``LBW_EARLY_TELEMETRY=0`` at import turns the early pass off (bench/device_check.sh's
    same-run baseline); the steps are then those without it."""
    import os
    import subprocess
    import sys

    from lbw_kernels import early_telemetry

    read = "import lbw_kernels.early_telemetry as e; print(e.ENABLED)"
    for value, expected in (("0", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, check=True,
                             env={**os.environ, "LBW_EARLY_TELEMETRY": value}).stdout
        assert out.strip() == expected
    monkeypatch.setattr(early_telemetry, "ENABLED", False)
    _, taken = _run("reference", random_stream(3, SHAPES, seed=7), True, monkeypatch)
    assert taken == [False] * 3
