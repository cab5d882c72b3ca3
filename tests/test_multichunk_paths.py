"""The kernel backends on paths the other tests' small problems miss: tensors of several chunks
that are misaligned views (the kernels' unaligned variants, with fp32 grads of bf16/fp16
params), grads that are not dense (gapped, expanded; the Triton backend reads them through a
dense copy), params dense in another order than the contiguous one (channels_last, a
transpose: walked as flat arrays), and the exact gate's early telemetry pass over multi-chunk
grads. On the GPU these are where a wrong alignment hint or a reduction over several programs of one tensor would
show; Triton's interpreter ignores alignment, so the CPU runs check the results and the GPU
runs check the kernels. (From a review of the Triton changes since the last GPU run.)

Tolerances: verify's per dtype, times 6 (steps compound, as in tests/test_amp_and_dtypes.py);
the guard's telemetry within 1e-5 relative (float64 sums in the kernels, in another order than
the reference's); the early pass bitwise against the same backend without it.
"""

import pytest
import torch

from gpu_checks import kernel_gpu_backends, require_backend
from lbw_kernels import GuardedAdamW, early_telemetry
from lbw_kernels.verify import PARAM_TOLERANCES, worst
from torch_compat import needs_grad_dtype

# Elements of the large tensors: several chunks of every backend's geometry there (GPU: Triton
# 32768, CUDA 16384; CPU: Triton's interpreter 4096, kept small for its speed).
BIG = {"cuda": 70001, "cpu": 9000}

# The Triton geometry variants a GPU run also checks: its single_pass update with pipelined loops.
TRITON_GPU_GEOMETRIES = [None, "single_pass_num_stages=3"]


def _fp32_grads_of_offset_params(backend, gate, dtype, device, steps=4):
    """bf16/fp16 params holding fp32 grads (``grad_dtype``): three params and their grads are
    views one element into flat buffers (misaligned, the first of several chunks), two are
    tensors of their own; a spike on the third call. Params, states and telemetry after."""
    gen = torch.Generator().manual_seed(3)
    sizes = (BIG[device], 5, 33)
    offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    flat = torch.randn(1 + sum(sizes), generator=gen).to(device, dtype)
    grad_flat = torch.empty(1 + sum(sizes), device=device)
    params = [torch.nn.Parameter(flat[o:o + n]) for o, n in zip(offsets, sizes)]
    params += [torch.nn.Parameter(torch.randn(n, generator=gen).to(device, dtype)) for n in (BIG[device], 7)]
    for p in params:
        p.grad_dtype = torch.float32
    opt = GuardedAdamW(params, lr=1e-2, backend=backend, gate=gate, stats_freq=1)
    for k in range(steps):
        grad_flat.copy_(torch.randn(grad_flat.shape, generator=gen) * (20.0 if k == 2 else 1.0))
        for i, p in enumerate(params):
            p.grad = (grad_flat[offsets[i]:offsets[i] + sizes[i]] if i < len(sizes)
                      else torch.randn(p.shape, generator=gen).to(device))
        opt.step()
    return [t.detach().clone() for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])], opt


def _grads_not_dense(backend, gate, device, steps=4):
    """Gapped grads (every other element of a buffer: one of several chunks, one 2-d), an
    expanded one (stride 0) and a plain one; a spike on the third call."""
    gen = torch.Generator().manual_seed(5)
    n = BIG[device]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in [(n,), (6, 7), (40, 9), (3,)]]
    opt = GuardedAdamW(params, lr=1e-2, backend=backend, gate=gate, stats_freq=1)
    big_store, store = torch.empty(2 * n, device=device), torch.empty(6, 14, device=device)
    for k in range(steps):
        big_store.copy_(torch.randn(2 * n, generator=gen) * (20.0 if k == 2 else 1.0))
        store.copy_(torch.randn(6, 14, generator=gen))
        params[0].grad = big_store[::2]
        params[1].grad = store[:, ::2]
        params[2].grad = torch.randn(1, 9, generator=gen).to(device).expand(40, 9)
        params[3].grad = torch.randn(3, generator=gen).to(device)
        opt.step()
    return [p.detach().clone() for p in params], opt


def _permuted_layouts(backend, gate, device, steps=4):
    """Params dense in another order of their dims than the contiguous one (a channels_last
    conv weight of several chunks, a transposed matrix) with grads in the same order (autograd
    gives a param's grad its layout, and the states are zeros_like it), and a plain one; a
    spike on the third call. The kernels walk them as flat arrays: one order, any order."""
    gen = torch.Generator().manual_seed(8)
    params = [
        torch.nn.Parameter(torch.randn(8, 9, 11, BIG[device] // 792, generator=gen).to(device).to(
            memory_format=torch.channels_last)),
        torch.nn.Parameter(torch.randn(9, 40, generator=gen).to(device).t()),
        torch.nn.Parameter(torch.randn(3, generator=gen).to(device)),
    ]
    assert not params[0].is_contiguous() and not params[1].is_contiguous()
    opt = GuardedAdamW(params, lr=1e-2, backend=backend, gate=gate, stats_freq=1)
    for k in range(steps):
        for p in params:
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen) * (20.0 if k == 2 else 1.0))
        opt.step()
    for p in params:
        assert opt.state[p]["exp_avg"].stride() == p.stride() == p.grad.stride()
    return [t.detach().clone() for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])], opt


def _assert_matches_reference(got, want):
    (tensors, opt), (ref_tensors, ref_opt) = got, want
    for a, b in zip(tensors, ref_tensors):
        atol, rtol = PARAM_TOLERANCES[b.dtype]
        assert worst(a, b, 6 * atol, 6 * rtol) is None, worst(a, b, 6 * atol, 6 * rtol)
    t, r = opt.telemetry(), ref_opt.telemetry()
    assert t["regime"] == r["regime"] and t["skipped_steps"] == r["skipped_steps"]
    assert t["grad_ms"] == pytest.approx(r["grad_ms"], rel=1e-5) and t["scale"] == pytest.approx(r["scale"], rel=1e-12)


def _early_pass_run(backend, device, dtype, early, monkeypatch):
    """Six exact calls over multi-chunk grads refilled in place (each call's layouts the last's:
    the early pass runs from the second call on, when ``early``), two groups, a spike and a NaN.
    Params, states and guard after, and per call whether an early pass ran."""
    from lbw_kernels import optimizer

    monkeypatch.setattr(early_telemetry, "ENABLED", early)
    launched = []
    real = early_telemetry.launch
    monkeypatch.setattr(optimizer, "launch", lambda *a: launched.append(real(*a)) or launched[-1])
    taken = []
    gen = torch.Generator().manual_seed(7)
    n = BIG[device]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in [(n,), (5,), (3 * n + 11,)]]
    opt = GuardedAdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=1e-2,
                       backend=backend, gate="exact", stats_freq=1)
    for p in params:
        p.grad = torch.zeros_like(p)
    for k in range(6):
        for p in params:
            p.grad.copy_((torch.randn(p.shape, generator=gen) * (30.0 if k == 3 else 1.0)).to(device, dtype))
        if k == 4:
            params[0].grad[17] = float("nan")
        before = len(launched)
        opt.step()
        taken.append(len(launched) > before and launched[-1] is not None)
    return [t.clone() for p in params for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])] + [
        opt._guard.clone()], taken


def _assert_early_pass_same_bits(backend, device, dtype, monkeypatch):
    with_early, taken = _early_pass_run(backend, device, dtype, True, monkeypatch)
    assert taken == [False] + [True] * 5
    without, taken = _early_pass_run(backend, device, dtype, False, monkeypatch)
    assert taken == [False] * 6
    for a, b in zip(with_early, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------ CPU

@needs_grad_dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_fp32_grads_of_misaligned_multichunk_low_precision_params(backend, gate, dtype):
    _assert_matches_reference(_fp32_grads_of_offset_params(backend, gate, dtype, "cpu"),
                              _fp32_grads_of_offset_params("reference", gate, dtype, "cpu"))


# grads that are not dense (gapped, expanded); params dense in another order (channels_last, a transpose)
LAYOUT_CASES = [_grads_not_dense, _permuted_layouts]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_multichunk_tensors_in_other_layouts(backend, gate, case):
    _assert_matches_reference(case(backend, gate, "cpu"), case("reference", gate, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_early_pass_over_multichunk_grads_same_bits(backend, dtype, monkeypatch):
    _assert_early_pass_same_bits(backend, "cpu", dtype, monkeypatch)


# ------------------------------------------------------------------------------ GPU

def _gpu_cases(gates) -> list:
    """(backend, Triton geometry, gate) parameters of the GPU tests, marked gpu: each kernel
    backend with its default geometry on each of ``gates``, and Triton's pipelined single_pass
    update on the single_pass gate (the only launches that setting changes)."""
    out = []
    for param in kernel_gpu_backends():
        name = param.values[0]
        for gate in gates:
            for geo in (TRITON_GPU_GEOMETRIES if name == "triton" and gate == "single_pass" else [None]):
                out.append(pytest.param(name, geo, gate, marks=param.marks, id=f"{name}-{geo or 'default'}-{gate}"))
    return out


@needs_grad_dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gpu_backend, geometry, gate", _gpu_cases(["exact", "single_pass"]))
def test_gpu_fp32_grads_of_misaligned_multichunk_low_precision_params(gpu_backend, geometry, gate, dtype,
                                                                      monkeypatch):
    require_backend(gpu_backend)
    if geometry:
        monkeypatch.setenv("LBW_TRITON_GEOMETRY", geometry)
    _assert_matches_reference(_fp32_grads_of_offset_params(gpu_backend, gate, dtype, "cuda"),
                              _fp32_grads_of_offset_params("reference", gate, dtype, "cuda"))


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("gpu_backend, geometry, gate", _gpu_cases(["exact", "single_pass"]))
def test_gpu_multichunk_tensors_in_other_layouts(gpu_backend, geometry, gate, case, monkeypatch):
    require_backend(gpu_backend)
    if geometry:
        monkeypatch.setenv("LBW_TRITON_GEOMETRY", geometry)
    _assert_matches_reference(case(gpu_backend, gate, "cuda"), case("reference", gate, "cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gpu_backend, geometry, gate", _gpu_cases(["exact"]))
def test_gpu_early_pass_over_multichunk_grads_same_bits(gpu_backend, geometry, gate, dtype, monkeypatch):
    require_backend(gpu_backend)
    _assert_early_pass_same_bits(gpu_backend, "cuda", dtype, monkeypatch)
