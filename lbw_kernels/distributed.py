"""Telemetry across ranks: the same guard decisions on every rank under DDP and FSDP2.

The guard decides from per-tensor partials ``(sum g^2, sum g, nonfinite)`` (see
:func:`lbw_kernels.reference.telemetry_partials`). Those are sums, so the partials of a
sharded gradient are the sums of its shards' partials:

* **DTensor params** (FSDP2's ``fully_shard``, ``distribute_tensor`` with ``Shard``
  placements): each rank computes the partials of its local shards, scatters them into a
  ``[T, 3]`` tensor whose rows are the tensors of *global* numel > 0 (the same ``T`` on every
  rank, even where a local shard is empty), and one ``all_reduce(SUM)`` of that small tensor
  over the mesh gives every rank the partials of the unsharded gradients. Every rank then runs
  the controller on identical numbers, with the global numels. The all_reduce happens on every
  ``step()`` that computes telemetry or the finite check: every call when
  ``skip_nonfinite=True`` (the default) or ``max_grad_norm`` is set (its norm), else the
  telemetry calls (1, f, 2f, ...; every call once a step has been captured in a CUDA graph,
  see GuardedAdamW._telemetry_due). It is
  enqueued like any collective: no host sync on NCCL.
* A row whose gradient is ``Replicate`` on a mesh dim holds the same numbers on every rank of
  that dim; ranks whose coordinate on such a dim is not 0 contribute zeros, so the sum counts
  it once, exactly (no division). Plain tensors next to DTensors are taken to be replicated
  over the whole mesh (counted from the rank at coordinate 0 everywhere); with several
  meshes, over the first one's ranks.
* **Several meshes** (a MoE's expert params on their own (dp, ep) mesh beside the dense
  params' mesh, as torchtitan lays out expert parallelism): each row is summed over its own
  mesh's ranks. Meshes over the same ranks share one reduction; meshes over other sets of
  ranks get one each (:class:`_MeshSum`), in the order their rows first appear, which must be
  the same on every rank (it is when every rank builds the same model).
* **A mesh over some of the ranks** (a pipeline stage's 1-D or n-D mesh, such as (dp, tp)):
  summed over that mesh's ranks; an n-D one by an ``all_gather`` per mesh dim, so that no
  process group has to be created (:class:`_MeshSum`).
* ``Partial(sum)`` gradients of params that are ``Replicate`` on that dim (tensor parallelism
  without FSDP2) are summed first, one all_reduce per bucket (partial_grads.py); other
  ``Partial`` gradients are refused.
* **DDP** (plain replicated params whose gradients DDP has already averaged): every rank holds
  the same gradients, so the same decisions follow with no communication at all.
* **Pipeline stages** hold different tensors: their telemetry is combined after this
  reduction, over ``pipeline_group`` (pipeline.py).
* **ZeroRedundancyOptimizer** gives each rank's optimizer only that rank's partition of the
  params: their telemetry is combined as pipeline stages' is (zero.py).
* **FSDP1** parameters are refused (check_no_fsdp1_shards).

The update runs on the local shards (params, grads, ``exp_avg``, ``exp_avg_sq``) through
whichever backend applies: backends take plain tensors.

Checkpoints (``torch.distributed.checkpoint``): ``opt.state_dict()`` holds DTensor states for
DTensor params and a top-level ``"guard"`` entry; ``dcp.save({"optim": opt.state_dict()})``
saves it. To load, a fresh optimizer needs its states allocated to serve as the template:
:func:`init_state_` does that without a step. ``get_/set_optimizer_state_dict`` from
``torch.distributed.checkpoint.state_dict`` work too: they keep only ``"state"`` and
``"param_groups"``, so the guard also rides in the first param's state (GuardedAdamW.state_dict);
on an optimizer without state they first run a step with zero gradients and lr 0 to create
AdamW's state, which the guard recognises and stays out of (:func:`called_by_dcp_state_init`).
"""

from __future__ import annotations

import operator
import sys
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import GroupTensors
from .partial_grads import PartialGrads, effective_placements
from .pipeline import all_gather_single, check_stage_group
from .stream_use import kept_copy
from .subclasses import dtensor_class, is_dtensor, is_plain, kernel_tensor


def check_no_fsdp1_shards(named: Sequence[Tuple[str, Tensor]]) -> None:
    """FSDP1 (``FullyShardedDataParallel``) hands the optimizer plain tensors holding this
    rank's shard (flat or not), which say nothing of what other ranks hold: telemetry on them
    cannot be reduced across ranks, so each rank would decide alone (skip different calls,
    scale differently) while promising one decision. Refused once more than one rank runs
    (NO_SHARD too, which is DDP's job; the param does not say which strategy wraps it);
    FSDP2's DTensor shards carry their placements and are reduced (above)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for where, p in named:
        if getattr(p, "_fsdp_flattened", False):  # (torch's mark for FSDP1's flat parameters and their views)
            raise ValueError(
                f"{where} is a FullyShardedDataParallel (FSDP1) parameter: sharded, each of the "
                f"{dist.get_world_size()} ranks would hold a part of it that the others cannot account "
                "for and take its own guard decisions. Use FSDP2 (torch.distributed.fsdp.fully_shard), "
                "whose DTensor shards GuardedAdamW reduces across ranks, or DDP (in place of NO_SHARD)"
            )


def _local(t: Tensor) -> Tensor:
    """:func:`_locals` of one tensor."""
    return _locals([t])[0]


def _locals(ts: Sequence[Tensor]) -> List[Tensor]:
    """The tensors the backends update for ``ts``: a DTensor's own local tensor, what
    to_local() returns under no_grad (step() runs under it), read without that method's Python
    overhead (~2 us, for each of thousands of tensors per call under FSDP2): updating it in
    place updates the DTensor. A local shard that is a wrapper subclass (FSDP2 with torchao's
    float8 all-gather) is taken through its inner tensor (subclasses.py); one without such a
    tensor stays as it is, for the reference backend (the step plan refused it to the kernel
    backends)."""
    dtensor = dtensor_class()
    out = [t._local_tensor if isinstance(t, dtensor) else t for t in ts] if dtensor is not None else list(ts)
    if all(map(is_plain, out)):
        return out
    return list(map(kernel_tensor, out))


def _specs(groups: Sequence[GroupTensors]) -> list:
    """Each param's and grad's DTensor spec object (None for a plain tensor): FSDP2 makes every
    call's grads with its params' spec objects, so comparing these by identity tells an
    unchanged layout in ~0.1 us a tensor (:func:`_layout_key` takes ~10)."""
    dtensor = dtensor_class()
    return [group.params for group in groups] + [  # (the step plan's lists: new ones when it is rebuilt)
        t._spec if isinstance(t, dtensor) else None for group in groups for ts in (group.params, group.grads) for t in ts
    ]


class ShardedTelemetry:
    """Per-optimizer helper: the local view of a call's tensors and the reduction of its partials.

    :meth:`local_groups` returns the groups with every DTensor replaced by its local shard
    (the groups themselves when nothing is a DTensor) and records the call's row layout;
    :meth:`reduce_partials_` turns the local partials into the global ``[T, 3]`` partials.
    The layout (row index, replicate mask, process group) is cached and rebuilt only when the
    tensors' shapes or placements change.
    """

    def __init__(self, pipeline_group=None) -> None:
        self._key: Optional[tuple] = None
        self._specs: list = []  # the specs of the call the key was last checked on (_specs)
        self._layout: Optional[_Layout] = None
        self.active = False  # whether this call's tensors include a DTensor
        self._pipeline_group = pipeline_group  # must not share the mesh's ranks (pipeline.py)

    def local_groups(self, groups: Sequence[GroupTensors], has_dtensor: bool) -> List[GroupTensors]:
        """``has_dtensor``: whether any param or grad of the call is a DTensor (the optimizer's
        step plan knows it without walking the tensors every call)."""
        if self.active != has_dtensor:  # written only on a change: a compiled step traces no write
            self.active = has_dtensor
        if not self.active:
            return list(groups)
        specs = _specs(groups)
        if not (len(specs) == len(self._specs) and all(map(operator.is_, specs, self._specs))):
            key = _layout_key(groups)
            if key != self._key:
                layout = _Layout.build(groups)
                if self._pipeline_group is not None:
                    check_stage_group(self._pipeline_group, layout.ranks)
                self._layout, self._key = layout, key
            self._specs = specs
        grads = [_locals(group.grads) for group in groups]
        if self._layout.partial:
            self._layout.partial.sum_(grads)
        return [
            replace(
                group,
                params=_locals(group.params),
                grads=group_grads,
                exp_avgs=_locals(group.exp_avgs),
                exp_avg_sqs=_locals(group.exp_avg_sqs),
                layout_key=None,  # (the gathered layout was the DTensors', not the shards')
            )
            for group, group_grads in zip(groups, grads)
        ]

    def reduce_partials_(self, partials: Optional[Tensor], *, dtype: torch.dtype, device) -> Tensor:
        """Local partials (rows: the locally non-empty gradients, in order; None when there are
        none) -> the partials of the whole gradients ``[T, 3]``, the same on every rank.

        Summed over the ranks of the DTensors' meshes when the call's tensors include one (one
        ``all_reduce`` in the common case, see :class:`_MeshSum`); otherwise ``partials`` as
        given (DDP, one process: nothing to reduce).
        """
        if not self.active:
            return partials
        layout = self._layout
        return layout.sum_over_ranks(layout.scatter(partials, dtype, torch.device(device)))


def _layout_key(groups: Sequence[GroupTensors]) -> tuple:
    return tuple(
        (g.numel(), _local(g).numel(), getattr(g, "placements", None), getattr(g, "device_mesh", None),
         getattr(p, "placements", None))
        for group in groups
        for p, g in zip(group.params, group.grads)
    )


class _Layout:
    """Rows of the global partials (gradients of global numel > 0, in group order), which of
    them are non-empty here (``index``), which this rank counts (``keep``), and the reductions
    that sum them over the ranks of their meshes (``sums``)."""

    def __init__(self, rows: int, index: Optional[Tensor], keep: Optional[Tensor], sums: List["_MeshSum"],
                 partial: PartialGrads):
        self.rows, self.index, self.keep, self.sums, self.partial = rows, index, keep, sums, partial
        self.ranks = set().union(*(s.ranks for s in sums))  # every rank of every mesh (pipeline.check_stage_group)
        self._cache = {}

    @staticmethod
    def build(groups: Sequence[GroupTensors]) -> "_Layout":
        from torch.distributed.tensor import Partial, Replicate

        meshes = []  # distinct meshes, in order of first appearance
        for gi, group in enumerate(groups):
            for pi, (p, g) in enumerate(zip(group.params, group.grads)):
                if not (is_dtensor(p) or is_dtensor(g)):
                    continue
                where = f"param {pi} of the call's group {gi}"
                if not (is_dtensor(p) and is_dtensor(g)):
                    raise TypeError(f"{where}: param and grad must both be DTensors or both plain tensors")
                if effective_placements(p, g, where) != tuple(p.placements) or g.device_mesh != p.device_mesh:
                    raise ValueError(
                        f"{where}: grad placements {g.placements} on {g.device_mesh} differ from "
                        f"the param's {p.placements} on {p.device_mesh}; the update runs on local "
                        "shards, which must line up"
                    )
                if p.device_mesh not in meshes:
                    if p.device_mesh.get_coordinate() is None:
                        raise ValueError(f"{where}: this rank is not in its mesh {p.device_mesh}")
                    meshes.append(p.device_mesh)

        # Rows go to the reduction of their mesh's ranks; plain tensors (replicated wherever this
        # optimizer runs) to the first mesh's, counted there by its rank at coordinate 0.
        rows, local_rows, keep, row_ranks = 0, [], [], []
        for group_tensors in groups:
            for g in group_tensors.grads:
                if g.numel() == 0:  # global numel: no row anywhere
                    continue
                if _local(g).numel() > 0:
                    local_rows.append(rows)
                mesh = g.device_mesh if is_dtensor(g) else meshes[0]
                # (a Partial grad counts as the param's placements: it is summed first, PartialGrads)
                placements = [Replicate() if isinstance(pl, Partial) else pl for pl in g.placements] if is_dtensor(g) \
                    else [Replicate()] * mesh.ndim
                coordinate = mesh.get_coordinate()
                keep.append(all(
                    coordinate[d] == 0 for d, pl in enumerate(placements) if isinstance(pl, Replicate)
                ))
                row_ranks.append(_ranks_of(mesh))
                rows += 1
        sums = _MeshSum.cover(meshes, row_ranks)
        index = None if len(local_rows) == rows else torch.tensor(local_rows, dtype=torch.long, device="cpu")
        keep_t = None if all(keep) else torch.tensor(keep, dtype=torch.bool, device="cpu").reshape(-1, 1)
        return _Layout(rows, index, keep_t, sums, PartialGrads(groups))

    def _on(self, name: str, t: Tensor, device: torch.device) -> Tensor:
        # Cached per device (stream_use.kept_copy): a host -> device copy every call would cost a
        # launch, and a pageable one waits for the device.
        return kept_copy(self._cache, (name, device), lambda: t, device, "a DTensor layout's row map")

    def scatter(self, partials: Optional[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The local partials in their global rows, zeros elsewhere and in rows this rank does not count."""
        if partials is not None:
            device = partials.device
        if partials is not None and self.index is None:
            full = partials.to(dtype)
        else:
            full = torch.zeros((self.rows, 3), dtype=dtype, device=device)
            if partials is not None and partials.shape[0] > 0:
                full.index_copy_(0, self._on("index", self.index, device), partials.to(dtype))
        if self.keep is not None:
            # where, not a product: a NaN row times 0 would still be NaN
            full = torch.where(self._on("keep", self.keep, device), full, torch.zeros((), dtype=dtype, device=device))
        return full

    def sum_over_ranks(self, full: Tensor) -> Tensor:
        """Every row summed over the ranks of its mesh: the rows of one set of ranks in one
        reduction (the common case: one, in place), those of another set in their own."""
        if len(self.sums) == 1:
            return self.sums[0](full)
        out = full
        for i, mesh_sum in enumerate(self.sums):
            mine = self._on(f"rows{i}", mesh_sum.rows, full.device)
            # each reduction sums the whole tensor (a few KB) and its own rows are taken from it
            out = torch.where(mine, mesh_sum(full.clone()), out)
        return out


def _ranks_of(mesh) -> Tuple[int, ...]:
    return tuple(sorted(mesh.mesh.flatten().tolist()))


class _MeshSum:
    """A sum over one set of ranks (those of one or more meshes spanning exactly them), the
    same bits on every rank:

    * one ``all_reduce`` over a 1-D mesh's group, or over the world when the ranks are all of
      them (FSDP2, HSDP, TP x FSDP, expert meshes beside dense ones in one job);
    * else, for an n-D mesh over some of the ranks (a pipeline stage's (dp, tp) mesh: no
      process group holds exactly its ranks, and none is created here), one ``all_gather``
      per mesh dim, added up in the order of the mesh's coordinates: the ranks of every
      slice add the same numbers in the same order (all_reduces one dim after another, as
      DTensor's own reductions do, could add them in a different order per slice and give
      slices last bits apart, hence decisions apart).

    ``rows``: [T, 1] bool, the rows summed here (used when several sets are).
    """

    def __init__(self, ranks: Tuple[int, ...], meshes: list, rows: Tensor):
        self.ranks, self.rows = set(ranks), rows
        one_d = [m for m in meshes if m.ndim == 1]
        if one_d:
            self.group, self.dims = one_d[0].get_group(), None
        elif len(ranks) == dist.get_world_size():
            self.group, self.dims = dist.group.WORLD, None
        else:
            self.group, self.dims = None, [_gather_order(meshes[0], d) for d in range(meshes[0].ndim)]

    @staticmethod
    def cover(meshes: list, row_ranks: List[Tuple[int, ...]]) -> List["_MeshSum"]:
        """One sum per distinct set of ranks among the meshes, in order of first appearance
        (the same order on every rank, whose meshes and rows are laid out alike)."""
        sets = list(dict.fromkeys(_ranks_of(m) for m in meshes))
        return [
            _MeshSum(s, [m for m in meshes if _ranks_of(m) == s],
                     torch.tensor([r == s for r in row_ranks], dtype=torch.bool, device="cpu").reshape(-1, 1))
            for s in sets
        ]

    def __call__(self, full: Tensor) -> Tensor:
        if self.dims is None:
            dist.all_reduce(full, op=dist.ReduceOp.SUM, group=self.group)
            return full
        for group, order in self.dims:
            n = len(order)
            gathered = full.new_empty((n * full.shape[0], 3))
            all_gather_single(gathered, full, group=group)
            gathered = gathered.view(n, -1, 3)
            if order != list(range(n)):  # (slices, not an index list: that would be a host-to-device copy)
                gathered = torch.stack([gathered[i] for i in order])
            full = gathered.sum(0)
        return full


def _gather_order(mesh, dim: int) -> Tuple[object, List[int]]:
    """Mesh dim ``dim``'s process group here, and the positions of its ranks' contributions in
    its all_gather (group rank order) listed by their coordinate along ``dim``."""
    group = mesh.get_group(dim)
    here = list(mesh.get_coordinate())
    along = mesh.mesh[tuple(slice(None) if d == dim else c for d, c in enumerate(here))].tolist()
    gathered = dist.get_process_group_ranks(group)
    return group, [gathered.index(r) for r in along]


def init_state_(optimizer) -> None:
    """Allocate zero AdamW state (``step``, ``exp_avg``, ``exp_avg_sq``) for every param of a
    GuardedAdamW that requires grad, without a step: DTensor params get DTensor states of the
    same placements.

    Use it on a fresh optimizer before ``dcp.load`` so that ``optimizer.state_dict()`` is a
    template with every tensor in place, and before ``dcp.save`` where some trainable param may
    not have had a gradient yet, so that the checkpoint holds every state the template asks
    for (the zero state it adds is the one the param's first gradient would make)::

        init_state_(opt)
        sd = {"optim": opt.state_dict()}
        dcp.load(sd, checkpoint_id=path)
        opt.load_state_dict(sd["optim"])

    Frozen params (an ``nn.Parameter`` with ``requires_grad=False``) get none, as training
    gives them none (nor does torch.distributed.checkpoint's own state creation): a template
    with their states would ask the checkpoint for keys it does not hold, and ``dcp.load``
    fails on the first one. (Plain tensors get state whatever their ``requires_grad``: code
    that sets their ``.grad`` itself leaves it False.)
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad or not isinstance(p, torch.nn.Parameter):
                optimizer._state_for(p)


def called_by_dcp_state_init(max_depth: int = 40) -> bool:
    """Whether this ``step()`` is torch.distributed.checkpoint.state_dict's state creation
    (``_init_optim_state``): on an optimizer that holds no state, get_/set_optimizer_state_dict
    set every gradient to zeros and every lr to 0 and call ``step()`` so that AdamW's state
    exists to be saved or loaded into. AdamW should take that step, as torch.optim.AdamW does
    (step 1, zero moments), but the guard should not: a zero reading would become the
    analyzer's EMA, and every real call after it a spike (a small MLP's scale fell from 1 to 0.3
    in 5 calls).

    Told by who makes the call, found on the Python stack (host only, no tensor read: the
    optimizer asks only while it holds no state, i.e. on its first call), not by the call's
    numbers: a warm-up that starts at lr 0 looks the same from inside, and reading the
    gradients would be a sync. ``max_depth`` covers the frames between (torch's step wrapper,
    no_grad, torch.compile's resume functions)."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_init_optim_state" and code.co_filename.replace("\\", "/").endswith(
            "distributed/checkpoint/state_dict.py"
        ):
            return True
        frame = frame.f_back
    return False
