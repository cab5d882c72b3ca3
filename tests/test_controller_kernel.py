"""The controller kernel (``torch.ops.lbw.guard_decide_``, csrc/guard_controller.h) against
``reference.guard_decide``: bitwise, on states and readings drawn to reach every branch of
rules 1-4 for both policies (first calls, sign flips, spikes, hot calls inside and outside the
window, non-finite and NaN readings, a device-side rule 2), on CPU and, with a GPU, on CUDA.
Skips with the reason when the C++ extension is not built."""

import itertools
import random
import zlib

import pytest
import torch

from lbw_kernels import reference as ref
from lbw_kernels.backends import availability
from lbw_kernels.policies import ZScorePolicy

_reason = availability()["cpp"]
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"C++ extension not built: {_reason}")


def _devices():
    out = ["cpu"]
    if torch.cuda.is_available() and availability()["cuda"] is None:
        out.append("cuda")
    return out


CONFIGS = [
    ref.GuardConfig(),
    ref.GuardConfig(auto_enabled=False),
    ref.GuardConfig(stress_threshold=1.05, spike_threshold=2.0, min_scale=0.3, recovery_fast=0.05, ema_decay=0.5),
    ref.GuardConfig(policy=ZScorePolicy()),
    ref.GuardConfig(policy=ZScorePolicy(window=0, stay_alert=False, growth=0.2), min_scale=0.2),
    ref.GuardConfig(policy=ZScorePolicy(window=3, z_threshold=1.0, sd_floor=0.01, max_cut=0.5, ema_decay=0.5)),
]


def _random_state(rng: random.Random, cfg: ref.GuardConfig) -> torch.Tensor:
    state = ref.new_guard_state("cpu", cfg.policy)
    if rng.random() < 0.8:  # else: a fresh guard (first call)
        state[ref.SCALE] = rng.choice([1.0, rng.uniform(0.05, 1.0)])
        state[ref.EMA] = rng.uniform(0.0, 3.0)
        state[ref.PREV_SIGN] = rng.choice([0.0, rng.uniform(-1, 1)])
        state[ref.ANALYZED] = rng.choice([0, 1, rng.randint(2, 50)])
        state[ref.SKIPPED] = rng.randint(0, 3)
        state[ref.REGIME] = rng.randint(1, 5)
        state[ref.CALLS] = rng.randint(0, 100)
        for slot in (ref.GRAD_MS, ref.RATIO, ref.SIGNED_MEAN, ref.GRAD_NORM):
            state[slot] = rng.uniform(-1, 2)
        if isinstance(cfg.policy, ZScorePolicy):
            from lbw_kernels import policies as pol

            state[pol.LOG_NORM_MEAN] = rng.uniform(-3, 3)
            state[pol.LOG_NORM_VAR] = rng.choice([0.0, rng.uniform(0, 2)])
            state[pol.LAST_HOT] = rng.choice([0, max(0, int(state[ref.ANALYZED]) - rng.randint(0, 4))])
            state[pol.SEEN] = rng.choice([0, rng.randint(1, 40)])
            state[pol.Z] = rng.uniform(-3, 3)
    return state


def _random_summary(rng: random.Random, state: torch.Tensor) -> torch.Tensor:
    ema = float(state[ref.EMA])
    x = rng.choice([ema * rng.uniform(0.5, 3.0), rng.uniform(0, 5), 0.0])
    sign = rng.choice([rng.uniform(-1, 1), 0.0])
    norm = rng.choice([rng.uniform(1e-3, 50.0), 0.0, 1e4])
    nonfinite = rng.choice([0.0, 0.0, 0.0, 1.0, 3.0])
    if nonfinite and rng.random() < 0.5:
        x, norm = float("nan"), float("inf")
    return torch.tensor([x, sign, norm, nonfinite], dtype=torch.float64)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_controller_kernel_is_bitwise_the_reference(device, cfg, seed):
    from lbw_kernels.controller_op import controller_config

    rng = random.Random(zlib.crc32(repr(cfg).encode()) + seed)
    config = list(controller_config(cfg))
    modes = list(itertools.product(["no", "yes", "device-true", "device-false"], [True, False]))
    reached = set()
    for trial in range(400):
        analyze_mode, check_finite = modes[trial % len(modes)]
        state = _random_state(rng, cfg).to(device)
        summary = _random_summary(rng, state).to(device)
        analyze = {"no": False, "yes": True}.get(analyze_mode)
        if analyze is None:
            analyze = torch.tensor(analyze_mode == "device-true", device=device)
        want = ref.guard_decide(state, summary, analyze=analyze, check_finite=check_finite, cfg=cfg)
        got = state.clone()
        torch.ops.lbw.guard_decide_(got, summary, analyze if isinstance(analyze, torch.Tensor) else None,
                                    analyze is True, check_finite, config)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"trial {trial} {analyze_mode} {check_finite}: {state} {summary}\n{m}")
        reached.add(int(want[ref.REGIME]))
    # the draws reach every regime this policy can decide, and rule 1
    policy_regimes = {ref.CALM, ref.SPIKE, ref.NONFINITE}
    policy_regimes |= {ref.STRESS} if isinstance(cfg.policy, ZScorePolicy) else {ref.OSCILLATION}
    assert policy_regimes <= reached, reached


def test_controller_kernel_refuses_bad_arguments():
    from lbw_kernels.controller_op import controller_config

    cfg = ref.GuardConfig()
    config = list(controller_config(cfg))
    guard = ref.new_guard_state("cpu", cfg.policy)
    summary = torch.zeros(4, dtype=torch.float64)
    cases = [
        ((guard.float(), summary, None, True, True, config), "guard must be a contiguous float64 vector of 12"),
        ((guard[:11], summary, None, True, True, config), "guard must be"),
        ((guard, None, None, True, False, config), "summary must be 4"),
        ((guard, summary[:3], None, False, True, config), "summary must be 4"),
        ((guard, summary, torch.tensor([1.0]), False, True, config), "analyze must be a one-element bool"),
        ((guard, summary, None, True, True, config[:-1]), "config must hold 15 numbers"),
        ((guard, summary, None, True, True, config[:6] + [2.0] + config[7:]), "config\\[POLICY\\] must be 0"),
    ]
    for args, match in cases:
        before = guard.clone()
        with pytest.raises(RuntimeError, match=match):
            torch.ops.lbw.guard_decide_(*args)
        assert torch.equal(guard, before) or torch.isnan(guard).any()
    # nothing due: the summary is not needed, the call is counted
    torch.ops.lbw.guard_decide_(guard, None, None, False, False, config)
    assert guard[ref.CALLS] == 1 and guard[ref.SKIP] == 0


@pytest.mark.parametrize("device", _devices())
def test_controller_kernel_opcheck(device):
    from lbw_kernels.controller_op import controller_config

    cfg = ref.GuardConfig(policy=ZScorePolicy())
    guard = ref.new_guard_state(device, cfg.policy)
    summary = torch.tensor([1.0, 0.1, 2.0, 0.0], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.lbw.guard_decide_.default,
                          (guard, summary, torch.tensor(True, device=device), False, True, list(controller_config(cfg))))


def test_policies_without_a_kernel_run_as_the_reference():
    from lbw_kernels.controller_op import controller_config

    class Custom(ref.LBWPolicy):  # a user's subclass: the kernel does not know its rules
        pass

    assert controller_config(ref.GuardConfig(policy=Custom())) is None
    assert controller_config(ref.GuardConfig()) is not None


@pytest.mark.parametrize("policy", ["lbw", "zscore"])
def test_kernel_backends_decide_with_the_kernel_and_a_custom_policy_with_the_reference(backend, policy, monkeypatch):
    """The kernel backends must not fall back silently: with the reference controller made to
    fail, their steps still decide (through the kernel), and a policy the kernel does not know
    still goes to the reference (and so fails here)."""
    from lbw_kernels import GuardedAdamW

    if backend == "reference":
        pytest.skip("the reference backend is the spec: it runs the reference controller")

    def forbidden(*args, **kwargs):
        raise AssertionError("reference.guard_decide called")

    p = torch.zeros(5, dtype=torch.float64)
    opt = GuardedAdamW([p], lr=1e-2, stats_freq=1, backend=backend, policy=policy)
    monkeypatch.setattr(ref, "guard_decide", forbidden)
    for amplitude in (1.0, 1.0, 4.0, -1.0):
        p.grad = torch.full((5,), amplitude, dtype=torch.float64)
        opt.step()
    assert opt.telemetry()["step"] == 4
    if policy == "lbw":  # the spike at call 3 and the flip at call 4 cut the scale
        assert opt.telemetry()["scale"] < 1.0

    class Custom(ref.LBWPolicy):
        pass

    q = torch.zeros(5, dtype=torch.float64)
    q.grad = torch.ones(5, dtype=torch.float64)
    with pytest.raises(AssertionError, match="reference.guard_decide called"):
        GuardedAdamW([q], lr=1e-2, stats_freq=1, backend=backend, policy=Custom()).step()
