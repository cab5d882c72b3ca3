"""Backend interface, registry and selection.

A backend does the passes over memory of one ``step()``; it never decides policy (the
controller is :func:`lbw_kernels.reference.guard_decide`, shared by all). Every backend takes
the same inputs: lists of tensors grouped as :class:`GroupTensors`, and 0-dim views of the
guard state (``scale``, ``skip``) that it reads on the device.

``"auto"`` picks, for the parameters' device, the available backend with the highest
priority: ``cuda`` > ``triton`` > ``cpp`` > ``reference``. A backend that is not built or
cannot import says why (``python -m lbw_kernels info`` prints it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .controller_op import fused_decide_, summary_decide_
from .validation import check_update_states


@dataclass
class GroupTensors:
    """The tensors of one param group that take part in a call (their ``.grad`` is set).

    ``lr`` is the group's scheduled learning rate (float or 0-dim tensor), before the guard's
    scale. States: ``exp_avgs``/``exp_avg_sqs`` shaped like params (fp32 for fp16/bf16 params),
    ``steps`` 0-dim float32 on the params' device.
    """

    params: List[Tensor]
    grads: List[Tensor]
    exp_avgs: List[Tensor]
    exp_avg_sqs: List[Tensor]
    steps: List[Tensor]
    lr: float | Tensor
    # One-element tensors are taken for these too (torch.optim's tensor betas): backends read
    # them each call, so in-place edits are seen (the Triton backend on the device).
    beta1: float | Tensor
    beta2: float | Tensor
    eps: float | Tensor
    weight_decay: float | Tensor
    maximize: bool
    # The params' distinct dtypes when the caller knows them (the step plan, once per plan):
    # saves a pass over the params per call in split_by_dtype.
    param_dtypes: Optional[frozenset] = None
    # This call's layout of the group's params and grads as the optimizer gathered them (every
    # param of the group, with or without grad: address, numel and dtype of each and of its
    # grad), when it read them (step_plan.CallGrads.layouts): the Triton backend keys its plans
    # with it instead of reading every param and grad again. Describes these lists only: a
    # GroupTensors of other tensors (shards, a dtype split) has None.
    layout_key: Optional[bytes] = None


class Backend:
    """The passes over memory. Subclasses implement the three methods below.

    Telemetry covers the non-empty gradients of all groups, in group order, as
    ``[T, 3]`` partials ``(sum g^2, sum g, nonfinite flag)`` in ``partials_dtype`` (the guard
    state's dtype); see :func:`lbw_kernels.reference.telemetry_partials`.
    """

    name = "?"
    #: higher wins under backend="auto"
    priority = 0
    #: whether telemetry sums accumulate in float64 whatever the gradient dtype (the kernels
    #: do; the reference accumulates in the gradients' precision): verify's tolerance follows
    telemetry_in_float64 = True
    #: whether rules 1-4 may run as the extension's controller kernel (bitwise the reference's
    #: ops, one launch instead of ~60); the reference backend runs the ops it is checked against
    fused_controller = True
    #: whether the backend runs on a tensor subclass it cannot address through the subclass's
    #: own operators (the reference: torch ops only); kernels need every tensor's address
    #: (subclasses.py: wrappers whose inner tensor holds their elements are resolved first)
    runs_subclasses = False
    #: whether :meth:`exact_step_` takes ``partials`` (the optimizer's early telemetry pass)
    exact_step_takes_partials = False

    def supports(self, device: torch.device) -> bool:
        raise NotImplementedError

    def device_hint(self, device: torch.device) -> str:
        """What would let this backend run on ``device``, for the error that refuses it ("" when
        nothing would)."""
        return ""

    def auto_selectable(self, device: torch.device) -> bool:
        """Whether backend="auto" may pick this backend for ``device``: a backend that only
        emulates a device (Triton's interpreter on CPU) runs when asked for by name, never by
        default."""
        return self.supports(device)

    def telemetry(self, grads: Sequence[Tensor], partials_dtype: torch.dtype) -> Tensor:
        """Exact gate's first pass: partials of ``grads`` (all non-empty)."""
        raise NotImplementedError

    def scaled_telemetry(self, grads: Sequence[Tensor], inv_scale: Tensor, partials_dtype: torch.dtype) -> Tensor:
        """:meth:`telemetry` of gradients still scaled by ``1/inv_scale`` (GradScaler's fused
        path): the same rows, summed so that the scale cannot overflow them. By default
        :meth:`telemetry`: float64 sums of float32-range values do not overflow."""
        return self.telemetry(grads, partials_dtype)

    def gathered_telemetry(self, grads: Sequence[Tensor], layouts: Sequence[bytes], partials_dtype: torch.dtype) -> Tensor:
        """:meth:`telemetry` of ``grads``: every gradient of the groups whose params' and grads'
        layouts the optimizer gathered as ``layouts`` (``GroupTensors.layout_key``, in the same
        order), which fix those gradients: a backend that keeps tables by storage may find them
        by these, without reading each gradient's address. By default, :meth:`telemetry`."""
        return self.telemetry(grads, partials_dtype)

    def adamw_(
        self, groups: Sequence[GroupTensors], *, scale: Tensor, skip: Optional[Tensor],
        grad_factor: Optional[Tensor] = None,
    ) -> None:
        """Rule 5 on every group with ``lr * scale``; nothing changes when ``skip`` is non-zero.
        ``grad_factor`` (0-dim, on the device; max_grad_norm's clipping): every gradient element
        is read times it, rounded once to the math dtype (reference.adamw_); grads unchanged."""
        raise NotImplementedError

    def adamw_telemetry_(
        self,
        groups: Sequence[GroupTensors],
        *,
        scale: Tensor,
        mask_nonfinite: bool,
        partials_dtype: torch.dtype,
    ) -> Tensor:
        """single_pass: rule 5 (elements with non-finite grads masked when ``mask_nonfinite``)
        and the partials of the gradients as read, in the order of :meth:`telemetry`."""
        raise NotImplementedError

    def exact_step_(
        self,
        groups: Sequence[GroupTensors],
        grads: Sequence[Tensor],
        *,
        decide: Callable[[Optional[Tensor]], Optional[Tensor]],
        scale: Tensor,
        skip: Optional[Tensor],
        partials_dtype: torch.dtype,
        partials: Optional[Tensor] = None,
    ) -> bool:
        """The exact gate's call in one go, for a backend that can find its tensors once for
        both passes (each pass on its own reads every tensor's address: the gradients' twice):
        the partials of ``grads`` (``nonempty_grads(groups)``, or none when the call measures
        nothing) handed to ``decide`` (rules 1-4, on the device), then rule 5 on ``groups``
        with ``skip`` as decided and the ``grad_factor`` that ``decide`` returns (None: none).
        Returns False, having done nothing, where the backend does
        not offer it: the caller then runs :meth:`telemetry`, ``decide`` and :meth:`adamw_`.
        ``partials`` (only where ``exact_step_takes_partials``): the rows of ``grads``, launched
        already (lbw_kernels/early_telemetry.py), to take instead of a telemetry pass; the
        update's checks still come before ``decide``."""
        return False

    def decide_(
        self,
        guard: Tensor,
        partials: Optional[Tensor],
        numels: Optional[Tensor],
        numel_total: Optional[Tensor],
        *,
        analyze: "bool | Tensor",
        check_finite: bool,
        cfg: "reference.GuardConfig",
    ) -> None:
        """Rules 1-4 for one call, in place on ``guard``, from the call's telemetry rows
        (``partials`` [T, 3], ``numels`` [T] and their sum ``numel_total``; None when neither
        telemetry nor the finite check is due): the C++ extension's controller kernel for a
        backend with ``fused_controller`` when it applies (controller_op.py), else
        :func:`reference.summarize` and :func:`reference.guard_decide`'s tensor ops."""
        if self.fused_controller and fused_decide_(
            guard, partials, numels, analyze=analyze, check_finite=check_finite, cfg=cfg
        ):
            return
        summary = None if partials is None else reference.summarize(partials, numels, cfg.use_max_rms, numel_total)
        guard.copy_(reference.guard_decide(guard, summary, analyze=analyze, check_finite=check_finite, cfg=cfg))

    def decide_summary_(
        self, guard: Tensor, summary: Optional[Tensor], *, analyze: "bool | Tensor", check_finite: bool,
        cfg: "reference.GuardConfig",
    ) -> None:
        """Rules 1-4 in place on ``guard`` from a call's summary instead of its rows (pipeline
        stages combine theirs: pipeline.py); the controller kernel under the same conditions."""
        summary_decide_(guard, summary, analyze=analyze, check_finite=check_finite, cfg=cfg,
                        use_kernel=self.fused_controller)


def split_by_dtype(group: GroupTensors) -> List[GroupTensors]:
    """Sub-groups whose params share one dtype (kernels and foreach ops want one dtype)."""
    dtypes = group.param_dtypes if group.param_dtypes is not None else {p.dtype for p in group.params}
    if len(dtypes) <= 1:
        return [group]
    out = []
    for dtype in sorted(dtypes, key=str):
        idx = [i for i, p in enumerate(group.params) if p.dtype == dtype]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        out.append(
            GroupTensors(
                pick(group.params), pick(group.grads), pick(group.exp_avgs),
                pick(group.exp_avg_sqs), pick(group.steps), group.lr, group.beta1,
                group.beta2, group.eps, group.weight_decay, group.maximize,
            )
        )
    return out


def nonempty_grads(groups: Sequence[GroupTensors]) -> List[Tensor]:
    """The gradients telemetry covers: every group's, in order, zero-element tensors left out."""
    return [g for group in groups for g in group.grads if g.numel() > 0]


class ReferenceBackend(Backend):
    """Pure PyTorch (foreach ops): any device, any dtype; the spec every kernel is tested against."""

    name = "reference"
    priority = 0
    telemetry_in_float64 = False
    fused_controller = False
    runs_subclasses = True

    def supports(self, device: torch.device) -> bool:
        return True

    def telemetry(self, grads, partials_dtype):
        return reference.telemetry_partials(grads, partials_dtype)

    def scaled_telemetry(self, grads, inv_scale, partials_dtype):
        # (fp32 sums: those of squares of scaled gradients overflow where the gradients do not)
        return reference.scaled_telemetry_partials(grads, inv_scale, partials_dtype)

    def adamw_(self, groups, *, scale, skip, grad_factor=None):
        check_update_states(groups)  # (all groups before the first is written)
        for group in groups:
            lr = scale * group.lr
            for part in split_by_dtype(group):
                reference.adamw_(
                    part.params, part.grads, part.exp_avgs, part.exp_avg_sqs, part.steps,
                    lr=lr, beta1=part.beta1, beta2=part.beta2, eps=part.eps,
                    weight_decay=part.weight_decay, maximize=part.maximize, skip=skip, grad_factor=grad_factor,
                )

    def adamw_telemetry_(self, groups, *, scale, mask_nonfinite, partials_dtype):
        check_update_states(groups)
        # The reference reads the gradients twice; the kernels fuse both into one pass.
        partials = reference.telemetry_partials(nonempty_grads(groups), partials_dtype)
        for group in groups:
            lr = scale * group.lr
            for part in split_by_dtype(group):
                reference.adamw_(
                    part.params, part.grads, part.exp_avgs, part.exp_avg_sqs, part.steps,
                    lr=lr, beta1=part.beta1, beta2=part.beta2, eps=part.eps,
                    weight_decay=part.weight_decay, maximize=part.maximize,
                    mask_nonfinite=mask_nonfinite,
                )
        return partials


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------
_FACTORIES: Dict[str, Callable[[], Backend]] = {"reference": ReferenceBackend}
# Optional backends: module path and class name, imported on first use so that importing
# lbw_kernels never needs a compiler, Triton or a GPU.
_OPTIONAL: Dict[str, tuple] = {}
_INSTANCES: Dict[str, Backend] = {}
_ERRORS: Dict[str, str] = {}

BACKEND_NAMES = ("reference", "triton", "cpp", "cuda")


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Add (or replace) a backend; ``factory()`` may raise ImportError/RuntimeError with the
    reason the backend is unavailable."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)
    _ERRORS.pop(name, None)


def register_lazy_backend(name: str, module: str, attr: str) -> None:
    def factory():
        return getattr(importlib.import_module(module), attr)()

    register_backend(name, factory)


register_lazy_backend("cpp", "lbw_kernels.cpp_backend", "CppBackend")
register_lazy_backend("cuda", "lbw_kernels.cpp_backend", "CudaBackend")
register_lazy_backend("triton", "lbw_kernels.triton_kernels.backend", "TritonBackend")


def registered_names() -> List[str]:
    """Every backend name ``get_backend`` knows: the built-in ones and those registered."""
    return list(_FACTORIES)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises RuntimeError saying why when it is unavailable."""
    if name in _INSTANCES:
        return _INSTANCES[name]
    if name not in _FACTORIES:
        if name in BACKEND_NAMES:
            raise RuntimeError(f"backend {name!r} is not built in this version of lbw_kernels")
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {name!r}")
    if name in _ERRORS:
        raise RuntimeError(f"backend {name!r} is unavailable: {_ERRORS[name]}")
    try:
        backend = _FACTORIES[name]()
    except (ImportError, RuntimeError, OSError) as err:
        _ERRORS[name] = f"{type(err).__name__}: {err}"
        raise RuntimeError(f"backend {name!r} is unavailable: {_ERRORS[name]}") from err
    _INSTANCES[name] = backend
    return backend


def availability() -> Dict[str, Optional[str]]:
    """Every known backend name -> None when available, else the reason it is not."""
    out: Dict[str, Optional[str]] = {}
    for name in BACKEND_NAMES:
        try:
            get_backend(name)
            out[name] = None
        except RuntimeError as err:
            out[name] = str(err)
    return out


def runs_on(device: torch.device) -> List[str]:
    """The names GuardedAdamW's ``backend`` may take for params on ``device``."""
    names = ["auto"]
    for name in list(_FACTORIES):
        try:
            if get_backend(name).supports(device):
                names.append(name)
        except RuntimeError:
            continue
    return names


def select_backend(name: str, device: torch.device) -> Backend:
    """Resolve ``name`` ("auto" or a backend name) for parameters on ``device``."""
    device = torch.device(device)
    if name != "auto":
        backend = get_backend(name)
        if not backend.supports(device):
            hint = backend.device_hint(device)
            raise ValueError(
                f"backend={name!r} does not run on {device.type} tensors (the params' device)"
                + (f": {hint}" if hint else "")
                + f"; backends that do: {', '.join(runs_on(device))}"
            )
        return backend
    best: Optional[Backend] = None
    for candidate in list(_FACTORIES):
        try:
            backend = get_backend(candidate)
        except RuntimeError:
            continue
        if backend.auto_selectable(device) and (best is None or backend.priority > best.priority):
            best = backend
    assert best is not None  # the reference supports every device
    return best
