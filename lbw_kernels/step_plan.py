"""Which tensors take part in a call, and their AdamW state: built once, reused every call.

Walking every parameter in Python each call (validating it, looking up its state, counting its
elements) costs milliseconds on a model of a few thousand tensors: more than the fused update
itself. A :class:`StepPlan` holds what does not change from call to call while the same
parameters have gradients: the per-group lists of params and states, the telemetry rows and
their element counts (on the device). A call only gathers the ``.grad`` of each param and checks
them cheaply (one C++ pass when the extension is built); the plan is rebuilt when which params
have a gradient changes, when a group is added or its list of params edited, or when state is
loaded or edited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backends import GroupTensors, nonempty_grads
from .distributed import check_no_fsdp1_shards
from .stream_use import StreamUse
from .subclasses import _PLAIN, is_dtensor, is_wrapper, kernel_tensor, views
from .validation import check_grad, check_params, check_state_entry


@dataclass
class _GroupPlan:
    group_index: int
    positions: Optional[List[int]]  # params (by position) with a grad; None: all of them
    params: List[Tensor]  # as the kernels take them: a wrapper subclass's inner tensor (subclasses.py)
    exp_avgs: List[Tensor]
    exp_avg_sqs: List[Tensor]
    steps: List[Tensor]
    telemetry_rows: List[int]  # positions in `params` of tensors with elements (global numel)
    # The params' dtypes as the plan was built; a param cast since (`p.data = p.data.half()`)
    # sends its sub-group to the reference (the kernels take one dtype per list: cpp_backend).
    param_dtypes: frozenset


class CallGrads(NamedTuple):
    """One call's gradients, gathered in one pass over the params."""

    per_group: List[List[Optional[Tensor]]]  # each param's .grad (None where absent), by group
    missing: Tuple[bool, ...]  # per group: whether some param has no grad
    dense_real: bool  # whether every grad is strided and real floating-point (else check_grads names the culprit)
    # Per group, its params' and grads' addresses, sizes and dtypes as read on the way (bytes;
    # GroupTensors.layout_key), or None (read in Python, or a param that is not a plain tensor).
    layouts: Tuple[Optional[bytes], ...]
    # Per group, which objects its params list holds, with their element counts and dtypes
    # (3 int64 per param as bytes from the extension: id, numel, dtype code; else a tuple of
    # triples): a param replaced in place in the list, or resized or cast through ``.data``
    # (the plan's element counts and its split by dtype would be stale), rebuilds the plan.
    identities: Tuple[Any, ...]
    # Which grads are tensor subclasses, and of which type (empty when none): a grad that turns
    # into one (a wrapper, whose address is not its elements') rebuilds the plan, which then
    # resolves wrappers every call. Bytes of (index among all params, type) from the
    # extension, else a tuple.
    subclass_grads: Any


def _gather_grads_python(param_groups: Sequence[dict]) -> CallGrads:
    per_group = [[p.grad for p in group["params"]] for group in param_groups]
    # `None in grads` would compare tensors with ==; identity checks are ~400x cheaper.
    missing = tuple(any(g is None for g in grads) for grads in per_group)
    kinds = {(g.layout, g.dtype) for grads in per_group for g in grads if g is not None}
    dense_real = all(layout == torch.strided and dtype.is_floating_point for layout, dtype in kinds)
    identities = tuple(tuple((id(p), p.numel(), p.dtype) for p in group["params"]) for group in param_groups)
    every = (g for grads in per_group for g in grads)
    subclasses = tuple((k, type(g)) for k, g in enumerate(every) if g is not None and type(g) not in _PLAIN)
    return CallGrads(per_group, missing, dense_real, (None,) * len(per_group), identities, subclasses)



def _gather_function():
    """From the C++ extension when it is built (one pass, ~20 ns per param: the three Python
    passes above cost ~0.4 us per param, 0.8 ms per call for 2000 params), else Python."""
    try:
        from ._C import _gather_grads
    except ImportError:  # the extension is optional; so is its attribute in an older build
        return _gather_grads_python
    return lambda param_groups: CallGrads(*_gather_grads([group["params"] for group in param_groups]))


gather_grads = _gather_function()


def presence_key(grads: CallGrads) -> tuple:
    """What a plan depends on: each group's params (the objects its list holds: a param replaced
    in the list, ``param_groups[0]["params"][3] = new``, must be the one updated; and their
    element counts and dtypes, which ``.data`` can change under the same object), which of them
    have a grad, and which grads are tensor subclasses."""
    return tuple(
        (ids, tuple(g is not None for g in per) if missing else None)
        for ids, per, missing in zip(grads.identities, grads.per_group, grads.missing)
    ) + (grads.subclass_grads,)


class StepPlan:
    def __init__(
        self,
        key: tuple,
        param_groups: Sequence[dict],
        grads_per_group: Sequence[List[Optional[Tensor]]],
        existing_state: Callable[[Tensor], Optional[Dict[str, Tensor]]],
        state_for: Callable[[Tensor], Dict[str, Tensor]],
        device_numels: Callable[[List[int]], Tensor],
        runs_subclasses: bool = False,
    ):
        """Checks first (every gradient; the params taking part: one device, each once; their
        existing states; tensor subclasses the backend cannot run, ``runs_subclasses`` False),
        so that bad input leaves no state behind, then creates the state of params that have
        none. A plan is built on the first call and after any change to the groups' params
        lists, to which have grads, or to ``opt.state``: edits made since the params were added
        (``param_groups[i]["params"].append``, ``opt.state[p] = ...``), and when a wrapper
        subclass's inner tensor was replaced (:meth:`views_current`)."""
        selected = []  # (group index, positions with a grad)
        for gi, grads in enumerate(grads_per_group):
            positions = [i for i, g in enumerate(grads) if g is not None]
            for pi in positions:
                check_grad(param_groups[gi]["params"][pi], gi, pi)
            if positions:
                selected.append((gi, positions))
        _check_taking_part(param_groups, selected, existing_state)
        # Grads that are wrapper subclasses (other than DTensor) are resolved on every call.
        self.wrapped_grads = any(is_wrapper(grads_per_group[gi][pi]) for gi, positions in selected for pi in positions)
        if not runs_subclasses:
            _check_addressable(param_groups, grads_per_group, selected, existing_state)
        self.key = key
        self.runs_subclasses = runs_subclasses
        self.wrapped: List[Tuple[Tensor, str, Tensor]] = []  # (wrapper, attribute, inner tensor taken in its place)
        self.groups: List[_GroupPlan] = []
        numels: List[int] = []
        for gi, positions in selected:
            grads = grads_per_group[gi]
            params = [param_groups[gi]["params"][i] for i in positions]
            states = [state_for(p) for p in params]
            rows = [i for i, p in enumerate(params) if p.numel() > 0]  # a DTensor's numel is global
            numels += [params[i].numel() for i in rows]
            self.groups.append(
                _GroupPlan(
                    group_index=gi,
                    positions=None if len(positions) == len(grads) else positions,
                    params=[self._resolved(p) for p in params],
                    exp_avgs=[self._resolved(s["exp_avg"]) for s in states],
                    exp_avg_sqs=[self._resolved(s["exp_avg_sq"]) for s in states],
                    steps=[s["step"] for s in states],
                    telemetry_rows=rows,
                    param_dtypes=frozenset(p.dtype for p in params),
                )
            )
        self.telemetry_rows = len(numels)
        # Every param with a grad has elements (the usual case): telemetry covers all grads, and
        # a call need not ask each one for its numel.
        self.all_nonempty = self.telemetry_rows == sum(len(gp.params) for gp in self.groups)
        self.numels = device_numels(numels) if numels else None
        self.numel_total = self.numels.sum() if numels else None  # (summarize's, once per plan)
        # On CUDA, the streams those two are read on (lbw_kernels/stream_use.py; set by the
        # optimizer): they are freed when a new layout replaces this plan.
        self.stream_use: Optional[StreamUse] = None
        self.pinned_sources: List[Tensor] = []  # (the host side of those uploads, kept: the optimizer's)
        self.graph_only = False  # built during a CUDA graph capture: serves that graph alone (the optimizer's)
        self.kept_for_graphs = False  # its device tensors kept for good: a graph captured it (the optimizer's)
        self.device = self.groups[0].params[0].device if self.groups else None
        self.has_dtensor = any(is_dtensor(p) for gp in self.groups for p in gp.params) or any(
            is_dtensor(g) for grads in grads_per_group for g in grads if g is not None
        )
        # The groups whose gathered grads lists, joined in this order, are the telemetry rows
        # (every param of those groups has a grad with elements, none a wrapper or a DTensor),
        # or None when the rows need the plan (positions, resolved wrappers, local shards).
        plain_rows = (self.all_nonempty and not self.has_dtensor and not self.wrapped_grads
                      and all(gp.positions is None for gp in self.groups))
        self.row_groups = tuple(gp.group_index for gp in self.groups) if plain_rows and self.groups else None

    def _resolved(self, t: Tensor) -> Tensor:
        """``t``, or the inner tensor holding its elements when it is a wrapper subclass (kept
        in ``wrapped`` to be checked each call); one without stays itself, for the reference
        (the checks refused it to the others, unless it is a state just created: zeros_like of
        a param whose subclass makes its own kind)."""
        if not is_wrapper(t):
            return t
        found = views.lookup(t)
        if found is None and not self.runs_subclasses:
            raise TypeError(f"a {type(t).__name__} AdamW state (zeros_like of its param) cannot be addressed by the "
                            "kernels (subclasses.py); backend='reference' runs it through its own operators")
        if found is None:
            return t
        self.wrapped.append((t, *found))
        return found[1]

    def views_current(self) -> bool:
        """Whether every wrapper still holds the inner tensor the plan took (one attribute read
        each: a module moved with ``.to()`` gives its wrappers new ones; True at once without
        wrappers)."""
        return all(getattr(t, name, None) is inner for t, name, inner in self.wrapped)

    def telemetry_grads(self, groups: Sequence[GroupTensors]) -> List[Tensor]:
        """The gradients telemetry reads, in row order (``nonempty_grads``). When the plan knows
        every one has elements and none is a local shard (which may be empty on this rank), the
        grads themselves, without asking each for its numel."""
        if self.all_nonempty and not self.has_dtensor:
            # (one group: its list itself; concatenating 2000 grads costs ~60 us per call)
            return groups[0].grads if len(groups) == 1 else [g for group in groups for g in group.grads]
        return nonempty_grads(groups)

    def group_tensors(self, param_groups: Sequence[dict], grads_per_group,
                      layouts: Optional[Sequence[Optional[bytes]]] = None) -> List[GroupTensors]:
        """This call's GroupTensors: the plan's lists, this call's grads and hyper-parameters, and
        the layouts gathered with the grads when the caller passes them (CallGrads.layouts)."""
        out = []
        for gp in self.groups:
            group, grads_of_group = param_groups[gp.group_index], grads_per_group[gp.group_index]
            layout = None if layouts is None else layouts[gp.group_index]
            if gp.positions is not None:
                grads_of_group = [grads_of_group[i] for i in gp.positions]
            if self.wrapped_grads:
                grads_of_group = list(map(kernel_tensor, grads_of_group))
            beta1, beta2 = group["betas"]
            lr, beta1, beta2, eps, weight_decay = map(
                _zero_dim, (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            )
            out.append(
                GroupTensors(
                    params=gp.params, grads=grads_of_group, exp_avgs=gp.exp_avgs, exp_avg_sqs=gp.exp_avg_sqs,
                    steps=gp.steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, maximize=group["maximize"],
                    param_dtypes=gp.param_dtypes, layout_key=layout,
                )
            )
        return out


def _zero_dim(value: Any) -> Any:
    """A one-element tensor hyper-parameter of shape [1] (torch.optim takes them) as a 0-dim view
    (an in-place edit is still seen): backends would broadcast it against 0-dim steps, or let its
    dtype promote their coefficients. Numbers and 0-dim tensors as they are."""
    return value.reshape(()) if isinstance(value, Tensor) and value.dim() else value


def _check_taking_part(param_groups: Sequence[dict], selected: Sequence[Tuple[int, List[int]]],
                       existing_state: Callable[[Tensor], Optional[Dict[str, Tensor]]]) -> None:
    """The params a call updates pass add_param_group's checks (validation.check_params: one
    device, each once) and the states they already have are usable (check_state_entry): they
    may have been put into a group's list or into ``opt.state`` since they were added, or
    wrapped since (FSDP1 with use_orig_params keeps the Parameter objects)."""
    named = [(f"param_groups[{gi}]['params'][{pi}]", param_groups[gi]["params"][pi])
             for gi, positions in selected for pi in positions]
    check_params(named)
    check_no_fsdp1_shards(named)
    owners: Dict[Any, str] = {}
    for where, p in named:
        state = existing_state(p)
        if state:
            check_state_entry(p, state, f"opt.state[{where}]")
            _check_own_state_tensors(state, f"opt.state[{where}]", owners)


def _check_own_state_tensors(state: Dict[str, Tensor], where: str, owners: Dict[Any, str]) -> None:
    """Each param's step, exp_avg and exp_avg_sq are tensors of its own (a hand-built state
    could share one step count among params): the kernels advance each step and compute its
    bias corrections in one pass, so a shared count would give each param another t than the
    final one torch.optim.AdamW's separate passes use, and two updates of one moment would race
    on the CPU's threads. ``owners``: what the params checked so far hold, by address (plain
    tensors) or object."""
    for key in ("step", "exp_avg", "exp_avg_sq"):
        t = state[key]
        if t.numel() == 0:
            continue
        addr = t.data_ptr() if type(t) in _PLAIN else id(t)
        other = owners.setdefault(addr, f"{where}[{key!r}]")
        if other != f"{where}[{key!r}]":
            raise ValueError(f"{where}[{key!r}] shares its memory with {other}: each param's AdamW state "
                             "holds tensors of its own")


def _check_addressable(param_groups: Sequence[dict], grads_per_group, selected: Sequence[Tuple[int, List[int]]],
                       existing_state: Callable[[Tensor], Optional[Dict[str, Tensor]]]) -> None:
    """For a kernel backend: every param, grad and existing state taking part is a plain tensor,
    a DTensor whose local shard is one, or a wrapper subclass whose elements an inner tensor
    holds (subclasses.py). Named, with what to do, otherwise."""
    for gi, positions in selected:
        for pi in positions:
            p = param_groups[gi]["params"][pi]
            state = existing_state(p) or {}
            where = f"param_groups[{gi}]['params'][{pi}]"
            for what, t in ((where, p), (f"{where}.grad", grads_per_group[gi][pi]),
                            *((f"opt.state[{where}]['{k}']", state[k]) for k in ("exp_avg", "exp_avg_sq") if k in state)):
                local = t.to_local() if is_dtensor(t) else t
                if views(local) is None:
                    raise TypeError(
                        f"{what} is a {type(local).__name__}, a tensor subclass whose elements no inner tensor "
                        "holds as a plain tensor of its dtype and shape (its aten.alias is not one), so the "
                        "kernels cannot address them; backend='reference' updates it through the "
                        "subclass's own operators"
                    )


def check_grads_cheaply(param_groups: Sequence[dict], grads: CallGrads) -> None:
    """Every call: dense, real gradients (torch itself refuses a .grad of another shape or
    device). Read off the gathering pass; the full check names the culprit."""
    if grads.dense_real:
        return
    for gi, group_grads in enumerate(grads.per_group):
        for pi, (p, g) in enumerate(zip(param_groups[gi]["params"], group_grads)):
            if g is not None:
                check_grad(p, gi, pi)
