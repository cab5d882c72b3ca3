"""Guard policies: ``policy="zscore"`` against a plain-Python model of its rules, its bounds,
rule 1 under it, checkpoints and bad input; ``"lbw"`` stays the published rules, bit for bit."""

import copy
import math
import random

import pytest
import torch

from lbw_kernels import GuardedAdamW
from lbw_kernels.policies import ZScorePolicy, resolve_policy
from lbw_kernels.reference import LBWPolicy
from streams import constant_grads, random_stream, run
from test_no_sync import host_reads_forbidden

NUMEL = 4  # constant gradients a * ones(4) have global norm 2|a|


def zscore_by_hand(norms, pol: ZScorePolicy, min_scale=0.1):
    """ZScorePolicy's docstring, one Python float at a time: (scale, regime, z) per call."""
    scale, mean, var, seen, last_hot, out = 1.0, 0.0, 0.0, 0, None, []
    for call, norm in enumerate(norms, start=1):
        z, hot = 0.0, False
        if norm > 0:  # a zero norm is not seen: statistics, scale and history stay
            s = math.log(norm)
            if seen == 0:  # the first non-zero norm starts the statistics
                mean = s
            else:
                sd = max(math.sqrt(var), pol.sd_floor)
                z = (s - mean) / sd
                hot = z > pol.z_threshold
                band = pol.z_threshold * sd
                delta = min(max(s, mean - band), mean + band) - mean
                mean += (1 - pol.ema_decay) * delta
                var = pol.ema_decay * (var + (1 - pol.ema_decay) * delta * delta)
            seen += 1
        corroborated = pol.window == 0 or (last_hot is not None and call - last_hot <= pol.window)
        corroborated = corroborated or (pol.stay_alert and scale < 1.0)
        if hot:
            last_hot = call
        if hot and corroborated:
            scale = max(min_scale, scale * max(pol.max_cut, math.exp(-pol.cut_per_z * (z - pol.z_threshold))))
            regime = "spike"
        elif hot:
            regime = "stress"
        else:
            if norm > 0:
                scale = min(1.0, scale * (1 + pol.growth))
            regime = "calm"
        out.append((scale, regime, z))
    return out


def bursty_norms(calls, seed):
    """Log-normal noise around a drifting level, with single-call spikes and multi-call bursts,
    a zero norm first and mid-way, and one near-zero norm."""
    rng = random.Random(seed)
    norms, level = [], 1.0
    for k in range(calls):
        level *= math.exp(rng.gauss(0, 0.02))
        burst = 8.0 if k % 23 in (10, 11, 12) else 6.0 if k % 17 == 5 else 1e-3 if k == 50 else 1.0
        norms.append(0.0 if k in (0, 30) else level * burst * math.exp(rng.gauss(0, 0.2)))
    return norms


POLICIES = [
    ZScorePolicy(),
    ZScorePolicy(window=0, growth=0.05, sd_floor=0.1),
    ZScorePolicy(window=6, cut_per_z=2.0, max_cut=0.5, ema_decay=0.5, stay_alert=False),
    ZScorePolicy(stay_alert=False),
]


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("pol", POLICIES, ids=["default", "at-once", "wide-window", "not-alert"])
def test_zscore_matches_its_rules_by_hand(pol, gate, backend):
    norms = bursty_norms(80, seed=1)
    p = torch.zeros(NUMEL, dtype=torch.float64)
    opt = GuardedAdamW([p], lr=1e-3, stats_freq=1, policy=pol, gate=gate, backend=backend)
    got = run(opt, [p], constant_grads([n / 2 for n in norms], NUMEL), record=("scale", "regime", "z"))
    want = zscore_by_hand(norms, pol)
    assert [r for _, r, _ in got] == [r for _, r, _ in want]
    for (scale, _, z), (w_scale, _, w_z) in zip(got, want):
        assert scale == pytest.approx(w_scale, rel=1e-12)
        assert z == pytest.approx(w_z, rel=1e-12, abs=1e-12)
    # The stream exercises every branch: calm growth, bursts cut, lone spikes held (with
    # window > 0; window=0 acts at once).
    regimes = {r for _, r, _ in want}
    assert regimes == {"calm", "spike"} | ({"stress"} if pol.window > 0 else set())


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_zscore_at_stats_freq_3_decides_on_the_telemetry_calls_alone(gate, backend):
    """With stats_freq=3 the policy sees calls 1, 3, 6, ... as if their norms were its whole
    stream ("two hot calls in a row" counts telemetry calls); other calls keep the scale."""
    rng = random.Random(4)
    # quiet noise; 7-call bursts (two telemetry calls, 3 apart) and 2-call ones (at most one)
    norms = [math.exp(rng.gauss(0, 0.15)) * (20.0 if k % 40 in range(20, 27) else 9.0 if k % 40 in (5, 6) else 1.0)
             for k in range(120)]
    telemetry_calls = [k for k in range(1, 121) if k == 1 or k % 3 == 0]
    want = zscore_by_hand([norms[k - 1] for k in telemetry_calls], ZScorePolicy())
    p = torch.zeros(NUMEL, dtype=torch.float64)
    opt = GuardedAdamW([p], lr=1e-3, stats_freq=3, policy="zscore", gate=gate, backend=backend)
    got = run(opt, [p], constant_grads([n / 2 for n in norms], NUMEL), record=("scale", "regime", "z"))
    decided = dict(zip(telemetry_calls, want))
    scale = 1.0
    for call, (g_scale, g_regime, g_z) in enumerate(got, start=1):
        if call in decided:
            scale, regime, z = decided[call]
            assert g_regime == regime and g_z == pytest.approx(z, rel=1e-12, abs=1e-12), call
        assert g_scale == pytest.approx(scale, rel=1e-12), call
    assert {r for _, r, _ in want} == {"calm", "stress", "spike"}


def test_zero_and_tiny_norms_do_not_blind_the_policy():
    # A zero first call, then a zero and a 1000x-too-small norm mid-way: the statistics must not
    # take them in, so a later 10x burst is still an outlier and is cut.
    amplitudes = [0.0] + [1.0, 1.1, 0.9, 1.05] * 5 + [0.0, 1e-3] + [1.0, 0.95, 1.1] * 3 + [10.0, 10.0]
    p = torch.zeros(NUMEL, dtype=torch.float64)
    opt = GuardedAdamW([p], stats_freq=1, policy="zscore", backend="reference")
    got = run(opt, [p], constant_grads(amplitudes, NUMEL), record=("scale", "regime", "log_norm_sd"))
    assert [r for _, r, _ in got[:-2]] == ["calm"] * (len(amplitudes) - 2)
    assert all(sd < 0.5 for _, _, sd in got)
    assert [r for _, r, _ in got[-2:]] == ["stress", "spike"] and got[-1][0] <= 0.25


def test_zscore_scale_stays_bounded_and_moves_boundedly_per_call():
    pol = ZScorePolicy(window=0)
    lowest = 1.0
    for seed in range(5):
        rng, norms, burst = random.Random(seed), [], 0
        for _ in range(200):  # quiet noise, and bursts of 1-4 calls up to e^6 times larger
            if burst == 0 and rng.random() < 0.15:
                burst, height = rng.randint(1, 4), rng.uniform(1, 6)
            norms.append(math.exp(rng.gauss(0, 0.1) + (height if burst else 0)))
            burst = max(0, burst - 1)
        p = torch.zeros(NUMEL, dtype=torch.float64)
        opt = GuardedAdamW([p], stats_freq=1, policy=pol, backend="reference", min_scale=0.2)
        scales = [1.0] + run(opt, [p], constant_grads([n / 2 for n in norms], NUMEL), record=("scale",))
        assert all(0.2 <= s <= 1.0 for s in scales)
        for before, after in zip(scales, scales[1:]):
            assert after >= before * pol.max_cut * (1 - 1e-12)
            assert after <= before * (1 + pol.growth) * (1 + 1e-12)
        lowest = min(lowest, *scales)
    assert lowest == 0.2  # the streams are wild enough to reach the floor


def test_lbw_is_the_default_and_the_same_bit_for_bit():
    stream = random_stream(30, [(5, 3), (7,)], seed=3, spikes=(5, 6, 20), flips=(9, 10), nan_at=(14,))
    results = []
    for policy in (None, "lbw", LBWPolicy()):
        params = [torch.zeros(5, 3, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)]
        kw = {} if policy is None else {"policy": policy}
        opt = GuardedAdamW(params, lr=1e-2, stats_freq=1, backend="reference", **kw)
        trace = run(opt, params, stream, record=("scale", "regime", "ratio", "policy"))
        results.append((trace, [p.clone() for p in params], opt._guard.clone()))
    for trace, params, guard in results[1:]:
        assert trace == results[0][0]
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][1]))
        assert torch.equal(guard, results[0][2])
    assert results[0][0][0][3] == "lbw"


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_nonfinite_call_under_zscore_is_rule_1_and_leaves_the_statistics(gate, backend):
    p = torch.zeros(NUMEL, dtype=torch.float64)
    opt = GuardedAdamW([p], stats_freq=1, policy="zscore", gate=gate, backend=backend)
    run(opt, [p], constant_grads([1.0, 1.1, 0.9, 1.0], NUMEL))
    before = opt.telemetry()
    p.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float64)
    opt.step()
    after = opt.telemetry()
    assert after["regime"] == "nonfinite"
    assert after["skipped_steps"] == before["skipped_steps"] + 1
    assert after["scale"] == pytest.approx(0.7 * before["scale"], rel=1e-15)
    for key in ("z", "log_norm_mean", "log_norm_sd", "last_hot_call", "grad_norm"):
        assert after[key] == before[key]


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_zscore_step_never_reads_device_values(gate, backend):
    params = [torch.zeros(6, 5), torch.zeros(11)]
    opt = GuardedAdamW(params, stats_freq=1, policy="zscore", gate=gate, backend=backend)
    stream = random_stream(8, [(6, 5), (11,)], seed=2, dtype=torch.float32, spikes=(4, 5), nan_at=(7,))
    regimes = []
    for grads in stream:
        for p, g in zip(params, grads):
            p.grad = g
        with host_reads_forbidden():
            opt.step()
        regimes.append(opt.telemetry()["regime"])
    # the device-side decisions still happened: the spikes at calls 4-5 cut, call 7 skipped
    # (single_pass decides on the same calls; its cut applies from the next one)
    assert regimes[3:5] == ["stress", "spike"] and regimes[6] == "nonfinite", regimes


def test_zscore_checkpoint_round_trip_and_cross_policy_refusal():
    stream = random_stream(16, [(4, 3)], seed=4, spikes=(6, 7))
    params = [torch.zeros(4, 3, dtype=torch.float64)]
    opt = GuardedAdamW(params, stats_freq=1, policy="zscore", backend="reference")
    run(opt, params, stream[:8])
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.clone() for p in params]
    assert saved["guard"]["policy"] == "zscore"
    assert opt.telemetry()["scale"] < 1  # the spikes at calls 6-7 cut: the loaded state matters
    straight = run(opt, params, stream[8:], record=("scale", "z", "log_norm_mean"))

    resumed = [saved_params[0].clone()]
    opt2 = GuardedAdamW(resumed, stats_freq=1, policy="zscore", backend="reference")
    opt2.load_state_dict(saved)  # a fresh optimizer: everything it continues with is loaded
    assert run(opt2, resumed, stream[8:], record=("scale", "z", "log_norm_mean")) == straight

    lbw = GuardedAdamW([torch.zeros(4, 3, dtype=torch.float64)], stats_freq=1, backend="reference")
    guard_before = lbw._guard.clone()
    with pytest.raises(ValueError, match="policy 'zscore'"):
        lbw.load_state_dict(saved)
    torch.testing.assert_close(lbw._guard, guard_before, rtol=0, atol=0, equal_nan=True)
    assert not lbw.state
    with pytest.raises(ValueError, match="policy 'lbw'"):
        opt2.load_state_dict(lbw.state_dict())


@pytest.mark.parametrize(
    "policy, error, name",
    [
        ("zclip", ValueError, "policy"),
        (3, TypeError, "policy"),
        (lambda: ZScorePolicy(ema_decay=1.0), ValueError, "ema_decay"),
        (lambda: ZScorePolicy(z_threshold=0), ValueError, "z_threshold"),
        (lambda: ZScorePolicy(sd_floor=float("inf")), ValueError, "sd_floor"),
        (lambda: ZScorePolicy(cut_per_z=-1), ValueError, "cut_per_z"),
        (lambda: ZScorePolicy(max_cut=0), ValueError, "max_cut"),
        (lambda: ZScorePolicy(growth=-0.1), ValueError, "growth"),
        (lambda: ZScorePolicy(window=-1), ValueError, "window"),
        (lambda: ZScorePolicy(window=1.5), TypeError, "window"),
        (lambda: ZScorePolicy(stay_alert=1), TypeError, "stay_alert"),
        (lambda: ZScorePolicy(ema_decay="0.9"), TypeError, "ema_decay"),
        (lambda: ZScorePolicy(z_threshold=float("nan")), ValueError, "z_threshold"),
    ],
)
def test_bad_policy_names_the_parameter(policy, error, name):
    with pytest.raises(error, match=name):
        GuardedAdamW([torch.zeros(3)], policy=policy() if callable(policy) else policy)


def test_resolve_policy_defaults():
    assert resolve_policy("zscore") == ZScorePolicy()
    assert resolve_policy("lbw") == LBWPolicy()
    custom = ZScorePolicy(window=3)
    assert resolve_policy(custom) is custom
