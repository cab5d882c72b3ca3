"""The backend's three passes, as plain functions and as ``torch.library`` custom ops.

``*_impl`` functions find (or build) the plan for their tensors and launch the kernels; the
eager backend calls them directly. Under ``torch.compile`` the backend calls the custom ops
``lbw_triton::telemetry / adamw_ / adamw_telemetry_`` instead: same implementation, but the
compiler sees an op with a schema that names every tensor it mutates (params, exp_avg,
exp_avg_sq, steps) and a fake implementation for shapes. ``wrap_triton`` alone would not do:
the kernels reach the tensors through addresses in a table, so the compiler could not see
which tensors they write. Eager skips the dispatcher because boxing thousands of tensors per
call costs host time comparable to the whole update of small models.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from lbw_kernels import reference
from lbw_kernels.backends import GroupTensors, nonempty_grads
from lbw_kernels.validation import check_state_tensors
from lbw_kernels.stream_use import StreamUse, stream_is_capturing

from .chunk_table import (
    HYPER_FIELDS, PlanCache, UpdatePlan, build_telemetry, build_update, exact_telemetry_key, refresh_hyper, stage_,
    telemetry_key, update_key,
)
from .config import geometry
from .guarded_adamw import guarded_adamw_
from .telemetry import new_partials, telemetry_chunks_, telemetry_partials

#: Plans of every optimizer using the Triton backend, keyed by storage (see chunk_table.py):
#: room for 8 optimizers on the exact gate (2 plans each) or 16 on single_pass, beyond which
#: every call would rebuild. (One plan covers every param group of a call; the CUDA backend
#: needs a table per group and dtype, and its cache holds 64.)
PLANS = PlanCache(capacity=16)


def _plan(key, build, device: torch.device):
    """``PLANS.get``; a plan used while the stream is captured into a CUDA graph is kept for good
    (PlanCache.keep): eviction would free memory the graph's replays write.

    A plan first needed during a capture (no eager step with these tensors before it) is built
    for that graph alone, not cached: its uploads and zero-fills are recorded into the graph,
    not run, so its tables hold nothing until the first replay, and an eager call finding it
    before then would launch from garbage addresses."""
    if not stream_is_capturing(device):
        plan = PLANS.get(key, lambda: _built_on_this_stream(build(), device))
        if plan.stream_use is not None:
            plan.stream_use.enter(plan)
        return plan
    plan = PLANS.get(key, None)
    if plan is None:
        try:
            plan = build()
        except Exception as err:  # e.g. pinning host memory, which a capture may not allow
            raise RuntimeError(
                "the Triton backend could not build its tables while a CUDA graph was being captured; "
                "run one step() eagerly with the same params and grads before capturing"
            ) from err
    PLANS.keep(plan)
    if isinstance(plan, UpdatePlan):
        plan.captured = True  # (refresh_hyper: eager calls now write lr every call)
    return plan


def _built_on_this_stream(plan, device: torch.device):
    # (a CUDA plan to be cached: its stream and an event after its uploads, lbw_kernels/stream_use.py)
    if device.type == "cuda":
        plan.stream_use = StreamUse(device)
    return plan


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def telemetry_impl(grads: Sequence[Tensor], partials_dtype: torch.dtype) -> Tensor:
    """``[T, 3]`` partials of ``grads`` (non-empty): the exact gate's telemetry pass."""
    if not grads:
        return torch.zeros((0, 3), dtype=partials_dtype)
    device = grads[0].device
    chunk = geometry().chunk
    layout = _plan(telemetry_key(grads, chunk, device), lambda: build_telemetry(grads, chunk, device), device)
    with _on_device(device):
        stage_(layout, grads)
        return telemetry_partials(layout, partials_dtype)


def _delegate(plan, groups: Sequence[GroupTensors], scale: Tensor, **kwargs) -> None:
    """fp64 params (their math dtype is fp64, which the kernels do not do), params with grads of
    another dtype and params whose tensors differ in element order (chunk_table.build_update):
    the reference updates them (one foreach chain per group and param dtype), reading
    scale/skip on the device too."""
    for gi, delegated in plan.delegated:
        g = groups[gi]
        by_dtype: dict = {}  # (reference.adamw_ takes params of one dtype: its math dtype)
        for i in delegated:
            by_dtype.setdefault(g.params[i].dtype, []).append(i)
        for idx in by_dtype.values():
            pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
            reference.adamw_(
                pick(g.params), pick(g.grads), pick(g.exp_avgs), pick(g.exp_avg_sqs), pick(g.steps),
                lr=scale * g.lr, beta1=g.beta1, beta2=g.beta2, eps=g.eps,
                weight_decay=g.weight_decay, maximize=g.maximize, **kwargs,
            )


def _update_plan(groups: Sequence[GroupTensors]):
    device = groups[0].params[0].device
    chunk = geometry().chunk
    plan = _plan(update_key(groups, chunk, device), lambda: build_update(groups, chunk, device), device)
    _check_delegated(plan, groups)
    refresh_hyper(plan, groups)
    return plan, device


def _check_delegated(plan, groups: Sequence[GroupTensors]) -> None:
    """The delegated params' states, every call, before the kernels write anything: the plan's
    key holds a state's address, numel and dtype, not its shape, so a state reshaped in place
    through ``.data`` finds the plan, and the reference's foreach ops would refuse it halfway
    through the call, after the kernels' params were updated. (The kernels' own params walk
    flat arrays: a shape is not what they read.)"""
    for gi, delegated in plan.delegated:
        g = groups[gi]
        for i in delegated:
            check_state_tensors(g.params[i], g.exp_avgs[i], g.exp_avg_sqs[i], g.steps[i],
                                f"the state of the step's group {gi}, param {i}")


def _update(plan, device: torch.device, groups: Sequence[GroupTensors], scale: Tensor, skip: Optional[Tensor],
            grad_factor: Optional[Tensor]) -> None:
    with _on_device(device):
        guarded_adamw_(plan, scale=scale, skip=skip, mask_nonfinite=False, grad_factor=grad_factor)
    _delegate(plan, groups, scale, skip=skip, grad_factor=grad_factor)


def adamw_impl(groups: Sequence[GroupTensors], scale: Tensor, skip: Optional[Tensor],
               grad_factor: Optional[Tensor] = None) -> None:
    """Rule 5 on every group with ``lr * scale``; nothing (not even a step) when ``skip != 0``;
    gradients read times ``grad_factor`` when given."""
    if not groups:
        return
    plan, device = _update_plan(groups)
    _update(plan, device, groups, scale, skip, grad_factor)


def _exact_telemetry(layouts: Sequence[Optional[bytes]], grads: Sequence[Tensor], rows: Callable[[], List[Tensor]],
                     partials_dtype: torch.dtype) -> Tensor:
    """The exact gate's telemetry pass over ``grads`` (non-empty), its layout found by the
    gathered ``layouts`` of their groups (``exact_telemetry_key``), else built over ``rows()``."""
    device = grads[0].device
    chunk = geometry().chunk
    layout = _plan(exact_telemetry_key(layouts, grads, chunk, device), lambda: build_telemetry(rows(), chunk, device),
                   device)
    with _on_device(device):
        stage_(layout, grads)
        return telemetry_partials(layout, partials_dtype)


def gathered_telemetry_impl(grads: Sequence[Tensor], layouts: Sequence[bytes], partials_dtype: torch.dtype) -> Tensor:
    """``Backend.gathered_telemetry``: the same layout as the exact call's over the same grads."""
    return _exact_telemetry(layouts, grads, lambda: list(grads), partials_dtype)


def exact_step_impl(groups: Sequence[GroupTensors], grads: Sequence[Tensor], decide, scale: Tensor,
                    skip: Optional[Tensor], partials_dtype: torch.dtype, partials: Optional[Tensor] = None) -> None:
    """The exact gate's call (``Backend.exact_step_``): the telemetry launch first, from a layout
    found by the layouts the optimizer gathered (``exact_telemetry_key``), then the update
    plan's key (every AdamW state's layout: 3 walks of Python objects per group) is read while
    the device runs the telemetry pass. With 2000 tensors those walks are ~0.1 ms of host time
    that came before the first kernel, with the device idle; the update can now start up to
    that much earlier, as far as the telemetry pass outlasts the host's decide and launches.
    ``partials``: the rows of ``grads``, launched already (the optimizer's early pass). Either
    way the update's plan, and its checks, come before ``decide`` writes the guard."""
    if partials is None and grads:
        # Built over what the key describes, nonempty_grads(groups): the same tensors as grads
        # unless the optimizer's plan is stale (a param emptied since: then numels disagree and
        # the step raises, rather than caching a layout its key does not determine).
        partials = _exact_telemetry([g.layout_key for g in groups], grads, lambda: nonempty_grads(groups),
                                    partials_dtype)
    plan, device = _update_plan(groups)
    grad_factor = decide(partials)  # (max_grad_norm's factor, or None)
    _update(plan, device, groups, scale, skip, grad_factor)


def adamw_telemetry_impl(
    groups: Sequence[GroupTensors], scale: Tensor, mask_nonfinite: bool, partials_dtype: torch.dtype
) -> Tensor:
    """single_pass: rule 5 and the partials of the gradients it reads, in one launch per dtype (per dtype and
    alignment when some tensor is off 16 bytes)."""
    if not groups:
        return torch.zeros((0, 3), dtype=partials_dtype)
    plan, device = _update_plan(groups)
    with _on_device(device):
        partials = new_partials(plan.telemetry, partials_dtype)
        guarded_adamw_(plan, scale=scale, skip=None, mask_nonfinite=mask_nonfinite, out=partials)
        if plan.telemetry.staged:
            stage_(plan.telemetry, [g for group in groups for g in group.grads])
        telemetry_chunks_(plan.telemetry, partials)  # the delegated params' gradients only
    _delegate(plan, groups, scale, mask_nonfinite=mask_nonfinite)
    return partials


# ---------------------------------------------------------------------------------------
# torch.library custom ops (what torch.compile sees)
# ---------------------------------------------------------------------------------------
# Each group's lr, beta1, beta2, eps and weight_decay, in that order, travel as a float (0.0 in
# the float list where the group holds a tensor) and as an optional tensor: a tensor stays a
# tensor through the traced op, so torch.compile reads it on the device each call (no graph
# break, no sync) as the eager path does (chunk_table.refresh_hyper).
_HYPER = tuple(HYPER_FIELDS.values())


def flatten(groups: Sequence[GroupTensors]) -> dict:
    """GroupTensors -> the flat arguments of the custom ops."""
    values = [getattr(g, name) for g in groups for name in _HYPER]
    return dict(
        params=[p for g in groups for p in g.params],
        grads=[x for g in groups for x in g.grads],
        exp_avgs=[x for g in groups for x in g.exp_avgs],
        exp_avg_sqs=[x for g in groups for x in g.exp_avg_sqs],
        steps=[x for g in groups for x in g.steps],
        group_sizes=[len(g.params) for g in groups],
        hyper_floats=[0.0 if isinstance(v, Tensor) else float(v) for v in values],
        hyper_tensors=[v if isinstance(v, Tensor) else None for v in values],
        maximizes=[bool(g.maximize) for g in groups],
    )


def _unflatten(params, grads, exp_avgs, exp_avg_sqs, steps, group_sizes, hyper_floats, hyper_tensors,
               maximizes) -> List[GroupTensors]:
    out, at = [], 0
    for i, n in enumerate(group_sizes):
        sl = slice(at, at + n)
        at += n
        k = i * len(_HYPER)
        hyper = [t if t is not None else f for f, t in zip(hyper_floats[k:k + len(_HYPER)], hyper_tensors[k:k + len(_HYPER)])]
        out.append(GroupTensors(params[sl], grads[sl], exp_avgs[sl], exp_avg_sqs[sl], steps[sl], *hyper, maximizes[i]))
    return out


_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "steps")


@torch.library.custom_op("lbw_triton::telemetry", mutates_args=())
def telemetry_op(grads: List[Tensor], partials_dtype: torch.dtype) -> Tensor:
    return telemetry_impl(grads, partials_dtype)


@telemetry_op.register_fake
def _(grads, partials_dtype):
    return grads[0].new_empty((len(grads), 3), dtype=partials_dtype)


@torch.library.custom_op("lbw_triton::adamw_", mutates_args=_MUTATED)
def adamw_op(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    steps: List[Tensor], group_sizes: List[int], hyper_floats: List[float], hyper_tensors: List[Optional[Tensor]],
    maximizes: List[bool], scale: Tensor, skip: Optional[Tensor], grad_factor: Optional[Tensor] = None,
) -> None:
    groups = _unflatten(params, grads, exp_avgs, exp_avg_sqs, steps, group_sizes, hyper_floats, hyper_tensors,
                        maximizes)
    adamw_impl(groups, scale, skip, grad_factor)


@adamw_op.register_fake
def _(*args, **kwargs):
    return None


@torch.library.custom_op("lbw_triton::adamw_telemetry_", mutates_args=_MUTATED)
def adamw_telemetry_op(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    steps: List[Tensor], group_sizes: List[int], hyper_floats: List[float], hyper_tensors: List[Optional[Tensor]],
    maximizes: List[bool], scale: Tensor, mask_nonfinite: bool, partials_dtype: torch.dtype,
) -> Tensor:
    groups = _unflatten(params, grads, exp_avgs, exp_avg_sqs, steps, group_sizes, hyper_floats, hyper_tensors,
                        maximizes)
    return adamw_telemetry_impl(groups, scale, mask_nonfinite, partials_dtype)


@adamw_telemetry_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, group_sizes, hyper_floats, hyper_tensors, maximizes, scale,
      mask_nonfinite, partials_dtype):
    n = sum(1 for g in grads if g.numel() > 0)
    return scale.new_empty((n, 3), dtype=partials_dtype)
