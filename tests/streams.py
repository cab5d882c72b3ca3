"""Scripted gradient streams shared by the optimizer tests.

A stream is a list of per-call gradient lists. Gradients of the form ``a * ones`` make the
telemetry easy to derive by hand: mean square ``a**2``, signed mean ``a``.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from lbw_kernels import GuardedAdamW


def constant_grads(amplitudes: Sequence[float], numel: int = 4, dtype=torch.float64) -> List[List[torch.Tensor]]:
    return [[torch.full((numel,), float(a), dtype=dtype)] for a in amplitudes]


def random_stream(calls: int, shapes, seed: int = 0, dtype=torch.float64, spikes=(), flips=(), nan_at=()):
    """Random non-zero gradients; on calls in ``spikes`` they are 30x larger, on ``flips`` their
    sign is forced negative (mean shifted), on ``nan_at`` one element is NaN. Calls count from 1."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for k in range(1, calls + 1):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) + 0.5 for s in shapes]
        if k in spikes:
            grads = [g * 30 for g in grads]
        if k in flips:
            grads = [g - 1.5 for g in grads]
        if k in nan_at:
            grads[0].view(-1)[0] = float("nan")
        stream.append([g.to(dtype) for g in grads])
    return stream


def run(opt: GuardedAdamW, params: Sequence[torch.Tensor], stream, record=("scale", "regime")):
    """Feed the stream to ``opt``; return per call the telemetry fields in ``record``."""
    out = []
    for grads in stream:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        t = opt.telemetry()
        out.append(tuple(t[k] for k in record) if len(record) > 1 else t[record[0]])
    return out
