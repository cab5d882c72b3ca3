"""The C++ backend (``backend="cpp"``) and, on a GPU, the CUDA one, against the reference.

Kernel-level checks go through ``lbw_kernels.verify`` (the same checks ``lbw-kernels verify``
runs): fresh random non-zero problems, odd sizes (1, 3, 4097, a 0-element tensor), 300
tensors, both gates, every dtype, planted NaN/Inf, outputs poisoned with NaN before the
kernels write them. Optimizer-level checks feed GuardedAdamW a scripted gradient stream.
Everything skips, with the reason, when the extension is not built.
"""


import pytest
import torch

from lbw_kernels import GuardedAdamW
from lbw_kernels.backends import GroupTensors, ReferenceBackend, availability, get_backend
from lbw_kernels.verify import ODD_SIZES, check_backend, clone_problem, make_problem, verify_backend, worst
from gpu_checks import (
    assert_graph_replay_matches_eager, assert_relayout_step_never_syncs, assert_side_stream_step_survives_eviction,
    assert_step_never_syncs, step_other_layouts,
)
from streams import random_stream, run

_reason = availability()["cpp"]
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"C++ extension not built: {_reason}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
MANY = tuple((int(n),) for n in torch.randint(1, 3000, (300,), generator=torch.Generator().manual_seed(5)))


@pytest.fixture
def cpp():
    return get_backend("cpp")


@pytest.fixture
def poisoned():
    from lbw_kernels.cpp_backend import poisoned_outputs

    with poisoned_outputs():
        yield


def _assert_no_mismatch(failures):
    assert not failures, "\n".join(str(f) for f in failures[:10])


# --------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(cpp, poisoned, dtype, seed):
    _assert_no_mismatch(check_backend(cpp, seed=seed, dtype=dtype))


@pytest.mark.parametrize(
    "shapes",
    [((1,),), ((3,),), ((4097,),), ((0,), (5,)), ((16384,), (16385,), (40000,)), MANY],
    ids=["1", "3", "4097", "empty+5", "chunk-edges", "300-tensors"],
)
def test_sizes(cpp, poisoned, shapes):
    _assert_no_mismatch(check_backend(cpp, seed=3, shapes=shapes))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_planted(cpp, poisoned, bad, dtype):
    _assert_no_mismatch(check_backend(cpp, seed=4, dtype=dtype, nonfinite_at=(1, 2, bad)))
    grads = [g for g in make_problem(4, dtype=dtype, nonfinite_at=(1, 2, bad))[1].grads if g.numel()]
    assert len(grads) == 2  # group 1 holds (3,), (0,), (2, 3, 5); the last one got the value
    assert cpp.telemetry(grads, torch.float64)[:, 2].tolist() == [0.0, 1.0]


def test_verify_suite(cpp):
    _assert_no_mismatch(verify_backend(cpp, seeds=1))


def test_contiguous_problems_never_touch_the_reference(cpp, monkeypatch):
    """The kernels do the work: the reference fallback is not what makes the checks pass."""
    import lbw_kernels.cpp_backend as module

    def refuse(*args, **kwargs):
        raise AssertionError("the cpp backend fell back to the reference")

    monkeypatch.setattr(module.reference, "adamw_", refuse)
    monkeypatch.setattr(module.reference, "telemetry_partials", refuse)
    problem = make_problem(0, dtype=torch.bfloat16)
    scale = torch.tensor(0.5, dtype=torch.float64)
    cpp.telemetry([g for group in problem for g in group.grads if g.numel()], torch.float64)
    cpp.adamw_(problem, scale=scale, skip=torch.tensor(0.0, dtype=torch.float64))
    cpp.adamw_telemetry_(problem, scale=scale, mask_nonfinite=True, partials_dtype=torch.float64)


def test_harness_catches_a_wrong_kernel(cpp):
    """The checks can fail: a backend whose update uses lr*1.0001 or drops a row is caught."""

    class WrongLr(type(cpp)):
        def adamw_(self, groups, *, scale, skip, grad_factor=None):
            super().adamw_(groups, scale=scale * 1.0001, skip=skip, grad_factor=grad_factor)

    class DropsRow(type(cpp)):
        def telemetry(self, grads, partials_dtype):
            out = super().telemetry(grads, partials_dtype)
            return torch.cat([out[:-1], torch.zeros_like(out[-1:])])

    assert any("adamw_ skip=0" in f.what for f in check_backend(WrongLr(), seed=0))
    assert any("telemetry" in f.what for f in check_backend(DropsRow(), seed=0))


def test_poisoned_outputs_are_nan_until_written():
    from lbw_kernels import _C
    from lbw_kernels.cpp_backend import poisoned_outputs

    with poisoned_outputs():
        assert _C._set_poison_outputs(True) is True  # the mode is on inside the context
        rows = torch.ops.lbw.telemetry([torch.ones(3), torch.ones(0), torch.full((5,), 2.0)])
    assert _C._set_poison_outputs(False) is False
    assert rows.tolist() == [[3.0, 3.0, 0.0], [20.0, 10.0, 0.0]]  # one row per non-empty grad


def test_telemetry_bitwise_repeatable_across_thread_counts(cpp):
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(n, generator=gen) * 3 for n in (1, 4097, 300_001, 16384 * 7 + 1)]
    grads.append(torch.randn(50_000, generator=gen).to(torch.bfloat16))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            results.append(cpp.telemetry(grads, torch.float64))
            problem = make_problem(2, shapes=((300_001,), (70_000,), (5,)))
            results.append(cpp.adamw_telemetry_(problem, scale=torch.tensor(0.5, dtype=torch.float64),
                                                mask_nonfinite=True, partials_dtype=torch.float64))
    finally:
        torch.set_num_threads(threads)
    for r in results[2::2]:
        assert torch.equal(r, results[0])
    for r in results[3::2]:
        assert torch.equal(r, results[1])


def test_mixed_dtypes_in_one_group_keep_telemetry_order(cpp):
    """A group whose params mix dtypes is split per dtype; rows come back in group order."""
    gen = torch.Generator().manual_seed(6)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.bfloat16]
    sizes = [7, 0, 4097, 3, 11]

    def group():
        params = [torch.randn(n, generator=gen).to(dt) for n, dt in zip(sizes, dtypes)]
        sdt = [torch.float64 if p.dtype == torch.float64 else torch.float32 for p in params]
        return GroupTensors(
            params=params,
            grads=[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params],
            exp_avgs=[torch.zeros(p.shape, dtype=d) for p, d in zip(params, sdt)],
            exp_avg_sqs=[torch.zeros(p.shape, dtype=d) for p, d in zip(params, sdt)],
            steps=[torch.tensor(0.0) for _ in params],
            lr=torch.tensor(1e-2), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, maximize=False,
        )

    g = group()
    scale = torch.tensor(0.9, dtype=torch.float64)
    got = cpp.adamw_telemetry_([g], scale=scale, mask_nonfinite=True, partials_dtype=torch.float64)
    # the float64 reference on float64 copies, as in the verify harness
    want = ReferenceBackend().telemetry([x.double() for x in g.grads if x.numel()], torch.float64)
    assert worst(got, want, 1e-10, 1e-9) is None


def _transposed_problem():
    """A group whose first param, grad and states are transposed views (strides (1, 6)): dense,
    one element order, not contiguous."""
    problem = make_problem(8, shapes=((6, 5), (9,)), n_groups=1)
    group = problem[0]
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        getattr(group, name)[0] = getattr(group, name)[0].t()
    assert not group.params[0].is_contiguous()
    return problem


def _no_reference_update(monkeypatch):
    """Make the reference's update, the fallback for parts the kernels do not take, fail."""
    from lbw_kernels import cpp_backend

    def refuse(*args, **kwargs):
        raise AssertionError("the part went to the reference")

    monkeypatch.setattr(cpp_backend.reference, "adamw_", refuse)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_transposed_params_are_updated_by_the_kernels(cpp, gate, monkeypatch):
    """A param with its grad and states in one order other than the contiguous one (a transpose,
    channels_last) is walked as the flat array it is: the kernels update it (the reference, the
    fallback, allocates param-sized temporaries every call), with the reference's result."""
    problem = _transposed_problem()
    actual, expected = clone_problem(problem), clone_problem(problem)
    scale = torch.tensor(0.5, dtype=torch.float64)
    ReferenceBackend().adamw_(expected, scale=scale, skip=None)
    _no_reference_update(monkeypatch)
    if gate == "exact":
        cpp.adamw_(actual, scale=scale, skip=None)
    else:
        cpp.adamw_telemetry_(actual, scale=scale, mask_nonfinite=True, partials_dtype=torch.float64)
    for x, y in zip(actual[0].params, expected[0].params):
        assert worst(x, y, 2.5e-7, 2.5e-7) is None


@pytest.mark.parametrize("which", ["grads", "exp_avgs", "exp_avg_sqs"])
def test_a_grad_or_state_in_another_order_than_its_param_goes_to_the_reference(cpp, which):
    """The update walks p, g, m, v side by side: one of them in another element order (a
    contiguous grad of a transposed param) would pair the wrong elements, so that part goes to
    the reference, and the op itself refuses it, naming the tensor."""
    problem = _transposed_problem()
    getattr(problem[0], which)[0] = getattr(problem[0], which)[0].contiguous()
    actual, expected = clone_problem(problem), clone_problem(problem)
    scale = torch.tensor(0.5, dtype=torch.float64)
    cpp.adamw_(actual, scale=scale, skip=None)
    ReferenceBackend().adamw_(expected, scale=scale, skip=None)
    for x, y in zip(actual[0].params, expected[0].params):
        assert worst(x, y, 2.5e-7, 2.5e-7) is None
    g = problem[0]
    one = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=rf"{which}\[0\] has strides \[6, 1\], params\[0\] \[1, 5\]"):
        torch.ops.lbw.adamw_(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps, one, 1e-3, 0.9, 0.999, 1e-8,
                             0.0, False, None)


def test_a_grad_that_is_not_dense_keeps_every_rows_kernel_sums(cpp):
    """Telemetry over a list holding one grad that is not dense (a slice with a step): that grad
    is read through a contiguous copy, so every row is still the kernels' float64 sum, the same
    bits for any number of threads, and the other grads' rows are those they have without it
    (the whole list used to go to the reference's float32 ops)."""
    gen = torch.Generator().manual_seed(11)
    plain = [torch.randn(70001, generator=gen), torch.randn(4, 3, 5, 7, generator=gen).to(
        memory_format=torch.channels_last)]
    gapped = torch.randn(6, 20, generator=gen)[:, ::2]
    threads = torch.get_num_threads()
    rows = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            rows[n] = cpp.telemetry(plain + [gapped], torch.float64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(rows[1], rows[2])
    assert torch.equal(rows[1][:2], cpp.telemetry(plain, torch.float64))
    assert torch.equal(rows[1][2:], cpp.telemetry([gapped.contiguous()], torch.float64))
    want = torch.tensor([[gapped.double().square().sum(), gapped.double().sum(), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(rows[1][2:], want, rtol=1e-12, atol=0)


def test_a_hyperparameter_tensor_on_another_device_goes_to_the_reference():
    """The kernels take betas, eps and weight_decay as numbers: a CPU tensor is read on the host,
    one on another device (a GPU's; meta stands in for it here) would cost a sync on every step
    and fail a CUDA graph's capture, so the ops are not called (False/None: the caller runs the
    reference's ops, which read it on its device) and nothing is written."""
    from lbw_kernels import cpp_backend

    problem = make_problem(3, shapes=((4,), (5,)), n_groups=1)
    part = problem[0]
    before = [p.clone() for p in part.params]
    scale = torch.tensor(1.0, dtype=torch.float64)
    part.beta1 = torch.tensor(0.9)  # (a CPU tensor: taken)
    assert cpp_backend._update_args(part, scale, 1e-3, None)[7] == pytest.approx(0.9)
    part.eps = torch.tensor(1e-8, device="meta")
    assert cpp_backend._update_args(part, scale, 1e-3, None) is None
    assert cpp_backend._run_adamw(part, scale, 1e-3, None) is False
    assert cpp_backend._run_adamw_telemetry(part, scale, 1e-3, True) is None
    assert all(torch.equal(a, b) for a, b in zip(part.params, before))


def test_bad_arguments_raise_clear_errors():
    p = torch.zeros(4)
    s = torch.tensor(0.0)
    one = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.lbw.adamw_([p], [p], [p], [p, p], [s], one, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, None)
    with pytest.raises(RuntimeError, match="exp_avgs\\[0\\] must be Float"):
        torch.ops.lbw.adamw_([p], [p], [p.double()], [p], [s], one, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, None)
    # A grad or state of the param's element count but another shape is refused (the kernel
    # would update it element by element as if it had the param's shape; torch's CPU fused
    # AdamW takes one silently).
    for k, name in ((1, "grads"), (2, "exp_avgs"), (3, "exp_avg_sqs")):
        args = [[p], [p.clone()], [p.clone()], [p.clone()], [s]]
        args[k] = [p.reshape(2, 2).clone()]
        with pytest.raises(RuntimeError, match=rf"{name}\[0\] has shape \[2, 2\], params\[0\] \[4\]"):
            torch.ops.lbw.adamw_(*args, one, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, None)
        with pytest.raises(RuntimeError, match=rf"{name}\[0\] has shape"):
            torch.ops.lbw.adamw_telemetry_(*args, one, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False)
    assert torch.equal(p, torch.zeros(4))  # nothing written
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be dense"):  # (a transpose is: walked in memory order)
        q = torch.zeros(4, 8)
        torch.ops.lbw.telemetry([q[:, ::2]])
    with pytest.raises(RuntimeError, match="grads must be float32"):
        torch.ops.lbw.telemetry([torch.zeros(3, dtype=torch.int32)])


# --------------------------------------------------------------------------- optimizer
def _stream_run(backend, gate, dtype=torch.float32):
    shapes = [(33, 17), (4097,), (1,), (0,), (5, 3)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    groups = [
        {"params": params[:2], "weight_decay": 0.1},
        {"params": params[2:], "lr": torch.tensor(3e-3), "betas": (0.8, 0.99), "maximize": True},
    ]
    opt = GuardedAdamW(groups, lr=1e-2, backend=backend, gate=gate, stats_freq=3)
    stream = random_stream(24, shapes, seed=1, dtype=dtype, spikes=(5, 14), flips=(8, 9, 17), nan_at=(11,))
    record = run(opt, params, stream, record=("scale", "regime", "skipped_steps", "grad_ms", "signed_mean"))
    return params, opt, record


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_optimizer_matches_reference_over_a_scripted_stream(gate):
    params, opt, got = _stream_run("cpp", gate)
    ref_params, ref_opt, want = _stream_run("reference", gate)
    regimes = [r[1] for r in want]
    assert {"spike", "oscillation", "nonfinite", "calm"} <= set(regimes)  # the stream exercises all
    for (s, r, k, ms, sm), (s2, r2, k2, ms2, sm2) in zip(got, want):
        assert (r, k) == (r2, k2)
        assert s == pytest.approx(s2, rel=1e-12)
        # the reference sums fp32 gradients in fp32 (verify.PARTIALS_TOLERANCE_FP32_SUMS)
        assert ms == pytest.approx(ms2, rel=4e-6, nan_ok=True)
        assert sm == pytest.approx(sm2, rel=1e-4, abs=1e-7, nan_ok=True)
    for a, b in zip(params, ref_params):
        # 24 fp32 steps: a few ulps of drift; the states too
        assert worst(a, b, 2e-6, 2e-6) is None
    for a, b in zip(params, ref_params):
        sa, sb = opt.state[a], ref_opt.state[b]
        assert torch.equal(sa["step"], sb["step"])
        assert worst(sa["exp_avg"], sb["exp_avg"], 1e-6, 1e-5) is None


def test_auto_picks_cpp_on_cpu():
    opt = GuardedAdamW([torch.zeros(3, requires_grad=True)])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    assert opt._backend_for(torch.device("cpu")).name in ("cpp", "triton")  # highest priority wins


# --------------------------------------------------------------------------- GPU
@pytest.fixture
def cuda_backend():
    reason = availability()["cuda"]
    if reason is not None:
        pytest.skip(reason)
    return get_backend("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_cuda_matches_reference(cuda_backend, poisoned, dtype):
    for seed in (0, 1):
        _assert_no_mismatch(check_backend(cuda_backend, seed=seed, dtype=dtype, device="cuda"))
    _assert_no_mismatch(check_backend(cuda_backend, seed=2, shapes=MANY, device="cuda"))
    _assert_no_mismatch(check_backend(cuda_backend, seed=3, device="cuda", nonfinite_at=(0, 2, float("nan"))))
    _assert_no_mismatch(check_backend(cuda_backend, seed=3, shapes=((1 << 20) + 3, (65536,), (65537,)), device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lbw", "zscore"])
def test_gpu_cuda_exact_call_matches_the_passes_one_by_one(cuda_backend, policy, monkeypatch):
    """CudaBackend.exact_step_ (_C._adamw_exact_: the telemetry op, decide, update in one call)
    against the same optimizer with it off (the optimizer then runs telemetry, decide
    and update one by one): bitwise params, states and guard over a stream with spikes, a flip,
    a NaN and a zero-element param, fp32 and bf16; the fused call taken on every step."""
    from lbw_kernels import _C
    from lbw_kernels.cpp_backend import CudaBackend

    shapes = [(7,), (70001,), (3,), (0,), (333, 65)]
    stream = random_stream(10, shapes, seed=2, spikes=(3, 7), flips=(5,), nan_at=(6,))
    taken = []
    real = _C._adamw_exact_
    monkeypatch.setattr(_C, "_adamw_exact_", lambda *args: taken.append(real(*args)) or taken[-1])
    out = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(CudaBackend, "exact_step_", lambda self, *args, **kwargs: False)
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(1)
            params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
            opt = GuardedAdamW(params, lr=0.05, backend="cuda", gate="exact", stats_freq=1, policy=policy)
            for grads in stream:
                for p, g in zip(params, grads):
                    p.grad = g.cuda().to(dtype)
                opt.step()
            out[fused, dtype] = [t for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
            out[fused, dtype].append(opt._guard.clone())
    assert taken == [True] * 2 * len(stream)
    for dtype in (torch.float32, torch.bfloat16):
        for a, b in zip(out[True, dtype], out[False, dtype]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_gpu_cuda_exact_call_takes_a_grad_aligned_where_its_param_is_not(cuda_backend):
    """A param viewed 4 bytes past a 16-byte boundary beside an aligned grad (the update reads
    that tensor with scalar loads, the telemetry op its grad with vectors, another order of the
    sum): _C._adamw_exact_ takes the call, and its rows and update are bitwise the telemetry op
    and the update op run one by one."""
    outs = []
    for fused in (True, False):
        problem = make_problem(4, shapes=((5,), (4099,)), device="cuda", n_groups=1)
        group = problem[0]
        flat = torch.zeros(4100, device="cuda")
        flat[1:].copy_(group.params[1])
        group.params[1] = flat[1:]
        assert group.params[1].data_ptr() % 16 and group.grads[1].data_ptr() % 16 == 0
        scale = torch.tensor(1.0, dtype=torch.float64, device="cuda")
        rows = []
        if fused:
            assert cuda_backend.exact_step_([group], group.grads, decide=rows.append, scale=scale, skip=None,
                                            partials_dtype=torch.float64) is True
        else:
            rows.append(cuda_backend.telemetry(group.grads, torch.float64))
            cuda_backend.adamw_([group], scale=scale, skip=None)
        outs.append([rows[0], *group.params, *group.exp_avgs, *group.exp_avg_sqs, *group.steps])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.gpu
def test_gpu_cuda_exact_call_stops_where_decide_raises(cuda_backend):
    """An error raised by decide inside _C._adamw_exact_ reaches the caller as itself, and the
    update never ran: params, states and step counts as they were."""
    problem = make_problem(4, shapes=((5,), (4099,)), device="cuda", n_groups=1)
    group = problem[0]
    before = [t.clone() for t in (*group.params, *group.exp_avgs, *group.exp_avg_sqs, *group.steps)]
    scale = torch.tensor(1.0, dtype=torch.float64, device="cuda")
    seen = []

    def decide(partials):
        seen.append(partials.shape)
        raise KeyError("from decide")

    with pytest.raises(KeyError, match="from decide"):
        cuda_backend.exact_step_([group], group.grads, decide=decide, scale=scale, skip=None,
                                 partials_dtype=torch.float64)
    assert seen == [(2, 3)]
    after = (*group.params, *group.exp_avgs, *group.exp_avg_sqs, *group.steps)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.gpu
def test_gpu_cuda_exact_call_converts_a_factor_decide_returns_in_another_dtype(cuda_backend):
    """decide has written the guard when it returns the update's gradient factor: a factor in
    float32 (a decide of one's own) is converted, not refused with the guard moved and no
    update; the update is the one a float64 factor of the same value gives."""
    outs = []
    for dtype in (torch.float32, torch.float64, None):  # (None: no factor, to see that it acted)
        group = make_problem(4, shapes=((5,), (4099,)), device="cuda", n_groups=1)[0]
        scale = torch.tensor(1.0, dtype=torch.float64, device="cuda")
        factor = None if dtype is None else torch.tensor(0.25, dtype=dtype, device="cuda")
        assert cuda_backend.exact_step_([group], group.grads, scale=scale, skip=None, partials_dtype=torch.float64,
                                        decide=lambda rows: factor) is True
        outs.append([*group.params, *group.exp_avgs, *group.exp_avg_sqs, *group.steps])
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    assert not torch.equal(outs[0][2], outs[2][2])  # exp_avg of the first param: the factor was read


@pytest.mark.gpu
def test_gpu_cuda_telemetry_bitwise_repeatable(cuda_backend):
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(n, device="cuda", generator=gen) for n in (3, 1 << 20, 65537)]
    first = cuda_backend.telemetry(grads, torch.float64)
    for _ in range(3):
        assert torch.equal(cuda_backend.telemetry(grads, torch.float64), first)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_cuda_telemetry_of_many_chunk_tensors(cuda_backend, poisoned, gate):
    """Tensors of more chunks than the second stage has threads per tensor (128; 300 and 129
    chunks of 4096 here) beside small ones: the float64 rows within 1e-12 relative (1e-9
    absolute, for sums near 0) of the reference's, which sums ~1.2M terms in float64 in
    another order; and bitwise the same on a second call."""
    from lbw_kernels import reference
    from lbw_kernels.cpp_backend import cuda_geometry

    shapes = ((300 * 4096 + 5,), (3,), (129 * 4096,), (0,), (4096,))
    problem = make_problem(6, shapes=shapes, device="cuda")
    grads = [g for group in problem for g in group.grads if g.numel() > 0]
    # The reference sums in the grads' precision: run it on float64 copies.
    want = reference.telemetry_partials([g.double() for g in grads], torch.float64)
    scale = torch.tensor(0.5, dtype=torch.float64, device="cuda")

    def rows():
        if gate == "exact":
            return cuda_backend.telemetry(grads, torch.float64)
        return cuda_backend.adamw_telemetry_(clone_problem(problem), scale=scale, mask_nonfinite=True,
                                             partials_dtype=torch.float64)

    with cuda_geometry(chunk=4096):
        first, second = rows(), rows()
    assert worst(first, want, 1e-9, 1e-12) is None
    assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_matches_triton(cuda_backend, dtype):
    reason = availability()["triton"]
    if reason is not None:
        pytest.skip(reason)
    triton = get_backend("triton")
    problem = make_problem(5, shapes=ODD_SIZES + ((1 << 20) + 1,), dtype=dtype, device="cuda")
    scale = torch.tensor(0.6, dtype=torch.float64, device="cuda")
    a, b = clone_problem(problem), clone_problem(problem)
    pa = cuda_backend.adamw_telemetry_(a, scale=scale, mask_nonfinite=True, partials_dtype=torch.float64)
    pb = triton.adamw_telemetry_(b, scale=scale, mask_nonfinite=True, partials_dtype=torch.float64)
    assert worst(pa, pb, 1e-10, 1e-9) is None
    from lbw_kernels.verify import PARAM_TOLERANCES

    for ga, gb in zip(a, b):
        for x, y in zip(ga.params, gb.params):
            assert worst(x, y, *(2 * t for t in PARAM_TOLERANCES[dtype])) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cuda_update_has_the_cpu_kernels_bits(cuda_backend, dtype):
    """guard_math.h is the per-element math of both, neither compiler contracts on its own
    (-ffp-contract=off, nvcc --fmad=false), division and sqrt are IEEE on both: the CUDA update
    should give the C++ CPU kernels' bits (the bias corrections' pow could differ by an ulp in
    float64 before rounding to float32; not seen on these problems, or this test says so)."""
    if availability()["cpp"] is not None:
        pytest.skip(availability()["cpp"])
    cpp = get_backend("cpp")
    scale = 0.6
    on_gpu = make_problem(7, shapes=ODD_SIZES + ((1 << 20) + 1,), dtype=dtype, device="cuda")
    on_cpu = make_problem(7, shapes=ODD_SIZES + ((1 << 20) + 1,), dtype=dtype, device="cpu")
    cuda_backend.adamw_(on_gpu, scale=torch.tensor(scale, dtype=torch.float64, device="cuda"), skip=None)
    cpp.adamw_(on_cpu, scale=torch.tensor(scale, dtype=torch.float64), skip=None)
    for ga, gb in zip(on_gpu, on_cpu):
        for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
            for x, y in zip(getattr(ga, name), getattr(gb, name)):
                assert torch.equal(x.cpu(), y), name


# Launch geometries with kernels besides the default (csrc/cuda/geometry.h), each with a
# chunk small enough that the problems below cross chunk edges.
OTHER_CUDA_GEOMETRIES = [dict(threads=512, ilp=2, chunk=8192), dict(threads=256, ilp=2, chunk=1 << 20),
                         dict(threads=256, ilp=4, chunk=4096), dict(threads=512, ilp=1, chunk=8192, warp_partials=1),
                         dict(threads=256, ilp=2, chunk=4096, warp_partials=1)]


def test_cuda_geometry_is_set_checked_and_restored(monkeypatch):
    """The geometry switch lives in every build (the CUDA launches read it): set, restored,
    and a geometry without kernels or a malformed LBW_CUDA_GEOMETRY refused by name."""
    from lbw_kernels import _C
    from lbw_kernels.cpp_backend import _apply_cuda_geometry_override, cuda_geometry

    default = _C._cuda_geometry()
    assert default == (512, 1, 16384, 0)
    with cuda_geometry(threads=256, ilp=4):
        assert _C._cuda_geometry() == (256, 4, 16384, 0)
    with cuda_geometry(warp_partials=1, chunk=8192):
        assert _C._cuda_geometry() == (512, 1, 8192, 1)
    assert _C._cuda_geometry() == default
    for bad in (dict(ilp=4), dict(threads=1024), dict(chunk=3000), dict(chunk=1 << 21), dict(warp_partials=2)):
        with pytest.raises(ValueError, match="has no kernels"):
            with cuda_geometry(**bad):
                pass
        assert _C._cuda_geometry() == default
    with pytest.raises(TypeError, match="threads"):
        with cuda_geometry(warps=4):
            pass
    for spec, match in (("threads=256,ilp=3", "has no kernels"), ("warps=4", "name=positive int"), ("ilp=x", "name=positive int")):
        monkeypatch.setenv("LBW_CUDA_GEOMETRY", spec)
        with pytest.raises(ValueError, match="LBW_CUDA_GEOMETRY"):
            _apply_cuda_geometry_override()
        assert _C._cuda_geometry() == default
    monkeypatch.setenv("LBW_CUDA_GEOMETRY", "threads=256, ilp=2")
    try:
        _apply_cuda_geometry_override()
        assert _C._cuda_geometry() == (256, 2, 16384, 0)
    finally:
        _C._cuda_geometry(*default)


@pytest.mark.gpu
@pytest.mark.parametrize("geometry", OTHER_CUDA_GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_cuda_other_geometries_match_reference(cuda_backend, poisoned, geometry, dtype):
    """Every geometry bench/device_check.sh may time (LBW_CUDA_GEOMETRY) computes the same
    thing: chunk edges, odd sizes, planted NaN, both gates (check_backend)."""
    from lbw_kernels.cpp_backend import cuda_geometry

    chunk = geometry["chunk"]
    with cuda_geometry(**geometry):
        _assert_no_mismatch(check_backend(cuda_backend, seed=4, dtype=dtype, device="cuda"))
        _assert_no_mismatch(check_backend(cuda_backend, seed=5, dtype=dtype, device="cuda",
                                          shapes=((2 * chunk + 9,), (chunk,), (chunk - 1,), (1,)),
                                          nonfinite_at=(0, 0, float("inf"))))  # (mid-tensor: 2nd chunk)


def _gpu_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.Linear(257, 3)).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lbw", "zscore"])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_cuda_step_never_syncs(cuda_backend, gate, policy):
    assert_step_never_syncs(_gpu_model(), backend="cuda", gate=gate, policy=policy)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_cuda_step_that_rebuilds_its_plan_never_syncs(cuda_backend, gate):
    assert_relayout_step_never_syncs(backend="cuda", gate=gate)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lbw", "zscore"])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("stats_freq", [1, 3])
def test_gpu_cuda_graph_capture_replays_like_eager(cuda_backend, gate, policy, stats_freq):
    # Same kernels, same inputs: bitwise.
    assert_graph_replay_matches_eager(
        _gpu_model(), rtol=0, atol=0, stats_freq=stats_freq, backend="cuda", gate=gate, policy=policy
    )


@pytest.mark.gpu
def test_gpu_cuda_captured_group_of_two_param_dtypes_replays_like_eager(cuda_backend):
    """single_pass telemetry of a group mixing dtypes puts its rows back in the group's order
    with an index the eager warm-up step uploads (stream_use.KeptCopy); the captured step
    reads it: bitwise the eager twin."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4).double()).cuda()
    assert_graph_replay_matches_eager(model, rtol=0, atol=0, backend="cuda", gate="single_pass")


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_cuda_captured_step_replays_after_its_tables_leave_the_cache(cuda_backend, gate):
    """Other optimizers' layouts push the captured step's tables out of the extension's cache
    before the replays (each adds at least one table of its own: one more of them than the
    cache holds): the tables kept while capturing still hold the memory."""
    from lbw_kernels import _C

    assert_graph_replay_matches_eager(
        _gpu_model(), rtol=0, atol=0, backend="cuda", gate=gate,
        after_capture=lambda: step_other_layouts(_C.TABLE_CACHE_CAPACITY + 1, backend="cuda", gate=gate),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("relayout", [False, True])
def test_gpu_cuda_tables_evicted_while_a_side_stream_still_reads_them(cuda_backend, gate, relayout):
    """Tables uploaded on the default stream, used next by a step on a held-back side stream,
    then evicted (one more optimizer than the cache holds): ops_cuda.cpp's use_on keeps their
    memory from the default stream's allocations until the side stream is done with it; with
    ``relayout`` the step plan's element counts are replaced too (stream_use.py)."""
    from lbw_kernels import _C

    assert_side_stream_step_survives_eviction(_C.TABLE_CACHE_CAPACITY + 1, rtol=0, atol=0, relayout=relayout,
                                              backend="cuda", gate=gate)


# Every kernel each instruction set compiles: each dtype, the telemetry pass, the exact gate's
# update, single_pass masked and unmasked; NaN/Inf planted; sizes around the vector widths;
# one group with beta1 < 0.5 (lerp's other form). One line per case: its bits' digest.
_ISA_SCRIPT = """
import dataclasses, hashlib, torch, lbw_kernels.cpp_backend
from lbw_kernels.backends import get_backend
from lbw_kernels.verify import clone_problem, make_problem
cpp = get_backend("cpp")
f64 = lambda x: torch.tensor(x, dtype=torch.float64)
shapes = ((40_000,), (4097,), (3,), (1,), (16,), (17,), (0,), (65,), (33, 65))
print(lbw_kernels._C._cpu_isa())
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for planted in (None, (0, 0, float("nan")), (1, 2, float("-inf"))):
        problem = make_problem(3, shapes=shapes, dtype=dtype, nonfinite_at=planted)
        problem = [dataclasses.replace(g, beta1=b1) for g, b1 in zip(problem, (0.9, 0.3))]
        out = [cpp.telemetry([g for grp in problem for g in grp.grads if g.numel()], torch.float64)]
        for mode in ("exact", "single_pass masked", "single_pass"):
            groups = clone_problem(problem)
            if mode == "exact":
                cpp.adamw_(groups, scale=f64(0.6), skip=f64(0.0))
            else:
                out.append(cpp.adamw_telemetry_(groups, scale=f64(0.6), mask_nonfinite=mode.endswith("masked"),
                                                partials_dtype=torch.float64))
            out += [t for grp in groups for ts in (grp.params, grp.exp_avgs, grp.exp_avg_sqs) for t in ts]
        bits = b"".join(t.detach().double().flatten().numpy().tobytes() for t in out)
        print(f"{dtype} planted={planted}", hashlib.sha1(bits).hexdigest())
# Every bf16 and fp16 bit pattern as a param (NaNs with every payload, subnormals, +-Inf, the
# largest finite values), stepped with lr 0 (a round trip through float) and with updates that
# round, overflow and underflow, their bits compared; a gradient of every pattern read by the
# telemetry pass. (A sum over many NaNs is NaN, its payload whichever NaN the instruction set's
# adds and fused multiply-adds let through: the sums' NaNs are compared as NaN.)
gen = torch.Generator().manual_seed(0)
nan_as_nan = lambda rows: torch.where(rows.isnan(), torch.full_like(rows, float("nan")), rows)
for dtype in (torch.bfloat16, torch.float16):
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    out = [nan_as_nan(lbw_kernels._C._telemetry([every]))]
    for lr in (0.0, 1e-3, 1e3):
        p = every.clone()
        g = (torch.randn(p.numel(), generator=gen) * 1e-2).to(dtype)
        states = [torch.zeros(p.numel()), torch.full((p.numel(),), 1e-6)]
        rows = lbw_kernels._C._adamw_telemetry_([p], [g], *[[s] for s in states], [torch.tensor(4.0)], f64(1.0), lr,
                                                0.9, 0.999, 1e-8, 0.0, False, False)
        out += [nan_as_nan(rows), p.view(torch.int16)] + states
    bits = b"".join(t.detach().flatten().numpy().tobytes() for t in out)
    print(f"{dtype} every bit pattern", hashlib.sha1(bits).hexdigest())
"""


@pytest.mark.parametrize("cap", ["AVX512", "avx512f", "bogus"])
def test_an_unknown_instruction_set_cap_is_refused(cap):
    """LBW_CPU_ISA names default, avx2 or avx512: anything else (a typo, upper case) raises,
    naming the variable, where it used to pick the baseline kernels without a word; info says
    so too. Empty counts as unset (the best the CPU has)."""
    import os
    import subprocess
    import sys

    script = """
import torch
from lbw_kernels import GuardedAdamW, _C
from lbw_kernels.cli import main
main(["info"])
p = torch.nn.Parameter(torch.ones(4))
p.grad = torch.ones(4)
try:
    GuardedAdamW([p], backend="cpp").step()
except RuntimeError as err:
    print("step refused:", err)
else:
    print("step ran")
"""
    ran = {}
    for value in (cap, "", None):
        env = {k: v for k, v in os.environ.items() if k != "LBW_CPU_ISA"}
        if value is not None:
            env["LBW_CPU_ISA"] = value
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        ran[value] = res.stdout
    assert f"step refused: LBW_CPU_ISA must be default, avx2 or avx512 (or unset: the best the CPU has), got '{cap}'" \
        in ran[cap], ran[cap]
    assert "CPU kernels refused (LBW_CPU_ISA must be" in ran[cap], ran[cap]
    assert "step ran" in ran[""] and "step ran" in ran[None]
    isa_line = [line for line in ran[None].splitlines() if "CPU kernels" in line]
    assert isa_line and isa_line == [line for line in ran[""].splitlines() if "CPU kernels" in line]


def test_every_instruction_set_gives_the_same_bits():
    """LBW_CPU_ISA caps the kernels the extension picks; baseline, AVX2 and AVX-512 builds
    (where this CPU runs them) must agree bit for bit on every kernel, telemetry and update
    alike, so the kernels a CPU without AVX-512 runs are those the rest of the suite checks
    against the reference here. Every bf16 and fp16 bit pattern goes through the conversions
    (the SIMD ones of the AVX2/AVX-512 builds against guard_math.h's scalar ones), NaN payloads
    included."""
    import os
    import subprocess
    import sys

    outs = {}
    for isa in ("default", "avx2", "avx512"):
        env = dict(os.environ, LBW_CPU_ISA=isa, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        used, *cases = res.stdout.strip().splitlines()
        outs[used] = cases
    assert "default" in outs  # the cap works: the baseline kernels ran
    assert len(outs["default"]) == 14
    for isa, cases in outs.items():
        differ = [a.rsplit(" ", 1)[0] for a, b in zip(cases, outs["default"]) if a != b]
        assert not differ, f"{isa} differs from the baseline build on: {differ}"
