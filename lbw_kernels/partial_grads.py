"""Gradients left ``Partial`` by tensor parallelism: summed over their mesh dims before a call reads them.

Under tensor parallelism without FSDP2 (FSDP2 reduces them itself), a param that is
``Replicate`` on the TP dim but computed from sharded activations gets a gradient that is
``Partial(sum)`` there: each rank holds a part, the gradient is their sum (torchtitan's TP plan
gives its norm weights such gradients: ``SequenceParallel``). torch.optim's AdamW takes them
because DTensor sums them inside each op that needs the whole value (an all_reduce per tensor
and op). Here they are summed once per call, every such gradient of one (mesh, dims, dtype)
in one ``all_reduce`` per Partial dim over a flat buffer, and the call's telemetry and update
read the sums: the gradient of the param's own placements. ``.grad`` is not written (its
placements would still say Partial).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def effective_placements(p: Tensor, g: Tensor, where: str) -> tuple:
    """``g``'s placements once its Partial dims are summed: the param's. Raises naming ``where``
    for a Partial other than a sum, or on a dim where the param is not Replicate."""
    from torch.distributed.tensor import Partial, Replicate

    out = []
    for d, (pg, pp) in enumerate(zip(g.placements, p.placements)):
        if isinstance(pg, Partial):
            if getattr(pg, "reduce_op", "sum") != "sum" or not isinstance(pp, Replicate):
                raise ValueError(
                    f"{where}: its grad is {pg!r} on mesh dim {d}, where the param is {pp!r}; GuardedAdamW sums "
                    "Partial(sum) gradients of params that are Replicate there (tensor parallelism), no other: "
                    "reduce it first (e.g. grad.redistribute(placements=param.placements))"
                )
            out.append(pp)
        else:
            out.append(pg)
    return tuple(out)


class PartialGrads:
    """Which of a call's gradients are Partial (by group and position) and over which mesh dims,
    bucketed by (mesh, dims, dtype, device): built with the call's layout (distributed.py)."""

    def __init__(self, groups: Sequence) -> None:
        from torch.distributed.tensor import Partial

        self.buckets: Dict[tuple, List[Tuple[int, int]]] = {}
        for gi, group in enumerate(groups):
            for ti, g in enumerate(group.grads):
                placements = getattr(g, "placements", ())
                dims = tuple(d for d, pl in enumerate(placements) if isinstance(pl, Partial))
                if dims:
                    self.buckets.setdefault((g.device_mesh, dims, g.dtype, g.device), []).append((gi, ti))

    def __bool__(self) -> bool:
        return bool(self.buckets)

    def sum_(self, local_grads: List[List[Tensor]]) -> None:
        """Replace each Partial gradient's local tensor in ``local_grads`` (per group, in order)
        with its sum over the Partial dims: one flat buffer and one all_reduce per dim and bucket."""
        for (mesh, dims, _, _), positions in self.buckets.items():
            parts = [local_grads[gi][ti] for gi, ti in positions]
            flat = torch.cat([t.reshape(-1) for t in parts])
            for d in dims:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
            offset = 0
            for (gi, ti), t in zip(positions, parts):
                local_grads[gi][ti] = flat[offset:offset + t.numel()].view(t.shape)
                offset += t.numel()
