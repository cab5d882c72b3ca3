"""The controller kernel of the C++ extension (``torch.ops.lbw.guard_decide_``,
csrc/guard_controller.h): rules 1-4 for one call in one launch, bitwise the reference's
:func:`~lbw_kernels.reference.guard_decide` on float64 state.

Why: the reference runs the controller as ~60 tiny torch ops per call. On a GPU each is a
kernel launch, and with thousands of parameter tensors they were most of a step's host time
(H200, 2000 x 65,536: ~2.2 ms per step, bench/results/nvidia-h200-profile-host-*.txt). The
kernel backends (``cpp``, ``cuda``, ``triton``: ``Backend.fused_controller``) call
:func:`fused_guard_decide_`; the reference backend keeps the tensor ops (it is what the
kernel is tested against).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import reference


def _config_of(cfg: reference.GuardConfig) -> Optional[Tuple[float, ...]]:
    """The numbers the kernel reads (csrc/guard_controller.h's ``Config`` order), or None for a
    policy it does not implement (a user's policy: that one runs as the reference's ops)."""
    from .policies import ZScorePolicy

    policy = cfg.policy
    if type(policy) is reference.LBWPolicy:
        code, own = 0.0, (0.0,) * 8
    elif type(policy) is ZScorePolicy:
        code = 1.0
        own = (policy.ema_decay, policy.z_threshold, policy.sd_floor, policy.window, policy.cut_per_z,
               policy.max_cut, policy.growth, policy.stay_alert)
    else:
        return None
    shared = (cfg.auto_enabled, cfg.stress_threshold, cfg.spike_threshold, cfg.min_scale, cfg.recovery_fast,
              cfg.ema_decay, code)
    return tuple(float(v) for v in shared + own)


# Cached per config (a frozen dataclass) for eager calls; torch.compile traces _config_of itself
# (dynamo warns that it ignores lru_cache wrappers).
controller_config = functools.lru_cache(maxsize=32)(_config_of)

_KERNEL_DEVICES: Optional[frozenset] = None


def _kernel_devices() -> frozenset:
    """Device types the built extension has the kernel for (none when it is not built)."""
    global _KERNEL_DEVICES
    if _KERNEL_DEVICES is None:
        try:
            from . import _C, cpp_backend  # noqa: F401  (cpp_backend registers the op's fake impl)
        except ImportError:
            _KERNEL_DEVICES = frozenset()
        else:
            _KERNEL_DEVICES = frozenset({"cpu", "cuda"} if getattr(_C, "WITH_CUDA", 0) else {"cpu"})
    return _KERNEL_DEVICES


def fused_guard_decide_(
    guard: Tensor, summary: Optional[Tensor], *, analyze: Union[bool, Tensor], check_finite: bool,
    cfg: reference.GuardConfig,
) -> bool:
    """Rules 1-4 in place on ``guard`` with the kernel, when it applies (extension built for the
    guard's device, float64 state, a policy it implements); False, untouched, otherwise."""
    config = (_config_of if torch.compiler.is_compiling() else controller_config)(cfg)
    if config is None or guard.dtype != torch.float64 or guard.device.type not in _kernel_devices():
        return False
    on_device = analyze if isinstance(analyze, Tensor) else None
    torch.ops.lbw.guard_decide_(guard, summary, on_device, on_device is None and bool(analyze), check_finite, config)
    return True
