"""Launching the backend's kernels without the JIT's per-call work (``LBW_TRITON_DIRECT_LAUNCH=1``).

``kernel[grid](*args, **constexprs)`` binds every argument by name, works out what each one
specialises (a tensor's dtype and 16-byte alignment; an integer's width, whether it is 1 and
whether it is a multiple of 16), builds a cache key from that and the compile options, and
looks the compiled kernel up before launching it: host time that, with a step's 2-3 launches
of kernels of ~15-20 arguments, counts where thousands of small tensors make a step
host-bound. A :class:`Launcher` keeps the compiled kernels the JIT returned at its site, keyed
by the same facts of the arguments the site passes, and launches a known one directly
(``CompiledKernel[grid](*args)``, what the JIT does last, in Triton 3.6 as in 3.9). What it
cannot key (an argument of another type), a first launch, and the interpreter go through the
JIT.

The key covers what the JIT specialises on for these arguments, not the JIT's own knobs: a
kernel compiled before ``TRITON_DEBUG`` or an instrumentation mode is switched on keeps being
launched at this site. bench/launch_overhead.py times both routes. Off by default: on an H200
(2026-11-27, bench/results/nvidia-h200-launch-overhead-20261127.jsonl) a launch through it took
16.1 us of host time against 18.7 us through the JIT and 7.9 us for the compiled kernel's own
launcher (the key built here costs the difference), and the 2000 x 65,536 step was no faster.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .config import environ_get, interpreting


def direct_launch_enabled() -> bool:
    return environ_get("LBW_TRITON_DIRECT_LAUNCH") == "1" and not interpreting()


class _Unkeyed(Exception):
    """An argument whose specialisation the key does not know: the JIT launches that call."""


def specialization(arg: Any) -> Any:
    """What the JIT's compiled kernel depends on for one runtime argument."""
    if isinstance(arg, Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if arg is None:
        return None
    if isinstance(arg, bool):
        return "u1", arg
    if isinstance(arg, int):  # width, == 1 (a constant to Triton), multiple of 16
        return "int", arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31, arg >= 2**63
    if isinstance(arg, float):
        return "fp"
    raise _Unkeyed(type(arg).__name__)


def _current_device() -> int:
    return torch.cuda.current_device()


class Launcher:
    """One launch site of a ``@triton.jit`` kernel: ``site(grid, args, constexprs, options)``
    launches ``kernel[grid](*args, **constexprs, **options)``, directly once the JIT has
    compiled that specialisation here. ``args`` are the runtime arguments in signature order;
    ``constexprs`` must name every parameter after them."""

    def __init__(self, kernel: Any, device_index: Callable[[], int] = _current_device):
        self.kernel = kernel
        self.device_index = device_index
        # key -> (compiled kernel, the constexpr values in signature order)
        self.compiled: Dict[Tuple, Tuple[Any, Tuple]] = {}

    def __call__(self, grid: Tuple[int, ...], args: Sequence[Any], constexprs: Dict[str, Any],
                 options: Dict[str, Any]) -> None:
        if not direct_launch_enabled():
            self.kernel[grid](*args, **constexprs, **options)
            return
        try:
            key = (self.device_index(), tuple(map(specialization, args)), tuple(constexprs.items()),
                   tuple(options.items()))
        except _Unkeyed:
            self.kernel[grid](*args, **constexprs, **options)
            return
        known = self.compiled.get(key)
        if known is not None:
            compiled, tail = known
            # (A compiled kernel reads grid[0], grid[1] and grid[2]; only the JIT pads a shorter grid.)
            compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)
            return
        compiled = self.kernel[grid](*args, **constexprs, **options)
        tail = self._constexpr_tail(len(args), constexprs)
        # Kept: a compiled kernel, not None (the interpreter) nor a future (asynchronous compiling).
        if compiled is not None and not hasattr(compiled, "result") and tail is not None:
            self.compiled[key] = (compiled, tail)

    def _constexpr_tail(self, n_args: int, constexprs: Dict[str, Any]) -> Optional[Tuple]:
        """The values of the parameters after the runtime ones, in signature order (a compiled
        kernel takes every parameter, constexprs included); None unless ``constexprs`` names
        exactly those."""
        rest = list(self.kernel.arg_names[n_args:])
        if sorted(rest) != sorted(constexprs):
            return None
        return tuple(constexprs[name] for name in rest)
