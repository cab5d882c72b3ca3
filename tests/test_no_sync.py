"""step() never waits for the device: every host-reading Tensor method raises while it runs."""

import contextlib
import sys

import pytest
import torch

from lbw_kernels import GuardedAdamW, validation
from streams import random_stream

SYNCING = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]


@contextlib.contextmanager
def host_reads_forbidden(allowed=()):
    """Every host read of a tensor raises, but the hyper-parameter check's read of a tensor in
    ``allowed``: a user's CPU hyper-parameter tensor, host memory even beside GPU params, which
    step() reads to check its value (validation._number). A backend reading it raises: for a
    GPU tensor that would be a sync."""
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def forbid(name):
        def raiser(*args, **kwargs):
            if (args and any(args[0] is t for t in allowed)
                    and sys._getframe(1).f_code is validation._number.__code__):
                return saved[name](*args, **kwargs)
            raise AssertionError(f"Tensor.{name} called inside step(): a host sync")

        return raiser

    for name in SYNCING:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_the_patch_catches_a_sync():
    with host_reads_forbidden(), pytest.raises(AssertionError, match="host sync"):
        bool(torch.ones(()) > 0)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_never_reads_device_values(gate, dtype, backend):
    shapes = [(5, 4), (0,), (9,)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    lr = torch.tensor(0.01)
    opt = GuardedAdamW([{"params": params[:2]}, {"params": params[2:], "lr": lr}],
                       stats_freq=2, gate=gate, backend=backend)
    for grads in random_stream(6, shapes, dtype=dtype, spikes=(3,), nan_at=(4,)):
        for q, g in zip(params, grads):
            q.grad = g
        with host_reads_forbidden(allowed=[lr]):
            opt.step()
    assert opt.telemetry()["skipped_steps"] == 1


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_dcp_state_init_call_and_a_warm_up_from_lr_0_read_nothing(gate, backend):
    """torch.distributed.checkpoint's state-creating step() (told by its caller, not by the
    gradients) and a first call at lr 0 (a warm-up from 0, the same numbers seen from inside)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    params = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(9))]
    opt = GuardedAdamW(params, lr=1e-2, stats_freq=1, gate=gate, backend=backend)
    with host_reads_forbidden():
        _init_optim_state(opt)  # what get_/set_optimizer_state_dict run on an optimizer without state
    assert opt.telemetry()["step"] == 0 and all(opt.state[p]["step"].item() == 1 for p in params)
    warm = GuardedAdamW([p.detach().clone() for p in params], lr=0.0, stats_freq=1, gate=gate, backend=backend)
    for p in warm.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with host_reads_forbidden():
        warm.step()
    assert warm.telemetry()["step"] == 1
