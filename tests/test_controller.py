"""The guard's controller on scripted gradient streams (DESIGN.md rules 2-4), expected values
derived by hand from the rules. Gradients ``a * ones`` give mean square ``a^2`` and sign ``a``."""

import math

import pytest
import torch

import lbw_kernels.optimizer as optimizer_module
from lbw_kernels import GuardedAdamW
from streams import constant_grads, random_stream, run


def make(backend, numel=4, **kw):
    p = torch.zeros(numel, dtype=torch.float64)
    kw.setdefault("stats_freq", 1)
    return p, GuardedAdamW([p], lr=1e-3, backend=backend, **kw)


def test_spike_flip_calm_sequence_by_hand(backend):
    p, opt = make(backend, )
    amplitudes = [1, 1, 2, -1, -1, -1]
    got = run(opt, [p], constant_grads(amplitudes), record=("scale", "regime", "grad_ms", "ratio", "signed_mean"))
    # call 1: ema = x = 1, ratio = 1/(1+1e-12) -> calm, scale min(1, 1.01) = 1
    # call 2: ema = .85*1 + .15*1 = 1 -> calm, 1
    # call 3: x = 4, ema = .85 + .6 = 1.45, ratio 2.7586 > 1.5 -> spike, 0.7
    # call 4: x = 1, ema = .85*1.45 + .15 = 1.3825, ratio .7233; sign 2 -> -1 flips -> oscillation, .7*.85
    # call 5: ema = .85*1.3825 + .15 = 1.325125, ratio .7546, no flip -> calm, .595 + .01
    # call 6: ema = .85*1.325125 + .15 = 1.27635625 -> calm, .605 + .01
    emas = [1.0, 1.0, 1.45, 1.3825, 1.325125, 1.27635625]
    xs = [1, 1, 4, 1, 1, 1]
    assert [r for _, r, *_ in got] == ["calm", "calm", "spike", "oscillation", "calm", "calm"]
    scales = [1.0, 1.0, 0.7, 0.7 * 0.85, 0.7 * 0.85 + 0.01, 0.7 * 0.85 + 0.02]
    for (scale, _, grad_ms, ratio, signed_mean), s, e, x, a in zip(got, scales, emas, xs, amplitudes):
        assert scale == pytest.approx(s, rel=1e-14)
        assert grad_ms == pytest.approx(x, rel=1e-14)
        assert ratio == pytest.approx(x / (e + 1e-12), rel=1e-14)
        assert signed_mean == a


def test_stress_between_thresholds_is_oscillation(backend):
    p, opt = make(backend, )
    # x = 1 then 1.44: ema = .85 + .15*1.44 = 1.066, ratio 1.3508: > 1.1, < 1.5, same sign
    # -> oscillation, scale .85
    got = run(opt, [p], constant_grads([1, 1.2]))
    assert got[1][1] == "oscillation"
    assert got[1][0] == pytest.approx(0.85)


def test_min_scale_floor_then_recovery_to_one(backend):
    p, opt = make(backend, min_scale=0.1)
    # x multiplies by 100 each call: every ratio after the first is far above 1.5.
    spikes = [10.0**k for k in range(9)]
    got = run(opt, [p], constant_grads(spikes))
    expected = [1.0] + [max(0.1, 0.7**k) for k in range(1, 9)]
    assert [s for s, _ in got] == pytest.approx(expected, rel=1e-14)
    assert [r for _, r in got][1:] == ["spike"] * 8
    assert got[-1][0] == 0.1  # 0.7**7 = 0.082 < 0.1: clamped exactly to the floor
    # Tiny gradients now: ratio << 1, no sign change -> calm, +0.01 per call, capped at 1.
    calm = run(opt, [p], constant_grads([1e-6] * 95))
    assert all(r == "calm" for _, r in calm)
    scales = [s for s, _ in calm]
    assert scales[0] == pytest.approx(0.11)
    assert scales[44] == pytest.approx(0.55)
    assert max(scales) == 1.0 and scales[-1] == 1.0  # min(1, .) hits 1 exactly and stays


def test_stats_freq_schedule_reads_telemetry_on_calls_1_f_2f(backend):
    p, opt = make(backend, stats_freq=4)
    # Growing gradients: every telemetry call after the first is a spike.
    stream = constant_grads([2.0**k for k in range(13)])
    got = run(opt, [p], stream, record=("scale", "regime", "grad_ms"))
    decided = {1: 1.0, 4: 0.7, 8: 0.49, 12: 0.343}
    scale = None
    for call, (s, regime, grad_ms) in enumerate(got, start=1):
        if call in decided:
            scale = decided[call]
            assert grad_ms == pytest.approx(4.0 ** (call - 1), rel=1e-14)  # this very call's
        assert s == pytest.approx(scale, rel=1e-14), call
    assert [r for _, r, _ in got] == ["calm"] * 3 + ["spike"] * 10


def test_a_call_that_raises_before_deciding_is_not_counted(monkeypatch):
    """The host count (eager schedule) and the CALLS slot (checkpoints, telemetry()) advance
    together, only once a call decides: after a failed call the next one is still call 1."""
    p = torch.zeros(4, dtype=torch.float64)
    opt = GuardedAdamW([p], stats_freq=3, backend="reference")
    backend = opt._backend_for(p.device)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(backend, "telemetry", out_of_memory)
    p.grad = torch.ones(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step()
    monkeypatch.undo()
    assert opt.telemetry()["step"] == 0 and torch.equal(p, torch.zeros(4, dtype=torch.float64))
    opt.step()
    assert opt.telemetry()["step"] == 1 and opt.telemetry()["regime"] == "calm"  # call 1 reads telemetry


def test_device_schedule_is_the_host_schedule():
    cfg = optimizer_module.ref.GuardConfig
    for f in (1, 2, 3, 10):
        host = [cfg(stats_freq=f).is_telemetry_call(k) for k in range(1, 61)]
        device = cfg(stats_freq=f).telemetry_due(torch.arange(60, dtype=torch.float64))
        assert device.tolist() == host
        assert not cfg(stats_freq=f, auto_enabled=False).telemetry_due(torch.arange(60.0)).any()


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("policy", ["lbw", "zscore"])
@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_schedule_read_from_the_device_matches_the_host_schedule(gate, policy, skip_nonfinite, backend, monkeypatch):
    """A step captured in a CUDA graph replays one call's launches, so once a step is captured
    the optimizer reads rule 2's schedule from the guard's CALLS slot and measures every call.
    Here the capture is simulated on the second call: the decisions must be bitwise the host's,
    spikes, a flip, a call without gradients and (with the finite check) a NaN call included,
    and the mode must stay on afterwards."""
    shapes = [(7, 3), (5,)]
    stream = random_stream(14, shapes, seed=3, spikes=(5, 6, 9), flips=(10,), nan_at=(8,) if skip_nonfinite else ())
    stream[3] = [None, None]  # call 4: no gradients, still a call
    record = ("scale", "regime", "grad_ms", "signed_mean", "skipped_steps", "step")
    kw = dict(lr=1e-2, stats_freq=3, gate=gate, policy=policy, backend=backend, skip_nonfinite=skip_nonfinite)
    host_params = [torch.ones(s, dtype=torch.float64) for s in shapes]
    on_host = run(GuardedAdamW(host_params, **kw), host_params, stream, record=record)

    device_params = [torch.ones(s, dtype=torch.float64) for s in shapes]
    opt = GuardedAdamW(device_params, **kw)
    # (captured: the whole second call, whichever of its steps ask; the first made the states,
    # which a capture may not)
    monkeypatch.setattr(optimizer_module, "stream_is_capturing", lambda device: opt._calls == 1)
    on_device = run(opt, device_params, stream, record=record)
    assert opt._schedule_on_device  # stays on once a step was captured
    assert on_device == on_host
    assert [r for _, r, *_ in on_device].count("nonfinite") == (1 if skip_nonfinite else 0)
    assert on_device[-1][-1] == 14  # telemetry()["step"]: every call counted
    assert {r for _, r, *_ in on_device} - {"calm", "nonfinite"}, "the stream must move the policy"
    for a, b in zip(device_params, host_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_compiled_step_follows_the_schedule_like_eager(gate, backend):
    """torch.compile bakes what it traces of the host into the graph (dynamo guards no optimizer
    attribute), so the call count, the plan and rule 2's schedule must not be read while tracing:
    a compiled step with stats_freq > 1 analysed every call before. Compiled calls must decide
    bitwise as eager ones, a call without gradients and a NaN call included, without compiling
    anew for every call."""
    from torch._dynamo.utils import counters

    shapes = [(7, 3), (5,)]
    stream = random_stream(11, shapes, seed=4, spikes=(5, 6, 9), flips=(10,), nan_at=(8,))
    stream[3] = [None, None]
    record = ("scale", "regime", "grad_ms", "signed_mean", "skipped_steps", "step")
    kw = dict(lr=1e-2, stats_freq=3, gate=gate, backend=backend)
    eager_params = [torch.ones(s, dtype=torch.float64) for s in shapes]
    eager = run(GuardedAdamW(eager_params, **kw), eager_params, stream, record=record)

    torch._dynamo.reset()
    counters.clear()
    params = [torch.ones(s, dtype=torch.float64) for s in shapes]
    opt = GuardedAdamW(params, **kw)
    opt.step = torch.compile(opt.step, backend="aot_eager")
    compiled = run(opt, params, stream, record=record)
    assert compiled == eager
    assert {r for _, r, *_ in eager} - {"calm", "nonfinite"}, "the stream must move the policy"
    for a, b in zip(params, eager_params):
        assert torch.equal(a, b)
    # graphs: the step with gradients and the one without, not one per call
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_compiled_step_takes_tensor_hyperparameters_edited_in_place(backend):
    """One-element tensors as lr, betas, eps and weight_decay (torch.optim's tensor betas, the
    usual choice under torch.compile), edited in place between compiled calls: the compiled
    step updates as the eager one does (the cpp ops' schema takes floats: the tensors must be
    read before the traced op, not handed to it)."""
    shapes = [(7, 3), (5,)]
    stream = random_stream(5, shapes, seed=6)

    def train(compiled: bool):
        params = [torch.ones(s, dtype=torch.float32) for s in shapes]
        opt = GuardedAdamW(params, lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.999)),
                           eps=torch.tensor(1e-8), weight_decay=torch.tensor(0.1), stats_freq=1, backend=backend)
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for k, grads in enumerate(stream):
            if k == 3:
                opt.param_groups[0]["betas"][1].fill_(0.9)
                opt.param_groups[0]["eps"].fill_(1e-3)
            for p, g in zip(params, grads):
                p.grad = g.float()
            step()
        return params

    torch._dynamo.reset()
    for a, b in zip(train(True), train(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_use_max_rms_false_averages_tensor_mean_squares(backend):
    # Tensor A: mean square 1 then 50; tensor B: 100 both times.
    a, b = torch.zeros(3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    stream = [
        [torch.full((3,), 1.0, dtype=torch.float64), torch.full((5,), 10.0, dtype=torch.float64)],
        [torch.full((3,), math.sqrt(50), dtype=torch.float64), torch.full((5,), 10.0, dtype=torch.float64)],
    ]
    by_max = run(GuardedAdamW([a, b], stats_freq=1, backend=backend), [a, b], stream, record=("grad_ms", "regime"))
    a2, b2 = a.clone().zero_(), b.clone().zero_()
    by_mean = run(GuardedAdamW([a2, b2], stats_freq=1, use_max_rms=False, backend=backend), [a2, b2], stream, record=("grad_ms", "regime"))
    # (sum g^2 is read off a float64 norm, squared: equal to ~1 ulp)
    assert [r for _, r in by_max] == ["calm", "calm"]
    assert [x for x, _ in by_max] == pytest.approx([100.0, 100.0], rel=1e-14)
    # mean: 50.5 then 75; ema = .85*50.5 + .15*75 = 54.175, ratio 1.3844 -> oscillation
    assert by_mean[0][0] == pytest.approx(50.5, rel=1e-14) and by_mean[0][1] == "calm"
    assert by_mean[1][0] == pytest.approx(75.0, rel=1e-14)
    assert by_mean[1][1] == "oscillation"


@pytest.mark.parametrize("use_max_rms", [True, False])
def test_summarize_with_the_plans_numel_total_has_the_same_bits(use_max_rms):
    """The step plan passes numels.sum() computed once per plan; a float64 sum of integers
    below 2**53 is exact in any order, so the summary must not change by a bit."""
    from lbw_kernels import reference as ref

    gen = torch.Generator().manual_seed(3)
    numels = torch.tensor([65_536_000, 2048, 5_632 * 2048, 1, 4097] * 40, dtype=torch.float64)
    partials = torch.rand((len(numels), 3), generator=gen, dtype=torch.float64) * 1e3
    partials[:, 1] -= 500.0
    partials[:, 2] = 0.0
    for total in (numels.sum(), numels.flip(0).sum(), numels.cumsum(0)[-1]):
        got = ref.summarize(partials, numels, use_max_rms, numel_total=total)
        assert torch.equal(got, ref.summarize(partials, numels, use_max_rms))


@pytest.mark.parametrize("use_max_rms", [True, False])
def test_zero_element_tensors_take_no_part(use_max_rms, backend):
    stream = [[torch.full((4,), a, dtype=torch.float64)] for a in (1.0, 1.0, 3.0, -1.0, 0.5)]
    p = torch.zeros(4, dtype=torch.float64)
    plain = run(GuardedAdamW([p], stats_freq=1, use_max_rms=use_max_rms, backend=backend), [p], stream,
                record=("scale", "regime", "grad_ms", "signed_mean"))
    q, empty = torch.zeros(4, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    with_empty = run(
        GuardedAdamW([q, empty], stats_freq=1, use_max_rms=use_max_rms, backend=backend), [q, empty],
        [[g, torch.zeros(0, dtype=torch.float64)] for (g,) in stream],
        record=("scale", "regime", "grad_ms", "signed_mean"),
    )
    assert with_empty == plain
    assert torch.equal(p, q)


def test_params_without_grad_take_no_part(backend):
    p, q = torch.zeros(4, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    opt = GuardedAdamW([p, q], stats_freq=1, backend=backend)
    run(opt, [p, q], [[torch.full((4,), 2.0, dtype=torch.float64), None]])
    assert opt.telemetry()["grad_ms"] == pytest.approx(4.0, rel=1e-14)
    assert torch.equal(q, torch.ones(6, dtype=torch.float64))
    assert q not in opt.state or not opt.state[q]


def test_auto_disabled_never_changes_scale(backend):
    p, opt = make(backend, auto_enabled=False)
    got = run(opt, [p], constant_grads([1, 100, -1000, 1]))
    assert [s for s, _ in got] == [1.0] * 4
    assert [r for _, r in got] == [None] * 4  # no call decided anything
