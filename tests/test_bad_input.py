"""Bad input gets a ValueError/TypeError naming the parameter, and nothing is half-applied."""

import pytest
import torch

from lbw_kernels import GuardedAdamW


def p(*shape, **kw):
    return torch.zeros(shape or (3,), **kw)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(betas=(0.9,)), ValueError, "betas"),
        (dict(ema_decay=0.0), ValueError, "ema_decay"),
        (dict(ema_decay=1.0), ValueError, "ema_decay"),
        (dict(min_scale=0.0), ValueError, "min_scale"),
        (dict(min_scale=1.5), ValueError, "min_scale"),
        (dict(stats_freq=0), ValueError, "stats_freq"),
        (dict(stats_freq=2.5), TypeError, "stats_freq"),
        (dict(stress_threshold=0.0), ValueError, "stress_threshold"),
        (dict(spike_threshold=-1.0), ValueError, "spike_threshold"),
        (dict(recovery_fast=-0.01), ValueError, "recovery_fast"),
        (dict(gate="fast"), ValueError, "gate"),
        (dict(backend="nonsense"), ValueError, "backend"),
        (dict(lr="big"), TypeError, "lr"),
        (dict(maximize=1), TypeError, "maximize"),
        (dict(auto_enabled="yes"), TypeError, "auto_enabled"),
        (dict(amsgrad=True), ValueError, "amsgrad"),
        (dict(differentiable=True), ValueError, "differentiable"),
        (dict(fused="yes"), TypeError, "fused"),
        (dict(foreach=1), TypeError, "foreach"),
        (dict(capturable=None), TypeError, "capturable"),
    ],
)
def test_bad_hyperparameters(kwargs, error, name):
    with pytest.raises(error, match=name):
        GuardedAdamW([p()], **kwargs)


def test_bad_group_hyperparameter_adds_no_group():
    opt = GuardedAdamW([p()])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [p()], "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="betas"):
        GuardedAdamW([{"params": [p()]}, {"params": [p()], "betas": (0.9, 1.0)}])
    with pytest.raises(ValueError, match="amsgrad"):
        opt.add_param_group({"params": [p()], "amsgrad": True})
    assert len(opt.param_groups) == 1


def test_bad_params():
    with pytest.raises(TypeError, match="complex"):
        GuardedAdamW([p(dtype=torch.complex64)])
    with pytest.raises(TypeError, match="dtype"):
        GuardedAdamW([p(dtype=torch.int64)])
    with pytest.raises(ValueError, match="mixed devices"):
        GuardedAdamW([p(), p(device="meta")])
    opt = GuardedAdamW([p()])
    with pytest.raises(ValueError, match="mixed devices"):
        opt.add_param_group({"params": [p(device="meta")]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("bad", ["sparse", "complex"])
def test_bad_gradient_leaves_everything_as_it_was(bad):
    good, other = p(4), p(4)
    opt = GuardedAdamW([good, other], lr=0.1)
    good.grad = torch.ones(4)
    if bad == "sparse":
        other.grad = torch.ones(4).to_sparse()
        match = "sparse"
    else:
        if not hasattr(other, "grad_dtype"):
            pytest.skip("this torch refuses a complex .grad on a real tensor by itself")
        other.grad_dtype = None  # torch >= 2.10 lets a tensor hold a grad of another dtype
        other.grad = torch.ones(4, dtype=torch.complex64)
        match = "complex"
    with pytest.raises((TypeError, ValueError), match=match):
        opt.step()
    assert torch.equal(good, torch.zeros(4))
    assert not opt.state  # no state was created
    assert opt.telemetry()["step"] == 0
