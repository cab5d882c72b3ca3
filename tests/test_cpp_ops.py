"""torch.library.opcheck on the lbw ops (schemas, fake impls, aliasing, dispatch), on CPU and,
with a GPU, on CUDA. Skips with the reason when the C++ extension is not built."""

import array

import pytest
import torch

from lbw_kernels.backends import availability

from gpu_checks import extension_devices

_reason = availability()["cpp"]
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"C++ extension not built: {_reason}")


def _update_args(device, dtype=torch.float32, skip=None):
    gen = torch.Generator().manual_seed(0)
    sizes = (5, 0, 4099)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    params = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
    exp_avgs = [torch.randn(n, generator=gen).to(device, sdt) * 0.1 for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=gen).to(device, sdt) * 0.01 for n in sizes]
    steps = [torch.tensor(3.0, device=device) for _ in sizes]
    lr_scale = torch.tensor(0.7, dtype=torch.float64, device=device)
    return params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, 1e-2, 0.9, 0.999, 1e-8, 0.1, False




@pytest.mark.parametrize("device", extension_devices())
def test_opcheck_telemetry(device):
    grads = [torch.randn(n, device=device) for n in (3, 4097)] + [torch.randn(7, device=device).bfloat16()]
    torch.library.opcheck(torch.ops.lbw.telemetry.default, (grads,))


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("skip", [None, 0.0, 1.0])
@pytest.mark.parametrize("factor", [None, 0.3])
def test_opcheck_adamw_(device, skip, factor):
    args = _update_args(device)
    skip_t = None if skip is None else torch.tensor(skip, dtype=torch.float64, device=device)
    factor_t = None if factor is None else torch.tensor(factor, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.lbw.adamw_.default, (*args, skip_t, factor_t))


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_grad_factor_is_the_reference_s(device, dtype, maximize):
    """grad_factor (max_grad_norm's clipping): each gradient read times the factor rounded to
    the math dtype, as reference.adamw_ reads it; the grads themselves are not written. Within
    a few ulps (the kernels and torch's foreach ops round a few elements differently even
    without the factor; bf16: one bf16 rounding of the param)."""
    from lbw_kernels import reference as ref

    args = list(_update_args(device, dtype))
    args[11] = maximize
    ours, theirs = _clone_args(args), _clone_args(args)
    grads_before = [g.clone() for g in args[1]]
    factor = torch.tensor(0.3, dtype=torch.float64, device=device)
    torch.ops.lbw.adamw_(*ours, None, factor)
    params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr, beta1, beta2, eps, wd, _ = theirs
    ref.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr_scale * lr, beta1=beta1, beta2=beta2, eps=eps,
               weight_decay=wd, maximize=maximize, grad_factor=factor)
    tol = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=2**-7, atol=2**-12),
           torch.float64: dict(rtol=1e-13, atol=1e-15)}[dtype]
    for a, b in zip(ours[0] + ours[2] + ours[3], params + exp_avgs + exp_avg_sqs):
        torch.testing.assert_close(a, b, **tol)
    assert all(torch.equal(g, h) for g, h in zip(ours[1], grads_before))
    # the factor reached the update: without it the params differ
    unclipped = _clone_args(args)
    torch.ops.lbw.adamw_(*unclipped, None)
    assert not torch.equal(unclipped[2][2], ours[2][2])


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask", [True, False])
def test_opcheck_adamw_telemetry_(device, dtype, mask):
    args = _update_args(device, dtype)
    torch.library.opcheck(torch.ops.lbw.adamw_telemetry_.default, (*args, mask))


def test_fake_shapes_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grads = [torch.empty(3), torch.empty(0), torch.empty(8)]
        assert torch.ops.lbw.telemetry(grads).shape == (2, 3)
        args = _update_args("cpu")
        assert torch.ops.lbw.adamw_telemetry_(*args, True).shape == (2, 3)


def test_layout_keys_read_each_tensor():
    from lbw_kernels import _C

    base = torch.zeros(10)
    tensors = [torch.randn(4, 3), torch.zeros(0), torch.ones(5, dtype=torch.bfloat16), base[2:], torch.tensor(1.0)]
    key = _C._layout_key(tensors)
    assert isinstance(key, bytes)  # int64s packed: hashed and compared at memory speed
    values = array.array("q", key).tolist()
    assert values[0::3] == [t.data_ptr() for t in tensors]
    assert values[1::3] == [12, 0, 5, 8, 1]
    codes = values[2::3]
    assert codes[0] == codes[3] == codes[4] != codes[2]  # float32 x3, bfloat16
    assert _C._layout_key(()) == b""
    with pytest.raises(TypeError, match="_layout_key: item 1 is not a tensor"):
        _C._layout_key([base, 3.0])


def test_layout_keys_carry_the_strides_of_tensors_that_are_not_contiguous():
    """A buffer viewed with other strides (same address, numel and dtype) gets another key,
    from _layout_key and from _gather_grads' layouts: a Triton plan walks p, g, m, v in one
    element order. Contiguous tensors add nothing to the key."""
    from lbw_kernels import _C

    buf = torch.randn(24)
    flat, turned = buf.view(4, 6), buf.view(6, 4).t()
    plain = array.array("q", _C._layout_key([flat])).tolist()
    assert len(plain) == 3 and plain[2] < (1 << 16)
    assert _C._layout_key([turned]) != _C._layout_key([flat])
    assert array.array("q", _C._layout_key([flat, turned])).tolist()[6:] == [1, 2, 1, 4]  # index, ndim, strides
    p = torch.nn.Parameter(torch.zeros(4, 6))
    p.grad = flat
    before = _C._gather_grads([[p]])[3]
    p.grad = turned
    after = _C._gather_grads([[p]])[3]
    assert len(before[0]) == 6 * 8 and after[0] != before[0]
    assert array.array("q", after[0]).tolist()[6:] == [1, 2, 1, 4]  # the grad (2 * 0 + 1)


def test_triton_plan_keys_use_the_extension():
    pytest.importorskip("triton")
    from lbw_kernels import _C
    from lbw_kernels.triton_kernels import chunk_table

    assert chunk_table.layout_key is _C._layout_key
    a, b = torch.zeros(3), torch.zeros(3)
    assert chunk_table.telemetry_key([a], 64, a.device) != chunk_table.telemetry_key([b], 64, b.device)  # another address


# ---------------------------------------------------------------------------------------
# The eager entry points in _C (the backend's path outside torch.compile)
# ---------------------------------------------------------------------------------------
def _clone_args(args):
    return [[t.clone() for t in a] if isinstance(a, list) else a for a in args]


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_entries_compute_what_the_ops_compute(device, dtype):
    """_C._adamw_ / _adamw_telemetry_ / _telemetry skip torch.ops' argument parsing only: the
    same kernels, so bitwise the same outputs and the same in-place updates."""
    from lbw_kernels import _C

    skip = torch.tensor(0.0, dtype=torch.float64, device=device)
    factor = torch.tensor(0.3, dtype=torch.float64, device=device)
    for op, entry, last in (
        (torch.ops.lbw.adamw_, _C._adamw_, (skip,)),
        (torch.ops.lbw.adamw_, _C._adamw_, (None,)),
        (torch.ops.lbw.adamw_, _C._adamw_, (skip, factor)),
        (torch.ops.lbw.adamw_telemetry_, _C._adamw_telemetry_, (True,)),
    ):
        a, b = _update_args(device, dtype), _update_args(device, dtype)
        out_op, out_entry = op(*a, *last), entry(*b, *last)
        if out_op is None:
            assert out_entry is True  # (_adamw_: True when the kernels took the call)
        else:
            assert torch.equal(out_op, out_entry)
        for xs, ys in zip(a[:5], b[:5]):
            assert all(torch.equal(x, y) for x, y in zip(xs, ys))
    grads = _update_args(device, dtype)[1]
    assert torch.equal(torch.ops.lbw.telemetry(grads), _C._telemetry(grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("maximize", [False, True])
def test_cpu_single_pass_telemetry_has_the_telemetry_pass_bits(dtype, maximize):
    """On CPU both passes sum a chunk's gradients in the same lanes and order
    (csrc/cpu/kernels_impl.h: reduce_chunk, update_chunk), so single_pass measures the exact
    gate's bits: sizes of several chunks (16384 elements) with tails, the sums taken before
    maximize's sign flip, with and without the non-finite mask."""
    from lbw_kernels import _C

    gen = torch.Generator().manual_seed(3)
    sizes = (1, 15, 17, 3 * 16384 + 37, 16384)
    grads = [(torch.randn(n, generator=gen) + 0.1).to(dtype) for n in sizes]
    want = _C._telemetry(grads)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    for mask in (False, True):
        params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        states = [[torch.zeros(n, dtype=sdt) for n in sizes] for _ in range(2)]
        steps = [torch.tensor(0.0) for _ in sizes]
        lr_scale = torch.tensor(1.0, dtype=torch.float64)
        got = _C._adamw_telemetry_(params, grads, *states, steps, lr_scale, 1e-3, 0.9, 0.999, 1e-8, 0.0, maximize, mask)
        assert got is not None and got.dtype == want.dtype
        assert torch.equal(got, want), (mask, (got - want).abs().max())


def test_eager_entries_raise_what_the_ops_raise_and_change_nothing():
    from lbw_kernels import _C

    args = _update_args("cpu")
    before = _clone_args(args)
    short = list(args)
    short[3] = short[3][:2]  # exp_avg_sqs one short
    for call in (torch.ops.lbw.adamw_, _C._adamw_):
        with pytest.raises(RuntimeError, match="must have the same length, got 3, 3, 3, 2, 3"):
            call(*short, None)
    for xs, ys in zip(args[:5], before[:5]):
        assert all(torch.equal(x, y) for x, y in zip(xs, ys))
    with pytest.raises(TypeError, match=r"grads\[1\] is not a tensor"):
        _C._adamw_(args[0], [args[1][0], 2.0, args[1][2]], *args[2:], None)
    with pytest.raises(TypeError, match="lr_scale is not a tensor"):
        _C._adamw_telemetry_(*args[:5], 0.7, *args[6:], True)
    with pytest.raises(TypeError, match="exp_avgs must be a sequence of tensors"):
        _C._adamw_(*args[:2], 3.0, *args[3:], None)
    # A tuple works as a list does (the entries hold each item, not a copy of the sequence).
    assert _C._adamw_(*(tuple(a) for a in args[:5]), *args[5:], None) is True


@pytest.mark.parametrize("device", extension_devices())
@pytest.mark.parametrize("which", ["lr_scale", "skip", "grad_factor"])
@pytest.mark.parametrize("bad", ["float32", "other device", "two elements"])
def test_update_scalars_are_checked_alike_on_every_device(device, which, bad):
    """lr_scale, skip and grad_factor: one float64 element on the params' device (the schemas'
    words), refused alike by the CPU and CUDA ops, on a call that skips too (skip=1 beside a bad
    lr_scale or factor), and before anything changes."""
    from lbw_kernels import _C

    if bad == "other device" and device == "cpu":
        pytest.skip("the other device is a GPU's (a meta tensor would send the op to its fake impl)")
    args = list(_update_args(device))
    one = dict(lr_scale=args[5], skip=torch.tensor(1.0, dtype=torch.float64, device=device),
               grad_factor=torch.tensor(0.5, dtype=torch.float64, device=device))
    one[which] = {"float32": one[which].float(), "other device": one[which].cpu(),
                  "two elements": one[which].expand(2).clone()}[bad]
    args[5] = one["lr_scale"]
    before = _clone_args(args)
    for call in (torch.ops.lbw.adamw_, _C._adamw_):
        with pytest.raises(RuntimeError, match=f"lbw: {which} must be a 0-dim float64 tensor on {device}"):
            call(*args, one["skip"], one["grad_factor"])
        if which != "skip":  # and on a call that would update
            with pytest.raises(RuntimeError, match=f"lbw: {which} must be a 0-dim float64 tensor on {device}"):
                call(*args, None, one["grad_factor"])
    if which != "skip":  # (the single_pass op takes no skip, nor a factor)
        if which == "lr_scale":
            with pytest.raises(RuntimeError, match=f"lbw: lr_scale must be a 0-dim float64 tensor on {device}"):
                torch.ops.lbw.adamw_telemetry_(*args, True)
    for xs, ys in zip(args[:5], before[:5]):
        assert all(torch.equal(x, y) for x, y in zip(xs, ys))


def test_gather_grads_reads_each_grad_once_with_the_flags():
    from lbw_kernels import _C

    class Tagged(torch.Tensor):  # a subclass: its .grad is read through getattr
        pass

    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    d = torch.zeros(2).as_subclass(Tagged).requires_grad_()
    a.grad, c.grad, d.grad = torch.ones(3), torch.ones(3), torch.ones(2)
    per_group, missing, dense_real, layouts, identities, subclass_grads = _C._gather_grads([[a, b, c], [c, d]])
    # the objects the list holds, with their element counts and dtypes
    f32 = 6  # (c10::ScalarType::Float)
    assert array.array("q", identities[0]).tolist() == [id(a), 3, f32, id(b), 3, f32, id(c), 3, f32]
    assert array.array("q", identities[1]).tolist() == [id(c), 3, f32, id(d), 2, f32]
    assert per_group[0][0] is a.grad and per_group[0][1] is None and per_group[0][2] is c.grad
    assert per_group[1][0] is c.grad and torch.equal(per_group[1][1], d.grad)
    assert missing == (True, False) and dense_real is True and subclass_grads == b""
    # Grads that are subclasses, by index among all params and type (a wrapper's address is not
    # its elements': the plan is rebuilt when these change, step_plan.presence_key); the
    # Python twin says the same in a tuple.
    from lbw_kernels.step_plan import _gather_grads_python

    class Other(torch.Tensor):
        pass

    c.grad = torch.ones(3).as_subclass(Tagged)
    found = array.array("q", _C._gather_grads([[a], [d, c]])[5]).tolist()
    assert found == [2, id(Tagged)]  # (a type's id is its address)
    assert _gather_grads_python([{"params": [a]}, {"params": [d, c]}]).subclass_grads == ((2, Tagged),)
    c.grad = torch.ones(3).as_subclass(Other)
    assert array.array("q", _C._gather_grads([[a], [d, c]])[5]).tolist() == [2, id(Other)]
    assert _C._gather_grads([[a, d]])[5] == b"" and _gather_grads_python([{"params": [a, d]}]).subclass_grads == ()
    c.grad = torch.ones(3)
    b.grad = torch.ones(3).to_sparse()
    assert _C._gather_grads([[a, b]])[2] is False
    assert layouts[1] is None  # a subclass param: its layout is not read here
    b.grad = None
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    z.grad = torch.ones(3, dtype=torch.complex64)
    assert _C._gather_grads([[a, z]])[1:3] == ((False,), False)
    if hasattr(a, "grad_dtype"):  # torch >= 2.10 lets a tensor hold a grad of another dtype
        i = torch.nn.Parameter(torch.zeros(3))
        i.grad_dtype = None
        i.grad = torch.ones(3, dtype=torch.int32)
        assert _C._gather_grads([[a, i]])[2] is False  # not floating-point: the full check names it
    # A subclass that overrides neither .grad nor __torch_function__ (as DTensor) has its grad
    # read in C++: the same object; one that overrides .grad is asked through getattr.
    class Disabled(torch.Tensor):
        __torch_function__ = torch._C._disabled_torch_function_impl

    class OwnGrad(Disabled):
        @property
        def grad(self):
            return "its own"

    e = torch.zeros(2).as_subclass(Disabled).requires_grad_()
    e.grad = torch.ones(2)
    f = torch.zeros(2).as_subclass(OwnGrad)
    gathered = _C._gather_grads([[e, f]])
    assert gathered[0][0][0] is e.grad and gathered[0][0][1] == "its own" and gathered[2] is False
    assert gathered[3][0] is None  # subclass params: no layout
    with pytest.raises(TypeError, match="must be a sequence"):
        _C._gather_grads([3])
    with pytest.raises(AttributeError, match="grad"):
        _C._gather_grads([[a, 1.0]])


def test_gathered_layouts_tell_apart_everything_a_plan_depends_on():
    """_C._gather_grads' per-group layout (GroupTensors.layout_key, the Triton plans' key):
    each param's and grad's address, numel and dtype; no grad, an empty grad, a grad moved,
    a param moved (.data) or cast, all give another layout; refilled in place, the same."""
    import array

    from lbw_kernels import _C

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 5)]
    params[0].grad, params[1].grad = torch.ones(3), torch.ones(5)

    def layout():
        return _C._gather_grads([params])[3][0]

    first = layout()
    rows = array.array("q", first).tolist()
    float32 = 6  # c10::ScalarType::Float
    assert rows[:6] == [params[0].data_ptr(), 3, float32, params[0].grad.data_ptr(), 3, float32]
    params[0].grad.fill_(2.0)
    params[1].data.mul_(3.0)
    assert layout() == first
    seen = {first}
    keep = []

    def changed():
        new = layout()
        assert new not in seen
        seen.add(new)

    keep.append(params[1].grad)
    params[1].grad = None
    changed()
    params[1].grad = torch.zeros(5)  # a grad again, elsewhere (the old one is kept alive)
    changed()
    keep.append(params[0].data)
    params[0].data = params[0].data.clone()
    changed()
    params[0].data = params[0].data.double()
    params[0].grad = None
    changed()
    empty = torch.nn.Parameter(torch.zeros(0))
    params.append(empty)
    changed()
    empty.grad = torch.zeros(0)
    changed()


def test_eager_entries_decline_what_the_kernels_do_not_take_and_change_nothing():
    """A non-contiguous, sparse or non-float tensor, or a list of two dtypes: _adamw_ gives
    False and the others None, nothing changed (the backend then runs the reference); what the
    kernels do take runs (True), mixed grad dtypes included for telemetry."""
    from lbw_kernels import _C

    args = _update_args("cpu")
    params, grads = args[0], args[1]
    declined = {
        "non-contiguous grad": (1, 2, torch.randn(4099 * 2)[::2]),
        "sparse grad": (1, 0, grads[0].to_sparse()),
        "int exp_avg": (2, 0, torch.zeros(5, dtype=torch.int32)),
        "a list of two dtypes": (0, 0, params[0].double()),
    }
    for name, (arg, i, bad) in declined.items():
        case = _clone_args(args)
        case[arg][i] = bad
        before = _clone_args(case)
        assert _C._adamw_(*case, None) is False, name
        assert _C._adamw_telemetry_(*case, True) is None, name
        for xs, ys in zip(case[:5], before[:5]):
            assert all(torch.equal(x.to_dense(), y.to_dense()) for x, y in zip(xs, ys)), name
    assert _C._telemetry([grads[0], grads[2][::2]]) is None
    assert _C._telemetry([grads[0].to_sparse()]) is None
    assert _C._telemetry([grads[0], grads[2].bfloat16()]).shape == (2, 3)  # telemetry takes mixed dtypes
    assert _C._adamw_(*_clone_args(args), None) is True


def test_gather_grads_in_cpp_matches_the_python_fallback():
    from lbw_kernels import step_plan

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 1, 4)]
    params[0].grad, params[2].grad = torch.ones(3), torch.ones(4)
    groups = [{"params": params[:2]}, {"params": params[2:]}, {"params": []}]
    fast, slow = step_plan.gather_grads(groups), step_plan._gather_grads_python(groups)
    assert fast.missing == slow.missing == (True, False, False)
    assert fast.dense_real is slow.dense_real is True
    assert all(a is b for x, y in zip(fast.per_group, slow.per_group) for a, b in zip(x, y))
    assert slow.layouts == (None, None, None) and all(isinstance(b, bytes) for b in fast.layouts)
    codes = {torch.float32: 6}  # (c10::ScalarType)
    assert [array.array("q", b).tolist() for b in fast.identities] == [
        [x for i, n, dt in ids for x in (i, n, codes[dt])] for ids in slow.identities]
    params[2].grad = torch.ones(4).to_sparse()
    assert step_plan.gather_grads(groups).dense_real is step_plan._gather_grads_python(groups).dense_real is False


def test_exact_entry_takes_cuda_tensors_only_and_checks_its_arguments():
    """_C._adamw_exact_ (the CUDA exact gate in one call): on CPU tensors (or
    in a build without CUDA) False, with nothing done and decide never called; a bad call
    raises TypeError naming what is wrong."""
    from lbw_kernels import _C

    args = list(_update_args("cpu"))
    before = [[t.clone() for t in xs] for xs in args[:5]]
    called = []
    assert _C._adamw_exact_(*args, None, called.append) is False
    assert not called
    assert all(torch.equal(a, b) for xs, ys in zip(args[:5], before) for a, b in zip(xs, ys))
    with pytest.raises(TypeError, match="14 positional arguments"):
        _C._adamw_exact_(*args)
    with pytest.raises(TypeError, match="decide must be callable"):
        _C._adamw_exact_(*args, None, 3)
    with pytest.raises(TypeError, match="grads must be a sequence of tensors"):
        _C._adamw_exact_(args[0], 5, *args[2:], None, called.append)
