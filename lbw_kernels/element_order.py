"""Which tensors a multi-tensor kernel can walk as flat arrays.

The kernels (C++, CUDA, Triton) address a tensor by its first element's address and its element
count, and walk ``numel()`` consecutive slots from there. That is right for any tensor whose
elements fill exactly that many consecutive slots: a contiguous tensor, or a permutation of
one (channels_last, a transpose). The update walks p, grad, exp_avg and exp_avg_sq side by
side, so there the four must also hold element i in the same slot: the same order.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor


def element_order(t: Tensor) -> Optional[Tuple[int, ...]]:
    """The strides of ``t``'s dims of size > 1 when its elements fill ``numel()`` consecutive
    slots, else None (an expanded or gapped tensor: not dense). Two such tensors of one shape
    with equal orders hold element i of one where the other holds it. (Size-1 dims' strides
    say nothing about the order: a (1, n) grad with strides (1, 1) is as contiguous as its
    param.)"""
    dims = sorted(((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1), reverse=True)
    expected = 1
    for st, sz in reversed(dims):
        if st != expected:
            return None
        expected *= sz
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz > 1)
