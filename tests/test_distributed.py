"""Distributed: the same guard decisions on every rank (DTensor / FSDP2 / DDP), equal to one process.

Two CPU worker processes (rank_pool.py) run each test in its own gloo group; each runs the
sharded optimizer and, beside it, the unsharded one on the whole gradients, and asserts
telemetry, skip counts and parameters equal (float64; 1e-12: sums of shards add in another
order than the sum of the whole tensor, so the last bits may differ). Workers also compare
their trajectories with each other's, bitwise. The process group is destroyed even on failure.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from lbw_kernels import GuardedAdamW
from lbw_kernels.backends import get_backend
from rank_pool import Ranks, assert_close_records, same_on_every_rank, telemetry_row
from streams import random_stream
from torch_compat import distribute_same, needs_fsdp2_on_cpu

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

WORLD = 2
# (6,5), (17,): uneven shards; (1,): rank 1's shard is empty; (0,): no telemetry row at all;
# (4,4) is Replicate: counted once; (2,3) stays a plain tensor (replicated, counted once).
SHAPES = [(6, 5), (17,), (1,), (0,), (3,), (4, 4), (2, 3)]
REPLICATED, PLAIN = 5, 6


def available(backend: str) -> bool:
    try:
        get_backend(backend)
        return True
    except RuntimeError:
        return False


def cpu_backend() -> str:
    """The fastest CPU backend built here (the C++ one when it is)."""
    return "cpp" if available("cpp") else "reference"


@pytest.fixture(scope="module")
def ranks4():
    pool = Ranks(world=4)
    yield pool
    pool.close()


def shard(t, mesh, placements):
    """``t`` (the same on every rank) as a DTensor, each rank cutting its own shard: no communication."""
    return distribute_same(t, mesh, placements)


def counting_all_reduce():
    """Wrap dist.all_reduce; return the list its calls are appended to and an undo function."""
    calls, original = [], dist.all_reduce

    def wrapped(tensor, *a, **kw):
        calls.append(tuple(tensor.shape))
        return original(tensor, *a, **kw)

    dist.all_reduce = wrapped
    return calls, lambda: setattr(dist, "all_reduce", original)


# ------------------------------------------------------------------------------ DTensor
def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _dtensor_case(rank, backend, gate, stats_freq, stream, placements_of, policy="lbw", mesh_shape=(WORLD,),
                  shapes=SHAPES, all_reduces=1, partial_grads=(), partial_calls=None, compiled=False, **options):
    """``placements_of(i)``: tensor i's placements on the mesh of ``mesh_shape``, or a (mesh,
    placements) pair; ``all_reduces``: how many telemetry reductions the sharded optimizer makes
    per call; tensors in ``partial_grads`` (Replicate params) get Partial(sum) grads, uneven
    parts of the whole (one all_reduce more per call, with their sums), on every call or on
    those in ``partial_calls`` (counted from 1; Replicate grads on the others); ``compiled``:
    the sharded optimizer's step under torch.compile."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", mesh_shape)
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    layout = [placements_of(i) for i in range(len(shapes))]
    layout = [pl if isinstance(pl, tuple) else (mesh, pl) for pl in layout]
    sharded = [p.clone() if i == PLAIN else shard(p, *layout[i]) for i, p in enumerate(full)]
    kw = dict(lr=1e-2, stats_freq=stats_freq, gate=gate, backend=backend, policy=policy, **options)
    opt = GuardedAdamW(sharded, **kw)
    ref = GuardedAdamW(full, **kw)
    # GradScaler's fused path reads each rank's own overflow flag: sharded params keep its own path
    assert not opt._step_supports_amp_scaling and ref._step_supports_amp_scaling == (gate == "exact")
    ours, theirs = [], []
    if compiled:
        opt.step = torch.compile(opt.step, backend="aot_eager")
    calls, undo = counting_all_reduce()
    try:
        for k, grads in enumerate(stream, 1):
            partial_now = partial_grads if partial_calls is None or k in partial_calls else ()
            for i, (p, q, g) in enumerate(zip(sharded, full, grads)):
                if i in partial_now:
                    p.grad = partial_parts(g.clone(), p.device_mesh, (0,), {(0,): 0.75, (1,): 0.25})
                else:
                    p.grad = shard(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g.clone()
                q.grad = g.clone()
            opt.step()
            ref.step()
            ours.append(telemetry_row(opt))
            theirs.append(telemetry_row(ref))
    finally:
        undo()
    # skip_nonfinite=True: all_reduces of [T, 3] every call, T = tensors of global numel > 0
    rows = sum(1 for s in shapes if math.prod(s) > 0)
    partial_elements = sum(math.prod(shapes[i]) for i in partial_grads)
    expected = []
    for k in range(1, len(stream) + 1):
        partial_now = bool(partial_grads) and (partial_calls is None or k in partial_calls)
        expected += [(partial_elements,)] * partial_now + [(rows, 3)] * all_reduces
    assert calls == expected
    assert_close_records(ours, theirs)
    for p, q in zip(sharded, full):
        torch.testing.assert_close(_full(p), q, rtol=1e-12, atol=1e-12)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(_full(opt.state[p][key]), ref.state[q][key], rtol=1e-12, atol=1e-12)
    same_on_every_rank(ours)
    same_on_every_rank([_full(p).tolist() for p in sharded])
    return ours


def _sharded_worker(rank, backends):
    from torch.distributed.tensor import Replicate, Shard

    def placements_of(i):
        return [Replicate()] if i == REPLICATED else [Shard(0)]

    # Call 3, 4, 9 spike, 6 flips; NaN at element 0 of (6, 5): on rank 0's shard only (call 11),
    # and at the last element of (17,): on rank 1's shard only (call 13).
    stream = random_stream(14, SHAPES, seed=5, spikes=(3, 4, 9), flips=(6,), nan_at=(11,))
    stream[12][1][-1] = float("nan")
    for backend in backends:
        for gate in ("exact", "single_pass"):
            for stats_freq in (1, 3):
                ours = _dtensor_case(rank, backend, gate, stats_freq, stream, placements_of)
                regimes = [r[1] for r in ours]
                assert regimes[10] == regimes[12] == "nonfinite" and ours[-1][2] == 2, regimes
                if stats_freq == 1:  # the stream reaches every regime, so the test cannot pass by accident
                    assert {"spike", "oscillation", "calm"} <= set(regimes), regimes
        # Our policy reads the same reduced telemetry (the global norm): the spikes at calls 3-4
        # are two hot calls in a row, so it cuts, on every rank alike.
        ours = _dtensor_case(rank, backend, "exact", 1, stream, placements_of, policy="zscore")
        assert [r[1] for r in ours][2:4] == ["stress", "spike"], ours
        # max_grad_norm clips by the global norm (every call's is above 2: a factor from one
        # rank's shards alone would differ), every rank alike
        _dtensor_case(rank, backend, "exact", 1, stream, placements_of, max_grad_norm=2.0)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_sharded_decisions_equal_unsharded(ranks, backend):
    """Shard(0) DTensors (uneven, one empty local shard, one Replicate, a 0-element tensor, one
    plain tensor beside them) on
    spike/flip/NaN streams, both gates: same telemetry, skips and params as one process; a NaN
    on either rank's shard only makes every rank skip."""
    if not available(backend):
        pytest.skip(f"backend {backend!r} is not built here")
    ranks.run(_sharded_worker, [backend])


def _two_dim_mesh_worker(rank, backend):
    from torch.distributed.tensor import Replicate, Shard

    # HSDP's layout: replicated across dim 0, sharded along dim 1. On (2, 1) both ranks hold
    # whole copies (only coordinate 0 of dim 0 may count them); on (1, 2) they hold shards.
    def placements_of(i):
        return [Replicate(), Replicate()] if i == REPLICATED else [Replicate(), Shard(0)]

    stream = random_stream(8, SHAPES, seed=6, spikes=(3,), flips=(5,), nan_at=(6,))
    for mesh_shape in ((WORLD, 1), (1, WORLD)):
        for gate in ("exact", "single_pass"):
            ours = _dtensor_case(rank, backend, gate, 1, stream, placements_of, mesh_shape=mesh_shape)
            assert [r[1] for r in ours][5] == "nonfinite", ours


def test_two_dim_mesh_decisions_equal_unsharded(ranks):
    """A 2-D mesh over all ranks (HSDP: Replicate x Shard): one all_reduce over the world
    group, each replica counted once; decisions, skips and params as one process."""
    ranks.run(_two_dim_mesh_worker, cpu_backend())


def _hsdp_worker(rank, backend):
    from torch.distributed.tensor import Replicate, Shard

    def placements_of(i):
        return [Replicate(), Replicate()] if i == REPLICATED else [Replicate(), Shard(0)]

    stream = random_stream(8, SHAPES, seed=6, spikes=(3,), flips=(5,), nan_at=(6,))
    for gate in ("exact", "single_pass"):
        ours = _dtensor_case(rank, backend, gate, 1, stream, placements_of, mesh_shape=(2, 2))
        assert [r[1] for r in ours][5] == "nonfinite", ours


def test_hsdp_mesh_of_four_ranks_decides_as_one_process(ranks4):
    """HSDP proper on 4 ranks: a (2, 2) mesh replicating over dim 0 while sharding over dim 1,
    so each replica group's shards are summed once (the 2-rank meshes above have one trivial
    dim)."""
    ranks4.run(_hsdp_worker, cpu_backend(), timeout=180)


def _expert_mesh_worker(rank, backend):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    # A MoE as torchtitan lays out expert parallelism: dense params sharded over a 1-D mesh of
    # the 4 ranks, experts [E, d, h] over a (dp, ep) mesh of the same ranks (experts split over
    # ep, each expert's rows over dp), an expert bias replicated over dp.
    shapes = SHAPES + [(4, 6, 5), (4, 3)]
    expert_w, expert_b = len(SHAPES), len(SHAPES) + 1
    stream = random_stream(14, shapes, seed=5, spikes=(3, 4, 9), flips=(6,), nan_at=(11,))
    stream[12][expert_w].view(-1)[-1] = float("nan")  # expert 3's last row: rank 3's shard only
    experts = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))

    def moe(i):
        if i == expert_w:
            return experts, [Shard(1), Shard(0)]
        if i == expert_b:
            return experts, [Replicate(), Shard(0)]
        return [Replicate()] if i == REPLICATED else [Shard(0)]

    for gate in ("exact", "single_pass"):
        # both meshes span the same ranks: still one all_reduce per call
        ours = _dtensor_case(rank, backend, gate, 1, stream, moe, mesh_shape=(4,), shapes=shapes)
        regimes = [r[1] for r in ours]
        assert regimes[10] == regimes[12] == "nonfinite" and {"spike", "oscillation", "calm"} <= set(regimes), regimes
    _dtensor_case(rank, backend, "exact", 1, stream, moe, mesh_shape=(4,), shapes=shapes, max_grad_norm=2.0)

    # Experts on a 1-D mesh over half of the ranks (ranks 0-1 and 2-3 each hold every expert,
    # replicated outside any mesh): their rows are summed over that half, the dense rows over
    # all four; two all_reduces per call.
    halves = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "ep"))["ep"]

    def half(i):
        if i == expert_w:
            return halves, [Shard(0)]
        if i == expert_b:
            return halves, [Replicate()]
        return moe(i)

    ours = _dtensor_case(rank, backend, "exact", 1, stream, half, mesh_shape=(4,), shapes=shapes, all_reduces=2)
    assert [r[1] for r in ours][12] == "nonfinite", ours

    # An n-D mesh over some of the ranks is summed one dim at a time, each dim's gathered rows
    # added in the order of the mesh's coordinates, not of the group's ranks: on a mesh whose
    # rows list ranks out of order the two differ.
    from torch.distributed.device_mesh import DeviceMesh

    from lbw_kernels.distributed import _gather_order

    shuffled = DeviceMesh("cpu", torch.tensor([[0, 1], [3, 2]]))
    along_dim_1 = {0: [0, 1], 1: [0, 1], 2: [1, 0], 3: [1, 0]}[rank]  # ranks 3, 2 gather as 2, 3
    assert _gather_order(shuffled, 1)[1] == along_dim_1
    assert _gather_order(shuffled, 0)[1] == [0, 1]


def test_expert_meshes_decide_as_one_process(ranks4):
    """Params on two meshes in one optimizer (dense and expert-parallel, over the same ranks or
    the experts over half of them): each row summed over its own mesh's ranks; telemetry, skips
    and params as one process, on every rank alike."""
    ranks4.run(_expert_mesh_worker, cpu_backend(), timeout=180)


def _float8_like_worker(rank, backend):
    """FSDP2 with torchao's float8 all-gather: DTensor params whose local shards are wrapper
    subclasses (test_tensor_subclasses.CastWrapper, built like torchao's weight wrapper)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from test_tensor_subclasses import CastWrapper

    mesh = init_device_mesh("cpu", (WORLD,))
    shapes = [(6, 5), (17,), (4, 4)]
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen) for s in shapes]
    plain = [shard(t, mesh, [Shard(0)]) for t in full]
    wrapped = [DTensor.from_local(CastWrapper(t.to_local().clone()), mesh, [Shard(0)], run_check=False,
                                  shape=t.shape, stride=t.stride()) for t in plain]
    assert all(type(w._local_tensor) is CastWrapper for w in wrapped)
    params = [torch.nn.Parameter(t) for t in wrapped]
    ref_params = [torch.nn.Parameter(t) for t in plain]
    kw = dict(lr=1e-2, stats_freq=1, backend=backend, max_grad_norm=3.0)
    opt, ref = GuardedAdamW(params, **kw), GuardedAdamW(ref_params, **kw)
    for grads in random_stream(6, shapes, seed=4, dtype=torch.float32, spikes=(3,), nan_at=(5,)):
        for p, q, g in zip(params, ref_params, grads):
            p.grad = shard(g, mesh, [Shard(0)])
            q.grad = shard(g, mesh, [Shard(0)])
        opt.step()
        ref.step()
        assert repr(telemetry_row(opt)) == repr(telemetry_row(ref))  # (bits; the NaN call's norm is NaN)
    for p, q in zip(params, ref_params):
        assert torch.equal(p._local_tensor._tensor, q.to_local())
        assert torch.equal(opt.state[p]["exp_avg"].to_local(), ref.state[q]["exp_avg"].to_local())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_dtensor_shards_that_are_wrapper_subclasses(ranks, backend):
    """Updated through the wrapper's inner tensor, bitwise as plain shards (the Triton backend
    would launch on the wrapper's address, 0)."""
    if not available(backend) or (backend == "triton" and not get_backend("triton").supports(torch.device("cpu"))):
        pytest.skip(f"backend {backend!r} does not run on CPU tensors here")
    ranks.run(_float8_like_worker, backend)


def partial_parts(g, mesh, dims, rank_weights):
    """``g`` (whole, the same on every rank) as a Partial(sum) DTensor over mesh ``dims``: this
    rank's part is its weight times ``g`` (the weights along those dims sum to 1)."""
    from torch.distributed.tensor import DTensor, Partial

    weight = rank_weights[tuple(mesh.get_coordinate()[d] for d in dims)]
    return DTensor.from_local(g * weight, mesh, [Partial() if d in dims else None for d in range(mesh.ndim)],
                              run_check=False)


def _tensor_parallel_worker(rank, backend):
    from torch.distributed.tensor import Replicate, Shard

    # Tensor parallelism without FSDP2: Replicate params (norm weights under SequenceParallel)
    # whose grads are Partial(sum), beside Shard(0) params with Shard(0) grads.
    stream = random_stream(8, SHAPES, seed=9, spikes=(3,), flips=(5,), nan_at=(7,))
    partial = {0, 2, REPLICATED}

    def placements_of(i):
        return [Replicate()] if i in partial else [Shard(0)]

    for gate in ("exact", "single_pass"):
        ours = _dtensor_case(rank, backend, gate, 1, stream, placements_of, partial_grads=partial)
        assert [r[1] for r in ours][6] == "nonfinite", ours
    _dtensor_case(rank, backend, "exact", 1, stream, placements_of, partial_grads=partial, max_grad_norm=2.0)
    # Partial on odd calls only, Replicate on the others: the layout (which grads to sum)
    # follows every change of the grads' placements
    _dtensor_case(rank, backend, "exact", 1, stream, placements_of, partial_grads=partial, partial_calls={1, 3, 5, 7})


def _sequence_parallel_worker(rank, backend):
    """torch's own tensor parallelism: a norm under SequenceParallel (its grads Partial), a
    column- and a row-wise linear; against the same model in one process, float64."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module,
    )

    torch.manual_seed(0)
    whole = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 8)).double()
    tp = __import__("copy").deepcopy(whole)
    parallelize_module(tp, init_device_mesh("cpu", (WORLD,)), {
        "0": SequenceParallel(), "1": ColwiseParallel(input_layouts=Shard(1)),
        "3": RowwiseParallel(output_layouts=Shard(1)),
    })
    kw = dict(lr=1e-2, stats_freq=1, backend=backend, max_grad_norm=1.0)
    opt, ref = GuardedAdamW(tp.parameters(), **kw), GuardedAdamW(whole.parameters(), **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64)
        for model, o, inp in ((tp, opt, x.chunk(WORLD, dim=1)[rank]), (whole, ref, x)):
            o.zero_grad()
            out = model(inp)  # (TP: each rank feeds and scores its own sequence shard)
            (out.to_local() if hasattr(out, "to_local") else out).square().sum().backward()
        assert tp[0].weight.grad.placements[0].is_partial()  # the case this covers
        opt.step()
        ref.step()
        assert_close_records([telemetry_row(opt)], [telemetry_row(ref)])
    for p, q in zip(tp.parameters(), whole.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_partial_grads_of_replicated_params_are_summed(ranks, backend):
    """Partial(sum) grads (tensor parallelism's, FSDP2 absent) summed over the ranks once per
    call: telemetry, skips (a NaN in one rank's part) and params as one process on the sums."""
    if not available(backend):
        pytest.skip(f"backend {backend!r} is not built here")
    ranks.run(_tensor_parallel_worker, backend)
    ranks.run(_sequence_parallel_worker, backend)


def _compiled_worker(rank, backend):
    from torch.distributed.tensor import Replicate, Shard

    partial = {0, REPLICATED}  # Replicate params, Partial(sum) grads, beside Shard(0) ones

    def placements_of(i):
        return [Replicate()] if i in partial else [Shard(0)]

    stream = random_stream(6, SHAPES, seed=2, spikes=(3,), nan_at=(5,))
    _dtensor_case(rank, backend, "exact", 1, stream, placements_of, partial_grads=partial, compiled=True)


def test_compiled_step_on_dtensors_decides_as_one_process(ranks):
    """``torch.compile(opt.step)`` (aot_eager) with DTensor params, Partial grads among them:
    the telemetry reduction and the Partial sums run inside the compiled step."""
    ranks.run(_compiled_worker, cpu_backend(), timeout=300)


def _refusals_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    p = distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh, [Shard(0)])
    opt = GuardedAdamW([p], backend="reference")
    p.grad = DTensor.from_local(torch.ones(4, 3, dtype=torch.float64), mesh, [Partial()])
    with pytest.raises(ValueError, match=r"its grad is Partial\(sum\) on mesh dim 0, where the param is Shard\(dim=0\)"):
        opt.step()
    q = distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh, [Replicate()])
    q.grad = DTensor.from_local(torch.ones(4, 3, dtype=torch.float64), mesh, [Partial("max")])
    with pytest.raises(ValueError, match=r"Partial\(max\) on mesh dim 0.*sums Partial\(sum\) gradients"):
        GuardedAdamW([q], backend="reference").step()
    p.grad = distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh, [Shard(1)])
    with pytest.raises(ValueError, match="placements"):
        opt.step()
    assert torch.equal(p.full_tensor(), torch.ones(4, 3, dtype=torch.float64))
    assert opt.state[p]["step"].item() == 0 if opt.state[p] else True
    # a one-process checkpoint's full states into DTensor params: refused at load, nothing
    # changed (the global shapes agree; every step raised after such a load)
    full = torch.ones(4, 3, dtype=torch.float64, requires_grad=True)
    one_process = GuardedAdamW([full], backend="reference")
    full.grad = torch.ones_like(full)
    one_process.step()
    r = distribute_tensor(torch.ones(4, 3, dtype=torch.float64), mesh, [Shard(0)])
    sharded = GuardedAdamW([r], backend="reference")
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\] is a full tensor and its param a DTensor"):
        sharded.load_state_dict(one_process.state_dict())
    assert not sharded.state and sharded.telemetry()["step"] == 0


def test_grads_partial_where_the_param_is_sharded_or_not_summed_are_refused(ranks):
    ranks.run(_refusals_worker)


def _other_placements_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for shape in ((4, 3), (1,)):  # (1,): rank 1's shard is empty, rank 0's local shapes agree
        replicated = shard(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
                           mesh, [Replicate()])
        source = GuardedAdamW([replicated], lr=1e-2, backend="reference")
        replicated.grad = shard(torch.ones(shape, dtype=torch.float64), mesh, [Replicate()])
        source.step()
        p = shard(torch.ones(shape, dtype=torch.float64), mesh, [Shard(0)])
        opt = GuardedAdamW([p], lr=1e-2, backend="reference")
        p.grad = shard(torch.full(shape, 0.5, dtype=torch.float64), mesh, [Shard(0)])
        opt.step()

        def unchanged(before=(p.to_local().clone(), opt.telemetry(),
                              {k: v.to_local().clone() for k, v in opt.state[p].items() if k.startswith("exp_avg")})):
            assert torch.equal(p.to_local(), before[0]) and opt.telemetry() == before[1], shape
            assert all(opt.state[p][k].placements == (Shard(0),) and torch.equal(opt.state[p][k].to_local(), v)
                       for k, v in before[2].items()), shape

        # a checkpoint of Replicate moments into Shard(0) params: refused at load on every rank,
        # nothing changed (the global shapes agree; the steps refused it on some ranks only)
        with pytest.raises(ValueError, match=r"state_dict state\[0\]\['exp_avg'\] is a DTensor on .* with "
                                             r"placements \(Replicate\(\),\), its param a DTensor on .* with "
                                             r"placements \(Shard\(dim=0\),\)"):
            opt.load_state_dict(source.state_dict())
        unchanged()
        # the same moments (or a full tensor) put into opt.state by hand: refused as the step
        # plan is built, on every rank, before the decision's all_reduce
        moment = opt.state[p]["exp_avg"]
        for swapped, message in ((source.state[replicated]["exp_avg"].clone(), r"is a DTensor on .* with placements "
                                  r"\(Replicate\(\),\), its param a DTensor on .* with placements \(Shard\(dim=0\),\)"),
                                 (torch.zeros(shape, dtype=torch.float64), "is a plain tensor, its param a DTensor")):
            opt.state[p]["exp_avg"] = swapped
            with pytest.raises(ValueError, match=r"opt.state\[param_groups\[0\]\['params'\]\[0\]\]\['exp_avg'\] "
                                                 + message):
                opt.step()
            opt.state[p]["exp_avg"] = moment
            unchanged()
        opt.step()  # (and the ranks are still in step)
        same_on_every_rank(telemetry_row(opt))


def test_moments_placed_otherwise_than_their_params_are_refused_on_every_rank(ranks):
    ranks.run(_other_placements_worker, timeout=60)


def _fsdp1_worker(rank):
    from torch.distributed.fsdp import FullyShardedDataParallel

    for use_orig_params in (False, True):
        model = FullyShardedDataParallel(_mlp(), use_orig_params=use_orig_params, device_id=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is a FullyShardedDataParallel \(FSDP1\) parameter.*Use FSDP2"):
            GuardedAdamW(model.parameters())
        opt = GuardedAdamW(torch.nn.Linear(2, 2).parameters())
        with pytest.raises(ValueError, match="FSDP1"):
            opt.add_param_group({"params": list(model.parameters())})
        assert len(opt.param_groups) == 1
    # Built before the wrapping: use_orig_params keeps the Parameter objects (their data become
    # shards), so the first step's plan finds them, before any state exists.
    net = _mlp()
    opt = GuardedAdamW(net.parameters())
    model = FullyShardedDataParallel(net, use_orig_params=True, device_id=torch.device("cpu"))
    x, y = _batches(1)[0]
    _loss(model, x[rank], y[rank]).backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[\d\] is a FullyShardedDataParallel"):
        opt.step()
    assert not opt.state and opt.telemetry()["step"] == 0


def test_fsdp1_parameters_are_refused(ranks):
    """FSDP1's plain-tensor shards cannot be reduced across ranks (nothing says which elements
    another rank holds), so each rank would decide alone: refused, pointing at FSDP2."""
    ranks.run(_fsdp1_worker)


# ------------------------------------------------------------------------------ FSDP2
def _mlp():
    torch.manual_seed(0)
    # Linear(7, 1)'s bias has one element: under 2-way FSDP rank 1's shard of it is empty.
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).double()


def _batches(calls):
    gen = torch.Generator().manual_seed(7)
    out = []
    for k in range(1, calls + 1):
        x = torch.randn(WORLD, 4, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(WORLD, 4, 1, generator=gen, dtype=torch.float64)
        if k in (3, 7):
            x = x * 30  # a spike
        if k == 5:
            x[1, 0, 0] = float("nan")  # rank 1's data only: every gradient is NaN after the reduction
        out.append((x, y))
    return out


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _fsdp2_worker(rank, backend, gate):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model, ref_model = _mlp(), _mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    kw = dict(lr=1e-2, stats_freq=1, gate=gate, backend=backend)
    opt = GuardedAdamW(model.parameters(), **kw)
    ref = GuardedAdamW(ref_model.parameters(), **kw)
    ours, theirs = [], []
    for x, y in _batches(9):
        opt.zero_grad()
        _loss(model, x[rank], y[rank]).backward()  # FSDP2 averages over ranks
        opt.step()
        ours.append(telemetry_row(opt))
        ref.zero_grad()
        (sum(_loss(ref_model, x[r], y[r]) for r in range(WORLD)) / WORLD).backward()
        ref.step()
        theirs.append(telemetry_row(ref))
    assert any(p.to_local().numel() == 0 for p in model.parameters()) == (rank == 1)
    assert_close_records(ours, theirs)
    assert [r[1] for r in ours][4] == "nonfinite" and "spike" in [r[1] for r in ours]
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.full_tensor(), q, rtol=1e-12, atol=1e-12)
    same_on_every_rank(ours)


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_fsdp2_fully_shard_matches_one_process(ranks, gate):
    """fully_shard on CPU/gloo, real backward on each rank's half of the batch: the decisions and
    parameters equal one process training on the whole batch."""
    ranks.run(_fsdp2_worker, cpu_backend(), gate)


# ------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, backend, bucket_view):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # gradient_as_bucket_view: the grads are views into DDP's flat buckets, which DDP rebuilds
    # after the first iteration (new storage: the kernel backends' cached tables must follow),
    # kept across calls by zero_grad(set_to_none=False)
    model, ref_model = DDP(_mlp(), gradient_as_bucket_view=bucket_view), _mlp()
    kw = dict(lr=1e-2, stats_freq=1, backend=backend)
    opt = GuardedAdamW(model.parameters(), **kw)
    ref = GuardedAdamW(ref_model.parameters(), **kw)
    ours, theirs = [], []
    calls, undo = counting_all_reduce()
    try:
        for x, y in _batches(9):
            opt.zero_grad(set_to_none=not bucket_view)
            _loss(model, x[rank], y[rank]).backward()  # DDP averages the gradients
            calls.clear()
            opt.step()
            assert calls == []  # the optimizer adds no communication under DDP
            ours.append(telemetry_row(opt))
            ref.zero_grad()
            (sum(_loss(ref_model, x[r], y[r]) for r in range(WORLD)) / WORLD).backward()
            ref.step()
            theirs.append(telemetry_row(ref))
    finally:
        undo()
    same_on_every_rank(ours)
    same_on_every_rank([p.tolist() for p in model.parameters()])
    assert_close_records(ours, theirs)
    assert [r[1] for r in ours][4] == "nonfinite"


@pytest.mark.parametrize("backend, bucket_view", [("cpu", False), ("cpu", True), ("triton", True)])
def test_ddp_decisions_identical_on_every_rank(ranks, backend, bucket_view):
    if backend == "triton" and not (available("triton") and get_backend("triton").supports(torch.device("cpu"))):
        pytest.skip("the triton backend does not run on CPU tensors here")
    ranks.run(_ddp_worker, cpu_backend() if backend == "cpu" else backend, bucket_view)


# ------------------------------------------------------------------------------ checkpoints
def _dcp_worker(rank, path, backend):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from lbw_kernels.distributed import init_state_

    mesh = init_device_mesh("cpu", (WORLD,))
    placements = [[Replicate()] if i == REPLICATED else [Shard(0)] for i in range(len(SHAPES))]

    def model(seed):
        gen = torch.Generator().manual_seed(seed)
        full = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        return [p if i == PLAIN else distribute_tensor(p, mesh, pl) for i, (p, pl) in enumerate(zip(full, placements))]

    def run(opt, params, stream):
        out = []
        for grads in stream:
            for p, g in zip(params, grads):
                p.grad = shard(g, mesh, p.placements) if hasattr(p, "placements") else g.clone()
            opt.step()
            out.append(telemetry_row(opt))
        return out

    stream = random_stream(16, SHAPES, seed=1, spikes=(4, 12), flips=(8,), nan_at=(6, 14))
    kw = dict(lr=1e-2, stats_freq=3, backend=backend)
    params = model(0)
    opt = GuardedAdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], **kw)
    run(opt, params, stream[:8])
    dcp.save({"params": dict(enumerate(params)), "optim": opt.state_dict()}, checkpoint_id=path)
    straight = run(opt, params, stream[8:])

    fresh = model(1)  # other values: the load must overwrite them
    opt2 = GuardedAdamW([{"params": fresh[:2]}, {"params": fresh[2:], "weight_decay": 0.0}], **kw)
    init_state_(opt2)
    assert opt2.telemetry()["step"] == 0 and all(opt2.state[p]["step"].item() == 0 for p in fresh)
    template = {"params": dict(enumerate(fresh)), "optim": opt2.state_dict()}
    dcp.load(template, checkpoint_id=path)
    opt2.load_state_dict(template["optim"])
    assert opt2.telemetry()["step"] == 8 and opt2.telemetry()["skipped_steps"] == 1
    resumed = run(opt2, fresh, stream[8:])
    assert resumed == straight
    assert [r[1] for r in straight].count("nonfinite") == 1
    for a, b in zip(params, fresh):
        assert torch.equal(_local(a), _local(b))
        for key in ("step", "exp_avg", "exp_avg_sq"):
            x, y = opt.state[a][key], opt2.state[b][key]
            assert type(x) is type(y) and torch.equal(_local(x), _local(y)), key
    assert torch.equal(opt.state_dict()["guard"]["state"], opt2.state_dict()["guard"]["state"])


def _dcp_state_dict_api_worker(rank, path, backend, flatten):
    """The FSDP2 trainers' checkpoint path (torchtitan's): get_/set_optimizer_state_dict, which
    keep only "state" and "param_groups" (flattened or not), then dcp.save / dcp.load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    kw = dict(lr=1e-2, stats_freq=2, backend=backend, policy="zscore")

    def sharded_model():
        model = _mlp()
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def train(model, opt, batches):
        out = []
        for x, y in batches:
            opt.zero_grad()
            _loss(model, x[rank], y[rank]).backward()
            opt.step()
            out.append(telemetry_row(opt))
        return out

    batches = _batches(12)
    model = sharded_model()
    opt = GuardedAdamW(model.parameters(), **kw)
    train(model, opt, batches[:8])
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=options)},
             checkpoint_id=path)
    straight = train(model, opt, batches[8:])

    model2 = sharded_model()
    opt2 = GuardedAdamW(model2.parameters(), **kw)
    state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2, options=options)}
    # that created the state with a zero-gradient lr-0 step(), which the guard stayed out of
    assert opt2.telemetry()["step"] == 0 and math.isnan(opt2.telemetry()["grad_ms"])
    assert all(opt2.state[p]["step"].item() == 1 for p in model2.parameters())
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model2, state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"], options=options)
    assert opt2.telemetry()["step"] == 8 and opt2.telemetry()["skipped_steps"] == 1
    assert opt2.telemetry()["scale"] < 1  # the spikes at calls 3 and 7 were cut: not a fresh guard
    assert_close_records(train(model2, opt2, batches[8:]), straight)


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("flatten", [False, True])
def test_dcp_state_dict_api_resumes_the_guard(ranks, tmp_path, flatten):
    ranks.run(_dcp_state_dict_api_worker, str(tmp_path / "ckpt"), cpu_backend(), flatten)


def _migration_worker(rank, path, backend):
    """An FSDP2 run moves its DCP checkpoint from torch.optim.AdamW to GuardedAdamW and back
    (docs/distributed.md): each template asks for keys the other optimizer's checkpoint lacks (the guard's
    entry in the first param's state; AdamW's amsgrad, foreach, ... in the groups), so the load
    is partial; AdamW's state moves over whole and the guard starts fresh."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))

    def sharded_model():
        return fully_shard(_mlp(), mesh=mesh)

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            _loss(model, x[rank], y[rank]).backward()
            opt.step()

    def moved(src_model, src_opt, dst_model, dst_opt, where):
        dcp.save({"optim": get_optimizer_state_dict(src_model, src_opt)}, checkpoint_id=where)
        state = {"optim": get_optimizer_state_dict(dst_model, dst_opt)}
        dcp.load(state, checkpoint_id=where, planner=DefaultLoadPlanner(allow_partial_load=True))
        set_optimizer_state_dict(dst_model, dst_opt, state["optim"])
        for p, q in zip(src_model.parameters(), dst_model.parameters()):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(_local(src_opt.state[p][key]), _local(dst_opt.state[q][key])), key

    batches = _batches(6)
    torch_model, guard_model = sharded_model(), sharded_model()
    adamw = torch.optim.AdamW(torch_model.parameters(), lr=1e-2)
    train(torch_model, adamw, batches[:3])
    guard = GuardedAdamW(guard_model.parameters(), lr=1e-2, backend=backend, stats_freq=1)
    moved(torch_model, adamw, guard_model, guard, path + "-adamw")
    assert guard.telemetry()["step"] == 0  # a fresh guard over AdamW's moments
    train(guard_model, guard, batches[3:])
    assert guard.telemetry()["step"] == 3 and guard.telemetry()["skipped_steps"] == 1
    # (a model without grads: DCP's template makes no AdamW state for an optimizer whose params have them)
    back_model = sharded_model()
    back = torch.optim.AdamW(back_model.parameters(), lr=1e-2)
    moved(guard_model, guard, back_model, back, path + "-guard")
    steps = [back.state[p]["step"].item() for p in back_model.parameters()]
    train(back_model, back, batches[:1])  # and AdamW goes on from there
    assert [back.state[p]["step"].item() for p in back_model.parameters()] == [s + 1 for s in steps]


@needs_fsdp2_on_cpu
def test_a_dcp_checkpoint_moves_between_torch_adamw_and_the_guard(ranks, tmp_path):
    ranks.run(_migration_worker, str(tmp_path / "ckpt"), cpu_backend())


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def test_dcp_save_load_continue_identically(ranks, tmp_path):
    """dcp.save of opt.state_dict() (DTensor states + the guard entry) on 2 ranks; a fresh
    optimizer with init_state_ as the template loads it and continues bitwise identically."""
    ranks.run(_dcp_worker, str(tmp_path / "ckpt"), cpu_backend())
