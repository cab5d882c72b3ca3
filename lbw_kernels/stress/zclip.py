"""A ZClip-style adaptive gradient clipping baseline for the stress runs (arm ``adamw+zclip``).

ZClip (Kumar et al., 2025) clips the global gradient norm against its own recent history
instead of a fixed threshold: an EMA mean and variance of the norm, a z-score, and when the
z-score exceeds a threshold the gradients are scaled down towards the mean (the further out,
the harder: the target is ``mean + z_thresh^2 / z * sd``, the "reciprocal" rule). The statistics
are updated with the clipped norm, so one spike does not raise the bar for the next, and the
first ``warmup`` steps only collect norms. Written here from that description as a baseline;
not the authors' code. It syncs once per step (``.item()``), which a baseline may.
"""

from __future__ import annotations

import math
from typing import Iterable, List

import torch


class ZClip:
    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, eps: float = 1e-6):
        self.alpha, self.z_thresh, self.warmup, self.eps = alpha, z_thresh, warmup, eps
        self.history: List[float] = []  # norms seen during warm-up
        self.mean = self.var = None

    @torch.no_grad()
    def clip_(self, params: Iterable[torch.Tensor]) -> float:
        """Clip the gradients of ``params`` in place when their norm is an outlier; return the
        norm the optimizer will see."""
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if not math.isfinite(norm):
            return norm  # leave non-finite gradients to the optimizer (or the loss scaler)
        if self.mean is None:
            self.history.append(norm)
            if len(self.history) >= self.warmup:
                self.mean = sum(self.history) / len(self.history)
                self.var = sum((x - self.mean) ** 2 for x in self.history) / len(self.history)
            return norm
        sd = math.sqrt(self.var)
        z = (norm - self.mean) / (sd + self.eps)
        seen = norm
        if z > self.z_thresh:
            seen = self.mean + self.z_thresh**2 / z * sd
            torch._foreach_mul_(grads, seen / norm)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * seen
        self.var = self.alpha * self.var + (1 - self.alpha) * (seen - self.mean) ** 2
        return seen
