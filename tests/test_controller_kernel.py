"""The controller kernel (``torch.ops.lbw.guard_decide_``, csrc/guard_controller.h) against
``reference.guard_decide``: bitwise, on states and readings drawn to reach every branch of
rules 1-4 for both policies (first calls, sign flips, spikes, hot calls inside and outside the
window, non-finite and NaN readings, a device-side rule 2), on CPU and, with a GPU, on CUDA.
Skips with the reason when the C++ extension is not built."""

import itertools
import math
import random
import zlib

import pytest
import torch

from lbw_kernels import reference as ref
from lbw_kernels.backends import availability
from lbw_kernels.policies import ZScorePolicy

from gpu_checks import extension_devices

_reason = availability()["cpp"]
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"C++ extension not built: {_reason}")




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


@pytest.mark.parametrize("device", extension_devices())
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
        torch.testing.assert_close(guard, before, rtol=0, atol=0, equal_nan=True)  # (NaN slots before any reading)
    # nothing due: the summary is not needed, the call is counted
    torch.ops.lbw.guard_decide_(guard, None, None, False, False, config)
    assert guard[ref.CALLS] == 1 and guard[ref.SKIP] == 0


@pytest.mark.parametrize("device", extension_devices())
def test_controller_kernel_opcheck(device):
    from lbw_kernels.controller_op import controller_config

    cfg = ref.GuardConfig(policy=ZScorePolicy())
    guard = ref.new_guard_state(device, cfg.policy)
    summary = torch.tensor([1.0, 0.1, 2.0, 0.0], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.lbw.guard_decide_.default,
                          (guard, summary, torch.tensor(True, device=device), False, True, list(controller_config(cfg))))


# ---------------------------------------------------------------------------------------
# summarize_decide_: the telemetry rows read in the kernel (csrc/guard_summary.h)
# ---------------------------------------------------------------------------------------
LANES = 256  # csrc/guard_summary.h kSummaryLanes


def _nan_max(a: float, b: float) -> float:
    return a + b if (a != a or b != b) else (a if a > b else b)


def _lanes_summary(partials: torch.Tensor, numels: torch.Tensor, use_max: bool) -> list:
    """guard_summary.h's documented order in Python floats (IEEE float64, as the kernel's):
    row r into lane r % 256, then lane j += lane j + w for w = 128, ..., 1."""
    lanes = [[0.0, 0.0, 0.0, 0.0, -math.inf if use_max else 0.0] for _ in range(LANES)]
    for r, ((sumsq, total, nonfinite), n) in enumerate(zip(partials.tolist(), numels.tolist())):
        lane, ms = lanes[r % LANES], sumsq / n
        lane[0] += sumsq
        lane[1] += total
        lane[2] += nonfinite
        lane[3] += n
        lane[4] = _nan_max(lane[4], ms) if use_max else lane[4] + ms
    w = LANES // 2
    while w >= 1:
        for j in range(w):
            a, b = lanes[j], lanes[j + w]
            lanes[j] = [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3],
                        _nan_max(a[4], b[4]) if use_max else a[4] + b[4]]
        w //= 2
    sumsq, total, nonfinite, numel, ms = lanes[0]
    return [ms if use_max else ms / len(numels), total / numel, math.sqrt(sumsq), nonfinite]


def _random_rows(gen: torch.Generator, rows: int, poison: bool):
    numels = torch.randint(1, 70_000, (rows,), generator=gen).to(torch.float64)
    partials = torch.empty((rows, 3), dtype=torch.float64)
    partials[:, 0] = torch.rand(rows, generator=gen, dtype=torch.float64) * numels * 10 ** torch.randint(-3, 3, (rows,), generator=gen)
    partials[:, 1] = torch.randn(rows, generator=gen, dtype=torch.float64) * numels.sqrt()
    partials[:, 2] = 0.0
    if poison:  # a NaN row and an Inf row, marked non-finite as the kernels mark them
        for r, value in ((rows // 3, float("nan")), (rows - 1, float("inf"))):
            partials[r, 0] = partials[r, 1] = value
            partials[r, 2] = 1.0
    return partials, numels


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("rows", [1, 3, 255, 256, 257, 2000])
@pytest.mark.parametrize("use_max_rms", [True, False])
@pytest.mark.parametrize("poison", [False, True], ids=["finite", "nonfinite"])
def test_summarize_decide_reads_the_rows_in_its_order_and_decides_as_the_reference(device, rows, use_max_rms, poison):
    """The summary is the documented fixed order's bits (a Python emulation), the reference's
    within that order's rounding (bitwise for x under use_max_rms and the count), and the
    decision is guard_decide_'s on that summary, bit for bit."""
    from lbw_kernels.controller_op import controller_config

    gen = torch.Generator().manual_seed(rows * 4 + use_max_rms * 2 + poison)
    partials, numels = _random_rows(gen, rows, poison)
    for cfg in (ref.GuardConfig(use_max_rms=use_max_rms), ref.GuardConfig(use_max_rms=use_max_rms, policy=ZScorePolicy())):
        config = list(controller_config(cfg))
        state = _random_state(random.Random(rows), cfg).to(device)
        got = state.clone()
        summary = torch.ops.lbw.summarize_decide_(got, partials.to(device), numels.to(device), use_max_rms, None, True,
                                                  True, config)
        assert summary.tolist() == pytest.approx(_lanes_summary(partials, numels, use_max_rms), rel=0, abs=0, nan_ok=True)
        want = ref.summarize(partials, numels, use_max_rms).to(device)
        # x under use_max_rms (a max of the same divisions) and the count (integers) are exact;
        # the sums over tensors differ from torch.sum's by their order: float64 rounding,
        # bounded by rows * 2**-53 of the sum of magnitudes (10x margin).
        exact = [0, 3] if use_max_rms else [3]
        torch.testing.assert_close(summary[exact], want[exact], rtol=0, atol=0, equal_nan=True)
        magnitude = torch.stack([partials[:, 0].div(numels).abs().sum() / (1 if use_max_rms else rows),
                                 partials[:, 1].abs().sum() / numels.sum(), partials[:, 0].abs().sum().sqrt()])
        bound = (10 * rows * 2.0**-53 * magnitude).to(device)
        diff = (summary[:3] - want[:3]).abs()
        assert bool(((diff <= bound) | (summary[:3].isnan() & want[:3].isnan()) | (summary[:3] == want[:3])).all()), (summary, want)
        decided = state.clone()
        torch.ops.lbw.guard_decide_(decided, summary, None, True, True, config)
        torch.testing.assert_close(got, decided, rtol=0, atol=0, equal_nan=True)
        assert got[ref.SKIP] == (1.0 if poison else 0.0)


@pytest.mark.gpu
def test_summarize_decide_gives_the_same_bits_on_cpu_and_cuda():
    if availability()["cuda"] is not None:
        pytest.skip(f"cuda backend: {availability()['cuda']}")
    from lbw_kernels.controller_op import controller_config

    cfg = ref.GuardConfig()
    config = list(controller_config(cfg))
    partials, numels = _random_rows(torch.Generator().manual_seed(7), 5000, poison=False)
    out = {}
    for device in ("cpu", "cuda"):
        guard = ref.new_guard_state(device, cfg.policy)
        summary = torch.ops.lbw.summarize_decide_(guard, partials.to(device), numels.to(device), False, None, True,
                                                  True, config)
        out[device] = (summary.cpu(), guard.cpu())
    assert torch.equal(out["cpu"][0], out["cuda"][0]) and torch.equal(out["cpu"][1], out["cuda"][1])


def test_summarize_decide_refuses_bad_rows_and_changes_nothing():
    from lbw_kernels.controller_op import controller_config

    cfg = ref.GuardConfig()
    config = list(controller_config(cfg))
    guard = ref.new_guard_state("cpu", cfg.policy)
    partials, numels = _random_rows(torch.Generator().manual_seed(1), 5, poison=False)
    cases = [
        ((None, numels), "partials must be a contiguous float64 \\[T, 3\\]"),
        ((partials.float(), numels), "partials must be"),
        ((partials[:, :2], numels), "partials must be"),
        ((partials.t().contiguous().t(), numels), "partials must be"),
        ((partials[:0], numels[:0]), "partials must be"),
        ((partials, None), "numels must be a contiguous float64 vector of 5"),
        ((partials, numels[:4]), "numels must be a contiguous float64 vector of 5"),
        ((partials, numels.float()), "numels must be"),
    ]
    for (p, n), match in cases:
        before = guard.clone()
        with pytest.raises(RuntimeError, match=match):
            torch.ops.lbw.summarize_decide_(guard, p, n, True, None, True, True, config)
        torch.testing.assert_close(guard, before, rtol=0, atol=0, equal_nan=True)
    # nothing due: no rows needed, no summary, the call is counted
    summary = torch.ops.lbw.summarize_decide_(guard, None, None, True, None, False, False, config)
    assert summary.numel() == 0 and guard[ref.CALLS] == 1 and guard[ref.SKIP] == 0


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("due", [True, False])
def test_summarize_decide_opcheck(device, due):
    from lbw_kernels.controller_op import controller_config

    cfg = ref.GuardConfig(policy=ZScorePolicy())
    guard = ref.new_guard_state(device, cfg.policy)
    partials, numels = _random_rows(torch.Generator().manual_seed(2), 300, poison=False)
    args = (partials.to(device), numels.to(device)) if due else (None, None)
    torch.library.opcheck(torch.ops.lbw.summarize_decide_.default,
                          (guard, *args, True, torch.tensor(due, device=device) if due else None, False, due,
                           list(controller_config(cfg))))


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
