"""GuardedAdamW.state counts structural edits so the cached step plan is rebuilt exactly when
the state holds other tensors (lbw_kernels/optimizer_state.py). That the steps then match
torch.optim.AdamW is test_adamw_equivalence.py's reset test; these pin down which edits
rebuild the plan and which must not (a rebuild per call would cost milliseconds)."""

import copy
import io
import pickle

import pytest
import torch

from lbw_kernels import GuardedAdamW


def stepped(backend="cpp"):
    params = [torch.nn.Parameter(torch.randn(5, dtype=torch.float64)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(5, dtype=torch.float64)
    opt = GuardedAdamW(params, lr=1e-2, backend=backend)
    opt.step()
    return opt, params


EDITS = {
    "setitem": lambda st, p: st[p].__setitem__("exp_avg", torch.zeros(5, dtype=torch.float64)),
    "delitem then step recreates": lambda st, p: st.__delitem__(p),
    "pop": lambda st, p: st.pop(p),
    "popitem (the last param's state)": lambda st, p: st.popitem(),
    "clear one": lambda st, p: st[p].clear(),
    "update": lambda st, p: st[p].update(step=torch.tensor(7.0)),
    "setdefault of a missing key": lambda st, p: (dict.pop(st[p], "exp_avg_sq"), st[p].setdefault("exp_avg_sq", torch.ones(5, dtype=torch.float64))),
    "ior": lambda st, p: st[p].__ior__({"exp_avg": torch.ones(5, dtype=torch.float64)}),
    "replace a dict": lambda st, p: st.__setitem__(p, dict(st[p])),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_every_structural_edit_rebuilds_the_plan(edit):
    opt, params = stepped()
    plan = opt._plan
    EDITS[edit](opt.state, params[1])
    opt.step()
    assert opt._plan is not plan


def test_in_place_changes_state_dict_and_reads_keep_the_plan():
    opt, params = stepped()
    plan = opt._plan
    opt.state[params[0]]["exp_avg"].zero_()
    opt.state_dict()  # moves nothing (the guard's entry is not an edit)
    _ = [opt.state[p]["step"] for p in params]
    opt.step()
    assert opt._plan is plan


def test_a_shallow_copy_does_not_take_the_entries_away():
    """A copy adopts copies of the per-param dicts: edits through the optimizer's own state
    still reach its counter."""
    opt, params = stepped()
    snapshot = copy.copy(opt.state)
    assert snapshot[params[0]]["exp_avg"] is opt.state[params[0]]["exp_avg"]
    plan = opt._plan
    opt.state[params[0]]["exp_avg"] = torch.zeros(5, dtype=torch.float64)
    opt.step()
    assert opt._plan is not plan


def test_state_dict_holds_plain_dicts_and_pickles_round_trip():
    opt, params = stepped()
    sd = opt.state_dict()
    assert all(type(entry) is dict for entry in sd["state"].values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    params2, opt2 = pickle.loads(pickle.dumps((params, opt)))
    plan_free = opt2._plan is None
    opt2.step()
    assert plan_free and type(opt2.state).__name__ == "OptimizerState"
    opt2.state[params2[0]]["exp_avg"] = torch.zeros(5, dtype=torch.float64)
    plan = opt2._plan
    opt2.step()
    assert opt2._plan is not plan


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_param_replaced_in_its_group_list_is_the_one_updated(backend, gate):
    """``param_groups[0]["params"][1] = new`` (same list, same length): the next step updates
    the new param from a fresh state, as torch.optim.AdamW does, and leaves the old one alone."""
    def make(cls, **kw):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
        return params, cls(params, lr=0.1, **kw)

    ours_p, ours = make(GuardedAdamW, backend=backend, gate=gate, auto_enabled=False)
    ref_p, ref = make(torch.optim.AdamW, foreach=False)
    for step in range(3):
        if step == 1:
            for params, opt in ((ours_p, ours), (ref_p, ref)):
                params.append(torch.nn.Parameter(torch.full((5,), 2.0)))
                opt.param_groups[0]["params"][1] = params[-1]
        for params, opt in ((ours_p, ours), (ref_p, ref)):
            gen = torch.Generator().manual_seed(step)
            for q in params:
                q.grad = torch.randn(5, generator=gen)
            opt.step()
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ours.state[ours_p[-1]]["step"].item() == 2


def test_param_groups_are_the_callers_dicts_as_in_torch_optim():
    """torch.optim keeps the dicts it is given as its param groups (writing the defaults into
    them), so code that holds them (a layer-wise learning-rate tool) edits the optimizer's
    groups through them. The checks run on a copy: a refused group leaves the dict as it was."""
    import numpy as np

    def life(cls, **kw):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, dtype=torch.float64)) for _ in range(3)]
        first = {"params": params[:2], "lr": 0.1}
        opt = cls([first], lr=1e-2, **kw)
        added = {"params": (p for p in params[2:]), "lr": np.float64(0.05), "betas": (np.float64(0.8), 0.99)}
        opt.add_param_group(added)
        assert opt.param_groups[0] is first and opt.param_groups[1] is added
        assert first["weight_decay"] == added["weight_decay"] == 0.01 and added["params"] == params[2:]
        for step in range(3):
            if step == 1:  # through the caller's dicts
                first["lr"] = 0.5
                added["betas"] = (0.7, 0.9)
            gen = torch.Generator().manual_seed(step)
            for q in params:
                q.grad = torch.randn(5, generator=gen, dtype=torch.float64)
            opt.step()
        return params, added

    ours, added = life(GuardedAdamW, backend="cpp", auto_enabled=False)
    theirs, _ = life(torch.optim.AdamW, foreach=False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert type(added["lr"]) is float  # the normalised entries (numpy scalars as Python numbers)

    opt = GuardedAdamW([torch.zeros(3)], backend="cpp")
    refused = [
        {"params": [torch.zeros(2)], "lr": -1.0, "betas": (np.float64(0.9), 0.999)},  # by GuardedAdamW's checks
        {"params": [("w", torch.zeros(2))]},  # by torch's: names in one group but not the others
        {"params": [torch.zeros(2, requires_grad=True) * 2]},  # by torch's: not a leaf
    ]
    for bad in refused:
        before = dict(bad)
        with pytest.raises(ValueError):
            opt.add_param_group(bad)
        assert list(bad) == list(before) and all(bad[k] is before[k] for k in before)
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError):
        GuardedAdamW([refused[0]])
    assert list(refused[0]) == ["params", "lr", "betas"]
