"""Checkpoints: bitwise round trip, AdamW -> GuardedAdamW migration, another model refused."""

import copy
import math
import io

import pytest
import torch

from lbw_kernels import GuardedAdamW
from lbw_kernels import reference as ref
from lbw_kernels.distributed import init_state_
from streams import random_stream, run

SHAPES = [(6, 5), (17,), (3,)]


def model(dtype=torch.float64, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def groups(params):
    return [{"params": params[:1]}, {"params": params[1:], "lr": 3e-3, "weight_decay": 0.0}]


def through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_continue_is_bitwise_identical(gate, dtype, backend):
    stream = random_stream(20, SHAPES, seed=1, dtype=dtype, spikes=(4, 12), flips=(8,), nan_at=(6, 15))
    kw = dict(lr=1e-2, stats_freq=3, gate=gate, backend=backend)
    params = model(dtype)
    opt = GuardedAdamW(groups(params), **kw)
    run(opt, params, stream[:9])
    saved_params = through_bytes([p.clone() for p in params])
    saved = through_bytes(opt.state_dict())
    straight = run(opt, params, stream[9:], record=("scale", "regime", "grad_ms", "skipped_steps", "step"))

    resumed_params = [p.clone() for p in saved_params]
    opt2 = GuardedAdamW(groups(resumed_params), **kw)
    opt2.load_state_dict(saved)
    resumed = run(opt2, resumed_params, stream[9:], record=("scale", "regime", "grad_ms", "skipped_steps", "step"))
    assert resumed == straight
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed_params):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])
            assert opt2.state[b][key].dtype == opt.state[a][key].dtype  # bf16 params keep fp32 state


@pytest.mark.parametrize("policy", ["lbw", "zscore"])
def test_state_and_param_groups_alone_resume_the_guard(policy):
    """torch.distributed.checkpoint.state_dict.get_optimizer_state_dict keeps only "state" and
    "param_groups": the guard's copy in the first param state resumes it, policy checked."""
    stream = random_stream(12, SHAPES, seed=6, spikes=(4, 5, 10))
    kw = dict(lr=1e-2, stats_freq=2, policy=policy)
    params = model()
    opt = GuardedAdamW(groups(params), **kw)
    run(opt, params, stream[:6])
    saved = through_bytes({k: v for k, v in opt.state_dict().items() if k in ("state", "param_groups")})
    saved_params = [p.clone() for p in params]
    straight = run(opt, params, stream[6:], record=("scale", "regime", "grad_ms", "step"))
    opt2 = GuardedAdamW(groups(saved_params), **kw)
    opt2.load_state_dict(saved)
    assert run(opt2, saved_params, stream[6:], record=("scale", "regime", "grad_ms", "step")) == straight
    holders = [p for p in saved_params if "lbw_guard" in opt2.state[p]]
    assert holders == [saved_params[0]] and opt2.state[holders[0]]["lbw_guard"] is opt2._guard
    other = GuardedAdamW(groups(model()), policy="zscore" if policy == "lbw" else "lbw")
    with pytest.raises(ValueError, match="policy"):
        other.load_state_dict(saved)


def _module(params):
    module = torch.nn.Module()
    module.ps = torch.nn.ParameterList([torch.nn.Parameter(p, requires_grad=True) for p in params])
    return module, list(module.ps)


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_dcp_state_init_call_takes_adamw_step_without_the_guard(gate, flatten, backend):
    """get_optimizer_state_dict on an optimizer with no state runs step() with zero gradients
    and lr 0 to create AdamW's state. As for torch.optim.AdamW, that makes step 1 with zero
    moments; the guard must not count it: a zero reading would become its EMA and every real
    call after it a spike (before the fix, a small MLP's scale fell from 1 to 0.3 in 5 calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    stream = random_stream(8, SHAPES, seed=4)
    record = ("scale", "regime", "grad_ms", "ratio", "step")
    kw = dict(lr=1e-2, stats_freq=1, gate=gate, backend=backend)
    module, params = _module(model())
    opt = GuardedAdamW(groups(params), **kw)
    fresh = opt.state_dict()["guard"]["state"]
    before = [p.detach().clone() for p in params]
    osd = get_optimizer_state_dict(module, opt, options=StateDictOptions(flatten_optimizer_state_dict=flatten))
    assert _same_guard(opt.state_dict()["guard"]["state"], fresh) and opt.telemetry()["step"] == 0
    assert [opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]] == [1e-2, 3e-3]  # DCP restores them
    adamw_module, adamw_params = _module(model())
    adamw = torch.optim.AdamW(groups(adamw_params), lr=1e-2)
    get_optimizer_state_dict(adamw_module, adamw)
    for p, q, b in zip(params, adamw_params, before):
        assert torch.equal(p.detach(), b) and p.grad is None
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], adamw.state[q][key]), key
    assert len(osd) > 0

    # the same run as one whose state was created by hand as that call leaves it
    _, params2 = _module(model())
    opt2 = GuardedAdamW(groups(params2), **kw)
    init_state_(opt2)
    for p in params2:
        opt2.state[p]["step"].fill_(1)
    assert run(opt, params, stream, record) == run(opt2, params2, stream, record)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


def test_dcp_state_init_call_is_recognised_by_a_compiled_step():
    """``opt.step = torch.compile(opt.step)``, then the DCP call: the check runs in the step's
    eager part, so the compiled step keeps the guard out too."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    module, params = _module(model())
    opt = GuardedAdamW(groups(params), lr=1e-2, stats_freq=1, backend="reference")
    opt.step = torch.compile(opt.step, backend="aot_eager")
    get_optimizer_state_dict(module, opt)
    assert opt.telemetry()["step"] == 0 and all(opt.state[p]["step"].item() == 1 for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.telemetry()["step"] == 1 and opt.telemetry()["grad_ms"] == 1.0


def test_dcp_state_init_call_leaves_the_telemetry_schedule_alone():
    """With stats_freq=3 telemetry is read on calls 1, 3, 6, ...: DCP's call must not be call 1."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    module, params = _module(model())
    opt = GuardedAdamW(groups(params), lr=1e-2, stats_freq=3)
    get_optimizer_state_dict(module, opt)
    read = []
    for k in (1, 2, 3):
        for p in params:
            p.grad = torch.full_like(p, float(k))
        opt.step()
        read.append(opt.telemetry()["grad_ms"])  # the latest reading: call 2 keeps call 1's
    assert read == [1.0, 1.0, 9.0]


@pytest.mark.parametrize("grad", [0.0, 0.5])
def test_a_first_step_at_lr_0_outside_dcp_is_a_guard_call(grad):
    """Only DCP's own call is kept out, told by its caller: a first step with lr 0 (a warm-up
    from 0) and zero or non-zero gradients is a guard call, read as usual."""
    params = model()
    opt = GuardedAdamW(groups(params), lr=0.0, stats_freq=1)
    opt.param_groups[1]["lr"] = torch.tensor(0.0)
    for p in params:
        p.grad = torch.full_like(p, grad)
    opt.step()
    t = opt.telemetry()
    assert t["step"] == 1 and t["grad_ms"] == grad**2


def _same_guard(a, b):
    return torch.equal(a.nan_to_num(7.25), b.nan_to_num(7.25))


def test_guarded_checkpoint_loads_into_torch_adamw():
    params = model()
    opt = GuardedAdamW(groups(params), lr=1e-2, auto_enabled=False)
    run(opt, params, random_stream(3, SHAPES, seed=8))
    theirs = [p.clone() for p in params]
    adamw = torch.optim.AdamW(groups(theirs), lr=1e-2)
    adamw.load_state_dict(through_bytes(opt.state_dict()))
    stream = random_stream(2, SHAPES, seed=9)
    run(opt, params, stream)
    for grads in stream:
        run_adamw(adamw, theirs, grads)
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # and back: AdamW's load cast the guard copy (and its policy tag) to the params' dtype and
    # its steps went on without it, so the guard starts fresh instead of resuming a stale one
    back = GuardedAdamW(groups([p.clone() for p in theirs]), lr=1e-2)
    back.load_state_dict(through_bytes(adamw.state_dict()))
    assert back.telemetry()["step"] == 0 and back.telemetry()["scale"] == 1.0
    assert back.state[back.param_groups[0]["params"][0]]["step"].item() == 5
    # a checkpoint with a copy in every state (a ZeroRedundancyOptimizer's) through an AdamW
    # whose params have several dtypes: every copy cast to its own param's dtype, all stale
    saved = through_bytes(opt.state_dict())
    for pid, dtype in zip(saved["state"], (torch.float32, torch.bfloat16, torch.float64)):
        entry = saved["state"][pid]
        entry["lbw_guard"], entry["lbw_guard_policy"] = saved["guard"]["state"].to(dtype), entry.get(
            "lbw_guard_policy", back._policy_tag).to(dtype)
    del saved["guard"]
    back.load_state_dict(saved)
    assert back.telemetry()["step"] == 0 and back.telemetry()["scale"] == 1.0


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_continues_like_the_original(how):
    import pickle

    params = model()
    opt = GuardedAdamW(groups(params), lr=1e-2, stats_freq=2, policy="zscore")
    stream = random_stream(8, SHAPES, seed=3, spikes=(3, 4))
    run(opt, params, stream[:4])
    if how == "deepcopy":
        opt2 = copy.deepcopy(opt)
        params2 = [p for g in opt2.param_groups for p in g["params"]]
    else:
        params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    assert opt2._guard is not opt._guard and opt2.state[params2[0]]["lbw_guard"] is opt2._guard
    record = ("scale", "regime", "grad_ms", "step")
    assert run(opt2, params2, stream[4:], record=record) == run(opt, params, stream[4:], record=record)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))


def test_guard_rides_in_the_first_param_state_with_state():
    """The first param (group order) whose state exists carries the guard, whatever order the
    states were created in; the entry moves with it and is in one state only."""
    params = model()
    opt = GuardedAdamW(groups(params), lr=1e-2)
    holders = lambda: [i for i, p in enumerate(params) if "lbw_guard" in opt.state.get(p, {})]  # noqa: E731
    run(opt, params, [[None, torch.ones(17, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]])
    assert holders() == [1]
    run(opt, params, random_stream(1, SHAPES))
    assert holders() == [0] and opt.state[params[0]]["lbw_guard"] is opt._guard
    extra = torch.zeros(4, dtype=torch.float64)
    opt.add_param_group({"params": [extra]})
    run(opt, params + [extra], random_stream(1, SHAPES + [(4,)]))
    assert holders() == [0]
    del opt.state[params[0]]  # a user resetting one param's moments
    sd = opt.state_dict()
    assert holders() == [1] and [k for k, v in sd["state"].items() if "lbw_guard" in v] == [1]
    assert torch.equal(sd["state"][1]["lbw_guard"], sd["guard"]["state"])


def test_disagreeing_guard_copies_are_refused():
    params = model()
    opt = GuardedAdamW(groups(params), lr=1e-2)
    run(opt, params, random_stream(2, SHAPES))
    edited = opt.state_dict()
    edited["state"][0] = {**edited["state"][0], "lbw_guard": edited["state"][0]["lbw_guard"] + 1}
    _refused(opt, edited, "differ")
    # copies in several param states (a ZeroRedundancyOptimizer's checkpoint has one in each) load
    # when they agree, values and policy
    twice = opt.state_dict()
    twice["state"][1] = {**twice["state"][1], "lbw_guard": twice["state"][0]["lbw_guard"].clone(),
                         "lbw_guard_policy": twice["state"][0]["lbw_guard_policy"]}
    opt.load_state_dict(twice)
    assert torch.equal(opt._guard, twice["guard"]["state"])
    twice["state"][1]["lbw_guard"] = twice["state"][1]["lbw_guard"] + 1
    _refused(opt, twice, r"state_dict\['state'\]\[1\]\['lbw_guard'\] and state_dict\['state'\]\[0\]\['lbw_guard'\] differ")
    twice["state"][1] = {**twice["state"][1], "lbw_guard": twice["state"][0]["lbw_guard"],
                         "lbw_guard_policy": torch.tensor(list(b"zscore"), dtype=torch.uint8)}
    _refused(opt, twice, "differ")


@pytest.mark.parametrize("policy", ["lbw", "zscore"])
def test_checkpoint_from_before_the_call_count_slot_loads(policy):
    """Checkpoints written before the call count moved into the guard state kept it in
    ["guard"]["calls"] and had one slot fewer (the policy's slots one lower): they load, and
    training continues as if never interrupted."""
    stream = random_stream(14, SHAPES, seed=4, spikes=(5, 6, 11), nan_at=(9,))
    kw = dict(lr=1e-2, stats_freq=3, policy=policy)
    params = model()
    opt = GuardedAdamW(groups(params), **kw)
    run(opt, params, stream[:7])
    saved = through_bytes(opt.state_dict())
    saved_params = [p.clone() for p in params]
    straight = run(opt, params, stream[7:], record=("scale", "regime", "grad_ms", "step"))

    state = saved["guard"]["state"]
    saved["guard"] = {**saved["guard"], "state": torch.cat([state[: ref.CALLS], state[ref.CALLS + 1 :]]),
                      "calls": int(state[ref.CALLS])}
    for entry in saved["state"].values():  # nor did params' states carry the guard then
        entry.pop("lbw_guard", None), entry.pop("lbw_guard_policy", None)
    opt2 = GuardedAdamW(groups(saved_params), **kw)
    opt2.load_state_dict(saved)
    assert opt2.telemetry()["step"] == 7
    assert run(opt2, saved_params, stream[7:], record=("scale", "regime", "grad_ms", "step")) == straight
    assert all(torch.equal(a, b) for a, b in zip(params, saved_params))
    torch.testing.assert_close(opt2._guard, opt._guard, rtol=0, atol=0, equal_nan=True)  # bitwise; unused slots NaN


def test_loaded_state_does_not_alias_the_dict():
    params = model()
    opt = GuardedAdamW(params)
    run(opt, params, random_stream(2, SHAPES))
    sd = opt.state_dict()
    keep = copy.deepcopy(sd)
    opt2 = GuardedAdamW(model())
    opt2.load_state_dict(sd)
    run(opt2, opt2.param_groups[0]["params"], random_stream(2, SHAPES, seed=9))
    assert torch.equal(sd["state"][0]["exp_avg"], keep["state"][0]["exp_avg"])
    assert torch.equal(sd["guard"]["state"], keep["guard"]["state"])


def test_torch_adamw_checkpoint_migrates_and_training_continues():
    stream = random_stream(10, SHAPES, seed=2)
    theirs = model()
    adamw = torch.optim.AdamW(groups(theirs), lr=1e-2)
    for grads in stream[:5]:
        run_adamw(adamw, theirs, grads)
    checkpoint = through_bytes(adamw.state_dict())
    ours = [p.clone() for p in theirs]
    for grads in stream[5:]:
        run_adamw(adamw, theirs, grads)

    opt = GuardedAdamW(groups(ours), lr=1e-2, auto_enabled=False)
    opt.load_state_dict(checkpoint)
    assert opt.telemetry()["step"] == 0 and opt.telemetry()["scale"] == 1.0  # a fresh guard
    run(opt, ours, stream[5:])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert opt.param_groups[1]["lr"] == 3e-3
    assert all(opt.state[p]["step"].item() == 10 for p in ours)

    # with the guard on, the migrated optimizer trains and reads telemetry from call 1
    guarded = GuardedAdamW(groups([p.clone() for p in ours]), lr=1e-2)
    guarded.load_state_dict(checkpoint)
    run(guarded, guarded.param_groups[0]["params"] + guarded.param_groups[1]["params"], stream[:2])
    assert guarded.telemetry()["regime"] == "calm"


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_an_empty_param_state_loads_as_no_state_yet(gate, backend):
    """A param that has had no gradient has no AdamW state; a lookup on torch's defaultdict
    state (``opt.state[p]``, as logging code does) makes an empty one, which state_dict() saves
    as ``{}``. torch.optim.AdamW loads that as "no state yet", and so does GuardedAdamW: the
    param's first step with a gradient creates its state, as without the load."""
    stream = random_stream(10, SHAPES, seed=2, spikes=(7,))
    for grads in stream[:4]:
        grads[2] = None  # the last param has no gradient in the first 4 calls
    kw = dict(lr=1e-2, stats_freq=2, gate=gate, backend=backend)
    record = ("scale", "regime", "grad_ms", "step")
    params = model()
    opt = GuardedAdamW(groups(params), **kw)
    run(opt, params, stream[:3])
    assert "exp_avg" not in opt.state[params[2]]  # (the lookup makes the empty entry)
    saved_params = [p.clone() for p in params]
    saved = through_bytes(opt.state_dict())
    assert saved["state"][2] == {}
    straight = run(opt, params, stream[3:], record)

    opt2 = GuardedAdamW(groups(saved_params), **kw)
    opt2.load_state_dict(saved)
    assert dict.get(opt2.state, saved_params[2]) == {}  # kept, as torch.optim.AdamW keeps it
    assert run(opt2, saved_params, stream[3:], record) == straight
    for a, b in zip(params, saved_params):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])

    # the guard's copies alone in an entry without AdamW state still carry the guard
    riders_only = copy.deepcopy(saved)
    del riders_only["guard"]
    riders_only["state"][2] = {k: riders_only["state"][0].pop(k) for k in ("lbw_guard", "lbw_guard_policy")}
    opt3 = GuardedAdamW(groups(model()), **kw)
    opt3.load_state_dict(riders_only)
    assert _same_guard(opt3._guard, saved["guard"]["state"])
    assert not dict.get(opt3.state, opt3.param_groups[1]["params"][1])

    # the same where ZeroRedundancyOptimizer.load_state_dict puts the states in itself (zero.py)
    zero_params = model()
    installed = GuardedAdamW(groups(zero_params), **kw)
    for pid, p in enumerate(zero_params):
        installed.state[p] = copy.deepcopy(saved["state"][pid])
    installed.adopt_installed_state()
    assert _same_guard(installed._guard, saved["guard"]["state"]) and dict.get(installed.state, zero_params[2]) == {}


def test_a_torch_adamw_checkpoint_with_an_empty_param_state_loads():
    params = model()
    theirs = [p.clone() for p in params]
    adamw = torch.optim.AdamW(groups(theirs), lr=1e-2)
    stream = random_stream(5, SHAPES, seed=6)
    for grads in stream[:2]:
        run_adamw(adamw, theirs[:2], grads[:2])  # the last param has no gradient yet
    assert not adamw.state[theirs[2]]
    saved = through_bytes(adamw.state_dict())
    assert saved["state"][2] == {}
    ours = [p.clone() for p in theirs]
    opt = GuardedAdamW(groups(ours), lr=1e-2, auto_enabled=False)
    opt.load_state_dict(saved)
    for grads in stream[2:]:
        run_adamw(adamw, theirs, grads)
    run(opt, ours, stream[2:])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert opt.state[ours[2]]["step"].item() == adamw.state[theirs[2]]["step"].item() == 3


def test_a_flattened_dcp_checkpoint_with_a_param_without_state_loads(backend):
    """torch.distributed.checkpoint's set_optimizer_state_dict with
    flatten_optimizer_state_dict=True (torchtitan's setting) makes ``state[fqn] = {}`` for every
    param that requires grad and has no state (an unused branch, an expert no token reached):
    it loads as into torch.optim.AdamW, and the guard resumes. (One process: these functions
    need no process group.)"""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=True)

    def make():
        torch.manual_seed(0)
        m = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 2), "unused": torch.nn.Linear(4, 2)})
        return m, GuardedAdamW(m.parameters(), lr=1e-2, stats_freq=1, backend=backend)

    def train(m, opt, calls, seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(calls):
            m["used"](torch.randn(8, 4, generator=gen)).square().sum().backward()
            opt.step()
            opt.zero_grad()

    m, opt = make()
    train(m, opt, 3, seed=1)
    saved = get_optimizer_state_dict(m, opt, options=options)
    m2, opt2 = make()
    train(m2, opt2, 1, seed=2)  # (the load unflattens into the keys the live states have)
    m2.load_state_dict(m.state_dict())
    set_optimizer_state_dict(m2, opt2, saved, options=options)
    assert opt2.telemetry() == opt.telemetry()
    for (name, p), q in zip(m.named_parameters(), m2.parameters()):
        if name.startswith("used"):
            assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
        else:
            assert not opt2.state.get(q)
    train(m, opt, 2, seed=3)
    train(m2, opt2, 2, seed=3)
    assert opt2.telemetry() == opt.telemetry()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))


def test_a_load_keeps_the_param_names_when_the_checkpoint_has_none():
    """As torch.optim.Optimizer.load_state_dict: the live groups' ``param_names`` stay when the
    checkpoint's groups have none (one saved by an optimizer built from ``parameters()``); the
    checkpoint's replace them when it has them."""
    m = torch.nn.Linear(3, 2)
    plain = torch.optim.AdamW(m.parameters()).state_dict()
    named = torch.optim.AdamW(m.named_parameters()).state_dict()
    named["param_groups"][0]["param_names"] = ["w", "b"]
    for saved, names in ((plain, ["weight", "bias"]), (named, ["w", "b"])):
        got = []
        for cls in (torch.optim.AdamW, GuardedAdamW):
            opt = cls(m.named_parameters())
            opt.load_state_dict(saved)
            got.append((opt.param_groups[0].get("param_names"), opt.state_dict()["param_groups"][0].get("param_names")))
        assert got == [(names, names)] * 2, (names, got)


def run_adamw(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _refused(opt, state_dict, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    # (NaN slots: a zscore guard's ratio, which it never measures)
    assert torch.equal(after["guard"]["state"].nan_to_num(7.0), before["guard"]["state"].nan_to_num(7.0))
    for k in before["state"]:
        for key, value in before["state"][k].items():
            same = (torch.equal(after["state"][k][key].nan_to_num(7.0), value.nan_to_num(7.0))
                    if isinstance(value, torch.Tensor) else after["state"][k][key] == value)
            assert same, (k, key)


def test_state_dict_of_another_model_is_refused_and_nothing_changes():
    params = model()
    opt = GuardedAdamW(groups(params))
    run(opt, params, random_stream(3, SHAPES))

    other_shapes = model(shapes=[(6, 5), (16,), (3,)])
    other = GuardedAdamW(groups(other_shapes))
    run(other, other_shapes, random_stream(2, [(6, 5), (16,), (3,)]))
    _refused(opt, other.state_dict(), "another model")

    fewer = GuardedAdamW(model()[:2])
    run(fewer, fewer.param_groups[0]["params"], random_stream(1, SHAPES[:2]))
    _refused(opt, fewer.state_dict(), "param groups")

    regrouped = model()
    regroup = GuardedAdamW([{"params": regrouped[:2]}, {"params": regrouped[2:]}])
    _refused(opt, regroup.state_dict(), "another model")

    ams = model()
    amsgrad = torch.optim.AdamW(groups(ams), amsgrad=True)
    run_adamw(amsgrad, ams, random_stream(1, SHAPES)[0])
    _refused(opt, amsgrad.state_dict(), "amsgrad")

    broken = opt.state_dict()
    broken["guard"] = {"state": torch.zeros(3)}
    _refused(opt, broken, "guard")

    for count in (-1.0, 2.5, float("nan"), float("inf")):
        bad_count = opt.state_dict()
        bad_count["guard"]["state"][ref.CALLS] = count
        _refused(opt, bad_count, "call count")


@pytest.mark.parametrize(
    "slot, value, match",
    [
        (ref.SCALE, float("nan"), "scale of nan"),
        (ref.SCALE, -1.0, "scale of -1.0"),
        (ref.SCALE, 0.0, "scale of 0.0"),
        (ref.SCALE, float("inf"), "scale of inf"),
        (ref.SKIPPED, float("nan"), "skipped-call count"),
        (ref.ANALYZED, 1.5, "analysed-call count"),
        (ref.REGIME, 99.0, "regime code of 99.0"),
        (ref.SKIP, 0.5, "skip flag"),
        (ref.CALLS, 1e300, "call count of 1e"),  # (whole, but past float64's whole numbers: 2**53)
        (ref.ANALYZED, 1e6, "analysed-call count of 1000000.0: above the call count"),
        (ref.SKIPPED, 1e6, "skipped-call count of 1000000.0: above the call count"),
    ],
)
def test_guard_values_no_run_can_reach_are_refused(slot, value, match):
    """A NaN or negative scale would poison or reverse every update after the load; a bad
    count or regime code would make telemetry() raise at every call."""
    params = model()
    opt = GuardedAdamW(groups(params))
    run(opt, params, random_stream(2, SHAPES))
    bad = opt.state_dict()
    bad["guard"]["state"][slot] = value
    _refused(opt, bad, match)


@pytest.mark.parametrize(
    "slot, value, match",
    [
        ("LOG_NORM_VAR", -1.0, "log_norm_var of -1.0"),
        ("LOG_NORM_VAR", -float("inf"), "log_norm_var of -inf"),
        ("LAST_HOT", -2.5, "last_hot_call of -2.5"),
        ("LAST_HOT", 1e6, "last_hot_call of 1000000.0"),
        ("SEEN", -7.0, "norms_seen of -7.0"),
        ("SEEN", 0.5, "norms_seen of 0.5"),
    ],
)
def test_zscore_slots_no_run_can_reach_are_refused(slot, value, match):
    """The zscore policy's own slots: a negative variance made its z and sd NaN for good (the
    policy then never cut again), and counts that are not whole or beyond the analysed calls
    were taken as they came."""
    from lbw_kernels import policies

    params = model()
    opt = GuardedAdamW(groups(params), policy="zscore", stats_freq=1)
    run(opt, params, random_stream(4, SHAPES))
    bad = opt.state_dict()
    bad["guard"]["state"][getattr(policies, slot)] = value
    _refused(opt, bad, match)


def test_zscore_statistics_an_inf_norm_made_inf_or_nan_load():
    """With skip_nonfinite=False an Inf gradient norm reaches the zscore policy (a norm > 0 is
    read): on the first reading its mean becomes inf, then NaN with its variance at the next.
    A state a run reaches, so its own checkpoint loads."""
    params = model()
    opt = GuardedAdamW(groups(params), policy="zscore", stats_freq=1, skip_nonfinite=False)
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    run(opt, params, random_stream(2, SHAPES, seed=5))
    saved = opt.state_dict()
    from lbw_kernels import policies

    assert not math.isfinite(float(saved["guard"]["state"][policies.LOG_NORM_MEAN]))
    fresh = GuardedAdamW(groups(model()), policy="zscore", stats_freq=1, skip_nonfinite=False)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh._guard.nan_to_num(7.0), opt._guard.nan_to_num(7.0))


def test_a_guard_saved_in_half_precision_is_refused():
    """A checkpoint cast to float16 or bfloat16 for storage: its counts above 2048 (256) are no
    longer the run's, and its EMA has 3 digits; the guard must be float32 or float64."""
    params = model()
    opt = GuardedAdamW(groups(params))
    run(opt, params, random_stream(2, SHAPES))
    for dtype in (torch.float16, torch.bfloat16):
        bad = opt.state_dict()
        bad["guard"]["state"] = bad["guard"]["state"].to(dtype)
        bad["state"][0]["lbw_guard"] = bad["guard"]["state"]
        _refused(opt, bad, f"float32 or float64, got {dtype}")


def test_a_zscore_policy_of_numpy_numbers_saves_a_weights_only_checkpoint():
    """numpy numbers (a config read with numpy) become Python numbers in the policy, as the
    optimizer's own arguments do: the policy's fields ride in every checkpoint, which
    torch.load(weights_only=True) refuses to unpickle with numpy scalars in it."""
    np = pytest.importorskip("numpy")
    from lbw_kernels.policies import ZScorePolicy

    policy = ZScorePolicy(z_threshold=np.float64(3.0), window=np.int64(2), growth=np.float32(0.5))
    assert (type(policy.z_threshold), type(policy.window), type(policy.growth)) == (float, int, float)
    assert policy == ZScorePolicy(z_threshold=3.0, window=2, growth=0.5)
    params = model()
    opt = GuardedAdamW(groups(params), policy=policy)
    run(opt, params, random_stream(2, SHAPES))
    loaded = through_bytes(opt.state_dict())  # (torch.load with weights_only=True)
    fresh = GuardedAdamW(groups(model()), policy=policy)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh._guard.nan_to_num(7.0), opt._guard.nan_to_num(7.0))


def test_measured_guard_slots_may_be_nan():
    """With skip_nonfinite=False a NaN gradient reaches the analyzer, so a real run can save
    a NaN EMA: such a checkpoint loads."""
    params = model()
    opt = GuardedAdamW(groups(params), skip_nonfinite=False)
    run(opt, params, random_stream(2, SHAPES))
    saved = opt.state_dict()
    saved["guard"]["state"][ref.EMA] = float("nan")
    fresh = GuardedAdamW(groups(model()), skip_nonfinite=False)
    fresh.load_state_dict(saved)
    assert fresh._guard[ref.EMA].isnan()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda sd, pid: sd["state"].__setitem__(pid, None), r"state\[\d+\] must be a dict"),
        (lambda sd, pid: sd["state"][pid].__setitem__("exp_avg", None), r"\['exp_avg'\] must be a tensor"),
        (lambda sd, pid: sd["state"][pid].__setitem__("exp_avg", sd["state"][pid]["exp_avg"].to_sparse()),
         r"\['exp_avg'\] must be a dense real floating-point tensor"),
        (lambda sd, pid: sd["state"][pid].__setitem__("exp_avg_sq", sd["state"][pid]["exp_avg_sq"].to(torch.complex128)),
         r"\['exp_avg_sq'\] must be a dense real floating-point tensor"),
        (lambda sd, pid: sd["state"][pid].__setitem__("exp_avg", torch.empty(sd["state"][pid]["exp_avg"].shape, device="meta")),
         r"\['exp_avg'\] must be .* with data"),
        (lambda sd, pid: sd["state"][pid].__setitem__("step", "3"), r"\['step'\] must be a number or a tensor"),
        (lambda sd, pid: sd["state"][pid].__setitem__("step", torch.ones(2)), r"\['step'\] must hold one value"),
        (lambda sd, pid: sd.__setitem__("guard", [1.0]), r"\['guard'\] must be a dict"),
        (lambda sd, pid: sd["param_groups"][1].pop("params"), "each with a 'params' list"),
        (lambda sd, pid: sd["param_groups"][1].__setitem__("eps", -1.0), r"param_groups\[1\]: eps must be >= 0"),
        (lambda sd, pid: sd.pop("state"), "state_dict has no 'state' entry"),
        (lambda sd, pid: sd.__setitem__("state", list(sd["state"].values())), r"state_dict\['state'\] must be a dict, got list"),
        (lambda sd, pid: sd["state"].__setitem__(99, sd["state"][pid]), "state for param id 99, which no group lists"),
        (lambda sd, pid: sd["state"][pid].__setitem__("max_exp_avg_sq", sd["state"][pid]["exp_avg_sq"]),
         r"state\[\d+\] has keys \['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', 'step'\]"),
        # (an empty entry is "no state yet"; a partial one is not)
        (lambda sd, pid: sd["state"].__setitem__(pid, {"step": sd["state"][pid]["step"]}),
         r"state\[\d+\] has keys \['step'\]"),
        # (the guard's copy in the first param's state goes too, so that the entry itself is read)
        (lambda sd, pid: (sd["state"][0].pop("lbw_guard"), sd["guard"].__setitem__("state", [1.0] * 9)),
         r"state_dict\['guard'\]\['state'\] must be a tensor of \d+ values"),
        (lambda sd, pid: (sd["state"][0].pop("lbw_guard"), sd["guard"].update(state=sd["guard"]["state"][1:], calls=-3)),
         r"state_dict\['guard'\]\['calls'\] must be an int >= 0, got -3"),
    ],
)
def test_malformed_entries_are_refused_naming_them(corrupt, match):
    params = model()
    opt = GuardedAdamW(groups(params))
    run(opt, params, random_stream(2, SHAPES))
    bad = opt.state_dict()
    corrupt(bad, sorted(bad["state"])[-1])
    _refused(opt, bad, match)


def test_state_dict_hooks_run_as_on_torch_optim():
    """torch.optim's state_dict and load_state_dict hooks: pre and post, a post hook's edits
    kept, a load pre hook's returned dict the one loaded."""
    params = model()
    opt = GuardedAdamW(groups(params))
    run(opt, params, random_stream(2, SHAPES))
    events = []
    opt.register_state_dict_pre_hook(lambda o: events.append("save pre"))
    opt.register_state_dict_post_hook(lambda o, sd: (events.append("save post"), sd.__setitem__("note", "kept"))[0])
    saved = opt.state_dict()
    assert saved["note"] == "kept" and events == ["save pre", "save post"]

    fresh_params = model()
    fresh = GuardedAdamW(groups(fresh_params))
    events.clear()

    def swap_in_saved(o, state_dict):  # e.g. a checkpoint converter
        events.append(("load pre", o is fresh, "note" in state_dict))
        return saved

    fresh.register_load_state_dict_pre_hook(swap_in_saved)
    fresh.register_load_state_dict_post_hook(lambda o: events.append(("load post", o.telemetry()["step"])))
    fresh.load_state_dict(GuardedAdamW(groups(model())).state_dict())  # (replaced by the hook)
    assert events == [("load pre", True, False), ("load post", 2)]
    assert torch.equal(fresh._guard.nan_to_num(), opt._guard.nan_to_num())
    assert torch.equal(fresh.state[fresh_params[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])


def test_state_dict_post_hooks_see_the_complete_dict_and_what_they_return_is_returned():
    """torch.optim runs the post-hooks last, in order, on the dict state_dict() returns: they
    see ``"guard"`` and the guard's copies in the param states (copies: an edit in place leaves
    the optimizer's guard alone), may drop or replace entries, and a dict one returns is the one
    passed on and returned. Copies of the optimizer still work (torch carries no hooks over)."""
    import pickle

    params = model()
    opt = GuardedAdamW(groups(params))
    run(opt, params, random_stream(2, SHAPES))
    live = opt._guard.clone()
    events, seen = [], {}
    opt.register_state_dict_pre_hook(lambda o: events.append("pre"))

    def drop_the_guard(o, sd):  # e.g. an export that keeps AdamW's state only
        events.append("post 1")
        seen.update(keys=sorted(sd), rider=sd["state"][0]["lbw_guard"])
        assert torch.equal(sd["state"][0]["lbw_guard"], sd["guard"]["state"])
        del sd["guard"]
        for entry in sd["state"].values():
            entry.pop("lbw_guard", None), entry.pop("lbw_guard_policy", None)

    replaced = {}

    def replace(o, sd):
        events.append("post 2")
        replaced.update(state=sd["state"], param_groups=sd["param_groups"], note="replaced")
        return replaced

    opt.register_state_dict_post_hook(drop_the_guard)
    opt.register_state_dict_post_hook(replace)
    out = opt.state_dict()
    assert out is replaced and events == ["pre", "post 1", "post 2"]
    assert seen["keys"] == ["guard", "param_groups", "state"] and seen["rider"] is not opt._guard
    assert "guard" not in out and not any("lbw_guard" in entry for entry in out["state"].values())
    seen["rider"].fill_(0.5)
    assert torch.equal(opt._guard.nan_to_num(), live.nan_to_num())
    # what the hooks made is what loads: AdamW's state, the guard fresh
    fresh_params = model()
    fresh = GuardedAdamW(groups(fresh_params))
    fresh.load_state_dict(out)
    assert fresh.telemetry()["step"] == 0
    assert torch.equal(fresh.state[fresh_params[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert _same_guard(copied.state_dict()["guard"]["state"], live)


def test_a_template_from_init_state_loads_a_dcp_checkpoint_with_a_frozen_param(tmp_path, backend):
    """Fine-tuning with a frozen weight passed to the optimizer (``model.parameters()``):
    training gives it no state, so the checkpoint has none; init_state_'s template must not
    ask for one (``dcp.load`` raised 'Missing key in checkpoint state_dict: optim.state.0.step')."""
    import torch.distributed.checkpoint as dcp

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        m[0].weight.requires_grad_(False)
        return m, GuardedAdamW(m.parameters(), lr=1e-2, stats_freq=1, backend=backend)

    m, opt = make()
    for _ in range(3):
        m(torch.randn(8, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert m[0].weight not in opt.state
    dcp.save({"model": m.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
    m2, opt2 = make()
    init_state_(opt2)
    assert m2[0].weight not in opt2.state and len(opt2.state) == 3
    sd = {"model": m2.state_dict(), "optim": opt2.state_dict()}
    dcp.load(sd, checkpoint_id=str(tmp_path))
    opt2.load_state_dict(sd["optim"])
    assert opt2.telemetry() == opt.telemetry()
    for p, q in zip(m.parameters(), m2.parameters()):
        if p.requires_grad:
            assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_init_state_before_dcp_save_makes_a_checkpoint_that_resumes_a_model_with_an_unused_branch(tmp_path, backend):
    """A trainable branch that got no gradient before the save (unused so far) has no AdamW
    state, so a checkpoint of opt.state_dict() holds none for it, while init_state_'s template
    asks for one: dcp.load raised 'Missing key in checkpoint state_dict'. init_state_ before the
    save too (zero state where a param has none: what its first gradient would make) gives a
    checkpoint the template matches, and a run that took it goes on bitwise as one that did not."""
    import torch.distributed.checkpoint as dcp

    def make():
        torch.manual_seed(0)
        m = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 3), "unused": torch.nn.Linear(4, 2)})
        return m, GuardedAdamW(m.parameters(), lr=1e-2, stats_freq=1, backend=backend)

    def train(m, opt, calls, seed, unused_too):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(calls):
            x = torch.randn(8, 4, generator=gen)
            loss = m["used"](x).square().sum() + (m["unused"](x).sum() if unused_too else 0)
            loss.backward()
            opt.step()
            opt.zero_grad()

    (m, opt), (control, control_opt) = make(), make()
    train(m, opt, 3, 1, False)
    train(control, control_opt, 3, 1, False)
    assert m["unused"].weight not in opt.state
    init_state_(opt)
    dcp.save({"model": m.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(tmp_path))
    m2, opt2 = make()
    init_state_(opt2)
    sd = {"model": m2.state_dict(), "optim": opt2.state_dict()}
    dcp.load(sd, checkpoint_id=str(tmp_path))  # (the default planner: every key it asks for is there)
    m2.load_state_dict(sd["model"])
    opt2.load_state_dict(sd["optim"])
    for run_ in ((m, opt), (control, control_opt), (m2, opt2)):
        train(*run_, 3, 2, True)
    for p, q, r in zip(m.parameters(), control.parameters(), m2.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert opt.telemetry() == control_opt.telemetry() == opt2.telemetry()
