"""Pipeline parallelism (``pipeline_group``): stages holding different params take the decisions
one optimizer over the whole model takes.

Each rank is a stage with its own GuardedAdamW over its slice of the model; beside it runs one
optimizer over the whole model on the same gradients (and, as a control, the stage's optimizer
without ``pipeline_group``). Float64; telemetry to 1e-12, since the stages' sums are added in
another order than one optimizer's (x and the non-finite count are exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lbw_kernels import GuardedAdamW
from lbw_kernels.backends import availability
from rank_pool import Ranks, assert_close_records, same_on_every_rank, step_with, telemetry_row
from streams import random_stream
from torch_compat import distribute_same

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

# Stage 0 and stage 1 hold different numbers of tensors (one of 0 elements: no telemetry row).
STAGES = [[(6, 5), (17,), (0,), (3,)], [(4, 4), (2, 3), (1,)]]
SHAPES = STAGES[0] + STAGES[1]
FIRST = [0, len(STAGES[0])]  # index of each stage's first tensor in SHAPES


def backends():
    return [b for b in ("reference", "cpp") if availability()[b] is None]


def scripted_stream():
    """Spikes at calls 3, 4, 9, 16 and a flip at 6 (over every tensor); a NaN in stage 1 only at
    call 11 and in stage 0 only at call 13; at call 8 stage 1 has no gradient at all, at call 15
    no stage has one (nothing to analyse: the spike at 16 must still be seen)."""
    stream = random_stream(16, SHAPES, seed=7, spikes=(3, 4, 9, 16), flips=(6,))
    stream[10][FIRST[1]].view(-1)[0] = float("nan")
    stream[12][1][-1] = float("nan")
    for i in range(FIRST[1], len(SHAPES)):
        stream[7][i] = None
    stream[14] = [None] * len(SHAPES)
    return stream


def whole_model():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _stages_worker(rank, backend):
    stream = scripted_stream()
    mine = slice(FIRST[rank], FIRST[rank] + len(STAGES[rank]))
    cases = [(gate, stats_freq, policy, True, None) for gate in ("exact", "single_pass") for stats_freq in (1, 3)
             for policy in ("lbw", "zscore")]
    # Stage 0's step compiled (its schedule read on the device, as after a CUDA graph capture),
    # stage 1's eager (read on the host), without the finite check: the stages must still
    # gather once per call each.
    cases += [(gate, 3, "lbw", False, None) for gate in ("exact", "single_pass")]
    # max_grad_norm: every stage clips by the whole model's norm (every call's is above 2)
    cases += [("exact", stats_freq, "lbw", True, 2.0) for stats_freq in (1, 3)]
    for gate, stats_freq, policy, skip_nonfinite, max_grad_norm in cases:
        kw = dict(lr=1e-2, stats_freq=stats_freq, gate=gate, backend=backend, policy=policy,
                  skip_nonfinite=skip_nonfinite, max_grad_norm=max_grad_norm)
        full = whole_model()
        stage = [p.clone() for p in full[mine]]
        alone = [p.clone() for p in full[mine]]
        opt = GuardedAdamW(stage, pipeline_group=dist.group.WORLD, **kw)
        if not skip_nonfinite and rank == 0:
            opt.step = torch.compile(opt.step, backend="aot_eager")
        opt_alone = GuardedAdamW(alone, **kw)
        whole = GuardedAdamW(full, **kw)
        ours, theirs, alone_rows = [], [], []
        for grads in stream:
            ours.append(step_with(opt, stage, grads[mine]))
            alone_rows.append(step_with(opt_alone, alone, grads[mine]))
            theirs.append(step_with(whole, full, grads))
        where = f"{gate} stats_freq={stats_freq} {policy} skip_nonfinite={skip_nonfinite} clip={max_grad_norm}"
        assert_close_records(ours, theirs)
        for p, q in zip(stage, full[mine]):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, equal_nan=True, msg=where)
        same_on_every_rank(ours)
        if not skip_nonfinite:
            continue
        regimes = [r[1] for r in ours]
        assert regimes[10] == regimes[12] == "nonfinite" and ours[-1][2] == 2, (where, regimes)
        if stats_freq == 1 and policy == "lbw":  # the stream reaches every regime
            assert {"spike", "oscillation", "calm"} <= set(regimes) and regimes[15] == "spike", (where, regimes)
        # the control: on its own, a stage misses the other stage's NaN (and its telemetry)
        assert [r[2] for r in alone_rows][-1] == 1, (where, alone_rows[-1])


def _no_rows_worker(rank, backend):
    """Calls on which no stage has a telemetry row although stage 0 has a (0-element) gradient,
    and a NaN in stage 0 while stage 1 has no gradient; both use_max_rms settings."""
    stream = random_stream(10, SHAPES, seed=11, spikes=(5,))
    stream[2] = [g if s == (0,) else None for s, g in zip(SHAPES, stream[2])]
    stream[5][0].view(-1)[0] = float("nan")
    for i in range(FIRST[1], len(SHAPES)):
        stream[5][i] = None
    mine = slice(FIRST[rank], FIRST[rank] + len(STAGES[rank]))
    for gate in ("exact", "single_pass"):
        for policy in ("lbw", "zscore"):
            for use_max_rms in (True, False):
                kw = dict(lr=1e-2, stats_freq=1, gate=gate, backend=backend, policy=policy, use_max_rms=use_max_rms)
                full = whole_model()
                stage = [p.clone() for p in full[mine]]
                opt = GuardedAdamW(stage, pipeline_group=dist.group.WORLD, **kw)
                whole = GuardedAdamW(full, **kw)
                ours = [step_with(opt, stage, grads[mine]) for grads in stream]
                assert_close_records(ours, [step_with(whole, full, grads) for grads in stream])
                assert ours[5][1] == "nonfinite", ours
                if policy == "lbw":
                    assert ours[4][1] == "spike", ours


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_stages_decide_as_one_optimizer_over_the_whole_model(ranks, backend):
    """Two stages (4 and 3 tensors), both gates, stats_freq 1 and 3, both policies: a NaN in
    either stage only skips the call on both, a call where one stage has no gradient still
    decides on the other's, one where none has any changes nothing but the call count, and
    telemetry, skips and params equal one optimizer's; also with the stages on different
    telemetry schedules (device and host) and no finite check."""
    if backend not in backends():
        pytest.skip(f"backend {backend!r} is not built here")
    ranks.run(_stages_worker, backend)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_calls_without_telemetry_rows_on_any_stage(ranks, backend):
    if backend not in backends():
        pytest.skip(f"backend {backend!r} is not built here")
    ranks.run(_no_rows_worker, backend)


def _scaler_worker(rank):
    """GradScaler decides to skip from each rank's own gradients: an overflow in one stage only
    would skip step() there alone and mispair the stages' gathers. ShardedGradScaler over the
    stages' group skips on every stage together."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    p = torch.nn.Parameter(torch.ones(4))
    opt = GuardedAdamW([p], lr=1e-2, stats_freq=1, pipeline_group=dist.group.WORLD)
    scaler = ShardedGradScaler("cpu", init_scale=2.0**10, process_group=dist.group.WORLD)
    # GradScaler's fused path would take found_inf from each stage's own gradients: its own path
    assert not opt._step_supports_amp_scaling
    for it in range(4):
        scaler.scale((p * (rank + 2)).sum()).backward()
        if rank == 0 and it == 1:
            p.grad[0] = float("inf")  # an overflow in stage 0 only
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    t = opt.telemetry()
    assert t["step"] == 3 and t["grad_ms"] == 9.0  # the overflowed call skipped on both stages
    same_on_every_rank([opt.telemetry(), scaler.get_scale()])


def test_sharded_grad_scaler_over_the_stages_skips_them_together(ranks):
    ranks.run(_scaler_worker)


def _dcp_state_init_worker(rank):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    module = torch.nn.Module()
    module.ps = torch.nn.ParameterList(
        [torch.nn.Parameter(p) for p in whole_model()[FIRST[rank]:FIRST[rank] + len(STAGES[rank])]]
    )
    opt = GuardedAdamW(module.parameters(), lr=1e-2, stats_freq=1, pipeline_group=dist.group.WORLD)
    get_optimizer_state_dict(module, opt)  # a zero-gradient lr-0 step() on each stage
    assert opt.telemetry()["step"] == 0 and all(opt.state[p]["step"].item() == 1 for p in module.parameters())
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    t = opt.telemetry()
    assert t["step"] == 1 and t["grad_ms"] == 1.0 and t["regime"] == "calm"


def test_dcp_state_init_call_is_kept_out_of_the_guard_on_every_stage(ranks):
    ranks.run(_dcp_state_init_worker)


def _frozen_stage_worker(rank):
    """Stage 1 is frozen: its optimizer never gets state, so get_optimizer_state_dict steps it
    alone (stage 0 has state by then). That call is told by its caller and gathers nothing."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    module = torch.nn.Module()
    module.ps = torch.nn.ParameterList(
        [torch.nn.Parameter(p, requires_grad=rank == 0) for p in whole_model()[FIRST[rank]:FIRST[rank] + len(STAGES[rank])]]
    )
    opt = GuardedAdamW(module.parameters(), lr=1e-2, stats_freq=1, pipeline_group=dist.group.WORLD)

    def train():
        for p in module.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        opt.step()

    train()
    get_optimizer_state_dict(module, opt)
    train()
    assert opt.telemetry()["step"] == 2 and opt.telemetry()["grad_ms"] == 1.0  # both stages alike
    same_on_every_rank(opt.telemetry())


def test_a_frozen_stage_does_not_hang_the_checkpoint_api(ranks):
    ranks.run(_frozen_stage_worker)


def _stage_module(rank: int, split: int):
    """The stage of ``rank`` when the model's 4 layers are split after layer ``split``; the
    other layers are dropped, so the stage's parameter names are the whole model's (as
    torchtitan splits a model for pipeline parallelism)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(3, 3, dtype=torch.float64) for _ in range(4)])
    keep = range(split) if rank == 0 else range(split, 4)
    for i in range(4):
        if i not in keep:
            model[i] = torch.nn.Identity()
    return model


def _resplit_worker(rank, path):
    """Saved through torch.distributed.checkpoint with the stages split after layer 2, resumed
    split after layer 1: stage 1 now starts at layer 1, whose state the checkpoint holds from
    stage 0. With the guard in its stage's first state only, the new stage 1 asked the
    checkpoint for 'state.1.weight.lbw_guard' and dcp.load failed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def stage(split):
        module = _stage_module(rank, split)
        return module, GuardedAdamW(module.parameters(), lr=1e-2, stats_freq=1, pipeline_group=dist.group.WORLD)

    module, opt = stage(2)
    gen = torch.Generator().manual_seed(rank)
    for k in range(4):
        for p in module.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * (20.0 if k == 2 else 1.0)
        opt.step()
    saved = opt.telemetry()
    dcp.save({"optim": get_optimizer_state_dict(module, opt)}, checkpoint_id=path)
    module, opt = stage(1)
    template = {"optim": get_optimizer_state_dict(module, opt)}
    dcp.load(template, checkpoint_id=path)
    set_optimizer_state_dict(module, opt, template["optim"])
    assert opt.telemetry() == saved and saved["step"] == 4
    same_on_every_rank(opt.telemetry())


def test_a_checkpoint_resumes_with_the_stages_split_elsewhere(ranks, tmp_path):
    ranks.run(_resplit_worker, str(tmp_path))


def _refusals_worker(rank):
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    p = torch.ones(3, dtype=torch.float64)
    outside = dist.new_group([0])  # every rank must call new_group; rank 1 is not in this one
    if rank == 1:
        with pytest.raises(ValueError, match="pipeline_group: this rank is not in the group"):
            GuardedAdamW([p], pipeline_group=outside)
    with pytest.raises(TypeError, match="pipeline_group must be a ProcessGroup or a 1-D DeviceMesh, got str"):
        GuardedAdamW([p], pipeline_group="pp")
    with pytest.raises(ValueError, match="pipeline_group: a DeviceMesh must be 1-D"):
        GuardedAdamW([p], pipeline_group=init_device_mesh("cpu", (2, 1)))
    opt = GuardedAdamW([p], lr=0.1, pipeline_group=init_device_mesh("cpu", (2,)))  # a 1-D mesh: its group
    p.grad = torch.full_like(p, float(rank + 1))
    opt.step()
    assert opt.telemetry()["grad_ms"] == 4.0  # the max over both stages' mean squares (1 and 4)
    with pytest.raises(TypeError, match="pipeline_group cannot be copied"):
        copy.deepcopy(opt)
    # a group of one stage gathers nothing and decides as an optimizer without one
    alone = [dist.new_group([r]) for r in range(2)][rank]  # (every rank creates every group)
    stream = random_stream(6, [(5,), (3, 2)], seed=rank, spikes=(4,), nan_at=(5,))
    a = [torch.zeros(5, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)]
    b = [t.clone() for t in a]
    one, plain = GuardedAdamW(a, lr=0.1, stats_freq=1, pipeline_group=alone), GuardedAdamW(b, lr=0.1, stats_freq=1)
    assert [step_with(one, a, g) for g in stream] == [step_with(plain, b, g) for g in stream]
    # stages with other guard options would decide apart: every stage raises as it builds its optimizer
    for options, match in (({"stats_freq": 1 + rank}, "stats_freq is 1 on rank 0, 2 on rank 1"),
                           ({"policy": ("lbw", "zscore")[rank]}, r"policy is 'LBWPolicy\(\)' on rank 0, 'ZScorePolicy\("),
                           ({"gate": ("exact", "single_pass")[rank]}, "gate is 'exact' on rank 0, 'single_pass' on rank 1"),
                           ({"min_scale": 0.1 * (rank + 1), "gate": ("exact", "single_pass")[rank]},
                            "min_scale is 0.1 on rank 0, 0.2 on rank 1; gate is 'exact' on rank 0")):
        with pytest.raises(ValueError, match=match):
            GuardedAdamW([torch.ones(3, dtype=torch.float64)], pipeline_group=dist.group.WORLD, **options)


def test_bad_pipeline_group_is_refused(ranks):
    ranks.run(_refusals_worker)


def test_pipeline_group_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="pipeline_group: torch.distributed is not initialized"):
        GuardedAdamW([torch.ones(3)], pipeline_group=object())


def _pp_dp_worker(rank, backend, stage_dims):
    """2 stages, each a mesh of ``stage_dims`` data/tensor-parallel ranks: DTensor params
    sharded over the stage's own ranks (summed there first, distributed.py), then combined over
    the pp dim. On a 2-D stage mesh 2-D tensors are sharded over both dims, 1-D ones sharded
    over dp and replicated over tp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    names = ("pp", "dp", "tp")[: 1 + len(stage_dims)]
    mesh = init_device_mesh("cpu", (2, *stage_dims), mesh_dim_names=names)
    stage_mesh = mesh[names[1:]] if len(names) > 2 else mesh["dp"]
    stage_id = mesh.get_coordinate()[0]
    mine = slice(FIRST[stage_id], FIRST[stage_id] + len(STAGES[stage_id]))

    def sharded(t):
        placements = [Shard(0)] + [Shard(1) if t.ndim == 2 else Replicate()] * (len(stage_dims) - 1)
        return distribute_same(t, stage_mesh, placements)

    stream = scripted_stream()
    for gate in ("exact", "single_pass"):
        kw = dict(lr=1e-2, stats_freq=1, gate=gate, backend=backend)
        full = whole_model()
        stage = [sharded(p) for p in full[mine]]
        opt = GuardedAdamW(stage, pipeline_group=mesh["pp"], **kw)
        whole = GuardedAdamW(full, **kw)
        ours, theirs = [], []
        for grads in stream:
            for p, g in zip(stage, grads[mine]):
                p.grad = None if g is None else sharded(g)
            opt.step()
            ours.append(telemetry_row(opt))
            theirs.append(step_with(whole, full, grads))
        assert_close_records(ours, theirs)
        for p, q in zip(stage, full[mine]):
            torch.testing.assert_close(p.full_tensor(), q, rtol=1e-12, atol=1e-12)
        same_on_every_rank(ours)
        assert [r[1] for r in ours][10] == "nonfinite"
    # the whole world as the pipeline group would count each stage's data-parallel ranks twice
    stage = [sharded(p) for p in whole_model()[mine]]
    opt = GuardedAdamW(stage, pipeline_group=dist.group.WORLD)
    for p in stage:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"pipeline_group shares ranks \[\d(, \d)*\] with the mesh"):
        opt.step()


def test_pipeline_stages_with_data_parallel_shards_decide_as_one_optimizer():
    with Ranks(world=4) as pool:
        pool.run(_pp_dp_worker, backends()[-1], (2,), timeout=180)


def test_pipeline_stages_on_two_dim_meshes_decide_as_one_optimizer():
    """8 ranks as 2 stages x (dp 2, tp 2), torchtitan's 3-D layout: each stage's rows summed
    over its own 2-D mesh (no process group holds exactly its ranks: one all_gather per mesh
    dim), then combined over pp; decisions as one optimizer, the same bits on every rank."""
    with Ranks(world=8) as pool:
        pool.run(_pp_dp_worker, backends()[-1], (2, 2), timeout=240)
