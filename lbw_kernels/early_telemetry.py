"""The exact gate's telemetry pass, launched as soon as a call's gradients are gathered.

Why: a step timed alone leaves the device idle until the host issues its first launch. On an
H200 (2026-11-27, bench/results/nvidia-h200-timeline-20261127.txt) the guarded TinyLlama step's
kernels ran within 1-3% of the memory floor, and 0.40-0.47 ms of host time before the first
launch made up the rest of the exact rows' overshoot. Of that host work, the step plan's
validation, grouping this call's tensors, the scaler and schedule inputs and the backend's own
bookkeeping come before the telemetry pass, yet the pass reads nothing but the gradients.

When: the telemetry rows are the gathered gradients themselves (``StepPlan.row_groups``) and
this call's params and grads have the layouts of the previous call's (addresses, sizes, dtypes
and strides, as ``gather_grads`` read them), so the previous call's rows are this call's and
the backend's cached tables for them still hold. And only when the call will read the
telemetry whatever its schedule says (the finite check, clipping, or telemetry every call),
eagerly, outside a CUDA graph capture, with state already created (not DCP's state-creating
call). The pass itself writes nothing but a fresh partials tensor and the backend's workspace.
The step hands these partials to the backend's one-call exact step (``Backend.exact_step_``'s
``partials``: triton, cuda), which checks the update's tensors before ``decide`` writes the
guard, as it does without them; a backend without one runs ``decide`` and the update one by
one, as it does without them. Either way, the same bits as a call without the early launch,
and a call refused by the update's checks changes what it changed without it.

``LBW_EARLY_TELEMETRY=0`` in the environment when this module is imported turns it off (read
once: a step reads no environment), so that a benchmark can time the step without it in the
same run (bench/device_check.sh).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backends import Backend
from .reference import GuardConfig
from .step_plan import CallGrads, StepPlan

ENABLED = os.environ.get("LBW_EARLY_TELEMETRY", "1") != "0"


@dataclass(frozen=True)
class Recipe:
    """What a call leaves for the next one to launch its telemetry early: the layouts its
    gradients had and which groups' gradients were its rows, on which backend."""

    layouts: Tuple[bytes, ...]
    row_groups: Tuple[int, ...]
    backend: Backend


class Launched(NamedTuple):
    """An early telemetry pass in flight: its partials, the gradients it read (the rows, in
    order), which groups' they are and the backend it ran on. (A tuple: one is made every call,
    and a frozen dataclass's __init__ costs ~1 us a field.)"""

    partials: Tensor
    rows: Sequence[Tensor]
    row_groups: Tuple[int, ...]
    backend: Backend

    def serves(self, plan: StepPlan, backend: Backend) -> bool:
        """Whether these are the partials of this call's rows on this call's backend."""
        return backend is self.backend and plan.row_groups == self.row_groups


def reads_every_call(cfg: GuardConfig) -> bool:
    """Whether every call with rows reads its telemetry, whatever rule 2's schedule says."""
    return cfg.skip_nonfinite or cfg.max_grad_norm is not None or (cfg.auto_enabled and cfg.stats_freq == 1)


def recipe_after(layouts: Optional[Sequence[Optional[bytes]]], plan: StepPlan, backend: Backend) -> Optional[Recipe]:
    """The recipe an eager exact call that read the telemetry of ``plan``'s rows leaves, or None
    where the next call could not tell from its layouts alone that its rows are the same, or
    where the backend's one-call exact step cannot take rows launched already (one registered
    from outside: it would be bypassed, and with it the update's checks before ``decide``)."""
    if layouts is None or plan.row_groups is None or any(layout is None for layout in layouts):
        return None
    if type(backend).exact_step_ is not Backend.exact_step_ and not backend.exact_step_takes_partials:
        return None
    return Recipe(tuple(layouts), plan.row_groups, backend)


def launch(recipe: Optional[Recipe], grads: CallGrads, partials_dtype: torch.dtype) -> Optional[Launched]:
    """The telemetry pass over this call's gradients when their layouts are the recipe's (the
    caller has checked the rest: module docstring), else None."""
    if recipe is None or not ENABLED or grads.layouts != recipe.layouts:
        return None
    groups = recipe.row_groups
    rows = grads.per_group[groups[0]] if len(groups) == 1 else [g for gi in groups for g in grads.per_group[gi]]
    # (the recipe's layouts, equal to this call's: the objects the backend's tables were keyed by)
    partials = recipe.backend.gathered_telemetry(rows, [recipe.layouts[gi] for gi in groups], partials_dtype)
    return Launched(partials, rows, groups, recipe.backend)
