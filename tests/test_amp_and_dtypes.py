"""Mixed precision: GradScaler's unscale_/step around GuardedAdamW; fp16/bf16 params with fp32
state and fp32 math."""

import pytest
import torch

from lbw_kernels import GuardedAdamW
from lbw_kernels.reference import adamw_
from lbw_kernels.verify import PARAM_TOLERANCES, worst


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


def test_grad_scaler_step_unscales_before_the_guard_reads():
    """Without an explicit unscale_, scaler.step unscales (GuardedAdamW does not claim
    GradScaler's fused path, whose grads would arrive scaled)."""
    p = torch.nn.Parameter(torch.ones(10))
    opt = GuardedAdamW([p], lr=1e-2, stats_freq=1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale((p * torch.arange(10.0)).sum()).backward()
    scaler.step(opt)
    assert opt.telemetry()["grad_ms"] == pytest.approx((torch.arange(10.0) ** 2).mean().item())
    assert not getattr(opt, "_step_supports_amp_scaling", False)


def test_grad_scaler_skips_inf_steps_without_calling_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
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
