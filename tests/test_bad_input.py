"""Bad input gets a ValueError/TypeError naming the parameter, and nothing is half-applied."""

import re

import pytest
import torch

from lbw_kernels import GuardedAdamW


def p(*shape, **kw):
    return torch.zeros(shape or (3,), **kw)


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(betas=(0.9,)), ValueError, "betas"),
        (dict(ema_decay=0.0), ValueError, "ema_decay"),
        (dict(ema_decay=1.0), ValueError, "ema_decay"),
        (dict(min_scale=0.0), ValueError, "min_scale"),
        (dict(min_scale=1.5), ValueError, "min_scale"),
        (dict(stats_freq=0), ValueError, "stats_freq"),
        (dict(stats_freq=2.5), TypeError, "stats_freq"),
        (dict(stress_threshold=0.0), ValueError, "stress_threshold"),
        (dict(spike_threshold=-1.0), ValueError, "spike_threshold"),
        (dict(recovery_fast=-0.01), ValueError, "recovery_fast"),
        (dict(gate="fast"), ValueError, "gate"),
        (dict(backend="nonsense"), ValueError, "backend"),
        (dict(lr="big"), TypeError, "lr"),
        (dict(maximize=1), TypeError, "maximize"),
        (dict(auto_enabled="yes"), TypeError, "auto_enabled"),
        (dict(amsgrad=True), ValueError, "amsgrad"),
        (dict(differentiable=True), ValueError, "differentiable"),
        (dict(fused="yes"), TypeError, "fused"),
        (dict(foreach=1), TypeError, "foreach"),
        (dict(capturable=None), TypeError, "capturable"),
        (dict(backend=3), TypeError, "backend must be a str"),
        (dict(lr=torch.tensor(1e-3 + 0j)), TypeError, "lr must be a real number, got a torch.complex64 tensor"),
        (dict(lr=torch.tensor(True)), TypeError, "lr must be a real number, got a torch.bool tensor"),
        (dict(lr=torch.tensor(float("nan"))), ValueError, "lr must not be NaN"),
    ],
)
def test_bad_hyperparameters(kwargs, error, name):
    with pytest.raises(error, match=name):
        GuardedAdamW([p()], **kwargs)


def test_bad_group_hyperparameter_adds_no_group():
    opt = GuardedAdamW([p()])
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [p()], "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="betas"):
        GuardedAdamW([{"params": [p()]}, {"params": [p()], "betas": (0.9, 1.0)}])
    with pytest.raises(ValueError, match="amsgrad"):
        opt.add_param_group({"params": [p()], "amsgrad": True})
    assert len(opt.param_groups) == 1


def test_bad_params():
    with pytest.raises(TypeError, match="complex"):
        GuardedAdamW([p(dtype=torch.complex64)])
    with pytest.raises(TypeError, match="dtype"):
        GuardedAdamW([p(dtype=torch.int64)])
    with pytest.raises(ValueError, match="mixed devices"):
        GuardedAdamW([p(), p(device="meta")])
    opt = GuardedAdamW([p()])
    with pytest.raises(ValueError, match="mixed devices"):
        opt.add_param_group({"params": [p(device="meta")]})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] must be a Tensor, got str"):
        GuardedAdamW([p(), "p"])
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is sparse"):
        GuardedAdamW([p().to_sparse()])


def test_named_backend_that_cannot_run_on_the_params_device_is_refused_before_any_state(monkeypatch):
    """Triton runs CPU tensors only under its interpreter. Construction takes such params (a
    model may still be moved to the GPU, as with any optimizer); the first step refuses them
    before it creates any state, naming the backend, the device, what would make it run and
    what runs there."""
    from lbw_kernels.backends import availability

    if availability()["triton"] is not None:
        pytest.skip(availability()["triton"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.nn.Parameter(p(4))
    opt = GuardedAdamW([q], lr=0.1, backend="triton")
    q.grad = torch.ones(4)
    refused = r"backend='triton' does not run on cpu tensors .*TRITON_INTERPRET=1.*backends that do: auto, reference"
    with pytest.raises(ValueError, match=refused):
        opt.step()
    assert torch.equal(q, p(4)) and not opt.state and opt.telemetry()["step"] == opt._calls == 0


@pytest.mark.parametrize("bad", ["sparse", "complex"])
def test_bad_gradient_leaves_everything_as_it_was(bad):
    good, other = p(4), p(4)
    opt = GuardedAdamW([good, other], lr=0.1)
    good.grad = torch.ones(4)
    if bad == "sparse":
        other.grad = torch.ones(4).to_sparse()
        match = "sparse"
    else:
        if not hasattr(other, "grad_dtype"):
            pytest.skip("this torch refuses a complex .grad on a real tensor by itself")
        other.grad_dtype = None  # torch >= 2.10 lets a tensor hold a grad of another dtype
        other.grad = torch.ones(4, dtype=torch.complex64)
        match = "complex"
    with pytest.raises((TypeError, ValueError), match=match):
        opt.step()
    assert torch.equal(good, torch.zeros(4))
    assert not opt.state  # no state was created
    assert opt.telemetry()["step"] == 0


# ---------------------------------------------------------------------------------------
# Edits made after construction (param_groups and opt.state are public and mutable): found at
# the next step(), before anything (params, AdamW state, the guard, the call count) changes.
# ---------------------------------------------------------------------------------------
def _two_group_optimizer(backend, gate):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    opt = GuardedAdamW([{"params": [a]}, {"params": [b]}], lr=0.1, backend=backend, gate=gate, stats_freq=1)
    a.grad, b.grad = torch.randn(5), torch.randn(3)
    opt.step()
    a.grad, b.grad = torch.randn(5), torch.randn(3)
    return opt, a, b


def _snapshot(opt):
    tensors = [p.detach().clone() for g in opt.param_groups for p in g["params"] if p.device.type != "meta"]
    tensors += [t.detach().clone() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return tensors, opt._guard.clone(), opt._calls, len(opt.state)


def _unchanged(before, after):
    (t0, guard0, calls0, n0), (t1, guard1, calls1, n1) = before, after
    assert (calls0, n0) == (calls1, n1)
    assert torch.equal(guard0.nan_to_num(), guard1.nan_to_num())
    assert len(t0) == len(t1) and all(torch.equal(x, y) for x, y in zip(t0, t1))


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize(
    "key, bad, error, match",
    [
        ("lr", "1e-3", TypeError, r"param_groups\[1\]: lr must be a number"),
        ("lr", -0.1, ValueError, r"param_groups\[1\]: lr must be >= 0"),
        ("lr", float("nan"), ValueError, r"param_groups\[1\]: lr must not be NaN"),
        ("lr", torch.ones(2), ValueError, r"param_groups\[1\]: lr must be a number or a one-element tensor"),
        ("betas", (0.9, 1.0), ValueError, r"param_groups\[1\]: betas\[1\] must be in \[0, 1\)"),
        ("betas", ("0.9", "0.999"), TypeError, r"param_groups\[1\]: betas\[0\] must be a number"),
        ("eps", None, TypeError, r"param_groups\[1\]: eps must be a number"),
        ("weight_decay", -1.0, ValueError, r"param_groups\[1\]: weight_decay must be >= 0"),
        ("maximize", "yes", TypeError, r"param_groups\[1\]: maximize must be a bool"),
        # (a meta tensor's device is known without reading it: checked at step() too)
        ("lr", torch.empty((), device="meta"), ValueError, r"param_groups\[1\]: lr is a meta tensor"),
        ("betas", (0.9, torch.empty((), device="meta")), ValueError, r"param_groups\[1\]: betas\[1\] is a meta tensor"),
        ("weight_decay", torch.empty((), device="meta"), ValueError, r"param_groups\[1\]: weight_decay is a meta tensor"),
    ],
)
def test_bad_hyperparameter_edited_into_a_group_changes_nothing(backend, gate, key, bad, error, match):
    """Group 0 is fine and comes first: a backend that checked group by group, or the exact
    gate's decision before the update, would have moved it (or the guard) before raising."""
    opt, a, b = _two_group_optimizer(backend, gate)
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = bad
    before = _snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    _unchanged(before, _snapshot(opt))
    opt.param_groups[1][key] = good
    opt.step()  # and the optimizer goes on
    assert opt.telemetry()["step"] == opt._calls == 2


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize(
    "key, fill, error, match",
    [
        ("lr", -1.0, ValueError, r"param_groups\[1\]: lr must be >= 0, got -1.0"),
        ("lr", float("nan"), ValueError, r"param_groups\[1\]: lr must not be NaN"),
        ("eps", float("nan"), ValueError, r"param_groups\[1\]: eps must not be NaN"),
        ("weight_decay", -0.5, ValueError, r"param_groups\[1\]: weight_decay must be >= 0"),
        ("betas", 1.0, ValueError, r"param_groups\[1\]: betas\[0\] must be in \[0, 1\)"),
    ],
)
def test_a_cpu_tensor_hyperparameter_edited_in_place_is_checked_at_the_next_step(backend, gate, key, fill, error,
                                                                                 match):
    """A CPU tensor is host memory: step() reads it (no device to wait for), so ``fill_`` of a
    value that assigning as a float would be refused is refused too, before anything changes.
    (A GPU tensor is not read at step(): its type alone is checked.)"""
    opt, a, b = _two_group_optimizer(backend, gate)
    value = torch.tensor(opt.param_groups[1][key][0] if key == "betas" else opt.param_groups[1][key],
                         dtype=torch.float64)
    good = value.item()
    if key == "betas":
        opt.param_groups[1]["betas"] = (value, opt.param_groups[1]["betas"][1])
    else:
        opt.param_groups[1][key] = value
    opt.step()  # the tensor taken while it holds a good value
    value.fill_(fill)
    before = _snapshot(opt)
    with pytest.raises(error, match=match):
        opt.step()
    _unchanged(before, _snapshot(opt))
    value.fill_(good)
    opt.step()  # and the optimizer goes on
    assert opt.telemetry()["step"] == opt._calls == 3


def test_a_group_edit_that_is_valid_passes_the_step_check(backend):
    """The per-call check takes what add_param_group takes: numpy scalars, a 0-dim tensor lr,
    int hyper-parameters, a betas list, and leaves the numbers as the user wrote them."""
    np = pytest.importorskip("numpy")
    opt, a, b = _two_group_optimizer(backend, "exact")
    opt.param_groups[0].update(lr=np.float32(0.05), betas=[0.8, np.float64(0.99)], eps=np.float64(1e-8), weight_decay=1)
    opt.param_groups[1].update(lr=torch.tensor(0.05, dtype=torch.float64))
    before = a.detach().clone()
    opt.step()
    assert not torch.equal(before, a) and opt.telemetry()["step"] == 2
    assert type(opt.param_groups[0]["lr"]) is np.float32


def test_param_appended_to_a_group_is_checked_at_the_next_step(backend):
    opt, a, b = _two_group_optimizer(backend, "exact")
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    meta.grad = torch.zeros(3, device="meta")
    opt.param_groups[1]["params"].append(meta)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] is on meta, .* on cpu"):
        opt.step()
    _unchanged(before, _snapshot(opt))
    opt.param_groups[1]["params"].pop()
    opt.param_groups[1]["params"].append(a)  # the same param twice: updated twice per call
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] is param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    _unchanged(before, _snapshot(opt))


def test_duplicate_params_are_refused_when_added():
    q, r = p(4), p(4)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\] is param_groups\[0\]\['params'\]\[0\] again"):
        GuardedAdamW([q, r, q])
    opt = GuardedAdamW([q])
    with pytest.raises(ValueError, match="more than one parameter group"):  # (torch's own check)
        opt.add_param_group({"params": [r, q]})
    assert len(opt.param_groups) == 1


def test_add_param_group_names_the_group_and_the_index_within_it():
    opt = GuardedAdamW([p(), p()])
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] has dtype torch.int64"):
        opt.add_param_group({"params": [p(dtype=torch.int64)]})
    with pytest.raises(ValueError, match=r"param_groups\[1\]: lr must be >= 0"):
        opt.add_param_group({"params": [p()], "lr": -1.0})
    with pytest.raises(ValueError, match="no 'params' entry"):
        opt.add_param_group({"lr": 0.5})
    with pytest.raises(TypeError, match=r"param_group\['params'\] must be a Tensor or a list"):
        opt.add_param_group({"params": None})
    assert len(opt.param_groups) == 1


def test_gradient_of_another_shape_is_refused_before_any_state_exists(backend):
    """A param resized through ``.data`` keeps its old ``.grad``: caught before any kernel reads
    past the end of one of them."""
    good, other = torch.nn.Parameter(p(4)), torch.nn.Parameter(p(3))
    opt = GuardedAdamW([good, other], lr=0.1, backend=backend)
    good.grad, other.grad = torch.ones(4), torch.ones(3)
    other.data = p(5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].grad has shape \(3,\), its param \(5,\)"):
        opt.step()
    assert torch.equal(good, p(4)) and not opt.state and opt.telemetry()["step"] == 0


def test_integer_gradient_is_refused_before_any_state_exists(backend):
    good, other = torch.nn.Parameter(p(4)), torch.nn.Parameter(p(4))
    opt = GuardedAdamW([{"params": [good]}, {"params": [other]}], lr=0.1, backend=backend)
    good.grad = torch.ones(4)
    if not hasattr(other, "grad_dtype"):
        pytest.skip("this torch refuses an integer .grad on a float tensor by itself")
    other.grad_dtype = None
    other.grad = torch.ones(4, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\].grad has dtype torch.int64"):
        opt.step()
    assert torch.equal(good, p(4)) and not opt.state and opt.telemetry()["step"] == 0


@pytest.mark.parametrize(
    "edit, error, match",
    [
        (lambda s, q: s.__setitem__("exp_avg", torch.zeros(4, dtype=torch.float64)), TypeError, "'exp_avg'.*torch.float32 tensor for a torch.float32 param"),
        (lambda s, q: s.__setitem__("exp_avg_sq", torch.zeros(5)), ValueError, r"'exp_avg_sq'.* shape \(5,\)"),
        (lambda s, q: s.__setitem__("exp_avg", torch.zeros(4).to_sparse()), TypeError, "'exp_avg'.* dense"),
        (lambda s, q: s.__setitem__("exp_avg", torch.zeros(4, device="meta")), ValueError, "'exp_avg'.* on meta"),
        (lambda s, q: s.__setitem__("step", 3), TypeError, "'step'.* got int"),
        (lambda s, q: s.__setitem__("step", torch.tensor(3.0, dtype=torch.float64)), TypeError, "'step'.*got torch.float64"),
        (lambda s, q: s.pop("exp_avg_sq"), ValueError, r"has no \['exp_avg_sq'\]"),
    ],
)
def test_state_edited_by_hand_is_checked_before_the_step_uses_it(backend, edit, error, match):
    """``opt.state[p][...] = ...`` rebuilds the step plan; a tensor the kernels cannot use is
    refused then, naming it, with every param (the other group's first) left as it was."""
    good, other = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))
    opt = GuardedAdamW([{"params": [good]}, {"params": [other]}], lr=0.1, backend=backend)
    good.grad, other.grad = torch.randn(3), torch.randn(4)
    opt.step()
    edit(opt.state[other], other)
    before = [good.detach().clone(), other.detach().clone(), opt.state[good]["exp_avg"].clone()]
    with pytest.raises(error, match=re.escape("opt.state[param_groups[1]['params'][0]]") + ".*" + match):
        opt.step()
    after = [good, other, opt.state[good]["exp_avg"]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert opt.telemetry()["step"] == opt._calls == 1


@pytest.mark.parametrize("share", ["a step count", "a moment", "exp_avg as exp_avg_sq"])
def test_state_tensors_shared_between_params_are_refused(backend, share):
    """A hand-built state that shares a tensor between params (one step count for all, say) is
    refused by name before anything changes: the kernels advance each step and compute its bias
    corrections in one pass, so a shared count would give each param another t than
    torch.optim.AdamW's final one, and two updates of one moment would race."""
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = GuardedAdamW([a, b], lr=0.1, backend=backend)
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    opt.step()
    sa, sb = opt.state[a], opt.state[b]
    if share == "a step count":
        sb["step"] = sa["step"]
        match = r"opt.state\[param_groups\[0\]\['params'\]\[1\]\]\['step'\] shares its memory with " \
                r"opt.state\[param_groups\[0\]\['params'\]\[0\]\]\['step'\]"
    elif share == "a moment":
        sb["exp_avg_sq"] = sa["exp_avg"]
        match = r"\[1\]\]\['exp_avg_sq'\] shares its memory with .*\[0\]\]\['exp_avg'\]"
    else:
        sb["exp_avg_sq"] = sb["exp_avg"]
        match = r"\[1\]\]\['exp_avg_sq'\] shares its memory with .*\[1\]\]\['exp_avg'\]"
    before = [t.clone() for t in (a, b, sa["exp_avg"], sa["step"])]
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, (a, b, sa["exp_avg"], sa["step"])))
    assert opt.telemetry()["step"] == 1


def test_numpy_scalars_are_taken_as_torch_optim_takes_them():
    """A config holding numpy numbers is common (np.linspace schedules, yaml loaders); they are
    stored as Python numbers, so the guard's config in a checkpoint loads with weights_only."""
    np = pytest.importorskip("numpy")
    q = torch.nn.Parameter(p(4))
    # (np.float64 is a subclass of float, which a check for float alone lets through; np.logspace
    # gives them)
    opt = GuardedAdamW([q], lr=np.float32(1e-3), betas=(np.float32(0.9), np.float64(0.999)), stats_freq=np.int64(4),
                       min_scale=np.float32(0.25), max_grad_norm=np.float64(1.0), eps=np.float64(1e-8))
    opt.add_param_group({"params": [torch.nn.Parameter(p(2))], "weight_decay": np.float32(0.5),
                         "lr": np.logspace(-4, -2, 3)[0]})
    assert type(opt.param_groups[0]["lr"]) is float and type(opt.param_groups[0]["betas"][0]) is float
    assert type(opt.param_groups[0]["betas"][1]) is float and type(opt.param_groups[0]["eps"]) is float
    assert type(opt.param_groups[1]["weight_decay"]) is float and type(opt.param_groups[1]["lr"]) is float
    assert type(opt.guard_config.stats_freq) is int and type(opt.guard_config.min_scale) is float
    assert type(opt.guard_config.max_grad_norm) is float
    q.grad = torch.ones(4)
    opt.step()
    import io

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


# A state tensor moved through ``.data`` (state offload and reload) changes behind the optimizer:
# no ``opt.state`` edit, so the step plan stands. A tensor the update cannot take must be refused
# by the update itself, before anything is written (a shorter one would be written past its end).
# (the state's key, what its .data becomes, the error, what the message says after "param 1")
MOVED_STATES = {
    "exp_avg to float64": ("exp_avg", lambda t: t.double(), TypeError, "must be a dense torch.float32"),
    "exp_avg_sq shorter": ("exp_avg_sq", lambda t: t.flatten()[:-1].clone(), ValueError, "has shape"),
    "step to float64": ("step", lambda t: t.double(), TypeError, "must be a one-element float32"),
    # at the state's own address (a view of itself, or what an allocator hands back from the
    # block the old tensor freed): a table keyed by addresses alone would be reused, and the
    # kernels would write past the view's end
    "exp_avg_sq shorter, same address": ("exp_avg_sq", lambda t: t.flatten()[:-1], ValueError, "has shape"),
    "exp_avg as int32, same address": ("exp_avg", lambda t: t.view(torch.int32), TypeError,
                                       "must be a dense torch.float32"),
}


def _moved_state_model(backend, gate, moved_group, one_group, device="cpu"):
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(7,), (33, 65), (5,), (129,)]]
    groups = [{"params": params}] if one_group else [{"params": params[:2], "weight_decay": 0.1},
                                                    {"params": params[2:], "weight_decay": 0.0}]
    # (the exact gate clips too: last_grad_norm is written before the update refuses)
    opt = GuardedAdamW(groups, lr=0.05, backend=backend, gate=gate, max_grad_norm=1.0 if gate == "exact" else None)
    for q in params:
        q.grad = torch.randn(q.shape, device=device)
    opt.step()
    opt.step()
    return params, opt, params[1 if moved_group == 0 else 3]


def _everything(params, opt):
    norm = [] if opt.last_grad_norm is None else [opt.last_grad_norm]
    return [t.clone() for q in params for t in (q, *(opt.state[q][k] for k in ("exp_avg", "exp_avg_sq", "step")))] + [
        opt._guard.clone()] + norm


def _moved_state_is_refused(backend, gate, moved, layout, device="cpu"):
    key, move, error, says = MOVED_STATES[moved]
    group = 0 if "first" in layout or "one" in layout else 1
    params, opt, moved_param = _moved_state_model(backend, gate, group, layout == "one group", device)
    tensor = opt.state[moved_param][key]
    good = tensor.data
    before, calls = _everything(params, opt), opt._calls
    for q in params:  # (another norm than the last call's)
        q.grad = q.grad * 3
    tensor.data = move(good)
    with pytest.raises(error, match=rf"the step's group {group}, param 1\['{key}'\] {says}"):
        opt.step()
    tensor.data = good
    after = _everything(params, opt)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, after))
    assert opt._calls == calls
    opt.step()
    assert opt._calls == opt.telemetry()["step"] == calls + 1


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("moved", list(MOVED_STATES))
@pytest.mark.parametrize("layout", ["one group", "two groups, the first moved", "two groups, the second moved"])
def test_state_moved_through_data_is_refused_before_anything_changes(backend, gate, moved, layout):
    """The step raises an error naming the state, with params, states, guard and call count as
    they were (a refused second group included: each backend checks every group before it
    writes the first); the state moved back, the next step goes on."""
    _moved_state_is_refused(backend, gate, moved, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("moved", list(MOVED_STATES))
def test_gpu_state_moved_through_data_is_refused_before_anything_changes(backend_name, gate, moved):
    """The same on the GPU, the second of two groups refused (cuda: one op call per group, all
    checked first by _C._check_update_; the exact gate's one-by-one path puts the guard back)."""
    from lbw_kernels.backends import availability

    if availability()[backend_name] is not None:
        pytest.skip(availability()[backend_name])
    _moved_state_is_refused(backend_name, gate, moved, "two groups, the second moved", "cuda")


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
@pytest.mark.parametrize("tie", ["the same storage", "overlapping views"])
def test_params_over_one_memory_are_refused_by_name_before_anything_changes(backend, gate, tie):
    """Two Parameters over the same elements (a tie made through ``.data``): each has its own
    gradient and AdamW state, so one call updates the elements twice, which torch.optim.AdamW
    does in turn and the multi-threaded kernels did at once (results changed from run to run).
    Refused, naming both, as a param listed twice is. Views of one buffer that do not overlap
    (a flat master buffer split per param) are params of their own and are taken."""
    base = torch.randn(10)
    q = torch.nn.Parameter(torch.randn(4))
    a = torch.nn.Parameter(base[:6])
    b = torch.nn.Parameter(a.data if tie == "the same storage" else base[4:])
    split = [torch.nn.Parameter(t) for t in torch.randn(12).split([5, 7])]
    match = r"param_groups\[0\]\['params'\]\[2\] shares memory with param_groups\[0\]\['params'\]\[1\]"
    with pytest.raises(ValueError, match=match):
        GuardedAdamW([q, a, b], lr=0.1, backend=backend, gate=gate)
    opt = GuardedAdamW([q, a], lr=0.1, backend=backend, gate=gate, stats_freq=1)
    for t in (q, a):
        t.grad = torch.randn_like(t)
    opt.step()
    opt.param_groups[0]["params"].append(b)  # (put into the list behind add_param_group's back)
    for t in (q, a, b):
        t.grad = torch.randn_like(t)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _unchanged(before, _snapshot(opt))
    flat = GuardedAdamW(split, lr=0.1, backend=backend, gate=gate)
    for t in split:
        t.grad = torch.randn_like(t)
    flat.step()
    assert flat.telemetry()["step"] == 1


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_an_expanded_param_is_refused_by_name_before_anything_changes(backend, gate):
    """A param whose elements share memory (expand: stride 0), which no update can write one by
    one: torch's own error came from inside the update, naming nothing, after the other params
    had their weight decay (or, on Triton, their whole update) and the guard its call."""
    q = torch.nn.Parameter(torch.randn(3))
    e = torch.nn.Parameter(torch.randn(5, 1).expand(5, 4))
    match = r"param_groups\[0\]\['params'\]\[1\] has elements that share memory"
    with pytest.raises(ValueError, match=match):
        GuardedAdamW([q, e], lr=0.1, backend=backend, gate=gate)
    opt = GuardedAdamW([q], lr=0.1, backend=backend, gate=gate, stats_freq=1)
    q.grad = torch.randn(3)
    opt.step()
    opt.param_groups[0]["params"].append(e)
    q.grad, e.grad = torch.randn(3), torch.randn(5, 4)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _unchanged(before, _snapshot(opt))
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] has elements that share memory"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(1).expand(3))]})


def test_an_optimizer_made_on_meta_params_steps_once_they_are_materialised():
    """The deferred-initialisation flow (a model built on the meta device, the optimizer made,
    then to_empty with the Parameter objects kept): the guard made on meta holds no history and
    cannot be copied off it; it is made afresh on the params' device, as torch.optim.AdamW's
    state is made at the first step."""
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.device("meta"):
            m = torch.nn.Linear(4, 4)
        opt = GuardedAdamW(m.parameters(), lr=1e-2, stats_freq=1, max_grad_norm=1.0)
        weight = m.weight
        m.to_empty(device="cpu")
        m.reset_parameters()
        assert m.weight is weight
        # (a resume before the first step: the state_dict and load of a template, as
        # init_state_ and dcp.load make them)
        template = opt.state_dict()
        opt.load_state_dict(template)
        assert template["guard"]["state"].device.type == "cpu"
        for _ in range(2):
            m(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
        t = opt.telemetry()
        assert t["step"] == 2 and opt._guard.device.type == "cpu" and float(opt.state[weight]["step"]) == 2
        assert torch.isfinite(opt.last_grad_norm)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_meta_params_step_on_the_reference_backend(gate):
    """Memory estimation and tracing tools step optimizers on meta tensors: the reference (and
    auto, which picks it there) steps them as torch.optim.AdamW does, making meta state; it read
    its skip flag as a Python number and raised."""
    for name in ("reference", "auto"):
        w = torch.nn.Parameter(torch.empty(4, 4, device="meta"))
        opt = GuardedAdamW([w], backend=name, gate=gate, stats_freq=1)
        for _ in range(2):
            w.grad = torch.empty(4, 4, device="meta")
            opt.step()
        assert opt.state[w]["exp_avg"].device.type == "meta" and opt.state[w]["step"].device.type == "meta"
