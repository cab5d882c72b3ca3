"""A training run's life, randomised: with the guard off, every backend stays torch.optim.AdamW;
with it on, every backend stays the reference backend, decision for decision.

The kernel backends keep what a call can reuse (the step plan of which params have grads and
their states, Triton's plans and the CUDA op's chunk tables keyed by addresses): host time
that would otherwise dominate steps of many small tensors. This drives one optimizer through
a random sequence of what training code does between steps (grads set to None for some
params, zeroed in place or reallocated, given as views with gaps; learning rates changed, as
floats or tensors; param groups added; a checkpoint saved and loaded into a new optimizer,
with the empty state a lookup gives a param that never has a gradient; params and AdamW states
moved to new storage behind the optimizer's back) beside
torch.optim.AdamW given the same sequence, and compares after every step: a cache that
outlived what it describes shows up as a difference (or, with a freed address, as garbage).

With the guard on, the twin is the same optimizer on the reference backend, the sequence also
holds what the guard reacts to (gradients 30x larger, a flipped mean, a NaN or an Inf) and the
options vary with the seed (policy, stats_freq, max_grad_norm): the early telemetry pass's
recipes, the tables of the telemetry rows and the guard state carried through checkpoints are
then in play, and each call's regime, scale and skip count must be the reference's.
"""

import random
from typing import Optional

import pytest
import torch

from lbw_kernels import GuardedAdamW

SHAPES = [(7, 3), (5,), (1,), (130,)]
ADDED = [[(4, 4)], [(9,), (2, 3)]]  # the param groups added along the way
# fp32: a few ulps over ~30 steps (test_adamw_equivalence), relative to each tensor's scale but
# at least its initial one (1: values start N(0, 1)). The AdamW states drift from torch's by
# ulps that a param's small updates round away; one large update (a gradient far above the
# history: |m / sqrt(v)| ~ 3) that carries a value near 0 shows them, relative to where it
# came from (seed 19 of the triton backend: 4.9e-8 on a move from -0.092 to -0.0085).
TOL = 1e-6
# Most steps write the grads in place, as a training loop's backward does into grads it keeps
# (and as CUDA's caching allocator tends to hand a freed grad's block back): only then do
# calls find their cached plans, the state this test is after. "step" reallocates them.
OPS = ("step_in_place",) * 5 + ("step", "step_not_dense", "some_grads_none", "zero_grad", "lr", "lr_tensor",
                                "add_group", "checkpoint", "move_param", "move_state")
# What the guard reacts to (a guarded life only): every grad 30x larger, the mean pushed below 0,
# one NaN or Inf element.
GUARD_EVENTS = ("spike", "flip", "nan", "inf")


def _close(a, b):
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1.0)
    torch.testing.assert_close(a, b, rtol=TOL, atol=TOL * scale)


# The guarded lives' options, one per seed: each policy with telemetry every call and every
# third call, with clipping and without (single_pass refuses clipping: without it there).
GUARD_OPTIONS = [
    dict(policy="lbw", stats_freq=1, max_grad_norm=None),
    dict(policy="zscore", stats_freq=1, max_grad_norm=1.0),
    dict(policy="lbw", stats_freq=3, max_grad_norm=1.0),
    dict(policy="zscore", stats_freq=3, max_grad_norm=None),
]


def guard_options(gate: str, seed: int) -> dict:
    options = dict(GUARD_OPTIONS[seed])
    if gate != "exact":
        options["max_grad_norm"] = None
    return options


def _run(backend: str, gate: str, seed: int, device: str, guard: Optional[dict] = None) -> int:
    """``guard``: None for a life with the guard off beside torch.optim.AdamW; else the guard's
    options, for a life beside the reference backend with those options."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    def new_params(shapes):
        vals = [torch.randn(s, generator=gen) for s in shapes]
        return ([torch.nn.Parameter(v.to(device)) for v in vals], [torch.nn.Parameter(v.to(device)) for v in vals])

    ours, theirs = new_params(SHAPES)
    # A param that never has a gradient (an unused branch): the lookups of logging code make
    # its state an empty dict on torch's defaultdict, which the checkpoints then hold.
    (unused,), (unused_twin,) = new_params([(3,)])
    options = dict(lr=1e-2, weight_decay=0.05)
    guarded = dict(auto_enabled=False, gate=gate) if guard is None else dict(guard, gate=gate)
    make_ours = lambda groups: GuardedAdamW(groups, **options, **guarded, backend=backend)  # noqa: E731
    if guard is None:
        make_theirs = lambda groups: torch.optim.AdamW(groups, **options, foreach=False)  # noqa: E731
        ops = OPS
    else:
        make_theirs = lambda groups: GuardedAdamW(groups, **options, **guarded, backend="reference")  # noqa: E731
        ops = OPS + GUARD_EVENTS
    opt, ref = make_ours([unused] + ours), make_theirs([unused_twin] + theirs)
    added = list(ADDED)
    steps = 0

    def set_grads(which, in_place=False, not_dense=False, event=None):
        for i in which:
            # (a positive mean: the signed mean's sign, and so a flip, means something)
            g = torch.randn(ours[i].shape, generator=gen) + (0.0 if guard is None else 0.3)
            if event == "spike":
                g *= 30
            elif event == "flip":
                g -= 1.3
            elif event in ("nan", "inf") and i == which[-1]:
                g.view(-1)[rnd.randrange(g.numel())] = float(event)
            g = g.to(device)
            for p in (ours[i], theirs[i]):
                if in_place and p.grad is not None:
                    p.grad.copy_(g)
                elif not_dense:  # every other element of a buffer twice the size
                    p.grad = torch.stack([g, torch.full_like(g, float("nan"))], dim=-1)[..., 0]
                else:
                    p.grad = g.clone()

    def step():
        nonlocal steps
        opt.step()
        ref.step()
        steps += 1
        for a, b in zip(ours, theirs):
            _close(a, b)
        if guard is not None:
            got, want = opt.telemetry(), ref.telemetry()
            assert (got["step"], got["regime"], got["skipped_steps"]) == (want["step"], want["regime"],
                                                                         want["skipped_steps"]), (steps, got, want)
            # (the same decisions: the scales differ by the controllers' float64 roundings at most)
            assert got["scale"] == pytest.approx(want["scale"], rel=1e-12), (steps, got, want)
            # The measurements themselves: the reference sums fp32 gradients in fp32
            # (verify.PARTIALS_TOLERANCE_FP32_SUMS: 4e-6 relative on sums of squares), the
            # kernels in float64; the signed mean of ~100 elements near 0.3 also absolutely.
            for key, rel, abs_ in (("grad_ms", 4e-6, 0.0), ("grad_norm", 4e-6, 0.0), ("signed_mean", 1e-4, 1e-7)):
                assert got[key] == pytest.approx(want[key], rel=rel, abs=abs_, nan_ok=True), (steps, key, got, want)
            regimes.add(want["regime"])

    regimes = set()
    for _ in range(60):
        op = rnd.choice(ops)
        n = len(ours)
        if op in GUARD_EVENTS:  # grads the guard reacts to, written in place
            set_grads(range(n), in_place=True, event=op)
            step()
        elif op == "step":  # new grad tensors
            set_grads(range(n))
            step()
        elif op == "some_grads_none":  # params without a grad this call: no update, no state change
            keep = [i for i in range(n) if rnd.random() < 0.5]
            set_grads(keep)
            for i in set(range(n)) - set(keep):
                ours[i].grad = theirs[i].grad = None
            step()
        elif op == "zero_grad":
            set_to_none = rnd.random() < 0.5
            opt.zero_grad(set_to_none=set_to_none)
            ref.zero_grad(set_to_none=set_to_none)
        elif op == "step_not_dense":  # grads as views with gaps (torch allows any grad of the param's shape)
            set_grads(range(n), not_dense=True)
            step()
        elif op == "step_in_place":  # the grads' storage kept (the usual loop: zero_grad(False), backward)
            set_grads(range(n), in_place=True)
            step()
        elif op in ("lr", "lr_tensor"):
            gi = rnd.randrange(len(opt.param_groups))
            lr = rnd.choice([3e-3, 1e-2, 2e-2])
            for o in (opt, ref):
                o.param_groups[gi]["lr"] = torch.tensor(lr, device=device) if op == "lr_tensor" else lr
        elif op == "add_group" and added:
            mine, twins = new_params(added.pop(0))
            ours += mine
            theirs += twins
            group = dict(lr=rnd.choice([5e-3, 2e-2]), weight_decay=rnd.choice([0.0, 0.1]))
            opt.add_param_group(dict(params=mine, **group))
            ref.add_param_group(dict(params=twins, **group))
        elif op == "checkpoint":  # saved, then loaded into a fresh optimizer over the same params
            assert "exp_avg" not in opt.state[unused] and "exp_avg" not in ref.state[unused_twin]
            sd, ref_sd = opt.state_dict(), ref.state_dict()
            opt = make_ours([{"params": g["params"]} for g in opt.param_groups])
            ref = make_theirs([{"params": g["params"]} for g in ref.param_groups])
            opt.load_state_dict(sd)
            ref.load_state_dict(ref_sd)
        elif op == "move_param":  # new storage, same values (offloading, resharding, .to() and back)
            p = rnd.choice(ours)
            p.data = p.data.clone()
        elif op == "move_state":
            with_state = [p for p in ours if opt.state.get(p)]
            if with_state:
                state = opt.state[rnd.choice(with_state)]
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    state[key].data = state[key].data.clone()
    set_grads(range(len(ours)))
    step()
    assert not opt.state.get(unused) and not ref.state.get(unused_twin) and torch.equal(unused, unused_twin)
    for a, b in zip(ours, theirs):
        if opt.state.get(a):
            sa, sb = opt.state[a], ref.state[b]
            _close(sa["exp_avg"], sb["exp_avg"])
            _close(sa["exp_avg_sq"], sb["exp_avg_sq"])
            assert sa["step"].item() == sb["step"].item()
        else:
            assert not ref.state.get(b)
    if guard is not None:
        assert regimes - {"calm"}, "the guard never left its calm regime: the life tested nothing of it"
    return steps


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_random_training_life_stays_torch_adamw(backend, gate, seed):
    assert _run(backend, gate, seed, "cpu") >= 10


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gpu_a_random_training_life_stays_torch_adamw(backend_name, gate, seed):
    from lbw_kernels.backends import availability

    if availability()[backend_name] is not None:
        pytest.skip(availability()[backend_name])
    assert _run(backend_name, gate, seed, "cuda") >= 10


@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_random_guarded_life_stays_the_reference(backend_name, gate, seed):
    from lbw_kernels.backends import availability

    if availability()[backend_name] is not None:
        pytest.skip(availability()[backend_name])
    assert _run(backend_name, gate, seed, "cpu", guard_options(gate, seed)) >= 10


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gpu_a_random_guarded_life_stays_the_reference(backend_name, gate, seed):
    from lbw_kernels.backends import availability

    if availability()[backend_name] is not None:
        pytest.skip(availability()[backend_name])
    assert _run(backend_name, gate, seed, "cuda", guard_options(gate, seed)) >= 10


_SHARED_SHAPES = [(30, 7), (17,), (500,)]


def _shared_run(backend):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in _SHARED_SHAPES]
    return params, GuardedAdamW(params, lr=1e-2, backend=backend, stats_freq=3)


def _shared_steps(params, opt, seed, calls):
    gen = torch.Generator().manual_seed(seed)
    for k in range(calls):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * (1 + 8 * (k == 1))  # (a spike the guard cuts on)
        opt.step()


def _shared_child(params, opt):
    torch.set_num_threads(1)
    _shared_steps(params, opt, 1, 2)


def test_an_optimizer_shared_with_another_process_keeps_the_schedule(backend):
    """The shared-optimizer pattern (A3C): params, AdamW state and the guard in shared memory,
    a child process stepping the same optimizer (torch.multiprocessing sends its tensors as
    shared memory). Rule 2's schedule followed the parent's own count of its calls, which the
    child's calls did not advance: telemetry came on other calls than in one process. A CPU
    guard in shared memory is read for the schedule (reading CPU memory waits for nothing)."""
    import torch.multiprocessing as tmp

    params, opt = _shared_run(backend)
    _shared_steps(params, opt, 0, 2)
    for p in params:
        p.share_memory_()
    one, one_opt = _shared_run(backend)
    for seed, calls in ((0, 2), (1, 2), (2, 3)):
        _shared_steps(one, one_opt, seed, calls)
    child = tmp.get_context("spawn").Process(target=_shared_child, args=(params, opt))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    _shared_steps(params, opt, 2, 3)
    assert opt.telemetry() == one_opt.telemetry()
    assert all(torch.equal(p, q) for p, q in zip(params, one))
