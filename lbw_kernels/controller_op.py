"""The controller kernels of the C++ extension (csrc/guard_controller.h, csrc/guard_summary.h):
rules 1-4 for one call in one launch, from the call's telemetry rows
(``torch.ops.lbw.summarize_decide_``: :func:`fused_decide_`) or from a summary
(``torch.ops.lbw.guard_decide_``: bitwise the reference's
:func:`~lbw_kernels.reference.guard_decide` on float64 state; what the kernel's decision is
tested against).

Why: the reference runs the controller as ~60 tiny torch ops per call and
:func:`~lbw_kernels.reference.summarize` as ~8 more. On a GPU each is a kernel launch, and
with thousands of parameter tensors they were most of a step's host time (H200, 2000 x 65,536:
~2.2 ms per step, bench/results/nvidia-h200-profile-host-*.txt). The kernel backends (``cpp``,
``cuda``, ``triton``: ``Backend.fused_controller``) call :func:`fused_decide_`; the reference
backend keeps the tensor ops (it is what the kernels are tested against).
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
    devices = _KERNEL_DEVICES
    if devices is None:
        try:
            from . import _C, cpp_backend  # noqa: F401  (cpp_backend registers the op's fake impl)
        except ImportError:
            devices = frozenset()
        else:
            devices = frozenset({"cpu", "cuda"} if getattr(_C, "WITH_CUDA", 0) else {"cpu"})
        # cached by eager calls only: the dynamo of torch 2.5 and 2.6 writes the global of a
        # function it inlines into the compiled frame's module, and reads this module's (None)
        if not torch.compiler.is_compiling():
            _KERNEL_DEVICES = devices
    return devices


def _kernel_config(guard: Tensor, cfg: reference.GuardConfig, *rows: Optional[Tensor]) -> Optional[Tuple[float, ...]]:
    """The kernel's config when a controller kernel applies to ``guard`` and the call's float
    tensors ``rows`` (extension built for its device, float64 throughout, a policy it
    implements), else None."""
    config = (_config_of if torch.compiler.is_compiling() else controller_config)(cfg)
    if config is None or guard.dtype != torch.float64 or guard.device.type not in _kernel_devices():
        return None
    if any(t is not None and t.dtype != torch.float64 for t in rows):
        return None
    return config


def fused_decide_(
    guard: Tensor, partials: Optional[Tensor], numels: Optional[Tensor], *, analyze: Union[bool, Tensor],
    check_finite: bool, cfg: reference.GuardConfig,
) -> bool:
    """Rules 1-4 in place on ``guard`` from the call's telemetry rows (``partials`` [T, 3] and
    ``numels`` [T]; None when neither telemetry nor the finite check is due) with one kernel,
    ``torch.ops.lbw.summarize_decide_``, when it applies (extension built for the guard's
    device, float64 state and rows, a policy it implements); False, untouched, otherwise.

    The kernel reads the rows as :func:`reference.summarize` does but adds them over tensors
    in its own fixed order (csrc/guard_summary.h): x under ``use_max_rms`` and the nonfinite
    count are the reference's bits, the signed mean and the norm may differ in the last bits.
    Given the same summary, the decision is bitwise the reference's."""
    config = _kernel_config(guard, cfg, partials, numels if partials is not None else None)
    if config is None:
        return False
    on_device = analyze if isinstance(analyze, Tensor) else None
    torch.ops.lbw.summarize_decide_(
        guard, None if partials is None else partials.contiguous(), numels, cfg.use_max_rms, on_device,
        on_device is None and bool(analyze), check_finite, config,
    )
    return True


def summary_decide_(
    guard: Tensor, summary: Optional[Tensor], *, analyze: Union[bool, Tensor], check_finite: bool,
    cfg: reference.GuardConfig, use_kernel: bool,
) -> None:
    """Rules 1-4 in place on ``guard`` from a call's summary (:func:`reference.summarize`'s
    ``[x, signed_mean, grad_norm, nonfinite]``; None when nothing is due), as pipeline stages
    have it (pipeline.py): ``torch.ops.lbw.guard_decide_`` (bitwise the reference's decision)
    when ``use_kernel`` and it applies as for :func:`fused_decide_`, else the reference's ops."""
    config = _kernel_config(guard, cfg, summary) if use_kernel else None
    if config is None:
        guard.copy_(reference.guard_decide(guard, summary, analyze=analyze, check_finite=check_finite, cfg=cfg))
        return
    on_device = analyze if isinstance(analyze, Tensor) else None
    torch.ops.lbw.guard_decide_(guard, summary, on_device, on_device is None and bool(analyze), check_finite, config)
