"""``TritonBackend``: the guard's passes over memory as Triton kernels (``backend="triton"``).

Per ``step()``, for all groups together (one launch per param dtype, not per tensor):

* exact gate: telemetry (chunk partials, each tensor's row finished by its last chunk's
  program: 1 launch), then the coefficient launch and the update launch (32 B per fp32
  parameter over both passes);
* single_pass: the coefficient launch, then the update launch that also writes the
  telemetry rows (28 B per fp32 parameter).

An eager exact call (``exact_step_``) launches its telemetry pass first, from a layout keyed by
the params' and grads' layouts the optimizer gathered, and reads the AdamW states' layouts
for the update plan's key while the device runs it (ops.exact_step_impl).
Plans (device-side chunk tables) are cached by storage and rebuilt only when it changes; no
launcher syncs with the host, allocates per parameter, or branches on device values, so a
step can be captured in a CUDA graph (after one warm-up call has built the plans).
fp64 params, params whose grad or AdamW states hold their elements in another order than
the param (other strides), whose grad is not dense or of a dtype the kernel does not pair with
the param's (it takes the param's, and fp32 for bf16/fp16 params), are updated by the reference
(``lbw_kernels.reference.adamw_``), their telemetry still read by the kernel (a grad that is
not dense through a buffer of the plan's: chunk_table.stage_). Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from lbw_kernels.backends import Backend

try:
    import triton
except ImportError as err:  # the registry reports this as the reason the backend is unavailable
    raise ImportError(f"triton is not installed ({err}); pip install 'lbw-kernels[triton]'") from err

# The oldest Triton the kernels are tested with (3.6.0: CI's .ci/triton_oldest.sh, and the GPU
# tests on an H200); setup.py's extras ask for the same. 3.1 fails on the kernels (its
# interpreter takes no constexpr block sizes, its ASTSource no constexprs); 3.5.1 passed the CPU
# checks but has never run them on a GPU. The CUDA wheels of torch < 2.10 pin such a release
# (torch 2.9.1: triton 3.5.1; 2.5: 3.1).
OLDEST_TRITON = (3, 6)


def check_triton_release(version: str) -> None:
    """ImportError (the registry's reason the backend is unavailable) for a release older than
    OLDEST_TRITON; development builds ("3.7.0+git...") count as their release."""
    parts = version.split(".")
    try:
        release = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return  # not a release number: let the kernels decide
    if release < OLDEST_TRITON:
        oldest = ".".join(map(str, OLDEST_TRITON))
        raise ImportError(f"triton {version} is older than {oldest}, the oldest release these kernels are tested with "
                          f"(the CUDA wheels of torch < 2.10 pin such a release); pip install 'triton>={oldest}'")


check_triton_release(triton.__version__)

from . import ops
from .config import interpreting


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class TritonBackend(Backend):
    name = "triton"
    priority = 20

    def supports(self, device: torch.device) -> bool:
        # Under the interpreter, CPU tensors only: it copies a launch's tensor arguments to the
        # host, and the chunk tables' addresses of CUDA tensors would be read as host memory.
        device = torch.device(device)
        if device.type == "cuda":
            return not interpreting()
        return device.type == "cpu" and interpreting()

    def device_hint(self, device: torch.device) -> str:
        if torch.device(device).type == "cpu":
            return ("Triton runs CPU tensors only through its interpreter, TRITON_INTERPRET=1 in the "
                    "environment from the start (Triton reads it when the kernels are defined)")
        if torch.device(device).type == "cuda" and interpreting():
            return "TRITON_INTERPRET=1 is set: Triton's interpreter takes CPU tensors only; unset it for CUDA tensors"
        return ""

    def auto_selectable(self, device: torch.device) -> bool:
        # The interpreter only emulates a GPU (and slowly): CPU runs it when asked by name.
        return torch.device(device).type == "cuda" and not interpreting()

    def telemetry(self, grads, partials_dtype):
        if _compiling():
            return torch.ops.lbw_triton.telemetry(list(grads), partials_dtype)
        return ops.telemetry_impl(grads, partials_dtype)

    def adamw_(self, groups, *, scale, skip, grad_factor=None):
        if _compiling():
            return torch.ops.lbw_triton.adamw_(**ops.flatten(groups), scale=scale, skip=skip, grad_factor=grad_factor)
        ops.adamw_impl(groups, scale, skip, grad_factor)

    def gathered_telemetry(self, grads, layouts, partials_dtype):
        return ops.gathered_telemetry_impl(grads, layouts, partials_dtype)

    exact_step_takes_partials = True

    def exact_step_(self, groups, grads, *, decide, scale, skip, partials_dtype, partials=None):
        if _compiling() or not groups:  # compiled: the custom ops, one per pass (the caller runs them)
            return False
        ops.exact_step_impl(groups, grads, decide, scale, skip, partials_dtype, partials)
        return True

    def adamw_telemetry_(self, groups, *, scale, mask_nonfinite, partials_dtype):
        if _compiling():
            return torch.ops.lbw_triton.adamw_telemetry_(
                **ops.flatten(groups), scale=scale, mask_nonfinite=mask_nonfinite, partials_dtype=partials_dtype
            )
        return ops.adamw_telemetry_impl(groups, scale, mask_nonfinite, partials_dtype)
