"""The C++/CUDA backend: ``backend="cpp"`` (CPU) and ``backend="cuda"`` (NVIDIA GPUs).

Both call the ops of the compiled extension ``lbw_kernels._C`` (``torch.ops.lbw.*``, schemas
in ``csrc/bindings/ops.cpp``): one multi-tensor kernel pass per (param group, param dtype),
the per-element math of ``csrc/guard_math.h`` (shared by the CPU and CUDA kernels), telemetry
accumulated in float64 with a fixed partition into chunks, so it is bitwise repeatable for any
number of threads.

fp64 params run through the same kernels in float64. The kernels walk each tensor as a flat
array, so they take any dense layout (contiguous, channels_last, a transpose: element_order.py),
summing a grad in its memory order. An update part (one group's params of one dtype) where a
param's grad or states hold their elements in another order than the param, or a tensor is not
dense (expanded, gapped), goes to the reference implementation, which computes the same thing;
the telemetry of such a grad is still the kernels' (float64, any number of threads), read
through a contiguous copy of it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference
from .backends import Backend, GroupTensors, split_by_dtype
from .element_order import element_order
from .stream_use import KeptCopy, kept_copy
from .validation import check_update_states, parse_int_overrides

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.lbw.*)
except ImportError as err:  # pragma: no cover - depends on the install
    raise ImportError(
        "lbw_kernels._C (the C++/CUDA extension) is not built: install with "
        "`pip install --no-build-isolation -e .` and a C++ compiler (LBW_SKIP_BUILD unset); "
        f"import failed with: {err}"
    ) from err

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, for torch.compile and FakeTensor tracing.
# ---------------------------------------------------------------------------------------
def _rows(tensors: Sequence[Tensor]) -> int:
    return sum(1 for t in tensors if t.numel() > 0)


@torch.library.register_fake("lbw::telemetry")
def _telemetry_fake(grads):
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((_rows(grads), 3), dtype=torch.float64, device=device)


@torch.library.register_fake("lbw::guard_decide_")
def _guard_decide_fake(guard, summary, analyze, analyze_host, check_finite, config):
    return None


@torch.library.register_fake("lbw::summarize_decide_")
def _summarize_decide_fake(guard, partials, numels, use_max_rms, analyze, analyze_host, check_finite, config):
    due = analyze is not None or analyze_host or check_finite
    return guard.new_empty((4 if due else 0,))


@torch.library.register_fake("lbw::adamw_")
def _adamw_fake(params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr, beta1, beta2, eps,
                weight_decay, maximize, skip, grad_factor=None):
    return None


@torch.library.register_fake("lbw::adamw_telemetry_")
def _adamw_telemetry_fake(params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr, beta1, beta2,
                          eps, weight_decay, maximize, mask_nonfinite):
    return torch.empty((_rows(grads), 3), dtype=torch.float64, device=lr_scale.device)


@contextlib.contextmanager
def poisoned_outputs(on: bool = True):
    """Test mode: outputs and workspaces the ops allocate start as NaN, so a row that no kernel
    writes shows up (the flash-linear-attention habit of poisoning fresh allocations)."""
    old = _C._set_poison_outputs(on)
    try:
        yield
    finally:
        _C._set_poison_outputs(old)


CUDA_GEOMETRY_FIELDS = ("threads", "ilp", "chunk", "warp_partials")


def set_cuda_geometry(**fields: int) -> tuple:
    """Replace fields of the CUDA kernels' launch geometry (csrc/cuda/geometry.h: ``threads``,
    ``ilp``, ``chunk``, ``warp_partials``; fields not given keep their value) and return the previous one;
    ValueError, nothing changed, for a geometry that has no kernels."""
    unknown = set(fields) - set(CUDA_GEOMETRY_FIELDS)
    if unknown:
        raise TypeError(f"the CUDA geometry's fields are {CUDA_GEOMETRY_FIELDS}, got {sorted(unknown)}")
    merged = {**dict(zip(CUDA_GEOMETRY_FIELDS, _C._cuda_geometry())), **fields}
    return _C._cuda_geometry(*(merged[k] for k in CUDA_GEOMETRY_FIELDS))


@contextlib.contextmanager
def cuda_geometry(**fields: int):
    """Run the CUDA kernels with another launch geometry (:func:`set_cuda_geometry`), for
    tests and tuning."""
    old = set_cuda_geometry(**fields)
    try:
        yield
    finally:
        _C._cuda_geometry(*old)


def _apply_cuda_geometry_override() -> None:
    """``LBW_CUDA_GEOMETRY="threads=256,ilp=4,chunk=32768"``: fields of the default geometry
    replaced for this process, for tuning runs (bench/device_check.sh times a few)."""
    spec = os.environ.get("LBW_CUDA_GEOMETRY")
    if not spec:
        return
    try:
        set_cuda_geometry(**parse_int_overrides("LBW_CUDA_GEOMETRY", spec, CUDA_GEOMETRY_FIELDS))
    except ValueError as err:
        raise ValueError(f"LBW_CUDA_GEOMETRY={spec!r}: {err}") from None


# The three passes, each returning what the kernels did, or False/None when they do not take
# the tensors (then nothing was done, and the backend runs the reference). Eagerly the op's
# direct entry in _C (csrc/bindings/python_module.cpp) checks that in the pass that unpacks
# the lists: the same kernels without torch.ops' per-tensor argument parsing (~0.9 ms per call
# for 5 lists of 2000 tensors) and without a separate readiness pass (~70 us per step there,
# on the 2-core VM). While torch.compile traces, torch.ops.lbw (the graph must see the ops and
# their declared mutations), after the same check in Python.
def _kernel_ready(uniform: bool, *lists: Sequence[Tensor]) -> bool:
    """Whether the kernels take every tensor of these lists (dense in some order, kernel dtype;
    with ``uniform``, one dtype per list): the entries' check, for the traced path."""
    return all(
        t.layout == torch.strided and element_order(t) is not None and t.dtype in _KERNEL_DTYPES
        and (not uniform or t.dtype == ts[0].dtype)
        for ts in lists for t in ts
    )


# (param dtype, grad dtype) pairs the update kernels take besides equal ones: fp32 grads of
# bf16/fp16 params (torch >= 2.10's grad_dtype; common.h's update_dtypes_supported).
_MIXED_UPDATE_DTYPES = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def _update_ready(params, grads, exp_avgs, exp_avg_sqs, *_) -> bool:
    """The update ops' entries' check (UpdateLists::kernel_ready), for the traced path: the four
    lists kernel-ready with one dtype each, the grads of the params' dtype or fp32 grads of
    bf16/fp16 params (other pairs go to the reference), and each param's grad and states in
    its element order."""
    return _kernel_ready(True, params, grads, exp_avgs, exp_avg_sqs) and (
        not params or grads[0].dtype == params[0].dtype or (params[0].dtype, grads[0].dtype) in _MIXED_UPDATE_DTYPES
    ) and all(len({element_order(t) for t in four}) == 1 for four in zip(params, grads, exp_avgs, exp_avg_sqs))


def _run_telemetry(grads: Sequence[Tensor]) -> Optional[Tensor]:
    if not torch.compiler.is_compiling():
        return _C._telemetry(grads)
    return torch.ops.lbw.telemetry(grads) if _kernel_ready(False, grads) else None


def _kernel_telemetry(grads: Sequence[Tensor]) -> Optional[Tensor]:
    """The kernels' telemetry rows of ``grads`` (non-empty list); a grad that is not dense (an
    expanded one, a slice with a step: torch takes any .grad of the param's shape) is read
    through a contiguous copy of itself, so one such grad does not send every grad's sums to the
    reference's float32 ops, whose bits depend on the thread count. None when the kernels
    still do not take them (a dtype they have no code for)."""
    rows = _run_telemetry(grads)
    if rows is None:
        rows = _run_telemetry([g if element_order(g) is not None else g.contiguous() for g in grads])
    return rows


def _update_args(part: GroupTensors, lr_scale: Tensor, lr: float, last) -> Optional[tuple]:
    """The update ops' leading arguments, in schema order; ``last``: skip (adamw_) or mask
    (adamw_telemetry_). (adamw_ takes grad_factor after them.)

    The schema takes betas, eps and weight_decay as floats: a group's one-element CPU tensors
    (torch.optim's tensor betas) are read here, with no sync. Eagerly that is what the direct
    entry's argument conversion would do; while torch.compile traces, the read breaks the graph
    there (a traced op cannot take a tensor for a float). None where one of them is a tensor on
    another device (a GPU tensor): reading it would wait for the device on every step (and fail
    a CUDA graph's capture), so such a part goes to the reference's ops, which read it there."""
    values = (part.beta1, part.beta2, part.eps, part.weight_decay)
    if any(isinstance(x, Tensor) and x.device.type != "cpu" for x in values):
        return None
    hyper = [float(x) if isinstance(x, Tensor) else x for x in values]
    return (part.params, part.grads, part.exp_avgs, part.exp_avg_sqs, part.steps, lr_scale, lr, *hyper,
            part.maximize, last)


def _run_adamw(part: GroupTensors, lr_scale: Tensor, lr: float, skip: Optional[Tensor],
               grad_factor: Optional[Tensor] = None) -> bool:
    args = _update_args(part, lr_scale, lr, skip)
    if args is None:
        return False
    args += (grad_factor,)
    if not torch.compiler.is_compiling():
        return _C._adamw_(*args)
    if not _update_ready(*args):
        return False
    torch.ops.lbw.adamw_(*args)
    return True


def _run_adamw_telemetry(part: GroupTensors, lr_scale: Tensor, lr: float, mask: bool) -> Optional[Tensor]:
    args = _update_args(part, lr_scale, lr, mask)
    if args is None:
        return None
    if not torch.compiler.is_compiling():
        return _C._adamw_telemetry_(*args)
    return torch.ops.lbw.adamw_telemetry_(*args) if _update_ready(*args) else None


def _check_states(part: GroupTensors, group: GroupTensors, gi: int) -> None:
    """The Python check of a part's states (validation.check_update_states), naming the group
    and param: before the reference updates a part the kernels did not take (its foreach ops
    would fail halfway through), and to name the state an op refused (the C++ checks know the
    part's lists only: "exp_avgs[1]" of a part split by dtype is not the group's param 1)."""
    split = part is not group  # (param indices are then those within the part's dtype)
    check_update_states([part], f"the step's group {gi}" + (f" (its {part.params[0].dtype} params)" if split else ""))


def _named(error: RuntimeError, part: GroupTensors, group: GroupTensors, gi: int) -> RuntimeError:
    """An op's refusal of ``part``: the Python check's error when a state is the cause (raised
    from here), else ``error`` itself, for the caller to raise."""
    _check_states(part, group, gi)
    return error


def _parts(groups: Sequence[GroupTensors]) -> Tuple[List[List[GroupTensors]], bool]:
    """Each group's parts (one op call each: split_by_dtype), and whether their states were all
    checked here. Each op checks its own part before writing it, so with several parts all are
    checked first (_C._check_update_, ~40 ns a param; the Python check for parts the kernels
    do not take): a later part refused (a state moved through `.data` to a tensor the kernels
    refuse) then leaves the earlier ones as they were. (Eagerly: a compiled step's ops are
    traced.)"""
    parts = [split_by_dtype(group) for group in groups]
    if sum(map(len, parts)) == 1 or torch.compiler.is_compiling():
        return parts, False
    for gi, (group, of_group) in enumerate(zip(groups, parts)):
        for part in of_group:
            try:
                ready = _C._check_update_(part.params, part.grads, part.exp_avgs, part.exp_avg_sqs, part.steps)
            except RuntimeError as err:
                raise _named(err, part, group, gi)
            if not ready:
                _check_states(part, group, gi)
    return parts, True


class CppBackend(Backend):
    """Multi-tensor C++ kernels on CPU (at::parallel_for, one fused loop per chunk)."""

    name = "cpp"
    priority = 10
    device_type = "cpu"

    def __init__(self) -> None:
        # (device, lengths of the sub-groups' non-empty rows) -> index restoring group order,
        # for the rare group whose params mix dtypes.
        self._orders: Dict[Tuple, KeptCopy] = {}

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == self.device_type

    # ----------------------------------------------------------------- passes
    def telemetry(self, grads: Sequence[Tensor], partials_dtype: torch.dtype) -> Tensor:
        if not grads:
            return torch.zeros((0, 3), dtype=partials_dtype)
        rows = _kernel_telemetry(grads)
        if rows is None:  # a grad the kernels do not take
            return reference.telemetry_partials(list(grads), partials_dtype)
        return self._as(rows, partials_dtype)

    def adamw_(self, groups: Sequence[GroupTensors], *, scale: Tensor, skip: Optional[Tensor],
               grad_factor: Optional[Tensor] = None) -> None:
        parts_of, checked = _parts(groups)
        for gi, (group, parts) in enumerate(zip(groups, parts_of)):
            lr_scale, lr = self._lr(scale, group.lr)
            for part in parts:
                if not part.params:
                    continue
                try:
                    done = _run_adamw(part, lr_scale, lr, skip, grad_factor)
                except RuntimeError as err:
                    raise _named(err, part, group, gi)
                if not done:
                    if not checked:
                        _check_states(part, group, gi)
                    reference.adamw_(
                        part.params, part.grads, part.exp_avgs, part.exp_avg_sqs, part.steps,
                        lr=lr_scale * lr, beta1=part.beta1, beta2=part.beta2, eps=part.eps,
                        weight_decay=part.weight_decay, maximize=part.maximize, skip=skip, grad_factor=grad_factor,
                    )

    def adamw_telemetry_(
        self,
        groups: Sequence[GroupTensors],
        *,
        scale: Tensor,
        mask_nonfinite: bool,
        partials_dtype: torch.dtype,
    ) -> Tensor:
        rows: List[Tensor] = []
        parts_of, checked = _parts(groups)
        for gi, (group, parts) in enumerate(zip(groups, parts_of)):
            lr_scale, lr = self._lr(scale, group.lr)
            got = [self._update_telemetry(part, group, gi, checked, lr_scale, lr, mask_nonfinite) for part in parts]
            rows.append(got[0] if len(parts) == 1 else self._group_order(group, parts, got))
        out = rows[0] if len(rows) == 1 else torch.cat(rows)
        return self._as(out, partials_dtype)

    # ----------------------------------------------------------------- helpers
    def _update_telemetry(self, part: GroupTensors, group: GroupTensors, gi: int, checked: bool, lr_scale: Tensor,
                          lr: float, mask: bool) -> Tensor:
        try:
            rows = _run_adamw_telemetry(part, lr_scale, lr, mask) if part.params else None
        except RuntimeError as err:
            raise _named(err, part, group, gi)
        if rows is not None:
            return rows
        if part.params and not checked:
            _check_states(part, group, gi)
        grads = [g for g in part.grads if g.numel() > 0]
        rows = _kernel_telemetry(grads) if grads else None
        if rows is None:
            rows = (
                reference.telemetry_partials(grads, torch.float64)
                if grads
                else torch.zeros((0, 3), dtype=torch.float64, device=lr_scale.device)
            )
        if part.params:
            reference.adamw_(
                part.params, part.grads, part.exp_avgs, part.exp_avg_sqs, part.steps,
                lr=lr_scale * lr, beta1=part.beta1, beta2=part.beta2, eps=part.eps,
                weight_decay=part.weight_decay, maximize=part.maximize, mask_nonfinite=mask,
            )
        return rows

    def _group_order(self, group: GroupTensors, parts: List[GroupTensors], got: List[Tensor]) -> Tensor:
        """Rows of a group split by dtype, back in the group's order (split_by_dtype groups
        tensors by their params' dtype, telemetry wants them as listed). The index is cached per
        layout. By the params' dtypes, as split_by_dtype: a bf16 param may hold fp32 grads
        (torch >= 2.10's grad_dtype), and ordering by the grads' dtypes then put one tensor's
        row against another's element count."""
        dtypes = tuple(p.dtype for p, g in zip(group.params, group.grads) if g.numel() > 0)
        key = (group.params[0].device, dtypes)

        def inverse_order() -> Tensor:
            order = sorted(set(dtypes), key=str)  # split_by_dtype's order
            concatenated = [i for dt in order for i, d in enumerate(dtypes) if d == dt]
            inverse = [0] * len(concatenated)
            for row, i in enumerate(concatenated):
                inverse[i] = row
            return torch.tensor(inverse, dtype=torch.long, device="cpu")

        index = kept_copy(self._orders, key, inverse_order, key[0],
                          "the row order of a param group with several dtypes")
        return torch.cat(got).index_select(0, index)

    @staticmethod
    def _lr(scale: Tensor, lr) -> Tuple[Tensor, float]:
        """(lr_scale tensor, lr float) with lr_t = lr * lr_scale, as the reference's scale * lr."""
        if isinstance(lr, Tensor):
            return (scale * lr).to(torch.float64), 1.0
        return scale if scale.dtype == torch.float64 else scale.to(torch.float64), float(lr)

    @staticmethod
    def _as(partials: Tensor, dtype: torch.dtype) -> Tensor:
        return partials if partials.dtype == dtype else partials.to(dtype)


class CudaBackend(CppBackend):
    """Multi-tensor CUDA kernels: a device-side chunk table, one launch per pass."""

    name = "cuda"
    priority = 30
    device_type = "cuda"

    def __init__(self) -> None:
        if not getattr(_C, "WITH_CUDA", 0):
            try:
                from ._build_info import BUILD  # (setup.py's decision, with its reason)
            except ImportError:
                BUILD = "built against a torch without CUDA, or nvcc not found"
            raise RuntimeError(f"lbw_kernels._C was not built with CUDA kernels ({BUILD}); rebuild on a "
                               "CUDA machine with a CUDA torch and an nvcc of its CUDA major")
        _apply_cuda_geometry_override()
        super().__init__()

    exact_step_takes_partials = True

    def exact_step_(self, groups, grads, *, decide, scale, skip, partials_dtype, partials=None):
        """Both passes in one call from Python (_C._adamw_exact_: the telemetry op over the grads,
        launched before the update's tensors are checked, then ``decide``, then the update, with
        the gradient factor ``decide`` returns), for the common call: eager, one group of one
        dtype, a float lr (a tensor lr's ``lr * scale`` must be formed after ``decide``), float64
        rows, telemetry due. Anything else, or tensors the kernels do not take: False, nothing
        done, and the optimizer runs the passes one by one (the same bits). ``grads`` is asked
        only whether it is empty: the call reads the group's own grads, whose zero-element ones
        give no row, so its rows are those of ``grads`` (the nonempty ones, in order). Given
        ``partials`` (the telemetry op's rows of them, launched early), the call takes those."""
        if torch.compiler.is_compiling() or len(groups) != 1 or not grads or partials_dtype != torch.float64:
            return False
        group = groups[0]
        if isinstance(group.lr, Tensor) or (group.param_dtypes is not None and len(group.param_dtypes) > 1):
            return False
        lr_scale, lr = self._lr(scale, group.lr)
        args = _update_args(group, lr_scale, lr, skip)
        if args is None:  # (a GPU tensor among betas, eps, weight_decay: the reference updates)
            return False
        try:
            return _C._adamw_exact_(*args, decide, partials)
        except RuntimeError as err:
            raise _named(err, group, group, 0)
