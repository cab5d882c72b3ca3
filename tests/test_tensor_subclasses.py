"""Params that are tensor subclasses (subclasses.py): wrappers are updated through their inner tensor.

``CastWrapper`` is built like torchao's float8 training weight (``WeightWithDynamicFloat8CastTensor``,
which FSDP2's float8 all-gather puts on every linear weight): a wrapper subclass with no storage
of its own (``data_ptr() == 0``) around a plain tensor ``_tensor`` whose values are its values,
whose ops unwrap it and return plain tensors. The optimizer over wrappers must do bit for bit
what it does over plain tensors with the same values, on every backend (before, the Triton
backend launched its kernels on address 0). ``Encoded`` keeps its values as half of them times
a scale: no inner tensor holds its elements, so the kernel backends refuse it, naming it.
The same with the wrapper as a DTensor's local shard: tests/test_distributed.py.
"""

import pytest
import torch
from torch.utils._pytree import tree_map_only

from lbw_kernels import GuardedAdamW
from gpu_checks import kernel_gpu_backends, require_backend
from streams import random_stream

SHAPES = [(6, 5), (17,), (0,), (3, 4)]
WRAPPED = (0, 1, 2)  # the (3, 4) param stays plain, beside them


class CastWrapper(torch.Tensor):
    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), dtype=inner.dtype, device=inner.device,
            requires_grad=inner.requires_grad,
        )

    def __init__(self, inner):
        self._tensor = inner

    def __tensor_flatten__(self):
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return CastWrapper(inner_tensors["_tensor"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrapped = tree_map_only(CastWrapper, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*unwrapped[0], **unwrapped[1])
        if func in (torch.ops.aten.detach.default, torch.ops.aten.view.default):  # (DTensor.from_local views)
            return CastWrapper(out)
        return out

    def __repr__(self):
        return f"CastWrapper({self._tensor!r})"


class Encoded(CastWrapper):
    """Its values are ``_tensor * 2``: every op sees a decoded copy."""

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return Encoded(inner_tensors["_tensor"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return Encoded(args[0]._tensor.detach())
        decoded = tree_map_only(Encoded, lambda t: t._tensor * 2, (args, kwargs or {}))
        return func(*decoded[0], **decoded[1])


def make(device, dtype=torch.float32, wrapped=WRAPPED, kind=CastWrapper):
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in SHAPES]
    params = [torch.nn.Parameter(kind(v) if i in wrapped else v) for i, v in enumerate(values)]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    return params, plain


def values(t):
    return t._tensor if isinstance(t, CastWrapper) else t


def feed(params, grads, wrap_grads=False):
    for p, g in zip(params, grads):
        g = g.to(device=p.device, dtype=p.dtype).clone()
        p.grad = CastWrapper(g) if wrap_grads and isinstance(p, CastWrapper) else g


def run_pair(backend, device, gate, dtype=torch.float32, wrap_grads=False, replace_inner_at=None, **options):
    """Steps over wrappers and over plain tensors with the same values; returns both.
    ``wrap_grads``: the wrapped params' grads are wrappers too (from that call on, if a number)."""
    params, plain = make(device, dtype)
    kw = dict(lr=1e-2, weight_decay=0.1, stats_freq=1, gate=gate, backend=backend, **options)
    opt, ref_opt = GuardedAdamW(params, **kw), GuardedAdamW(plain, **kw)
    stream = random_stream(8, SHAPES, seed=3, spikes=(4,), flips=(6,), nan_at=(7,))
    for k, grads in enumerate(stream, 1):
        if k == replace_inner_at:  # what module.to() does to a wrapper: a new inner tensor
            for i in WRAPPED:
                params[i]._tensor = params[i]._tensor.clone()
        feed(params, grads, wrap_grads is True or (wrap_grads is not False and k >= wrap_grads))
        feed(plain, grads)
        opt.step()
        ref_opt.step()
        assert opt.telemetry() == ref_opt.telemetry(), k
    return opt, ref_opt, params, plain


def assert_bitwise_equal(opt, ref_opt, params, plain):
    for p, q in zip(params, plain):
        assert torch.equal(values(p.detach()), q.detach())
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_wrapped_params_step_as_plain_ones(backend, gate):
    """Bitwise: params, states and telemetry (a spike, a flip, a NaN call), both gates."""
    assert CastWrapper(torch.ones(3)).data_ptr() == 0  # what the kernels must not be given
    assert_bitwise_equal(*run_pair(backend, "cpu", gate))


def test_wrapped_bf16_params_with_clipping(backend):
    assert_bitwise_equal(*run_pair(backend, "cpu", "exact", dtype=torch.bfloat16, max_grad_norm=1.0))


def test_wrapped_grads_are_read_through_their_inner_tensor(backend):
    opt, ref_opt, params, plain = run_pair(backend, "cpu", "exact", wrap_grads=True)
    assert_bitwise_equal(opt, ref_opt, params, plain)
    # what the backends are handed: plain tensors only (the reference and the C++ ops would
    # also take a wrapper through its own dispatch; the Triton kernels would read address 0)
    groups = opt._plan.group_tensors(opt.param_groups, [[p.grad for p in g["params"]] for g in opt.param_groups])
    handed = [t for g in groups for t in (*g.params, *g.grads, *g.exp_avgs, *g.exp_avg_sqs)]
    assert all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in handed), [type(t) for t in handed]


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("gathered_by", ["extension", "python"])
def test_grads_that_turn_into_wrappers_are_resolved(backend, gate, gathered_by, monkeypatch):
    """Plain grads for three calls, then wrappers (a float8 recipe switched on mid-run): the
    plan is rebuilt when a grad turns into a subclass, so its inner tensor is what the backend
    reads (before, Triton's kernels were given address 0: a segfault on CPU, an illegal
    address on a GPU); bitwise the plain run, with the grads gathered by the extension or by
    Python."""
    from lbw_kernels import optimizer, step_plan

    if gathered_by == "python":
        monkeypatch.setattr(optimizer, "gather_grads", step_plan._gather_grads_python)
    assert_bitwise_equal(*run_pair(backend, "cpu", gate, wrap_grads=4))


class Tagged(torch.Tensor):
    """A subclass with storage of its own (``as_subclass``): not a wrapper, read at its address."""


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_wrapper_grad_beside_a_grad_that_was_a_subclass_already_is_resolved(backend, gate):
    """One grad is a ``Tagged`` subclass from the first call; from call 4 another turns into a
    wrapper. The plan's key names which grads are subclasses and of which type, so the wrapper
    rebuilds the plan even though some grad was a subclass before (a key of "all grads plain"
    would not change: the Triton kernels were then given the wrapper's address 0)."""
    out = []
    for wrapped in (True, False):
        gen = torch.Generator().manual_seed(7)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 5), (17,), (4,))]
        opt = GuardedAdamW(params, lr=1e-2, stats_freq=1, gate=gate, backend=backend)
        for k in range(1, 7):
            grads = [torch.randn(q.shape, generator=gen) for q in params]
            params[0].grad = CastWrapper(grads[0]) if wrapped and k >= 4 else grads[0]
            params[1].grad = grads[1]
            params[2].grad = grads[2].as_subclass(Tagged) if wrapped else grads[2]
            opt.step()
        out.append([t.clone() for q in params for t in (q.detach(), opt.state[q]["exp_avg"], opt.state[q]["exp_avg_sq"])])
    for a, b in zip(*out):
        assert torch.equal(a.as_subclass(torch.Tensor), b)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_wrapper_grad_whose_inner_tensor_moves_each_call_is_read_where_it_is(backend, gate):
    """A wrapper grad around a new tensor each call (the old ones kept alive, so the new ones
    land elsewhere), beside a plain grad reused in place: the same wrapper type every call, so
    the plan's subclass key does not change. The plans must still follow the inner tensor
    (before, the gathered layout held the wrapper's address, 0, every call: Triton kept its
    first plan and read the first call's gradient again); bitwise the plain run."""
    out = []
    for wrapped in (True, False):
        gen = torch.Generator().manual_seed(7)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 5), (17,))]
        opt = GuardedAdamW(params, lr=1e-2, stats_freq=1, gate=gate, backend=backend)
        reused, kept = torch.zeros(17), []
        for _ in range(6):
            grads = [torch.randn(q.shape, generator=gen) for q in params]
            kept.append(grads)
            params[0].grad = CastWrapper(grads[0]) if wrapped else grads[0]
            reused.copy_(grads[1])
            params[1].grad = reused
            opt.step()
        out.append([t.clone() for q in params for t in (q.detach(), opt.state[q]["exp_avg"], opt.state[q]["exp_avg_sq"])])
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_a_replaced_inner_tensor_is_the_one_updated(backend):
    """After ``w._tensor = new`` (as ``module.to()`` leaves a wrapper) the plan takes the new
    inner tensor: the old one is no longer the param's, and updating it would leave the param."""
    assert_bitwise_equal(*run_pair(backend, "cpu", "exact", replace_inner_at=3))


def test_kernel_backends_refuse_what_no_inner_tensor_holds(backend):
    params, _ = make("cpu", wrapped=(1,), kind=Encoded)
    opt = GuardedAdamW(params, lr=1e-2, backend=backend)
    feed(params, [torch.ones(s) for s in SHAPES])
    if backend == "reference":  # runs it through the subclass's own ops
        opt.step()
        assert len(opt.state) == len(params)
        return
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] is a Encoded, a tensor subclass"):
        opt.step()
    assert not opt.state  # refused before any state was created


@pytest.mark.gpu
@pytest.mark.parametrize("name", kernel_gpu_backends())
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_wrapped_params_step_as_plain_ones_on_gpu(name, gate):
    require_backend(name)
    assert_bitwise_equal(*run_pair(name, "cuda", gate))


@pytest.mark.gpu
@pytest.mark.parametrize("name", kernel_gpu_backends())
def test_grads_that_turn_into_wrappers_are_resolved_on_gpu(name):
    require_backend(name)
    assert_bitwise_equal(*run_pair(name, "cuda", "exact", wrap_grads=4))


def test_torchao_float8_training_weights(backend):
    """The real thing where torchao is installed (not in CI): float8 training's weight wrappers
    stepped like torch.optim.AdamW on plain weights (the guard off; fp32 within 1e-6)."""
    float8 = pytest.importorskip("torchao.float8")
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 16))
    model = float8.convert_to_float8_training(
        __import__("copy").deepcopy(base), config=float8.Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    )
    assert type(model[0].weight) is not torch.nn.Parameter and model[0].weight.data_ptr() == 0
    opt = GuardedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend, auto_enabled=False)
    torch_opt = torch.optim.AdamW(base.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(model.parameters(), base.parameters()):
            q.grad = torch.randn(q.shape, generator=gen)
            p.grad = q.grad.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(model.parameters(), base.parameters()):
        torch.testing.assert_close(p.detach().float(), q.detach(), rtol=1e-6, atol=1e-6)
