"""Test helpers for torch APIs that moved or grew between torch 2.5 and today's releases."""

from __future__ import annotations

import inspect

import pytest
import torch

TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])

# torch >= 2.10 lets a tensor hold a grad of another dtype (p.grad_dtype = torch.float32).
needs_grad_dtype = pytest.mark.skipif(not hasattr(torch.empty(0), "grad_dtype"),
                                      reason="this torch has no grad_dtype (torch < 2.10)")

# torch 2.5's FSDP2 (torch.distributed._composable.fsdp, not yet public as
# torch.distributed.fsdp.fully_shard) raises "FSDP requires CUDA for streams" on CPU.
needs_fsdp2_on_cpu = pytest.mark.skipif(
    TORCH_VERSION < (2, 6) and not torch.cuda.is_available(),
    reason="FSDP2 on CPU needs torch >= 2.6 (torch 2.5's needs CUDA streams)",
)


def distribute_same(t, mesh, placements):
    """``t`` (the same on every rank) as a DTensor. torch >= 2.7: each rank cuts its own shard
    (``src_data_rank=None``, no communication); before, distribute_tensor has no src_data_rank
    and scatters rank 0's copy, which holds the same values."""
    from torch.distributed.tensor import distribute_tensor

    if "src_data_rank" in inspect.signature(distribute_tensor).parameters:
        return distribute_tensor(t.clone(), mesh, placements, src_data_rank=None)
    return distribute_tensor(t.clone(), mesh, placements)
