"""Argument checks for GuardedAdamW: each names the parameter and runs before anything is changed."""

from __future__ import annotations

import math
from typing import Any, Collection, Dict, Iterable

import torch

from .reference import GuardConfig

SUPPORTED_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GATES = ("exact", "single_pass")
AMSGRAD_REFUSED = "amsgrad=True is not supported: GuardedAdamW keeps AdamW's exp_avg and exp_avg_sq only"


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()  # construction time, not step(): a sync here is harmless
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_group_hyperparameters(group: Dict[str, Any]) -> None:
    """lr, betas, eps, weight_decay, maximize of one param group."""
    lr = _number("lr", group["lr"])
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        beta = _number(f"betas[{i}]", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    eps = _number("eps", group["eps"])
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    weight_decay = _number("weight_decay", group["weight_decay"])
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"maximize must be a bool, got {type(group['maximize']).__name__}")
    if group.get("amsgrad", False):
        raise ValueError(AMSGRAD_REFUSED)


def check_adamw_switches(amsgrad, foreach, capturable, differentiable, fused) -> None:
    """torch.optim.AdamW's implementation switches, taken so that a call written for it works
    unchanged; the two that change what is computed must be off."""
    for name, value in (("amsgrad", amsgrad), ("capturable", capturable), ("differentiable", differentiable)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None or a bool, got {type(value).__name__}")
    if amsgrad:
        raise ValueError(AMSGRAD_REFUSED)
    if differentiable:
        raise ValueError("differentiable=True is not supported: the guarded step updates in place without autograd")


def check_guard_config(cfg: GuardConfig, gate: str) -> None:
    for name in ("auto_enabled", "use_max_rms", "skip_nonfinite"):
        if not isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{name} must be a bool, got {type(getattr(cfg, name)).__name__}")
    for name in ("stress_threshold", "spike_threshold"):
        value = _number(name, getattr(cfg, name))
        if not value > 0 or math.isinf(value):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    min_scale = _number("min_scale", cfg.min_scale)
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    recovery = _number("recovery_fast", cfg.recovery_fast)
    if not 0.0 <= recovery < math.inf:
        raise ValueError(f"recovery_fast must be a finite number >= 0, got {recovery}")
    if isinstance(cfg.stats_freq, bool) or not isinstance(cfg.stats_freq, int):
        raise TypeError(f"stats_freq must be an int, got {type(cfg.stats_freq).__name__}")
    if cfg.stats_freq < 1:
        raise ValueError(f"stats_freq must be >= 1, got {cfg.stats_freq}")
    ema_decay = _number("ema_decay", cfg.ema_decay)
    if not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


def check_params(params: Iterable[torch.Tensor], where: str) -> None:
    """Params must be dense real floating-point tensors, all on one device."""
    devices = set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: params[{i}] must be a Tensor, got {type(p).__name__}")
        if p.is_complex():
            raise TypeError(f"{where}: params[{i}] is complex ({p.dtype}); GuardedAdamW takes real params")
        if p.dtype not in SUPPORTED_PARAM_DTYPES:
            raise TypeError(
                f"{where}: params[{i}] has dtype {p.dtype}; supported: "
                + ", ".join(str(d) for d in SUPPORTED_PARAM_DTYPES)
            )
        if p.is_sparse:
            raise TypeError(f"{where}: params[{i}] is sparse; GuardedAdamW takes dense params")
        devices.add(p.device)
    if len(devices) > 1:
        raise ValueError(
            f"{where}: params are on mixed devices {sorted(str(d) for d in devices)}; "
            "one GuardedAdamW takes one decision per call, so its params share one device"
        )


def check_grad(p: torch.Tensor, group_index: int, param_index: int) -> None:
    g = p.grad
    where = f"param_groups[{group_index}]['params'][{param_index}].grad"
    if g.is_sparse:
        raise TypeError(f"{where} is sparse; GuardedAdamW does not support sparse gradients")
    if g.is_complex():
        raise TypeError(f"{where} is complex; GuardedAdamW does not support complex gradients")
    if g.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(g.shape)}, its param {tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"{where} is on {g.device}, its param on {p.device}")


def parse_int_overrides(variable: str, spec: str, names: Collection[str]) -> Dict[str, int]:
    """The ``name=value`` pairs of a tuning variable's ``spec`` (comma-separated; e.g.
    ``LBW_CUDA_GEOMETRY="threads=256,ilp=4"``) as positive ints; ValueError naming the variable
    for anything else."""
    values = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if name not in names or not value.isdigit() or int(value) <= 0:
            raise ValueError(f"{variable}: {item!r} is not name=positive int with name one of {sorted(names)}")
        values[name] = int(value)
    return values
