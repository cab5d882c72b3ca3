"""``ZeroRedundancyOptimizer(params, optimizer_class=GuardedAdamW, ...)``: one decision for a
model whose optimizer state is partitioned over the ranks (ZeRO stage 1).

ZeroRedundancyOptimizer (torch.distributed.optim) builds one GuardedAdamW per rank over that
rank's partition of the params, and after each local step broadcasts every partition's params
from its owner. Each local optimizer would read only its own partition's gradients: every rank
would scale its partition's learning rate on its own, and a NaN in one partition would skip
that partition alone, leaving the model half stepped. So a GuardedAdamW that a
ZeroRedundancyOptimizer builds (found on the call stack while it is built: :func:`building_zero`)
combines its telemetry over ZeRO's ranks as pipeline stages do (pipeline.py: one
``all_gather`` of a 7-number summary per call). ZeRO partitions whole params, so every
per-tensor number is exact; the decisions are those of one optimizer over all the params.

Checkpoints: ``consolidate_state_dict()`` gathers each rank's ``state_dict()``, and
``ZeroRedundancyOptimizer.load_state_dict`` installs each param's saved state straight into
the rank that owns it now (``optim.state[p] = ...``, never calling the local optimizer's
``load_state_dict``). The guard rides in every param's state of such an optimizer (one tensor,
saved once), and a hook that ZeRO runs after installing the states
(:func:`adopt_states_after_zero_loads`) passes them through GuardedAdamW's own checks and
loading, then gathers every rank's outcome (:func:`agree_on_loaded_guard`): a rank may own no
param that had state when saved (another number of ranks partitions the params otherwise), and
still takes the guard the others found.

DeepSpeed's ZeRO (stages 1-3) and its bf16/fp16 optimizers are refused instead
(:func:`check_not_wrapped_by_deepspeed`): they replace each param group's params by one flat
fp32 tensor (this rank's slice of the group, or the whole group), from which the per-tensor
mean squares of rule 2 cannot be read, and each rank would decide on its own slice.
"""

from __future__ import annotations

import sys
import weakref
from typing import Optional

from .reference import CALLS

_ZERO_MODULE = "torch.distributed.optim.zero_redundancy_optimizer"


def building_zero(max_depth: int = 8):
    """The ZeroRedundancyOptimizer whose ``_init_local_optimizer`` is building the caller's
    optimizer, else None (a stack walk when an optimizer is built; nothing per step)."""
    module = sys.modules.get(_ZERO_MODULE)
    if module is None:  # not imported: no ZeroRedundancyOptimizer exists
        return None
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_code.co_name == "_init_local_optimizer":
            zero = frame.f_locals.get("self")
            return zero if isinstance(zero, module.ZeroRedundancyOptimizer) else None
    return None


def zero_group(zero, pipeline_group) -> Optional[object]:
    """The process group over which the local optimizer that ``zero`` builds combines its
    telemetry (None for one rank: nothing to combine). Refuses the keywords that ZeRO would copy
    into its param groups where its state_dict() could not save them (the same keywords on
    every rank: every rank raises alike)."""
    policy = getattr(zero, "defaults", {}).get("policy")
    if policy is not None and not isinstance(policy, str):
        # (ZeRO's defaults are its keywords; a partial's are not among them)
        raise ValueError(
            f"policy={policy!r} cannot be given through ZeroRedundancyOptimizer's keywords: it copies every "
            "keyword argument into its param_groups, and its consolidated state_dict() would hold the policy "
            "object, which torch.load(weights_only=True) refuses. Pass a policy name (policy=\"zscore\"), or "
            "bind the instance to the class: optimizer_class=functools.partial(GuardedAdamW, "
            "policy=ZScorePolicy(...))"
        )
    if pipeline_group is not None:
        # ZeroRedundancyOptimizer copies every keyword into its param groups, which its
        # state_dict() returns: a ProcessGroup there cannot be saved
        raise ValueError(
            "pipeline_group cannot be given through ZeroRedundancyOptimizer: it copies every keyword "
            "argument into its param_groups, and its state_dict() (a ProcessGroup inside) could not be saved"
        )
    import torch.distributed as dist

    group = zero.process_group
    return group if dist.get_world_size(group) > 1 else None


def zero_device(zero):
    """The device of ZeRO's params: the guard's on a rank whose partition is empty, so that its
    share of each call's gather is on the device the other ranks gather on (NCCL: CUDA)."""
    return getattr(zero, "_default_device", None) or zero._all_params[0].device


def adopt_states_after_zero_loads(zero, optimizer, group) -> None:
    """Register on ``zero`` the hook that loads, into ``optimizer`` (its local optimizer), the
    states ZeroRedundancyOptimizer.load_state_dict has just put in ``optimizer.state``: AdamW's
    moments and step counts checked and moved to their params' devices and dtypes (ZeRO moves
    0-dim tensors to the CPU), and the guard they carry adopted on every rank of ``group``
    (None: one rank), which makes ZeRO's load_state_dict a collective
    (GuardedAdamW.adopt_installed_state). The hook holds the optimizer weakly (``zero.optim``
    holds it). The load itself checks the saved param groups first and changes nothing when
    it fails (_checked_all_or_nothing_loads)."""
    ref = weakref.ref(optimizer)

    def hook(_zero) -> None:
        local = ref()
        if local is not None:
            hook_ran[0] = True  # (this load's outcome is gathered in there: agree_on_loaded_guard)
            local.adopt_installed_state(group)

    hook_ran = [False]
    zero.register_load_state_dict_post_hook(hook)
    _checked_all_or_nothing_loads(zero, group, hook_ran)


def _checked_all_or_nothing_loads(zero, group=None, hook_ran=None) -> None:
    """Make ``zero.load_state_dict`` check the checkpoint's param groups first and change
    nothing when it fails.

    ZeRO copies the saved hyper-parameters into its local optimizer's groups itself, after the
    post-hook: they are checked before the load (GuardedAdamW.checked_saved_group; the same
    checkpoint on every rank, so every rank raises alike, before any collective). And ZeRO
    writes the saved states into the local optimizer's ``state`` before its own
    Optimizer.load_state_dict (and so the post-hook) runs, and replaces its ``param_groups`` and
    ``state`` before the post-hook: a checkpoint refused there (a state of the wrong shape on
    one rank, refused on every rank) left the new moments beside the old guard, and that
    rank's next step raised while the others waited in the guard's gather. On an error the
    entries as they were are put back: ZeRO replaces per-param state dicts and group lists, it
    does not edit them in place.

    The saved states must be dicts (``{}``: no state yet) or None, checked first on every rank:
    ZeRO's install loop reads one only on the rank that owns its param, and an entry it could not
    read raised there alone, while the others waited in the post-hook's gather. A None owned by
    this rank (_check_owned_entries), and any other error that ZeRO's own load raises before
    the post-hook (``hook_ran``, set by it), are gathered over ``group``, as the post-hook gathers
    its outcome (agree_on_loaded_guard), so that every rank raises them."""
    load = zero.load_state_dict  # (the bound method of ZeroRedundancyOptimizer)

    def load_state_dict(state_dict) -> None:
        local = zero.optim
        states = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(states, dict):
            raise ValueError(f"state_dict['state'] must be a dict, got {type(states).__name__}")
        for index, entry in states.items():
            if not isinstance(entry, dict) and entry is not None:  # (None: see _check_owned_entries)
                raise ValueError(f"state_dict['state'][{index!r}] must be a dict (empty: no state yet), got "
                                 f"{type(entry).__name__}")
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        for gi, saved in enumerate(groups if isinstance(groups, (list, tuple)) else ()):
            if isinstance(saved, dict):
                local.checked_saved_group(saved, [], gi)
        kept = (dict(local.state), [dict(g) for g in local.param_groups], zero.state, zero.param_groups,
                [dict(g) for g in zero.param_groups])
        if hook_ran is not None:
            hook_ran[0] = False
        try:
            _check_owned_entries(zero, states)
            load(state_dict)
        except BaseException as err:
            local_state, local_groups, zero.state, zero.param_groups, zero_groups = kept
            local.state.clear()
            local.state.update(local_state)
            for live, old in zip(local.param_groups, local_groups):
                live.clear()
                live.update(old)
            for live, old in zip(zero.param_groups, zero_groups):
                live.clear()
                live.update(old)
            if group is not None and hook_ran is not None and not hook_ran[0] and isinstance(err, Exception):
                # raised before the post-hook's gather, perhaps on this rank only: the others
                # wait there for this rank's outcome (raises on every rank, naming this one's)
                agree_on_loaded_guard(group, None, f"{type(err).__name__}: {err}", local._guard)
            raise

    zero.load_state_dict = load_state_dict


def _check_owned_entries(zero, states: dict) -> None:
    """A None entry is what ZeroRedundancyOptimizer.load_state_dict writes into the dict it loads
    for each param another rank owns (a dict loaded once already holds them), and it never
    reads those: taken there. Where this rank owns the param, ZeRO would fail reading it, on
    this rank alone: refused here instead, inside the load's try, whose error path gathers it
    so that every rank raises. (ZeRO's own index and partition maps, as its load reads them.)"""
    for index, entry in states.items():
        if entry is None and zero._param_to_rank[zero._index_to_param[index]] == zero.rank:
            raise ValueError(
                f"state_dict['state'][{index!r}] is None where this rank owns its param: a dict (empty: no state "
                "yet) is needed (ZeroRedundancyOptimizer.load_state_dict writes None for the params other ranks "
                "own into the dict it loads: a dict loaded under another partition holds them)")


def agree_on_loaded_guard(group, checked: Optional[tuple], error: Optional[str], guard):
    """Every rank's outcome of loading its partition's states (GuardedAdamW._checked_state's
    result, or the error it raised) gathered over ``group``: an error on any rank is raised on
    every rank; else the guard found in the states of the lowest rank that found one (copies
    that differ are refused), or on every rank a fresh one when none did (a rank may own no
    param with saved state: its partition changed, or it held no state when saved). Returns
    this rank's result with that guard (on ``guard``'s device and dtype) and call count."""
    import torch
    import torch.distributed as dist

    found = checked[2].tolist() if checked is not None and checked[4] else None
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (error, found), group=group)
    ranks = dist.get_process_group_ranks(group)
    errors = [f"rank {r}: {e}" for r, (e, _) in zip(ranks, gathered) if e is not None]
    if errors:
        raise ValueError("ZeroRedundancyOptimizer.load_state_dict: " + "; ".join(errors))
    copies = [(r, values) for r, (_, values) in zip(ranks, gathered) if values is not None]
    if not copies:
        return checked
    first, values = copies[0]
    for r, other in copies[1:]:
        # (NaN slots equal: a != a only for NaN)
        if len(other) != len(values) or not all(a == b or (a != a and b != b) for a, b in zip(other, values)):
            raise ValueError(f"ZeroRedundancyOptimizer.load_state_dict: the guard in rank {r}'s states differs "
                             f"from the one in rank {first}'s")
    groups, state = checked[:2]
    return groups, state, torch.tensor(values, dtype=guard.dtype, device=guard.device), int(values[CALLS]), True


def check_not_wrapped_by_deepspeed(optimizer, max_depth: int = 16) -> None:
    """Raise ValueError when one of DeepSpeed's optimizer wrappers (every one derives from its
    ``DeepSpeedOptimizer``) is stepping ``optimizer``: found on the call stack as a step plan is
    built, so once per layout, and only where DeepSpeed is imported. DeepSpeed's engine stepping
    the optimizer itself (ZeRO stage 0 in fp32) keeps the params as they are, and is taken."""
    if "deepspeed" not in sys.modules:
        return
    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if owner is None or owner is optimizer or not _is_deepspeed_optimizer(type(owner)):
            continue
        if getattr(owner, "optimizer", None) is optimizer:
            raise ValueError(
                f"GuardedAdamW is stepped by DeepSpeed's {type(owner).__name__}, which hands it one flat fp32 "
                "tensor per param group (a slice of it per rank under ZeRO): the guard's per-tensor telemetry "
                "cannot be read from that, and each rank would decide alone. Use torch's FSDP2 or "
                "ZeroRedundancyOptimizer, or DeepSpeed without ZeRO and without its bf16/fp16 optimizers"
            )


def _is_deepspeed_optimizer(cls) -> bool:
    return any(c.__name__ == "DeepSpeedOptimizer" and c.__module__.startswith("deepspeed.") for c in cls.__mro__)
