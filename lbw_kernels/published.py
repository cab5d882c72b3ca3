"""The published guard procedure, written the way the closed published wheel runs it: a baseline.

The only released code of the Learn-by-Wire Guard (arXiv 2605.19008) is a closed wheel. Its
step, as far as its behaviour and the paper describe it, is:

1. telemetry per tensor with ordinary tensor ops: ``g.pow(2).mean()`` (allocates ``g**2``),
   ``max`` over tensors, and the signed ``sum(g) / numel`` over all of them;
2. two ``.item()`` host syncs (the statistic and the sign) so that
3. the analyzer and controller run in Python floats on the host, then
4. AdamW as a chain of ``torch._foreach_*`` ops (allocating the denominators every call).

This module reproduces that procedure so benchmarks can put it beside the kernels, and so tests
can check that it decides and updates exactly as :class:`lbw_kernels.GuardedAdamW` with
``backend="reference", gate="exact", stats_freq=1`` does: the same guard (DESIGN.md rules 1-5),
computed the slow way. It is not a re-distribution of the wheel's code, which we have not used.

Where the published wheel's behaviour is unknown we chose the simplest reading and say so:
the non-finite check (rule 1) is read off the same synced statistic (a NaN/Inf gradient makes
``max_i mean(g_i^2)`` or the signed mean non-finite), so calls without telemetry
(``stats_freq > 1``) check nothing and sync nothing.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from .reference import GuardConfig


class PublishedGuardAdamW(torch.optim.Optimizer):
    """The published guard procedure (host-side controller, foreach AdamW). fp32/fp64 params.

    Same hyper-parameters and defaults as :class:`lbw_kernels.GuardedAdamW`; one param group
    semantics per group (lr, betas, eps, weight_decay), one guard for the optimizer.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        auto_enabled: bool = True,
        stress_threshold: float = 1.1,
        spike_threshold: float = 1.5,
        min_scale: float = 0.1,
        recovery_fast: float = 0.01,
        use_max_rms: bool = True,
        stats_freq: int = 10,
        ema_decay: float = 0.85,
    ):
        if stats_freq < 1:
            raise ValueError(f"stats_freq must be >= 1, got {stats_freq}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.cfg = GuardConfig(
            auto_enabled=auto_enabled, stress_threshold=stress_threshold,
            spike_threshold=spike_threshold, min_scale=min_scale, recovery_fast=recovery_fast,
            use_max_rms=use_max_rms, stats_freq=stats_freq, ema_decay=ema_decay,
        )
        # Host-side guard state, in Python floats as the published procedure keeps it.
        self.scale = 1.0
        self.ema: Optional[float] = None
        self.prev_sign: Optional[float] = None
        self.regime: Optional[str] = None
        self.skipped_steps = 0
        self.calls = 0

    # -------------------------------------------------------------- sensor + controller
    def _sensor(self, grads: List[Tensor]) -> tuple:
        """``(x, sign)`` as Python floats: the two host syncs of every telemetry call."""
        ms = [g.pow(2).mean() for g in grads]  # allocates g**2 per tensor
        stacked = torch.stack(ms)
        x_t = stacked.max() if self.cfg.use_max_rms else stacked.mean()
        total = sum(g.numel() for g in grads)
        sign_t = torch.stack([g.sum() for g in grads]).sum() / total
        return x_t.item(), sign_t.item()

    def _decide(self, x: float, sign: float) -> bool:
        """Rules 1-4 in Python floats; returns True when the call is skipped."""
        cfg = self.cfg
        if not (math.isfinite(x) and math.isfinite(sign)):
            self.skipped_steps += 1
            self.regime = "nonfinite"
            self.scale = max(cfg.min_scale, 0.7 * self.scale)
            return True
        self.ema = x if self.ema is None else cfg.ema_decay * self.ema + (1 - cfg.ema_decay) * x
        ratio = x / (self.ema + 1e-12)
        flip = self.prev_sign is not None and self.prev_sign * sign < 0
        self.prev_sign = sign
        if ratio > cfg.spike_threshold:
            self.regime, self.scale = "spike", max(cfg.min_scale, 0.7 * self.scale)
        elif ratio > cfg.stress_threshold or flip:
            self.regime, self.scale = "oscillation", max(cfg.min_scale, 0.85 * self.scale)
        else:
            self.regime, self.scale = "calm", min(1.0, self.scale + cfg.recovery_fast)
        return False

    # -------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.calls += 1
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params if p.numel() > 0]
        if self.cfg.is_telemetry_call(self.calls) and grads:
            if self._decide(*self._sensor(grads)):
                return loss
        for group in self.param_groups:
            self._adamw_group(group)
        return loss

    def _adamw_group(self, group) -> None:
        """AdamW as torch.optim.AdamW's foreach path computes it, with lr * scale."""
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        gs = [p.grad for p in ps]
        for p in ps:
            if not self.state[p]:
                self.state[p] = {
                    "step": 0,
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        states = [self.state[p] for p in ps]
        ms = [s["exp_avg"] for s in states]
        vs = [s["exp_avg_sq"] for s in states]
        beta1, beta2 = group["betas"]
        lr = group["lr"] * self.scale
        for s in states:
            s["step"] += 1
        bc1 = [1 - beta1 ** s["step"] for s in states]
        bc2_sqrt = [math.sqrt(1 - beta2 ** s["step"]) for s in states]
        torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
        denom = torch._foreach_sqrt(vs)  # allocated every call
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(ps, ms, denom, [-lr / b for b in bc1])

    def telemetry(self) -> dict:
        return {"step": self.calls, "scale": self.scale, "regime": self.regime,
                "skipped_steps": self.skipped_steps}
