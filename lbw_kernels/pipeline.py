"""Pipeline parallelism: one guard decision for a model split into stages.

Under pipeline parallelism each rank's optimizer holds only its stage's params (torchtitan
builds one per model part), so each would read only its own stage's telemetry: every stage
would scale its learning rate on its own, and a NaN gradient in one stage would skip that
stage's update alone, leaving the model half stepped. With ``GuardedAdamW(...,
pipeline_group=group)`` each call's telemetry is combined over ``group`` (the ranks that hold
the other stages, e.g. torchtitan's ``world_mesh["pp"]``) before rules 1-4, so every stage
takes the decision that one optimizer over the whole model would take.

Stages hold different tensors, so their rows cannot be summed as DTensor shards' are
(distributed.py, which still runs first, over a stage's own data-parallel ranks). Each stage
sends a summary of a fixed size instead: one ``all_gather`` of 7 numbers per call, enqueued
like any collective (no host sync on NCCL), and stages never have to agree on a layout. The
whole model's summary (reference.summarize's ``[x, signed_mean, grad_norm, nonfinite]``) is
formed from the stages' summaries:

* ``x``: the max over stages of their max mean square (``use_max_rms``), or the sum over
  stages of their mean squares over their number of tensors;
* ``signed_mean``: the sum of their gradient sums over the sum of their element counts;
* ``grad_norm``: the square root of the sum of their sums of squares;
* ``nonfinite``: the sum of their counts.

``x`` under ``use_max_rms`` and ``nonfinite`` are exactly what one optimizer over all the
params computes; the sums are added in another order (the last bits may differ). The same
summaries combine a ZeroRedundancyOptimizer's partitions (zero.py): a message is gathered over
each group in turn (ZeRO's ranks, then the stages) and merged (:func:`merge`).

The gather is a collective, so every stage's optimizer gathers exactly once per ``step()``,
whatever its own telemetry schedule says (a call it does not measure sends an empty summary:
stages whose schedules are read on the device, after a CUDA graph capture or under
torch.compile, and stages whose schedules are read on the host still pair their gathers), and
every stage's optimizer must call ``step()`` on every iteration, as every pipeline schedule
does (a stage with no gradient on a call takes part too). When no stage has a gradient
element, nothing is analysed, as for one optimizer without any. The stages' guard options are
compared once, when each stage builds its optimizer (:func:`check_same_options`).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

_FIELDS = 7  # max mean square, sum of mean squares, tensors, sum g, elements, sum g^2, non-finite

# all_gather_into_tensor's newer name (torch 2.13 warns on the old one; older torch has only it)
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def resolve_pipeline_group(group):
    """``pipeline_group`` as the process group to gather over: None, a ProcessGroup, or a 1-D
    DeviceMesh (its group). Raises naming the parameter otherwise."""
    if group is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("pipeline_group: torch.distributed is not initialized (init_process_group first)")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on ranks outside it
        raise ValueError("pipeline_group: this rank is not in the group (new_group returned NON_GROUP_MEMBER here)")
    if isinstance(group, dist.ProcessGroup):
        return group
    mesh_type = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            raise ValueError(f"pipeline_group: a DeviceMesh must be 1-D (the stages' dim), got {group.ndim}-D")
        return group.get_group()
    raise TypeError(f"pipeline_group must be a ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")


def stage_summary(partials: Optional[Tensor], numels: Optional[Tensor], numel_total: Optional[Tensor],
                  dtype: torch.dtype, device) -> Tensor:
    """This stage's ``[7]`` message from its telemetry rows (``partials`` [T, 3], ``numels``
    [T] and their sum; None or no rows: an empty stage, whose max is -inf)."""
    if partials is None or partials.shape[0] == 0:
        empty = torch.zeros(_FIELDS, dtype=dtype, device=device)
        empty[0] = float("-inf")
        return empty
    sumsq, sums, nonfinite = partials.to(dtype).unbind(1)
    grad_ms = sumsq / numels
    tensors = torch.full((), grad_ms.shape[0], dtype=dtype, device=grad_ms.device)
    total = numels.sum() if numel_total is None else numel_total
    return torch.stack([grad_ms.amax(), grad_ms.sum(), tensors, sums.sum(), total.to(dtype), sumsq.sum(),
                        nonfinite.sum()])


def merge(summaries: Tensor) -> Tensor:
    """Several parts' messages ``[parts, 7]`` -> the message of their union ``[7]``: the max of
    the max mean squares, the sums of the rest (in the parts' order, the same on every rank)."""
    ms_max, *summed = summaries.unbind(1)
    return torch.stack([ms_max.amax(), *(field.sum() for field in summed)])


def finish(summary: Tensor, use_max_rms: bool) -> Tuple[Tensor, Tensor]:
    """The whole model's message ``[7]`` -> its ``[x, signed_mean, grad_norm, nonfinite]``, as
    reference.summarize gives for all the rows, and the number of rows (0: no part had any,
    and the summary means nothing)."""
    ms_max, ms_sum, rows, sums, elements, sumsq, nonfinite = summary.unbind(0)
    x = ms_max if use_max_rms else ms_sum / rows
    return torch.stack([x, sums / elements, sumsq.sqrt(), nonfinite]), rows


def model_summary(groups: Sequence, partials: Optional[Tensor], numels: Optional[Tensor],
                  numel_total: Optional[Tensor], use_max_rms: bool, dtype: torch.dtype, device) -> Tuple[Tensor, Tensor]:
    """:func:`finish` of every part's telemetry rows: this rank's message is gathered over each
    of ``groups`` in turn and the gathered messages merged (ZeroRedundancyOptimizer's ranks,
    then the pipeline stages: zero.py), the same on every rank of every group."""
    summary = stage_summary(partials, numels, numel_total, dtype, device)
    for group in groups:
        parts = dist.get_world_size(group)
        if parts > 1:
            gathered = summary.new_empty((parts * _FIELDS,))
            all_gather_single(gathered, summary, group=group)
            summary = merge(gathered.view(parts, _FIELDS))
    return finish(summary, use_max_rms)


def only_rows_analyzed(analyze, rows: Tensor):
    """The call's ``analyze`` (a host or device bool), off on the device when no stage had a
    row: an empty reading (x = -inf) must not reach the analyzer's EMA."""
    if isinstance(analyze, Tensor) or analyze:
        return (rows > 0) & analyze
    return analyze


def check_stage_group(group, mesh_ranks) -> None:
    """``pipeline_group`` must hold the ranks of the other stages only: a rank that shares this
    rank's DTensor meshes (``mesh_ranks``: every rank of every mesh) holds the same stage, and
    its summary would count a second time (x and the signed mean would survive that, the norm
    would grow by sqrt(replicas))."""
    shared = set(dist.get_process_group_ranks(group)) & set(mesh_ranks)
    shared.discard(dist.get_rank())
    if shared:
        raise ValueError(
            f"pipeline_group shares ranks {sorted(shared)} with the mesh of this stage's DTensor params: it "
            "must hold one rank per stage (the other stages' ranks, e.g. world_mesh['pp']), not data-parallel ranks"
        )


def check_same_options(group, options: Sequence[Tuple[str, object]], what: str = "pipeline_group") -> None:
    """Every stage's guard options are the same (else the stages would decide apart while
    looking as one): gathered when each stage builds its optimizer (a collective, like building
    DDP; none in ``step()``; on NCCL, as for any object collective, after the rank's
    ``torch.cuda.set_device``). Every rank compares the same gathered lists, so all of them
    raise together, naming the option and each rank's value; ``what`` names the parts."""
    gathered: List[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(options), group=group)
    ranks = dist.get_process_group_ranks(group)
    differ = []
    for i, (name, _) in enumerate(options):
        values = [theirs[i][1] for theirs in gathered]
        if any(v != values[0] for v in values):
            differ.append(f"{name} is " + ", ".join(f"{v!r} on rank {r}" for r, v in zip(ranks, values)))
    if differ:
        raise ValueError(f"{what}: the parts' GuardedAdamW options differ: {'; '.join(differ)}; every "
                         "part of the model must take the same guard options (gate, policy and thresholds)")


def stage_options(cfg, gate: str) -> Sequence[Tuple[str, object]]:
    """The guard options the stages must share, as (name, value): every GuardConfig field (so a
    new option is compared without being listed here), the policy by its repr (a dataclass's
    holds its options; another policy's, its name), and the gate."""
    policy = cfg.policy
    described = repr(policy) if dataclasses.is_dataclass(policy) else str(getattr(policy, "name", type(policy).__name__))
    fields = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "policy"]
    return fields + [("gate", gate), ("policy", described)]
