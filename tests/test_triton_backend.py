"""The Triton backend against the reference.

CPU: kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1 without
CUDA), with every workspace and output poisoned with NaN before each launch (LBW_POISON=1),
so a row a kernel forgot to write fails. Sizes stay small: the interpreter runs each program
as Python. GPU tests (``@pytest.mark.gpu``) repeat the checks on CUDA and add torch.compile,
CUDA-graph capture and no-sync checks.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from lbw_kernels import GuardedAdamW
from lbw_kernels.backends import GroupTensors, ReferenceBackend, get_backend, nonempty_grads
from lbw_kernels.verify import (
    ODD_SIZES,
    PARAM_TOLERANCES,
    PARTIALS_TOLERANCE, PARTIALS_TOLERANCE_FP32_SUMS,
    check_backend,
    clone_problem,
    make_problem,
    verify_backend,
    worst,
)
from gpu_checks import (
    assert_graph_replay_matches_eager, assert_relayout_step_never_syncs, assert_side_stream_step_survives_eviction,
    assert_step_never_syncs, device_check_candidates, kernel_gpu_backends, require_backend, step_other_layouts,
)
from streams import random_stream

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# 300 tensors of mixed sizes (some multi-chunk, some a single element).
MANY = tuple((int(n),) for n in torch.randint(1, 2500, (300,), generator=torch.Generator().manual_seed(3)))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("LBW_POISON", "1")


@pytest.fixture
def triton_backend():
    backend = get_backend("triton")
    if not backend.supports(torch.device("cpu")):
        # With CUDA, conftest leaves the interpreter off: the gpu-marked tests cover the device.
        pytest.skip("CPU-tensor tests need TRITON_INTERPRET=1 (conftest sets it without CUDA)")
    return backend


def _ops():
    from lbw_kernels.triton_kernels import ops

    return ops


def assert_no_mismatch(failures):
    assert not failures, "\n".join(str(f) for f in failures[:10])


# ---------------------------------------------------------------------------------------
# Backend vs reference (the verify harness: telemetry, exact gate with/without skip,
# single_pass masked/unmasked), on random problems with odd sizes and a 0-element tensor
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_random_problem_each_dtype(triton_backend, dtype):
    assert (0,) in ODD_SIZES and (4097,) in ODD_SIZES
    assert_no_mismatch(check_backend(triton_backend, seed=int(torch.randint(0, 1000, ())), dtype=dtype))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planted_nonfinite(triton_backend, value, dtype):
    # (group 0, tensor 2) is the 4097-element tensor (3 chunks): the bad element is mid-tensor.
    assert_no_mismatch(check_backend(triton_backend, seed=5, dtype=dtype, nonfinite_at=(0, 2, value)))


def test_300_tensors_of_mixed_sizes(triton_backend):
    assert_no_mismatch(check_backend(triton_backend, seed=21, shapes=MANY))


def test_sizes_around_block_and_chunk(triton_backend):
    from lbw_kernels.triton_kernels.config import geometry

    geo = geometry()
    shapes = [(n,) for n in (1, 3, geo.block - 1, geo.block, geo.block + 1, geo.chunk, geo.chunk + 1, 2 * geo.chunk + 5)]
    assert_no_mismatch(check_backend(triton_backend, seed=8, shapes=shapes))


def test_mixed_dtypes_in_one_group_keep_telemetry_order(triton_backend):
    """fp32, fp64 (delegated to the reference), bf16 and fp16 params in one group, an empty one
    between them: partials stay in nonempty_grads order and every tensor updates."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16, torch.float64]
    sizes = [5, 2100, 0, 4097, 33, 7]

    def problem():
        g = torch.Generator().manual_seed(4)
        ps = [torch.rand(n, generator=g, dtype=torch.float64).to(dt) for n, dt in zip(sizes, dtypes)]
        gs = [(torch.rand(n, generator=g, dtype=torch.float64) - 0.5).to(dt) for n, dt in zip(sizes, dtypes)]
        st = [torch.float64 if dt == torch.float64 else torch.float32 for dt in dtypes]
        ms = [torch.rand(n, generator=g, dtype=torch.float64).to(s) * 0.1 for n, s in zip(sizes, st)]
        vs = [torch.rand(n, generator=g, dtype=torch.float64).to(s) * 0.01 for n, s in zip(sizes, st)]
        steps = [torch.tensor(3.0) for _ in sizes]
        return [GroupTensors(ps, gs, ms, vs, steps, 0.01, 0.9, 0.99, 1e-8, 0.1, False)]

    scale = torch.tensor(0.5, dtype=torch.float64)
    got_groups, want_groups = problem(), problem()
    got = triton_backend.adamw_telemetry_(got_groups, scale=scale, mask_nonfinite=True, partials_dtype=torch.float64)
    want = ReferenceBackend().adamw_telemetry_(want_groups, scale=scale, mask_nonfinite=True, partials_dtype=torch.float64)
    assert got.shape == (5, 3)
    assert worst(got, want, *PARTIALS_TOLERANCE_FP32_SUMS) is None  # the reference sums fp32 in fp32
    for a, b in zip(got_groups[0].params, want_groups[0].params):
        assert worst(a, b, *PARAM_TOLERANCES[a.dtype]) is None, a.dtype
    assert [s.item() for s in got_groups[0].steps] == [4.0] * len(sizes)


# ---------------------------------------------------------------------------------------
# The update's bits: those of the C++/CUDA kernels (csrc/guard_math.h)
# ---------------------------------------------------------------------------------------
def _interpreter_fma_rounds_once() -> bool:
    """Whether this Triton's interpreter rounds tl.fma once, as the GPU does (3.9 does; 3.6
    computes x*y + z in float32, rounding twice): (1 + 2^-12)^2 - (1 + 2^-11) is 2^-24 with
    one rounding and 0 with two."""
    import triton.language as tl

    @triton.jit
    def fma_kernel(x_ptr, out_ptr):
        x = tl.load(x_ptr)
        tl.store(out_ptr, tl.fma(x, x, tl.load(x_ptr + 1)))

    x = torch.tensor([1 + 2**-12, -(1 + 2**-11)], dtype=torch.float32)
    out = torch.zeros(1, dtype=torch.float32)
    fma_kernel[(1,)](x, out)
    return float(out) == 2**-24


def _update_bits_problem(dtype, single_pass, device="cpu"):
    # (single_pass masks a NaN gradient's element; the exact gate's update also clips)
    problem = make_problem(7, shapes=ODD_SIZES + MANY[:40], dtype=dtype, device=device,
                           nonfinite_at=(1, 2, float("nan")) if single_pass else None)
    kw = dict(scale=torch.tensor(0.6, dtype=torch.float64, device=device))
    if single_pass:
        kw.update(mask_nonfinite=True, partials_dtype=torch.float64)
    else:
        kw.update(skip=None, grad_factor=torch.tensor(0.375, dtype=torch.float64, device=device))
    return problem, kw


def _same_update_bits(a, b):
    for ga, gb in zip(a, b):
        for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
            for i, (x, y) in enumerate(zip(getattr(ga, name), getattr(gb, name))):
                assert torch.equal(x.cpu(), y.cpu()), (name, i, int((x.cpu() != y.cpu()).sum()), x.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("single_pass", [False, True])
def test_update_has_the_cpp_kernels_bits(triton_backend, dtype, single_pass):
    """The update rounds where csrc/guard_math.h rounds (IEEE operations, no contraction,
    torch's one-rounding lerp and addcmul written out as tl.fma), so under an interpreter whose
    tl.fma rounds once its params, moments and steps are bitwise the cpp backend's (which the
    CUDA kernels' are on a GPU: test_gpu_cuda_update_has_the_cpu_kernels_bits). Before the
    fmas were written out, ~11% of exp_avg elements differed by an ulp every step."""
    from lbw_kernels.backends import availability

    if availability()["cpp"] is not None:
        pytest.skip(availability()["cpp"])
    if not _interpreter_fma_rounds_once():
        pytest.skip(f"Triton {triton.__version__}'s interpreter rounds tl.fma twice: compared within tolerances only")
    ours, kw = _update_bits_problem(dtype, single_pass)
    theirs = clone_problem(ours)
    step = "adamw_telemetry_" if single_pass else "adamw_"
    getattr(triton_backend, step)(ours, **kw)
    getattr(get_backend("cpp"), step)(theirs, **kw)
    _same_update_bits(ours, theirs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("single_pass", [False, True])
def test_gpu_update_has_the_cuda_kernels_bits(dtype, single_pass):
    """The same on a GPU, compiled (tl.fma is an fma.rn.f32 there), against the CUDA kernels."""
    require_backend("triton")
    require_backend("cuda")
    ours, kw = _update_bits_problem(dtype, single_pass, device="cuda")
    theirs = clone_problem(ours)
    step = "adamw_telemetry_" if single_pass else "adamw_"
    getattr(get_backend("triton"), step)(ours, **kw)
    getattr(get_backend("cuda"), step)(theirs, **kw)
    _same_update_bits(ours, theirs)


# ---------------------------------------------------------------------------------------
# Determinism, poison, cache
# ---------------------------------------------------------------------------------------
def test_telemetry_is_bitwise_repeatable(triton_backend):
    problem = make_problem(2, MANY[:60] + ((4097,),))
    grads = nonempty_grads(problem)
    first = triton_backend.telemetry(grads, torch.float64)
    second = triton_backend.telemetry(grads, torch.float64)
    assert torch.equal(first, second)
    # The fused pass gives bitwise the same partials on identical inputs too.
    a, b = clone_problem(problem), clone_problem(problem)
    scale = torch.tensor(1.0, dtype=torch.float64)
    pa = triton_backend.adamw_telemetry_(a, scale=scale, mask_nonfinite=True, partials_dtype=torch.float64)
    pb = triton_backend.adamw_telemetry_(b, scale=scale, mask_nonfinite=True, partials_dtype=torch.float64)
    assert torch.equal(pa, pb) and torch.equal(pa, first)


def test_folded_telemetry_accumulators_match_the_reference(triton_backend, monkeypatch):
    """config.Geometry.telemetry_fold > 1 (fewer float64 accumulators per thread; a tuning
    option, off by default): the rows still match the reference, both gates, and the fused
    pass still gives the telemetry pass's bits."""
    from lbw_kernels.triton_kernels import config

    _assert_geometry_option_matches_reference(triton_backend, monkeypatch, dict(telemetry_fold=4), seed=11,
                                              shapes=ODD_SIZES + ((4097,), (2 * 4096 + 3,)))
    with pytest.raises(ValueError, match="telemetry_fold"):
        config._overridden(config.GPU, "telemetry_fold=3")


def _assert_geometry_option_matches_reference(backend, monkeypatch, fields: dict, seed: int, shapes) -> None:
    """The interpreter's geometry with `fields` replaced: check_backend on `shapes` (both
    gates, against the reference), and the fused pass's rows bitwise the telemetry pass's on
    those shapes plus 30 of MANY."""
    from dataclasses import replace

    from lbw_kernels.triton_kernels import config

    monkeypatch.setattr(config, "INTERPRETER", replace(config.INTERPRETER, **fields))
    assert_no_mismatch(check_backend(backend, seed=seed, shapes=shapes))
    problem = make_problem(seed + 1, MANY[:30] + tuple(shapes))
    first = backend.telemetry(nonempty_grads(problem), torch.float64)
    fused = backend.adamw_telemetry_(clone_problem(problem), scale=torch.tensor(1.0, dtype=torch.float64),
                                     mask_nonfinite=True, partials_dtype=torch.float64)
    assert torch.equal(fused, first)


@pytest.mark.parametrize("stages", [2, 3])
def test_pipelined_loops_match_the_reference(triton_backend, monkeypatch, stages):
    """config.Geometry.num_stages > 1 (a tuning option, off by default): both passes run their
    whole blocks in a branch-free loop (blocks past them masked off) and the partial block
    after it; the rows and updates still match the reference in both gates (chunk edges,
    partial blocks, single elements, an empty tensor), and the fused pass gives the telemetry
    pass's bits. (That Triton pipelines the loop on a GPU: the cp.async count of
    tests/triton_aot.py.)"""
    from lbw_kernels.triton_kernels import config

    block, chunk = config.INTERPRETER.block, config.INTERPRETER.chunk
    _assert_geometry_option_matches_reference(triton_backend, monkeypatch, dict(num_stages=stages), seed=17,
                                              shapes=ODD_SIZES + ((chunk + block + 5,), (2 * chunk,), (block - 1,)))
    with pytest.raises(ValueError, match="num_stages"):
        config._overridden(config.GPU, "num_stages=9")


def test_single_pass_stages_reach_the_single_pass_update_alone(triton_backend, monkeypatch):
    """config.Geometry.single_pass_num_stages (0 by default: num_stages): the single_pass update
    launches pipeline their loops that deep, the exact gate's update and the telemetry pass
    keep num_stages; the results match the reference and the fused pass gives the telemetry
    pass's bits."""
    from dataclasses import replace

    from lbw_kernels.triton_kernels import config, guarded_adamw, telemetry

    seen = set()
    for module, name in ((guarded_adamw, "_UPDATE"), (telemetry, "_TELEMETRY")):
        real = getattr(module, name)

        def spy(grid, args, constexprs, options, real=real):
            seen.add((constexprs.get("TELEMETRY"), constexprs["STAGES"]))
            return real(grid, args, constexprs, options)

        monkeypatch.setattr(module, name, spy)
    block, chunk = config.INTERPRETER.block, config.INTERPRETER.chunk
    _assert_geometry_option_matches_reference(triton_backend, monkeypatch, dict(single_pass_num_stages=3), seed=19,
                                              shapes=ODD_SIZES + ((chunk + block + 5,), (block - 1,)))
    # (TELEMETRY: True for the single_pass update, False for the exact gate's, None for the telemetry pass)
    assert seen == {(True, 3), (False, 1), (None, 1)}
    assert config.pass_stages(replace(config.GPU, num_stages=2)) == 2
    assert config.pass_stages(replace(config.GPU, num_stages=2), single_pass=True) == 2
    with pytest.raises(ValueError, match="single_pass_num_stages"):
        config._overridden(config.GPU, "single_pass_num_stages=9")


def test_a_register_cap_is_passed_to_the_launches_and_changes_no_result(triton_backend, monkeypatch):
    """config.Geometry.maxnreg (a tuning option, 0 by default) reaches the single_pass update
    launches (and no other); the launches accept it and compute the same rows and updates
    as the reference (registers only: compiled for a GPU, ptxas spills what does not fit;
    bench/triton_registers.py shows the count)."""
    from dataclasses import replace

    from lbw_kernels.triton_kernels import config, guarded_adamw, telemetry

    monkeypatch.setattr(config, "INTERPRETER", replace(config.INTERPRETER, maxnreg=64))
    seen = []
    for module in (guarded_adamw, telemetry):
        real = module.pass_options

        def spy(geo, single_pass=False, real=real):
            options = real(geo, single_pass)
            seen.append((single_pass, options.get("maxnreg")))
            return options

        monkeypatch.setattr(module, "pass_options", spy)
    assert_no_mismatch(check_backend(triton_backend, seed=13, shapes=ODD_SIZES[:4] + ((4097,),)))
    assert set(seen) == {(True, 64), (False, None)}


def test_each_tensors_last_program_finishes_its_row_and_leaves_the_counters_at_zero(triton_backend):
    """The per-tensor rows are written by the program that finishes a tensor's last chunk
    (telemetry.finish_tensor), reading several iterations of chunk rows for a tensor of many
    chunks, with every counter back at 0 after each pass (the next call and CUDA-graph
    replays start from there), in both gates, bitwise the same call after call."""
    from lbw_kernels.triton_kernels.config import geometry

    ops = _ops()
    chunk, rows_per_iteration = geometry().chunk, geometry().reduce_block
    many = 2 * rows_per_iteration + 1  # chunks of one tensor: 3 iterations of the finishing loop
    shapes = ((many * chunk - 5,), (3,), (chunk + 1,))
    assert_no_mismatch(check_backend(triton_backend, seed=21, shapes=shapes))
    problem = make_problem(22, shapes)
    grads = nonempty_grads(problem)
    first = triton_backend.telemetry(grads, torch.float64)
    assert torch.equal(triton_backend.telemetry(grads, torch.float64), first)
    fused = triton_backend.adamw_telemetry_(clone_problem(problem), scale=torch.tensor(1.0, dtype=torch.float64),
                                            mask_nonfinite=True, partials_dtype=torch.float64)
    assert torch.equal(fused, first)
    layouts = [plan.telemetry if hasattr(plan, "telemetry") else plan for plan in ops.PLANS.plans()]
    assert len(layouts) >= 2 and max(int(lay.first_chunk.diff().max()) for lay in layouts if lay.n_tensors) == many
    for layout in layouts:
        assert not layout.counters.any()


def test_a_missing_chunk_is_caught_by_the_poison(triton_backend):
    """A plan whose chunk table lost a row leaves a NaN partial (the harness fails it)."""
    from lbw_kernels.triton_kernels.chunk_table import telemetry_key
    from lbw_kernels.triton_kernels.config import geometry

    ops = _ops()
    grads = [torch.randn(4097), torch.randn(3)]
    good = triton_backend.telemetry(grads, torch.float64)
    assert torch.isfinite(good).all()
    layout = ops.PLANS.get(telemetry_key(grads, geometry().chunk, grads[0].device), None)
    layout.lists[0].n_chunks -= 1  # the last chunk (of the 3-element tensor) is never launched
    try:
        bad = triton_backend.telemetry(grads, torch.float64)
    finally:
        ops.PLANS.clear()
    assert torch.isfinite(bad[0]).all() and torch.isnan(bad[1, :2]).all()
    assert worst(bad, good, *PARTIALS_TOLERANCE) is not None


def test_wrong_learning_rate_is_caught(triton_backend, monkeypatch):
    """The harness is sensitive: a 1e-4 relative error in lr fails fp32."""
    ops = _ops()
    real = ops.adamw_impl
    monkeypatch.setattr(ops, "adamw_impl", lambda groups, scale, skip, *rest: real(groups, scale * (1 + 1e-4), skip, *rest))
    failures = check_backend(triton_backend, seed=1)
    assert any("adamw_ skip=0" in f.what and "params" in f.what for f in failures)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_chunk_table_is_reused_and_rebuilt_when_storage_changes(triton_backend, gate):
    """Plans are reused while storage stays and rebuilt when it moves: per layout the update
    plan, and for the exact gate its telemetry layout (keyed by the params and grads alone, so
    that it launches before the update key reads the states: ops.exact_step_impl)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 4097, 3)]
    opt = GuardedAdamW(params, lr=1e-2, backend="triton", gate=gate)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = GuardedAdamW(ref_params, lr=1e-2, backend="reference", gate=gate)
    ops = _ops()

    def step(grads):
        for p, q, g in zip(params, ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()

    grads = [torch.randn(p.shape) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for q, g in zip(ref_params, grads):
        q.grad = g.clone()
    ref.step()
    builds = ops.PLANS.builds
    for _ in range(2):  # same grad tensors, refilled in place: no rebuild
        for p in params:
            p.grad.copy_(torch.randn(p.shape))
        for p, q in zip(params, ref_params):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert ops.PLANS.builds == builds
    per_layout = 2 if gate == "exact" else 1
    keep = params[1].grad  # hold the old storage so the new grad cannot reuse its address
    params[1].grad = None
    step([torch.randn(p.shape) for p in params])  # reallocated grads: new addresses
    assert ops.PLANS.builds == builds + per_layout
    params[2].grad = None  # a param without grad leaves the plan (and its step stays)
    ref_params[2].grad = None
    opt.step()
    ref.step()
    assert ops.PLANS.builds == builds + 2 * per_layout
    del keep
    for p, q in zip(params, ref_params):
        assert worst(p, q, *PARAM_TOLERANCES[torch.float32]) is None
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item()


def test_plan_cache_tells_layouts_of_one_kind_apart_and_evicts_the_least_recent():
    """Plans are found by kind and told apart by layout (compared, not hashed): two layouts
    of one kind are both kept, a lookup refreshes recency, and past capacity the least
    recently used plan goes (and is built again when asked for)."""
    from lbw_kernels.triton_kernels.chunk_table import PlanCache

    cache = PlanCache(capacity=3)
    built = []

    def build(name):
        return lambda: built.append(name) or name

    tel, upd = ("cpu", "telemetry", 64), ("cpu", "update", 64, ("float", 0.9))
    assert cache.get((tel, (b"a",)), build("tel-a")) == "tel-a"
    assert cache.get((upd, (b"a", b"b")), build("upd-ab")) == "upd-ab"
    assert cache.get((tel, (b"b",)), build("tel-b")) == "tel-b"  # same kind, another layout
    assert cache.get((tel, (bytes(b"a"),)), build("never")) == "tel-a"  # an equal, not identical, layout
    assert cache.get((upd, (b"a", b"c")), None) is None  # build=None: a lookup only
    assert cache.get((upd, (b"a", b"b")), build("never")) == "upd-ab"
    assert cache.get(((*upd[:3], ("float", 0.8)), (b"a", b"b")), build("upd-ab-0.8")) == "upd-ab-0.8"
    # 4 plans in a cache of 3: the least recent kind was telemetry, its least recent layout b
    assert cache.get((tel, (b"b",)), None) is None
    assert cache.get((tel, (b"a",)), build("never")) == "tel-a"
    assert built == ["tel-a", "upd-ab", "tel-b", "upd-ab-0.8"] and cache.builds == 4
    cache.clear()
    assert cache.get((tel, (b"a",)), None) is None


def test_plan_cache_evicts_the_least_recently_used_plan_of_any_kind():
    """An exact call looks up its telemetry layout, then its update plan: when the update plan
    alone is rebuilt (a state moved), the stale update plan goes, not the live telemetry layout
    (which evicting from the least recent kind would drop: that kind is looked up first in
    every call)."""
    from lbw_kernels.triton_kernels.chunk_table import PlanCache

    cache = PlanCache(capacity=3)
    tel, upd = ("cpu", "exact telemetry", 64), ("cpu", "update", 64)
    built = []

    def call(grads, states):
        for key in ((tel, (grads,)), (upd, (grads, states))):
            cache.get(key, lambda key=key: built.append(key[1]) or key[1])

    for states in (b"s1", b"s2", b"s3", b"s3"):
        call(b"g", states)
    assert built == [(b"g",), (b"g", b"s1"), (b"g", b"s2"), (b"g", b"s3")] and cache.builds == 4
    assert cache.get((upd, (b"g", b"s1")), None) is None  # the least recently used went
    assert cache.get((upd, (b"g", b"s2")), None) == (b"g", b"s2")


def test_exact_telemetry_layout_is_built_over_what_its_key_describes(triton_backend):
    """The exact gate's telemetry layout is keyed by the params' and grads' gathered layouts, so
    it is built over the gradients those determine (nonempty_grads), not over the list an
    optimizer's plan passes. A param emptied through ``.data`` after the first step: the
    optimizer's plan, keyed by the params' element counts too, is rebuilt and refuses the
    state of 5 elements it finds for the emptied param (before, the stale plan passed the
    call on, and the update's check refused it); a fresh optimizer over the same tensors then
    finds a layout of its own rows and matches the reference."""
    torch.manual_seed(0)
    a, p = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(5))
    kw = dict(lr=1e-2, gate="exact", stats_freq=1)
    stale = GuardedAdamW([a, p], backend="triton", **kw)
    a.grad, p.grad = torch.randn(3), torch.randn(5)
    stale.step()
    p.data, p.grad = torch.empty(0), torch.empty(0)
    a.grad = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"opt.state\[param_groups\[0\]\['params'\]\[1\]\]\['exp_avg'\] has "
                                         r"shape \(5,\) on cpu, its param \(0,\)"):
        stale.step()
    a_ref, p_ref = (torch.nn.Parameter(t.detach().clone()) for t in (a, p))
    a_ref.grad, p_ref.grad = a.grad.clone(), p.grad.clone()
    fresh = GuardedAdamW([a, p], backend="triton", **kw)
    ref = GuardedAdamW([a_ref, p_ref], backend="reference", **kw)
    fresh.step()
    ref.step()
    assert fresh.telemetry()["grad_ms"] == pytest.approx(ref.telemetry()["grad_ms"], rel=1e-12)
    assert worst(a, a_ref, *PARAM_TOLERANCES[torch.float32]) is None


@pytest.mark.parametrize("captured", [False, True])
def test_plans_a_cuda_graph_captured_outlive_eviction(triton_backend, captured, monkeypatch):
    """A CUDA graph replays from its plans' addresses, so plans used while the stream captures
    (simulated here on CPU) are kept when later layouts push them out of the cache; plans used
    eagerly are freed on eviction (nothing else holds them)."""
    import gc
    import weakref

    ops = _ops()
    ops.PLANS.clear()
    monkeypatch.setattr(ops.PLANS, "kept", [])
    real = ops.stream_is_capturing
    capturing = [False]
    monkeypatch.setattr(ops, "stream_is_capturing", lambda device: capturing[0] or real(device))

    def step(n, capture=False):
        p = torch.nn.Parameter(torch.randn(n))
        opt = GuardedAdamW([p], lr=1e-2, backend="triton", gate="exact", stats_freq=1)
        p.grad = torch.randn(n)
        opt.step()
        capturing[0] = capture  # a capture after the eager warm-up step, as CUDA graphs need
        opt.step()
        capturing[0] = False
        return opt, p

    first = step(5, captured)  # (held: its tensors' memory cannot be reused by the layouts below)
    plans = [weakref.ref(plan) for plan in ops.PLANS.plans()]
    assert len(plans) == 2  # the exact gate's telemetry layout and update plan
    others = [step(6 + i) for i in range(ops.PLANS.capacity)]  # each builds 2 plans: evicts the first
    gc.collect()
    assert all(alive() is not None for alive in plans) == captured
    assert len(ops.PLANS.kept) == (2 if captured else 0)
    del first, others


def test_every_tensor_of_a_plan_is_found_for_record_stream(triton_backend):
    """stream_use.held_tensors walks a plan into its nested layouts and lists: each tensor a
    cached plan holds (tables, workspaces, the dense buffers of gradients that are not dense)
    is one a step on another stream must record_stream, or eviction frees it under that
    stream. On CPU the plans carry no StreamUse (nothing to order)."""
    from lbw_kernels.triton_kernels.chunk_table import TelemetryLayout, UpdatePlan
    from lbw_kernels.stream_use import held_tensors

    ops = _ops()
    ops.PLANS.clear()
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((5, 3), (7,), (4,))]
    opt = GuardedAdamW(params, lr=1e-2, backend="triton", gate="exact", stats_freq=1)
    params[0].grad = torch.randn(5, 1).expand(5, 3)  # not dense: read through a staged buffer
    params[1].grad, params[2].grad = torch.randn(7), torch.randn(4)
    opt.step()
    plans = ops.PLANS.plans()
    update = next(p for p in plans if isinstance(p, UpdatePlan))
    layout = next(p for p in plans if isinstance(p, TelemetryLayout))
    assert layout.staged, "the expanded gradient should be staged"
    want = [update.tensors, update.hyper, update.lr_ptrs, update.coefs, *(c.table for c in update.updates),
            update.telemetry.workspace, update.telemetry.counters, update.telemetry.first_chunk,
            layout.workspace, layout.counters, layout.first_chunk, *(c.table for c in layout.lists),
            *(buffer for _, buffer in layout.staged)]
    found = {id(t) for plan in plans for t in held_tensors(plan)}
    assert all(id(t) in found for t in want)
    assert all(plan.stream_use is None for plan in plans)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_plans_are_keyed_with_the_layouts_the_optimizer_gathered(triton_backend, gate, monkeypatch):
    """With the C++ extension, the optimizer gathers each group's params and grads with their
    layout (GroupTensors.layout_key): a steady-state step then reads only the AdamW states'
    layouts for the plan key (3 lists a group, not 5, and none for the exact gate's telemetry)."""
    from lbw_kernels.backends import availability
    from lbw_kernels.triton_kernels import chunk_table

    if availability()["cpp"] is not None:
        pytest.skip("the layouts are gathered by the C++ extension")
    read = []
    real = chunk_table.layout_key
    monkeypatch.setattr(chunk_table, "layout_key", lambda ts: read.append(len(ts)) or real(ts))
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 4097, 3)]
    opt = GuardedAdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], lr=1e-2, backend="triton",
                       gate=gate, stats_freq=1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        read.clear()
        opt.step()
    assert read == [2, 2, 2, 1, 1, 1]  # exp_avgs, exp_avg_sqs, steps of each group


def test_exact_gate_launches_telemetry_before_reading_the_states(triton_backend, monkeypatch):
    """With the layouts gathered by the C++ extension, the exact call launches its telemetry
    pass before the update plan's key reads the AdamW states' addresses (3 walks per group),
    so that host work overlaps the device reading the gradients (ops.exact_step_impl)."""
    from lbw_kernels.backends import availability
    from lbw_kernels.triton_kernels import telemetry

    if availability()["cpp"] is not None:
        pytest.skip("the layouts are gathered by the C++ extension")
    ops = _ops()
    events = []
    real_key, real_launch = ops.update_key, telemetry.telemetry_chunks_
    monkeypatch.setattr(ops, "update_key", lambda *a: events.append("update key") or real_key(*a))
    monkeypatch.setattr(telemetry, "telemetry_chunks_", lambda *a: events.append("telemetry") or real_launch(*a))
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 4097)]
    opt = GuardedAdamW(params, lr=1e-2, backend="triton", gate="exact", stats_freq=1)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        events.clear()
        opt.step()
        assert events == ["telemetry", "update key"]


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("keys", ["as installed", "python"])
def test_plan_follows_swapped_params_and_state_and_holds_nothing_alive(triton_backend, keys, gate, monkeypatch):
    """Swapped param or state storage (``.data = ...``: state offload) and loaded state rebuild
    the plan even when the grads stay put, and the cache keeps no dropped optimizer's tensors
    alive; with the cache keys read by the C++ extension (when built) and by Python."""
    import gc
    import weakref

    from lbw_kernels.triton_kernels import chunk_table

    from lbw_kernels import optimizer, step_plan

    if keys == "python":  # as without the extension: the optimizer gathers no layouts either
        monkeypatch.setattr(chunk_table, "layout_key", chunk_table._layout_key_python)
        monkeypatch.setattr(optimizer, "gather_grads", step_plan._gather_grads_python)

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (7, 4097)]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = GuardedAdamW(params, lr=1e-2, backend="triton", gate=gate, stats_freq=1)
    ref = GuardedAdamW(ref_params, lr=1e-2, backend="reference", gate=gate, stats_freq=1)
    ops = _ops()

    def step():  # the same grad tensors every call, refilled: only what the test changes moves
        for p, q in zip(params, ref_params):
            if p.grad is None:
                p.grad = torch.empty(p.shape)
            p.grad.copy_(torch.randn(p.shape))
            q.grad = p.grad.clone()
        opt.step()
        ref.step()

    step()
    step()
    builds = ops.PLANS.builds
    keep = params[0].data
    params[0].data = params[0].data.clone()  # new storage, same Parameter object
    step()
    # The exact gate's telemetry layout is keyed by the layouts the optimizer gathered in C++,
    # params included, when it did (else by the grads alone, which did not move).
    gathered = keys == "as installed" and step_plan.gather_grads is not step_plan._gather_grads_python
    builds += 2 if gate == "exact" and gathered else 1
    assert ops.PLANS.builds == builds
    state = opt.state[params[1]]
    keep_state = state["exp_avg_sq"].data
    state["exp_avg_sq"].data = state["exp_avg_sq"].data.clone()  # offloaded and back: the update plan alone
    step()
    assert ops.PLANS.builds == builds + 1
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)  # fresh state tensors: the old addresses are gone
    ref.load_state_dict(copy.deepcopy(ref.state_dict()))
    step()
    assert ops.PLANS.builds == builds + 2
    for p, q in zip(params, ref_params):
        assert worst(p, q, *PARAM_TOLERANCES[torch.float32]) is None
    del keep, keep_state

    alive = weakref.ref(opt.state[params[1]]["exp_avg"])
    del opt, saved
    gc.collect()
    assert alive() is None


# ---------------------------------------------------------------------------------------
# Optimizer level: GuardedAdamW(backend="triton") vs backend="reference"
# ---------------------------------------------------------------------------------------
def _stream_run(gate, backend, stream, shapes, dtype, lr):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).to(dtype)) for s in shapes]
    groups = [{"params": params[::2]}, {"params": params[1::2], "lr": lr * 0.5, "weight_decay": 0.0, "betas": (0.8, 0.99)}]
    opt = GuardedAdamW(groups, lr=lr, backend=backend, gate=gate, stats_freq=1, weight_decay=0.05)
    trajectory = []
    for grads in stream:
        for p, g in zip(params, grads):
            p.grad = g.to(dtype).clone()
        opt.step()
        t = opt.telemetry()
        trajectory.append((t["scale"], t["regime"], t["skipped_steps"]))
    return params, trajectory


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_optimizer_matches_reference_on_a_scripted_stream(triton_backend, gate):
    shapes = [(7,), (4097,), (3,), (0,), (33, 5)]
    stream = random_stream(12, shapes, seed=3, spikes=(4, 9), flips=(6, 7), nan_at=(8,))
    got_p, got_t = _stream_run(gate, "triton", stream, shapes, torch.float32, 0.05)
    want_p, want_t = _stream_run(gate, "reference", stream, shapes, torch.float32, 0.05)
    assert [r for _, r, _ in got_t] == [r for _, r, _ in want_t]
    assert {r for _, r, _ in want_t} >= {"spike", "oscillation", "nonfinite"}, want_t
    for (gs, _, gk), (ws, _, wk) in zip(got_t, want_t):
        assert abs(gs - ws) <= 1e-12 and gk == wk
    for a, b in zip(got_p, want_p):
        # 12 steps of rounding differences, each within one step's tolerance.
        assert worst(a, b, *(12 * x for x in PARAM_TOLERANCES[torch.float32])) is None


def test_optimizer_bf16_params_and_tensor_lr(triton_backend):
    """bf16 params (fp32 states), lr a 0-dim tensor changed in place between calls."""
    shapes = [(5,), (2049,)]
    stream = random_stream(4, shapes, seed=9)
    out = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in shapes]
        lr = torch.tensor(0.01, dtype=torch.float64)
        opt = GuardedAdamW(params, lr=lr, backend=backend, stats_freq=1)
        for k, grads in enumerate(stream):
            lr.fill_(0.01 / (k + 1))
            for p, g in zip(params, grads):
                p.grad = g.to(torch.bfloat16)
            opt.step()
        out[backend] = params
    for a, b in zip(out["triton"], out["reference"]):
        assert worst(a, b, *(2 * x for x in PARAM_TOLERANCES[torch.bfloat16])) is None


def _layouts_run(backend, gate, make_grads, steps=3):
    """Params in several memory layouts (channels_last, a transpose, a param sliced with a
    step), grads from ``make_grads(step, params)``; params after ``steps`` calls."""
    torch.manual_seed(4)
    base = torch.randn(8, 10)
    params = [
        torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)),
        torch.nn.Parameter(torch.randn(6, 7).t()),  # strides (1, 7)
        torch.nn.Parameter(base[:, ::2]),  # not dense: the reference updates it
        torch.nn.Parameter(torch.randn(1, 6)),
    ]
    opt = GuardedAdamW(params, lr=0.05, backend=backend, gate=gate, stats_freq=1)
    for k in range(steps):
        for q, g in zip(params, make_grads(k, params)):
            q.grad = g
        opt.step()
    return [q.detach().clone() for q in params], opt.telemetry()


def _grads_like(k, params):
    """Grads in their params' layouts (empty_like keeps a dense layout, and gives a contiguous
    grad for the param that is not dense)."""
    gen = torch.Generator().manual_seed(k)
    return [torch.empty_like(q).copy_(torch.randn(q.shape, generator=gen)) for q in params]


def _grads_of_other_strides(k, params):
    """Contiguous grads (other strides than the permuted params'), and a (1, 6) grad of
    strides (1, 1) for the (1, 6) param of strides (6, 1): the same order."""
    gen = torch.Generator().manual_seed(k)
    grads = [torch.randn(q.shape, generator=gen) for q in params]
    grads[3] = torch.randn(6, 1, generator=gen).t()
    return grads


def _grads_not_dense(k, params):
    """Grads torch allows but no kernel can walk as flat arrays: an expanded one (strides 0), a
    slice with a step of a larger buffer, a slice of a transposed buffer with gaps."""
    gen = torch.Generator().manual_seed(k)
    grads = [torch.randn(q.shape, generator=gen) for q in params]
    grads[0] = torch.randn(1, generator=gen).expand(params[0].shape)
    grads[1] = torch.randn(7, 12, generator=gen)[:, ::2]
    grads[3] = torch.randn(3, 6, generator=gen)[1:2]  # (dense after all: one row)
    grads[2] = torch.randn(10, 16, generator=gen).t()[::2, ::2]
    return grads


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("make_grads", [_grads_like, _grads_of_other_strides, _grads_not_dense])
def test_params_and_grads_in_any_memory_layout_match_the_reference(triton_backend, gate, make_grads):
    """Dense params of one order with their grads and states go to the kernels; a param whose
    tensors differ in order (or are not dense) to the reference; plans are keyed by strides,
    so a grad of other strides at a known address rebuilds instead of pairing wrong elements."""
    got, got_t = _layouts_run("triton", gate, make_grads)
    want, want_t = _layouts_run("reference", gate, make_grads)
    assert got_t["regime"] == want_t["regime"] and abs(got_t["scale"] - want_t["scale"]) <= 1e-12
    for a, b in zip(got, want):
        assert worst(a, b, *(3 * x for x in PARAM_TOLERANCES[torch.float32])) is None


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_grads_that_are_not_dense_are_read_through_a_buffer_refilled_each_call(triton_backend, gate):
    """A grad kept at one address with gaps between its elements (a slice with a step of a
    buffer the training loop refills): the plan is built once, and each call copies the grad
    into the plan's dense buffer before the telemetry pass reads it (stale values there would
    give the first call's telemetry on every call); the update goes to the reference."""
    ops = _ops()
    out = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(9)
        params = [torch.nn.Parameter(torch.randn(5, 6)), torch.nn.Parameter(torch.randn(33))]
        opt = GuardedAdamW(params, lr=0.05, backend=backend, gate=gate, stats_freq=1)
        storage = torch.empty(5, 12)
        params[0].grad, params[1].grad = storage[:, ::2], torch.empty(33)
        builds, telemetry = None, []
        for k in range(4):
            storage.copy_(torch.randn(5, 12) * (1 + 3 * (k == 2)))  # a spike on call 3
            params[1].grad.copy_(torch.randn(33))
            opt.step()
            telemetry.append(opt.telemetry())
            builds = ops.PLANS.builds if builds is None else builds
        if backend == "triton":
            assert ops.PLANS.builds == builds  # (built on call 1, found since)
        out[backend] = [q.detach().clone() for q in params], telemetry
    for a, b in zip(out["triton"][0], out["reference"][0]):
        assert worst(a, b, *(2 * x for x in PARAM_TOLERANCES[torch.float32])) is None
    for t, r in zip(out["triton"][1], out["reference"][1]):
        # (the reference sums in the gradients' fp32, the kernel in float64; a stale buffer
        # would be off by the call's own values, a factor up to 16 here)
        assert t["regime"] == r["regime"] and t["grad_ms"] == pytest.approx(r["grad_ms"], rel=1e-6)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_param_whose_tensors_all_have_gaps_goes_to_the_reference(triton_backend, gate):
    """p, grad, exp_avg and exp_avg_sq all every other column of larger buffers: one element
    order for all four (none), which is no order a kernel can walk as a flat array. The update
    goes to the reference: the gaps (other tensors' memory) stay as they were, NaN here."""
    out = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(11)
        base, grad_base = torch.full((6, 10), float("nan")), torch.full((6, 10), float("nan"))
        base[:, ::2] = torch.randn(6, 5)
        q = torch.nn.Parameter(base[:, ::2])
        opt = GuardedAdamW([q], lr=0.05, backend=backend, gate=gate, stats_freq=1)
        states = [torch.full((6, 10), float("nan")) for _ in range(2)]
        for k in range(3):
            grad_base[:, ::2] = torch.randn(6, 5)
            q.grad = grad_base[:, ::2]
            opt.step()
            if k == 0:  # states moved (through .data) to views with gaps too
                for key, buf in zip(("exp_avg", "exp_avg_sq"), states):
                    buf[:, ::2] = opt.state[q][key]
                    opt.state[q][key].data = buf[:, ::2]
        for t in (base, grad_base, *states):
            assert t[:, 1::2].isnan().all()
        out[backend] = q.detach().clone()
    assert worst(out["triton"], out["reference"], *(2 * x for x in PARAM_TOLERANCES[torch.float32])) is None


def test_grad_buffer_reused_with_other_strides_rebuilds_the_plan(triton_backend):
    """One buffer as the grad: in the param's order on call 1 (the kernels update it), then
    viewed transposed on call 2, same address and numel: without the strides in the key the
    cached plan would pair p[i] with another element's gradient."""
    out = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(5)
        q = torch.nn.Parameter(torch.randn(4, 6))
        opt = GuardedAdamW([q], lr=0.05, backend=backend, stats_freq=1, auto_enabled=False)
        buf = torch.randn(24)
        q.grad = buf.view(4, 6)
        opt.step()
        buf.copy_(torch.randn(24))
        q.grad = buf.view(6, 4).t()  # strides (1, 4)
        opt.step()
        out[backend] = q.detach().clone()
    assert worst(out["triton"], out["reference"], *(2 * x for x in PARAM_TOLERANCES[torch.float32])) is None


def _views_off_16_bytes(backend, gate, dtype, device="cpu", steps=3):
    """Params and grads 0-2 as views into flat buffers one element in (not 16-byte aligned, as
    params of a flat-buffer optimizer can be), params 3-4 allocated on their own (aligned)."""
    torch.manual_seed(8)
    sizes = (5, 4097, 3)
    flat = torch.randn(1 + sum(sizes)).to(device, dtype)
    flat_grad = torch.empty_like(flat)
    offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    params = [torch.nn.Parameter(flat[o:o + n]) for o, n in zip(offsets, sizes)]
    params += [torch.nn.Parameter(torch.randn(n).to(device, dtype)) for n in (4100, 7)]
    opt = GuardedAdamW(params, lr=0.05, backend=backend, gate=gate, stats_freq=1)
    for k in range(steps):
        flat_grad.copy_(torch.randn(flat.shape) * (1 + k))
        for i, p in enumerate(params):
            p.grad = (flat_grad[offsets[i]:offsets[i] + sizes[i]] if i < len(sizes)
                      else torch.randn(p.shape).to(device, dtype))
        opt.step()
    return [p.detach().clone() for p in params], opt.telemetry()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_tensors_off_16_bytes_get_their_own_scalar_launch(triton_backend, gate, dtype):
    """A param or grad not 16-byte aligned goes into a chunk list of its own (scalar access);
    the aligned tensors of its dtype keep theirs (vector access), and both match the reference."""
    ops = _ops()
    ops.PLANS.clear()
    got, got_t = _views_off_16_bytes("triton", gate, dtype)
    want, want_t = _views_off_16_bytes("reference", gate, dtype)
    assert got_t["regime"] == want_t["regime"] and abs(got_t["scale"] - want_t["scale"]) <= 1e-9
    for a, b in zip(got, want):
        assert worst(a, b, *(3 * x for x in PARAM_TOLERANCES[dtype])) is None
    plans = ops.PLANS.plans()
    lists = [plan.updates for plan in plans if hasattr(plan, "updates")]
    lists += [plan.lists for plan in plans if hasattr(plan, "lists")]  # the exact gate's telemetry
    for chunk_lists in lists:
        assert sorted(lst.aligned for lst in chunk_lists) == [False, True]


def test_changing_float_lr_is_seen(triton_backend):
    p = torch.nn.Parameter(torch.ones(10))
    opt = GuardedAdamW([p], lr=0.1, weight_decay=0.0, backend="triton", auto_enabled=False)
    p.grad = torch.ones(10)
    opt.step()
    after_one = p.detach().clone()
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.ones(10)
    opt.step()
    assert torch.equal(p.detach(), after_one)
    assert abs(after_one[0].item() - 0.9) < 1e-6


@pytest.mark.parametrize("name", ["betas", "eps", "weight_decay", "lr"])
def test_tensor_hyperparameters_edited_in_place_are_seen(triton_backend, name):
    """One-element tensors as betas / eps / weight_decay / lr (torch.optim takes them), edited
    in place at call 3 while the grad buffers stay the same (the plan is not rebuilt): the
    kernels read the new value as the reference does, not the one the plan was built with."""
    out = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(6)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 4097, 3)]
        hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
        hyper[name] = (torch.tensor(0.9), torch.tensor(0.999)) if name == "betas" else torch.tensor(hyper[name])
        opt = GuardedAdamW(params, backend=backend, stats_freq=1, **hyper)
        buffers = [torch.randn(p.shape) for p in params]
        for k in range(4):
            for p, g in zip(params, buffers):
                g.copy_(torch.randn(p.shape) * (1 + k))
                p.grad = g
            if k == 2:
                edited = opt.param_groups[0][name]
                (edited[0] if name == "betas" else edited).fill_(0.5)
            opt.step()
        out[backend] = params
    for a, b in zip(out["triton"], out["reference"]):
        assert worst(a, b, *(4 * x for x in PARAM_TOLERANCES[torch.float32])) is None


def test_cpu_tensor_hyperparameters_of_gpu_params_are_read_on_the_host(triton_backend):
    """With GPU params a CPU-tensor hyper-parameter is read on the host each call (no sync, and
    no pageable copy, which a CUDA graph capture refuses), as a float is: not in the plan's key
    (refresh_hyper writes its value when it changed), so an in-place edit rebuilds nothing.
    With CPU params the same tensor is on the plan's device: keyed by address and copied on
    the device each call. (Keys only: no GPU here.)"""
    from lbw_kernels.triton_kernels.chunk_table import read_on_host, update_key

    tensors = [[torch.randn(3)] for _ in range(4)] + [[torch.zeros(())]]  # p, g, m, v, step
    lr, beta1 = torch.tensor(1e-3, dtype=torch.float64), torch.tensor(0.9)

    def key(device):
        group = GroupTensors(*tensors, lr, beta1, 0.999, 1e-8, 0.0, False)
        return update_key([group], 4096, torch.device(device))[0]

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert read_on_host(beta1, cuda) and not read_on_host(beta1, cpu) and read_on_host(0.9, cpu)
    before = {d: key(d) for d in ("cuda", "cpu")}
    beta1.fill_(0.5)
    assert key("cuda") == before["cuda"]  # read on the host: refresh_hyper writes the new value
    assert key("cpu") == before["cpu"]  # keyed by address; refresh_hyper copies the new value
    assert key("cuda")[3][:2] == ("host", "host") and key("cpu")[3][1][0] == "tensor"


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_scheduled_float_hyperparameters_are_written_not_rebuilt(triton_backend, gate):
    """lr, betas, eps and weight_decay given as floats and changed every call (OneCycleLR cycles
    beta1 with the lr on every step; a weight-decay schedule): the plan is built once and its
    hyper table rewritten where a value changed (refresh_hyper), where every change used to
    build and upload a new plan and push other optimizers' plans out of the cache; each call
    updates with its own values, as the reference does."""
    ops = _ops()
    out = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(12)
        params = [torch.nn.Parameter(torch.randn(n)) for n in (33, 5)]
        opt = GuardedAdamW(params, lr=1e-2, backend=backend, gate=gate, stats_freq=1)
        for p in params:
            p.grad = torch.zeros_like(p)
        builds = []
        for k in range(5):
            group = opt.param_groups[0]
            group["lr"], group["betas"] = 1e-2 * (1 + k), (0.95 - 0.05 * k, 0.99 + 0.001 * k)
            group["eps"], group["weight_decay"] = 1e-8 * 10 ** k, 0.01 * k
            for p in params:
                p.grad.copy_(torch.randn(p.shape))
            opt.step()
            builds.append(ops.PLANS.builds)
        out[backend] = ([p.detach().clone() for p in params], builds)
    (got, builds), (want, _) = out["triton"], out["reference"]
    assert builds[1:] == [builds[0]] * 4, builds  # (the first call builds what it needs)
    for a, b in zip(got, want):
        assert worst(a, b, *PARAM_TOLERANCES[torch.float32]) is None


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_delegated_params_state_reshaped_through_data_is_refused_before_any_write(triton_backend, gate):
    """An fp64 param (updated by the reference, delegated) whose exp_avg is reshaped in place
    through ``.data`` keeps its address, numel and dtype, so the update plan is found again:
    its states are checked every call before the kernels write, so the call is refused whole
    (the reference's foreach ops used to refuse it after the fp32 param was updated)."""
    a = torch.nn.Parameter(torch.randn(4, 6))
    b = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    opt = GuardedAdamW([a, b], lr=1e-2, backend="triton", gate=gate, stats_freq=1)
    a.grad, b.grad = torch.randn(4, 6), torch.randn(4, 6, dtype=torch.float64)
    opt.step()
    opt.state[b]["exp_avg"].data = opt.state[b]["exp_avg"].data.view(24)
    before = [t.clone() for t in (a, b, opt.state[a]["step"], opt.state[a]["exp_avg"], opt._guard)]
    with pytest.raises(ValueError, match=r"\['exp_avg'\] has shape \(24,\) on cpu, its param \(4, 6\)"):
        opt.step()
    after = (a, b, opt.state[a]["step"], opt.state[a]["exp_avg"], opt._guard)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_an_update_plan_refuses_a_tensor_on_another_device(triton_backend):
    """A param moved through ``.data`` with its states (an offload library's way) keeps its
    Parameter, so the optimizer's device check, made on the first param, does not see it: the
    plan's build names it rather than hand another device's addresses to a launch. (A meta
    tensor stands in for the other device.)"""
    from lbw_kernels.triton_kernels.chunk_table import build_update

    tensors = [[torch.randn(3), torch.randn(4, device="meta")] for _ in range(4)]  # p, g, m, v
    tensors.append([torch.zeros(()), torch.zeros((), device="meta")])  # steps: the second param's moved too
    group = GroupTensors(*tensors, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match=r"group 0 param 1: its param is on meta, the step's params on cpu"):
        build_update([group], 4096, torch.device("cpu"))


def test_plans_first_needed_during_a_capture_are_kept_for_it_not_cached(triton_backend, monkeypatch):
    """A step captured into a CUDA graph with no eager step before it (simulated on CPU) builds
    its plans inside the capture, where their uploads are only recorded: they are kept for the
    graph but not cached, so the next eager call builds its own instead of launching from
    tables the device has not filled yet."""
    ops = _ops()
    ops.PLANS.clear()
    monkeypatch.setattr(ops.PLANS, "kept", [])
    capturing = [True]
    monkeypatch.setattr(ops, "stream_is_capturing", lambda device: capturing[0])
    p = torch.nn.Parameter(torch.randn(7))
    opt = GuardedAdamW([p], lr=1e-2, backend="triton", gate="exact", stats_freq=1)
    p.grad = torch.randn(7)
    builds = ops.PLANS.builds
    opt.step()
    assert ops.PLANS.plans() == [] and len(ops.PLANS.kept) == 2
    capturing[0] = False
    opt.step()
    cached = ops.PLANS.plans()
    assert ops.PLANS.builds == builds + 2 and len(cached) == 2  # (builds counts the cache's own)
    assert not any(plan is kept for plan in cached for kept in ops.PLANS.kept)


def test_a_build_that_fails_during_a_capture_says_to_step_eagerly_first(triton_backend, monkeypatch):
    ops = _ops()
    ops.PLANS.clear()

    def refuse(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ops, "build_update", refuse)
    p = torch.nn.Parameter(torch.randn(7))
    opt = GuardedAdamW([p], lr=1e-2, backend="triton", gate="single_pass")
    p.grad = torch.randn(7)
    with pytest.raises(RuntimeError, match="not permitted"):  # eagerly: the error as it is
        opt.step()
    monkeypatch.setattr(ops, "stream_is_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="run one step\\(\\) eagerly with the same params and grads"):
        opt.step()


def test_eager_calls_after_a_capture_rewrite_an_unchanged_lr(triton_backend, monkeypatch):
    """A graph's replays write the lr of capture time into the plan's hyper table: an eager call
    after a capture writes its lr even when it equals the last one it wrote (simulated on CPU:
    a replay's write is a write of another value into the slot)."""
    from lbw_kernels.triton_kernels.chunk_table import LR

    ops = _ops()
    ops.PLANS.clear()
    monkeypatch.setattr(ops.PLANS, "kept", [])
    out = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(7)
        p = torch.nn.Parameter(torch.randn(9))
        opt = GuardedAdamW([p], lr=1e-2, backend=backend, stats_freq=1, auto_enabled=False)
        p.grad = torch.randn(9)
        opt.step()  # eager warm-up
        if backend == "triton":
            capturing = [True]
            monkeypatch.setattr(ops, "stream_is_capturing", lambda device: capturing[0])
            opt.step()  # "captured"
            capturing[0] = False
            plan, = [plan for plan in ops.PLANS.plans() if hasattr(plan, "hyper")]
            plan.hyper[0, LR] = 0.5  # a replay of a graph captured with lr=0.5
        else:
            opt.step()
        opt.step()  # eager, lr unchanged at 1e-2
        out[backend] = p.detach().clone()
    assert worst(out["triton"], out["reference"], *(3 * x for x in PARAM_TOLERANCES[torch.float32])) is None


# ---------------------------------------------------------------------------------------
# torch.library custom ops (what torch.compile sees)
# ---------------------------------------------------------------------------------------
def test_custom_ops_pass_opcheck(triton_backend):
    ops = _ops()
    problem = make_problem(6, ((5,), (3,), (0,)), n_groups=1)
    args = ops.flatten(problem)
    scale = torch.tensor(0.9, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.lbw_triton.adamw_telemetry_.default,
        (), dict(args, scale=scale, mask_nonfinite=True, partials_dtype=torch.float64),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.lbw_triton.adamw_.default, (), dict(args, scale=scale, skip=torch.tensor(0.0, dtype=torch.float64)),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.lbw_triton.telemetry.default, (nonempty_grads(problem), torch.float64),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_compiled_step_calls_the_custom_ops_and_matches_eager(triton_backend, gate):
    """torch.compile sees the launches as lbw_triton ops (declared mutations), and the compiled
    step (aot_eager: functionalised, no C++ compiler needed) updates like the eager one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(4, 8)
    seen = set()

    def spy(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    opt = GuardedAdamW(model.parameters(), lr=1e-2, backend="triton", gate=gate, stats_freq=1)
    twin_opt = GuardedAdamW(twin.parameters(), lr=1e-2, backend="triton", gate=gate, stats_freq=1)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=spy)
    for _ in range(2):
        for m, s in ((model, step), (twin, twin_opt.step)):
            m.zero_grad()
            m(x).square().mean().backward()
            s()
    want = {"exact": {"lbw_triton.telemetry", "lbw_triton.adamw_"}, "single_pass": {"lbw_triton.adamw_telemetry_"}}
    assert want[gate] <= {s.split(".default")[0] for s in seen}, seen
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_compiled_step_reads_tensor_hyperparameters_without_a_graph_break(triton_backend):
    """Tensor lr, betas and weight_decay reach the custom op as tensors (a float() of one would
    break the graph, and sync on a GPU); edited in place between compiled calls, they are seen."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    twin = copy.deepcopy(model)
    x = torch.randn(4, 8)

    def hyper():
        return dict(lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.999)),
                    weight_decay=torch.tensor(0.1))

    opt = GuardedAdamW(model.parameters(), backend="triton", gate="exact", stats_freq=1, **hyper())
    twin_opt = GuardedAdamW(twin.parameters(), backend="reference", gate="exact", stats_freq=1, **hyper())
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(opt.step, backend="aot_eager")
    for k in range(4):
        if k == 2:
            for o in (opt, twin_opt):
                o.param_groups[0]["betas"][0].fill_(0.5)
                o.param_groups[0]["weight_decay"].fill_(0.3)
        for m, s in ((model, step), (twin, twin_opt.step)):
            m.zero_grad()
            m(x).square().mean().backward()
            s()
    breaks = [reason for reason in counters["graph_break"] if "float" in reason or "item" in reason]
    assert not breaks, breaks
    for a, b in zip(model.parameters(), twin.parameters()):
        assert worst(a, b, *(4 * x for x in PARAM_TOLERANCES[torch.float32])) is None


def test_every_kernel_variant_compiles_for_sm80_and_sm90_with_vector_access():
    """Without a GPU: every specialisation the backend launches (tests/triton_aot.py) compiles
    for sm_80 and sm_90 with the GPU geometry (triton ships ptxas), and the fp32 single_pass
    update has no fused multiply-adds but its own and moves 16 bytes per access: 8 fp32 per thread = 2 vector loads for each of p, g, m, v
    and 2 vector stores for each of p, m, v; with num_stages=3 its loads are 16-byte cp.async
    copies (Triton pipelined the loop: the option does what it says)."""
    import subprocess
    import sys

    from triton_aot import variants

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    run = subprocess.run([sys.executable, script, "80", "90"], env=env, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("no ptxas")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert sum(line.startswith("compiled ") for line in lines) == 2 * len(list(variants())) >= 40
    loads, stores = map(int, lines[-1].split()[-2:])
    assert lines[-1].startswith("vector-access") and (loads, stores) == (8, 6)
    # No contraction: the PTX's fmas are the update's own tl.fma calls, 3 per element (lerp's
    # two branches, computed and selected, and addcmul's) of the 8 each thread holds, in both
    # copies of the block (the whole blocks' and the partial one's): 3 x 8 x 2
    assert lines[-2] == "fma-instructions 48"
    assert lines[-3].startswith("pipelined-loads") and int(lines[-3].split()[-1]) >= 8  # 2 per stream and stage


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------
def _model(device, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)).to(device, dtype)


@pytest.mark.gpu
def test_gpu_verify_backend():
    assert_no_mismatch(verify_backend(get_backend("triton"), device="cuda"))


@pytest.mark.gpu
def test_gpu_rows_finished_by_each_tensors_last_program_are_the_same_bits_every_call():
    """On the GPU the programs of a tensor finish in any order: whichever counts last sums the
    chunk rows the others wrote (integer atomic, acquire/release; telemetry.finish_tensor).
    A row read before its writer's store landed would change the bits from call to call or
    leave the reference's tolerance: 40 calls of each pass over a 97-chunk tensor and 300
    small ones, against the reference on float64 copies, the fused pass's rows equal to the
    telemetry pass's, every counter back at 0."""
    from lbw_kernels.triton_kernels.config import geometry

    ops = _ops()
    chunk = geometry().chunk
    torch.manual_seed(5)
    grads = [torch.randn(97 * chunk - 11, device="cuda")] + [torch.randn(s, device="cuda") for s in MANY]
    want = ReferenceBackend().telemetry([g.double() for g in grads], torch.float64)
    first = get_backend("triton").telemetry(grads, torch.float64)
    assert worst(first, want, *PARTIALS_TOLERANCE) is None
    problem = [GroupTensors([torch.zeros_like(g) for g in grads], grads, [torch.zeros_like(g) for g in grads],
                            [torch.zeros_like(g) for g in grads], [torch.zeros((), device="cuda") for _ in grads],
                            1e-3, 0.9, 0.999, 1e-8, 0.0, False)]
    scale = torch.ones((), dtype=torch.float64, device="cuda")
    for _ in range(40):
        assert torch.equal(get_backend("triton").telemetry(grads, torch.float64), first)
        fused = get_backend("triton").adamw_telemetry_(problem, scale=scale, mask_nonfinite=True,
                                                       partials_dtype=torch.float64)
        assert torch.equal(fused, first)
    for plan in ops.PLANS.plans():
        assert not (plan.telemetry if hasattr(plan, "telemetry") else plan).counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [e.split(":", 1)[1] for e in device_check_candidates() if e.startswith("triton:")])
def test_gpu_candidate_geometries_match_reference(spec, monkeypatch):
    """Every Triton geometry device_check times computes the same thing (its timings are
    only worth comparing then): both gates against the reference across chunk edges, a
    planted Inf mid-tensor, and the fused pass's rows bitwise the telemetry pass's."""
    from lbw_kernels.triton_kernels.config import geometry

    monkeypatch.setenv("LBW_TRITON_GEOMETRY", spec)
    backend = get_backend("triton")
    chunk = geometry().chunk
    shapes = ((2 * chunk + 9,), (chunk,), (chunk - 1,), (1,), (0,), (3 * chunk // 2 + 4,))
    assert_no_mismatch(check_backend(backend, seed=6, shapes=shapes, device="cuda"))
    assert_no_mismatch(check_backend(backend, seed=7, shapes=shapes, device="cuda", nonfinite_at=(0, 0, float("inf"))))
    problem = make_problem(8, shapes, device="cuda")
    first = backend.telemetry(nonempty_grads(problem), torch.float64)
    fused = backend.adamw_telemetry_(clone_problem(problem), scale=torch.tensor(1.0, dtype=torch.float64, device="cuda"),
                                     mask_nonfinite=True, partials_dtype=torch.float64)
    assert torch.equal(fused, first)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_optimizer_matches_reference(gate):
    shapes = [(7,), (70001,), (3,), (0,), (333, 65)]
    stream = [[g.cuda() for g in grads] for grads in random_stream(12, shapes, seed=3, spikes=(4, 9), flips=(6, 7), nan_at=(8,))]
    out = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        opt = GuardedAdamW(params, lr=0.05, backend=backend, gate=gate, stats_freq=1)
        traj = []
        for grads in stream:
            for p, g in zip(params, grads):
                p.grad = g.float().clone()
            opt.step()
            traj.append(opt.telemetry()["regime"])
        out[backend] = (params, traj)
    assert out["triton"][1] == out["reference"][1]
    for a, b in zip(out["triton"][0], out["reference"][0]):
        assert worst(a, b, *(12 * x for x in PARAM_TOLERANCES[torch.float32])) is None


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_direct_launch_matches_the_jit_bitwise(gate, monkeypatch):
    """LBW_TRITON_DIRECT_LAUNCH=1 (triton_kernels/launch.py) launches the kernels the JIT
    compiled without the JIT: the same kernels on the same arguments, so bitwise the JIT
    route's params, states and guard, over a stream with spikes and a NaN, fp32 and bf16
    groups; every launch site used launches directly (a kept kernel found: Launcher.__call__'s
    direct branch) after its first calls; and the step still never syncs."""
    from lbw_kernels.triton_kernels import coefficients, guarded_adamw, telemetry

    class Kept(dict):
        """A site's kept kernels, counting the lookups that find one (each a direct launch)."""

        found = 0

        def get(self, key, default=None):
            hit = super().get(key, default)
            self.found += hit is not None
            return hit

    shapes = [(7,), (70001,), (3,), (333, 65)]
    stream = random_stream(8, shapes, seed=5, spikes=(3,), nan_at=(5,))
    out = {}
    for route in ("0", "1"):
        monkeypatch.setenv("LBW_TRITON_DIRECT_LAUNCH", route)
        for site in (guarded_adamw._UPDATE, telemetry._TELEMETRY, coefficients._COEFFICIENTS):
            monkeypatch.setattr(site, "compiled", Kept())
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        low = [torch.nn.Parameter(torch.randn(s, device="cuda").bfloat16()) for s in shapes[:2]]
        opt = GuardedAdamW([{"params": params}, {"params": low, "lr": 0.02}], lr=0.05, backend="triton", gate=gate,
                           stats_freq=1)
        for grads in stream:
            for p, g in zip(params, grads):
                p.grad = g.cuda().float()
            for p, g in zip(low, grads):
                p.grad = g.cuda().bfloat16()
            opt.step()
        state = [t for p in params + low for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
        out[route] = (state, opt._guard.clone())
        if route == "1":
            used = [guarded_adamw._UPDATE, coefficients._COEFFICIENTS] + ([telemetry._TELEMETRY] if gate == "exact" else [])
            assert all(site.compiled and site.compiled.found > 0 for site in used)
            assert_step_never_syncs(_model("cuda"), backend="triton", gate=gate)
    for a, b in zip(out["0"][0], out["1"][0]):
        assert torch.equal(a, b)
    torch.testing.assert_close(out["0"][1], out["1"][1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lbw", "zscore"])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_step_never_syncs(gate, policy):
    assert_step_never_syncs(_model("cuda"), backend="triton", gate=gate, policy=policy)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_step_that_rebuilds_its_plan_never_syncs(gate):
    assert_relayout_step_never_syncs(backend="triton", gate=gate)


def _tensor_hyperparameters() -> dict:
    """lr a CPU tensor (read on the host: no pageable copy to the device), betas, eps and
    weight_decay tensors on the GPU (copied into the plan on the device each call)."""
    on_gpu = lambda x: torch.tensor(x, device="cuda")  # noqa: E731
    return dict(lr=torch.tensor(1e-2), betas=(on_gpu(0.9), on_gpu(0.999)), eps=on_gpu(1e-8), weight_decay=on_gpu(0.01))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_tensors_off_16_bytes_match_reference(gate, dtype):
    got, got_t = _views_off_16_bytes("triton", gate, dtype, "cuda")
    want, want_t = _views_off_16_bytes("reference", gate, dtype, "cuda")
    assert got_t["regime"] == want_t["regime"] and abs(got_t["scale"] - want_t["scale"]) <= 1e-9
    for a, b in zip(got, want):
        assert worst(a, b, *(3 * x for x in PARAM_TOLERANCES[dtype])) is None


@pytest.mark.gpu
@pytest.mark.parametrize("name", kernel_gpu_backends())
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_step_with_tensor_hyperparameters_never_syncs(name, gate):
    """(cuda: its kernels take betas, eps and weight_decay as numbers, so a group holding GPU
    tensors there goes to the reference's ops, which read them on the device)"""
    require_backend(name)
    assert_step_never_syncs(_model("cuda"), backend=name, gate=gate, **_tensor_hyperparameters())


@pytest.mark.gpu
@pytest.mark.parametrize("name", kernel_gpu_backends())
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_captured_step_with_tensor_hyperparameters_replays_like_eager(name, gate):
    require_backend(name)
    assert_graph_replay_matches_eager(
        _model("cuda"), rtol=1e-6, atol=1e-7, backend=name, gate=gate, **_tensor_hyperparameters()
    )


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["lbw", "zscore"])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("stats_freq", [1, 3])
def test_gpu_captured_step_replays_like_eager(gate, policy, stats_freq):
    assert_graph_replay_matches_eager(
        _model("cuda"), rtol=1e-6, atol=1e-7, stats_freq=stats_freq, backend="triton", gate=gate, policy=policy
    )


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_gpu_captured_step_replays_after_its_plans_leave_the_cache(gate):
    """Other optimizers' layouts push the captured step's plans out of the cache before the
    replays: the kept plans (PlanCache.keep) still hold the memory the graph writes."""
    ops = _ops()
    assert_graph_replay_matches_eager(
        _model("cuda"), rtol=1e-6, atol=1e-7, backend="triton", gate=gate,
        after_capture=lambda: step_other_layouts(ops.PLANS.capacity + 1, backend="triton", gate=gate),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("relayout", [False, True])
def test_gpu_plans_evicted_while_a_side_stream_still_reads_them(gate, relayout):
    """Plans built on the default stream, used next by a step on a held-back side stream, then
    evicted (one more optimizer than the cache holds plans): stream_use.py keeps their memory
    from the default stream's allocations until the side stream is done with it; with
    ``relayout`` the step plan's element counts are replaced too."""
    ops = _ops()
    assert_side_stream_step_survives_eviction(ops.PLANS.capacity + 1, rtol=1e-6, atol=1e-7, relayout=relayout,
                                              backend="triton", gate=gate)


@pytest.mark.gpu
@pytest.mark.parametrize("name", kernel_gpu_backends())
def test_gpu_capturing_a_first_step_is_refused_and_makes_no_state(name):
    """A step whose params have no optimizer state cannot be captured: the states' zero fill
    would be recorded and every replay would reset AdamW's moments and step count. It raises
    inside the capture, makes no state, and an eager step after it runs as usual."""
    require_backend(name)
    model = _model("cuda")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = GuardedAdamW(model.parameters(), lr=1e-2, backend=name)
    # (step()'s eager bookkeeping is wrapped by torch._dynamo's disable, whose first use imports
    # torch._dynamo: not inside the capture, when this test runs first in its process)
    import torch._dynamo  # noqa: F401

    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="has no optimizer state yet"):
        with torch.cuda.graph(graph):
            opt.step()
    assert len(opt.state) == 0
    opt.step()
    assert opt.telemetry()["step"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", kernel_gpu_backends())
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_compiled_training_step_runs(name, gate, mode):
    """A compiled training step (forward, backward, step) matches eager. With
    mode="reduce-overhead" inductor's CUDA graph trees run warm-up calls in a private memory
    pool and may record the step's graph segments: the plans and chunk tables a first call
    builds there must keep working (a review's open question: memory of that pool handed back
    to a later recording would be tables the launches read)."""
    require_backend(name)
    model = _model("cuda")
    twin = copy.deepcopy(model)
    # (the exact gate clips: last_grad_norm's tensor, made by the first call's eager part, is
    # written by the compiled segments, recorded as CUDA graphs or not)
    clip = dict(max_grad_norm=0.5) if gate == "exact" else {}
    opt = GuardedAdamW(model.parameters(), lr=1e-2, backend=name, gate=gate, **clip)
    twin_opt = GuardedAdamW(twin.parameters(), lr=1e-2, backend=name, gate=gate, **clip)
    x = torch.randn(32, 64, device="cuda")

    def train_step(m, o):
        o.zero_grad(set_to_none=False)
        loss = m(x).square().mean()
        loss.backward()
        o.step()
        return loss

    # A fresh dynamo per case: the 8 cases share train_step's code object (and the no_grad
    # wrapper's), one cache entry each, and at dynamo's recompile limit (8) a later case would
    # silently run eagerly and compare eager with eager.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(train_step, mode=mode)
    for _ in range(6):
        compiled(model, opt)
        train_step(twin, twin_opt)
    torch.cuda.synchronize()
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])
    # (whether reduce-overhead recorded CUDA graphs for the step's segments: in the log)
    print("cudagraph_skips:", dict(counters["inductor"]).get("cudagraph_skips", 0))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert opt.telemetry()["step"] == twin_opt.telemetry()["step"] == 6
    if clip:
        assert float(opt.last_grad_norm) == pytest.approx(float(twin_opt.last_grad_norm), rel=1e-4)


def test_geometry_override_for_tuning_runs(monkeypatch):
    from lbw_kernels.triton_kernels import config

    monkeypatch.setattr(config, "interpreting", lambda: False)
    monkeypatch.setenv("LBW_TRITON_GEOMETRY", "block=1024, num_warps=4")
    geo = config.geometry()
    assert (geo.block, geo.num_warps, geo.chunk) == (1024, 4, config.GPU.chunk)
    for bad in ("block=1000", "chunk=3000", "warps=4", "block=-2", "num_warps=3", "num_warps=0", "chunk=0",
                "reduce_block=100", "tensors_per_program=3"):
        monkeypatch.setenv("LBW_TRITON_GEOMETRY", bad)
        with pytest.raises(ValueError, match="LBW_TRITON_GEOMETRY"):
            config.geometry()
    monkeypatch.setenv("LBW_TRITON_GEOMETRY", "block=512,num_warps=4,telemetry_fold=4,maxnreg=64")
    geo = config.geometry()
    assert config.pass_options(geo, single_pass=True) == dict(num_warps=4, maxnreg=64, **config.COMPILE_OPTIONS)
    assert "maxnreg" not in config.pass_options(geo)  # the other kernels: the compiler's choice
    assert "maxnreg" not in config.pass_options(config.GPU, single_pass=True)  # 0: none
    for bad in ("maxnreg=16", "maxnreg=256"):
        monkeypatch.setenv("LBW_TRITON_GEOMETRY", bad)
        with pytest.raises(ValueError, match="maxnreg"):
            config.geometry()
    monkeypatch.delenv("LBW_TRITON_GEOMETRY")
    assert config.geometry() == config.GPU


def test_switches_are_read_as_os_environ_has_them(monkeypatch):
    from lbw_kernels.triton_kernels import config

    for value in ("1", "", "block=512, num_warps=4", "caf\u00e9"):
        monkeypatch.setenv("LBW_TEST_SWITCH", value)
        assert config.environ_get("LBW_TEST_SWITCH") == os.environ.get("LBW_TEST_SWITCH") == value
    monkeypatch.delenv("LBW_TEST_SWITCH")
    assert config.environ_get("LBW_TEST_SWITCH") is None
    monkeypatch.setenv("LBW_POISON", "1")
    assert config.poison_enabled()
    monkeypatch.setenv("LBW_POISON", "0")
    assert not config.poison_enabled()


def test_a_step_asks_os_environ_for_no_switch(triton_backend, monkeypatch):
    """os.environ.get of a name that is not set costs ~2 us (a KeyError raised and caught); a
    Triton step read ~15 such switches per call (config.environ_get)."""
    from lbw_kernels import GuardedAdamW

    params = [torch.randn(n, requires_grad=True) for n in (5, 4097)]
    for p in params:
        p.grad = torch.randn_like(p)
    for gate in ("exact", "single_pass"):
        opt = GuardedAdamW(params, lr=1e-3, gate=gate, backend="triton")
        opt.step()  # (plans built)
        asked = []
        original = os._Environ.__getitem__
        monkeypatch.setattr(os._Environ, "__getitem__", lambda self, key: asked.append(key) or original(self, key))
        opt.step()
        monkeypatch.setattr(os._Environ, "__getitem__", original)
        assert asked == [], gate


def test_cuda_tensors_are_refused_while_the_interpreter_is_on(monkeypatch):
    """The interpreter copies a launch's tensors to the host: the chunk tables' addresses of
    CUDA tensors would then be read as host memory (a segfault). With TRITON_INTERPRET=1 (a
    user debugging kernels of their own), CUDA params get a clear error, and "auto" another backend."""
    from lbw_kernels.backends import get_backend, select_backend

    triton = get_backend("triton")
    cuda = torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton.supports(cuda) and not triton.auto_selectable(cuda)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 is set"):
        select_backend("triton", cuda)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton.supports(cuda) and triton.auto_selectable(cuda)


@pytest.mark.parametrize("version, refused", [("3.5.1", True), ("3.1.0", True), ("2.3.0", True),
                                              ("3.6.0", False), ("3.10.2", False), ("3.7.0+git1a2b3c", False)])
def test_a_triton_older_than_the_oldest_tested_release_is_refused_by_name(version, refused):
    from lbw_kernels.triton_kernels.backend import check_triton_release

    if not refused:
        check_triton_release(version)
        return
    with pytest.raises(ImportError, match=rf"triton {version} is older than 3\.6, .*pip install 'triton>=3\.6'"):
        check_triton_release(version)


def test_with_an_older_triton_the_backend_is_unavailable_and_says_why():
    """torch 2.9.1's CUDA wheel pins triton 3.5.1: the registry reports the backend unavailable
    with the reason (so backend="auto" passes it over), and asking for it by name says why."""
    import subprocess
    import sys

    child = ("import triton; triton.__version__ = '3.5.1'\n"
             "import torch\n"
             "from lbw_kernels import GuardedAdamW\n"
             "from lbw_kernels.backends import availability\n"
             "print(availability()['triton'])\n"
             "p = torch.ones(3, requires_grad=True); p.grad = torch.ones(3)\n"
             "try:\n"
             "    GuardedAdamW([p], backend='triton').step()\n"
             "except (RuntimeError, ValueError) as err:\n"
             "    print(type(err).__name__, str(err).replace(chr(10), ' '))\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr
    reason, refused = done.stdout.strip().splitlines()[-2:]
    assert "triton 3.5.1 is older than 3.6, the oldest release these kernels are tested with" in reason
    assert "triton" in refused.split(":")[0] and "triton 3.5.1 is older than 3.6" in refused


def test_the_plan_cache_stays_whole_under_threads():
    """One PlanCache serves every Triton optimizer of the process: optimizers stepped in
    threads look plans up at once. Without a lock, a lookup that moved an entry while another
    thread evicted raised KeyError or 'dictionary changed size during iteration', and the size
    count drifted from the entries, after which every build raised (min() of nothing) for the
    rest of the process. 4 threads, 3 kinds each, capacity 4, a switch every microsecond."""
    import sys
    import threading

    from lbw_kernels.triton_kernels.chunk_table import PlanCache

    cache, errors = PlanCache(capacity=4), []

    def work(t):
        try:
            for i in range(3000):
                key = ((t, i % 3), (b"x%d" % (i % 7),))
                if cache.get(key, lambda: ("plan", key)) != ("plan", key):
                    errors.append(("another key's plan", key))
        except Exception as e:  # noqa: BLE001 (what the test reports)
            errors.append(repr(e))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert cache._size == sum(len(entries) for entries in cache._plans.values()) <= 4
