"""Argument checks for GuardedAdamW: each names the parameter and runs before anything is changed."""

from __future__ import annotations

import math
import numbers
from typing import Any, Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from . import reference as ref
from .element_order import element_order
from .reference import GuardConfig, state_tensor_dtype
from .subclasses import _PLAIN, is_dtensor

SUPPORTED_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
GATES = ("exact", "single_pass")
AMSGRAD_REFUSED = "amsgrad=True is not supported: GuardedAdamW keeps AdamW's exp_avg and exp_avg_sq only"
DIFFERENTIABLE_REFUSED = "differentiable=True is not supported: the guarded step updates in place without autograd"


def plain_number(value: Any) -> Any:
    """A numpy scalar (``np.float32(3e-4)``, ``np.int64(10)``: torch.optim takes them) as the
    Python number it holds, so configs and checkpoints hold plain numbers; anything else as is.
    (By exact type: ``np.float64`` is a subclass of ``float``, yet torch.load(weights_only=True)
    refuses it.)"""
    if isinstance(value, numbers.Real) and type(value) not in (bool, int, float) and hasattr(value, "item"):
        return value.item()
    return value


def _number(name: str, value: Any, read_tensor: bool = True) -> float:
    """``value`` as a float, checked to be a real number (not NaN). A one-element tensor off the
    CPU is read only with ``read_tensor`` (construction, loading); ``step()`` checks its type
    alone, as reading it would wait for the device, and returns 0.0 for it. A CPU tensor is
    host memory, read always: an edit in place (``lr.fill_(-1.0)``) is then refused by the next
    ``step()`` as the same value assigned as a float is."""
    if type(value) is float:  # the common case, first (step() checks every group every call)
        if math.isnan(value):
            raise ValueError(f"{name} must not be NaN")
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        if value.device.type == "meta":  # (its device is known without reading the value)
            raise ValueError(f"{name} is a meta tensor: it holds no value")
        if not read_tensor and value.device.type != "cpu":
            return 0.0
        value = value.item()  # (construction or loading, where a sync is harmless; or a CPU tensor)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_group_hyperparameters(group: Dict[str, Any], where: str = "", read_tensors: bool = True) -> None:
    """lr, betas, eps, weight_decay, maximize of one param group; messages start with ``where``
    (``"param_groups[1]: "``). ``read_tensors=False`` (every ``step()``: a group may have been
    edited since it was added) checks a device tensor's type, not its value (``_number``)."""

    def number(name: str, value: Any) -> float:
        return _number(where + name, value, read_tensors)

    lr = number("lr", group["lr"])
    if lr < 0:
        raise ValueError(f"{where}lr must be >= 0, got {lr}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        beta = number(f"betas[{i}]", beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}betas[{i}] must be in [0, 1), got {beta}")
    eps = number("eps", group["eps"])
    if eps < 0:
        raise ValueError(f"{where}eps must be >= 0, got {eps}")
    weight_decay = number("weight_decay", group["weight_decay"])
    if weight_decay < 0:
        raise ValueError(f"{where}weight_decay must be >= 0, got {weight_decay}")
    if not isinstance(group["maximize"], bool):
        raise TypeError(f"{where}maximize must be a bool, got {type(group['maximize']).__name__}")
    if group.get("amsgrad", False):
        raise ValueError(where + AMSGRAD_REFUSED)
    if group.get("differentiable", False):
        raise ValueError(where + DIFFERENTIABLE_REFUSED)


def check_groups_at_step(param_groups) -> None:
    """Every group's hyper-parameters, at the start of each ``step()``: they may have been
    edited since the group was added (a scheduler, a config reload), and a bad one found by a
    backend half-way through the groups would leave the earlier ones updated."""
    for gi, group in enumerate(param_groups):
        # Plain floats in range pass here in ~0.4 us a group (NaN fails every comparison);
        # anything else takes the full check, which names what is wrong.
        lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if (type(lr) is float and type(eps) is float and type(wd) is float and type(betas) is tuple
                and len(betas) == 2 and type(betas[0]) is float and type(betas[1]) is float
                and lr >= 0.0 and eps >= 0.0 and wd >= 0.0 and 0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0
                and type(group["maximize"]) is bool and not group.get("amsgrad", False)
                and not group.get("differentiable", False)):
            continue
        check_group_hyperparameters(group, f"param_groups[{gi}]: ", read_tensors=False)


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
        raise ValueError(DIFFERENTIABLE_REFUSED)


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
    if isinstance(cfg.stats_freq, bool) or not isinstance(cfg.stats_freq, numbers.Integral):
        raise TypeError(f"stats_freq must be an int, got {type(cfg.stats_freq).__name__}")
    if cfg.stats_freq < 1:
        raise ValueError(f"stats_freq must be >= 1, got {cfg.stats_freq}")
    ema_decay = _number("ema_decay", cfg.ema_decay)
    if not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if cfg.max_grad_norm is not None:
        if isinstance(cfg.max_grad_norm, torch.Tensor):
            raise TypeError("max_grad_norm must be a number, got a tensor")
        max_norm = _number("max_grad_norm", cfg.max_grad_norm)
        if not 0.0 < max_norm < math.inf:
            raise ValueError(f"max_grad_norm must be a positive finite number (or None), got {max_norm}")
        if gate != "exact":
            raise ValueError(f"max_grad_norm needs gate='exact', got gate={gate!r}: single_pass updates before the "
                             "call's gradient norm is known (clip with torch.nn.utils.clip_grad_norm_ before step())")


def check_params(named: Iterable[Tuple[str, torch.Tensor]], held: Iterable[Tuple[str, torch.Tensor]] = ()) -> None:
    """Params, as ``(where, param)`` pairs (``"param_groups[2]['params'][0]"``), must be dense real
    floating-point tensors, each listed once, all on one device with the params already ``held``
    (pairs too). add_param_group checks a new group with this, the step plan every param taking
    part in a call (they may have been put into a group's list since)."""
    first = next(iter(held), None)
    seen: Dict[int, str] = {}
    spans: List[Tuple[int, int, int, str]] = []  # (start, end, listing index, where) of dense plain params
    for where, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where} must be a Tensor, got {type(p).__name__}")
        if p.is_complex():
            raise TypeError(f"{where} is complex ({p.dtype}); GuardedAdamW takes real params")
        if p.dtype not in SUPPORTED_PARAM_DTYPES:
            raise TypeError(
                f"{where} has dtype {p.dtype}; supported: " + ", ".join(str(d) for d in SUPPORTED_PARAM_DTYPES)
            )
        if p.is_sparse:
            raise TypeError(f"{where} is sparse; GuardedAdamW takes dense params")
        if id(p) in seen:
            # (torch.optim only warns; the kernels would update the one tensor twice per call,
            # racing with themselves on the multi-threaded CPU backend)
            raise ValueError(f"{where} is {seen[id(p)]} again: list each param once")
        seen[id(p)] = where
        # (strided plain tensors with storage: mkldnn, nested, lazy or XLA tensors have no
        # strides or address to read here)
        if (type(p) in _PLAIN and p.layout == torch.strided and not p.is_nested and p.device.type != "meta"
                and p.numel() > 1):
            if any(size > 1 and stride == 0 for size, stride in zip(p.shape, p.stride())):
                raise ValueError(f"{where} has elements that share memory (expanded: stride 0); an update "
                                 "writes each element: give the param memory of its own (.contiguous())")
            start = _address(p)
            if start and (p.is_contiguous() or element_order(p) is not None):  # (dense: it fills its span)
                spans.append((start, start + p.numel() * p.element_size(), len(seen), where))
        if first is None:
            first = (where, p)
        elif p.device != first[1].device:
            raise ValueError(
                f"params are on mixed devices: {where} is on {p.device}, {first[0]} on {first[1].device}; "
                "one GuardedAdamW takes one decision per call, so its params share one device"
            )
    _check_disjoint(spans)


def _address(p: torch.Tensor) -> int:
    """``p``'s first element's address, 0 where it has none to give (a device without one)."""
    try:
        return p.data_ptr()
    except RuntimeError:
        return 0


def _check_disjoint(spans: List[Tuple[int, int, int, str]]) -> None:
    """Distinct params over the same memory (a tie made through ``.data``, overlapping views of
    one buffer): each has its own gradient and state, so a call would update those elements
    twice (torch.optim.AdamW in turn; the kernels at once, racing on the CPU's threads). Dense
    params fill their spans, so overlapping spans share elements; views of one buffer side by
    side (a flat master buffer split per param) do not. (Params that are not dense, strided
    slices, are left out: their spans may interleave without sharing an element.)"""
    spans = sorted(spans)
    for (_, end, i, where), (start, _, j, other) in zip(spans, spans[1:]):
        if start < end:
            later, earlier = (where, other) if i > j else (other, where)
            raise ValueError(f"{later} shares memory with {earlier}: one update per call would write those "
                             "elements twice; tie them as one Parameter (module_b.weight = module_a.weight) "
                             "or give each its own memory")


def plain_hyperparameters(group: Dict[str, Any]) -> None:
    """A group's (or the defaults') lr, eps, weight_decay and betas with numpy scalars made
    Python numbers, in place (plain_number)."""
    for key in ("lr", "eps", "weight_decay"):
        if key in group:
            group[key] = plain_number(group[key])
    if isinstance(group.get("betas"), (tuple, list)):
        group["betas"] = type(group["betas"])(map(plain_number, group["betas"]))


def check_grad(p: torch.Tensor, group_index: int, param_index: int) -> None:
    g = p.grad
    where = f"param_groups[{group_index}]['params'][{param_index}].grad"
    if g.is_sparse:
        raise TypeError(f"{where} is sparse; GuardedAdamW does not support sparse gradients")
    if g.is_complex():
        raise TypeError(f"{where} is complex; GuardedAdamW does not support complex gradients")
    if not g.is_floating_point():
        raise TypeError(f"{where} has dtype {g.dtype}; gradients must be floating-point")
    if g.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(g.shape)}, its param {tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"{where} is on {g.device}, its param on {p.device}")


STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def dtensor_spec_differs(t: torch.Tensor, p: torch.Tensor) -> Optional[str]:
    """Where state ``t`` and its param ``p`` are not DTensors of one mesh and placements (or one
    of them is not a DTensor): both, said ("is ..., its param ..."); else None. The same global
    shape may hold other local shards, which the update's own check would find only on the
    ranks whose shards differ, some after a collective."""
    dt, dp = is_dtensor(t), is_dtensor(p)
    if not (dt or dp) or (dt and dp and t.device_mesh == p.device_mesh
                          and tuple(t.placements) == tuple(p.placements)):
        return None

    def spec(x: torch.Tensor, d: bool) -> str:
        return f"a DTensor on {x.device_mesh} with placements {tuple(x.placements)}" if d else "a plain tensor"

    return f"is {spec(t, dt)}, its param {spec(p, dp)}"


def check_state_entry(p: torch.Tensor, state: Mapping[str, Any], where: str) -> None:
    """An existing AdamW state of ``p`` (``where``: how to find it, ``"opt.state[...]"``), perhaps
    edited by hand since it was made: the tensors the kernels will read and write in place.
    Checked when a step plan is built (edits of ``opt.state`` rebuild it), before any state
    is created and anything is updated."""
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"{where} has no {missing}: a param's AdamW state holds all of {list(STATE_KEYS)} or none")
    dtype = state_tensor_dtype(p.dtype)
    for key in ("exp_avg", "exp_avg_sq"):
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.dtype != dtype:
            kind = f"a {t.layout} {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{where}[{key!r}] must be a dense {dtype} tensor for a {p.dtype} param, got {kind}")
        if t.shape != p.shape or t.device != p.device:
            raise ValueError(
                f"{where}[{key!r}] has shape {tuple(t.shape)} on {t.device}, its param {tuple(p.shape)} on {p.device}"
            )
        differs = dtensor_spec_differs(t, p)
        if differs:
            raise ValueError(f"{where}[{key!r}] {differs}")
    step = state["step"]
    if not (isinstance(step, torch.Tensor) and step.numel() == 1 and step.dtype == torch.float32
            and step.device == p.device):
        kind = f"{step.dtype} of shape {tuple(step.shape)} on {step.device}" if isinstance(step, torch.Tensor) else type(step).__name__
        raise TypeError(f"{where}['step'] must be a one-element float32 tensor on {p.device}, got {kind}")


def check_state_tensors(p: torch.Tensor, exp_avg: Any, exp_avg_sq: Any, step: Any, where: str) -> None:
    """``check_state_entry`` on the tensors an update is about to write, read again from its
    lists: a state tensor can change behind the optimizer's back through ``.data`` (state
    offload and reload), which no edit of ``opt.state`` records, so the plan's check at build
    time does not cover it. A tensor of another shape would otherwise be written past its end
    by the kernels, or fail in the middle of the update. The common case is one comparison per
    attribute; the message comes from ``check_state_entry``."""
    dtype = state_tensor_dtype(p.dtype)
    shape, device = p.shape, p.device
    if not (isinstance(exp_avg, torch.Tensor) and isinstance(exp_avg_sq, torch.Tensor)
            and isinstance(step, torch.Tensor) and exp_avg.dtype == dtype and exp_avg_sq.dtype == dtype
            and exp_avg.shape == shape and exp_avg_sq.shape == shape and exp_avg.device == device
            and exp_avg_sq.device == device and exp_avg.layout == torch.strided
            and exp_avg_sq.layout == torch.strided and step.dtype == torch.float32 and step.numel() == 1
            and step.device == device):
        check_state_entry(p, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, where)


def check_update_states(groups: Sequence[Any], where: str = "the step's group {}") -> None:
    """:func:`check_state_tensors` on every param of the update's groups (``GroupTensors``),
    before any is written: a call refused here changes nothing. ``where`` names a group by its
    index in ``groups``. A group the C++ extension's check takes (``_C._check_update_``: ~40 ns
    a param and its 4 tensors, states' shapes included) is checked there; the others in Python (~2 us a param),
    and so is one it refuses, for an error naming the param."""
    for gi, group in enumerate(groups):
        lists = (group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.steps)
        try:
            if _CHECK_UPDATE is not None and _CHECK_UPDATE(*lists):
                continue
        except RuntimeError:
            _check_states_in_python(group, where.format(gi))
            raise
        _check_states_in_python(group, where.format(gi))


def _check_states_in_python(group: Any, where: str) -> None:
    for ti, (p, m, v, s) in enumerate(zip(group.params, group.exp_avgs, group.exp_avg_sqs, group.steps)):
        check_state_tensors(p, m, v, s, f"the state of {where}, param {ti}")


def _check_update_function():
    try:
        from ._C import _check_update_
    except ImportError:  # the extension is optional (and its attribute in an older build)
        return None
    return _check_update_


_CHECK_UPDATE = _check_update_function()


def check_count(value: float, name: str, where: str, at_most: Optional[float] = None,
                bound: str = "") -> None:
    """A guard slot that counts (calls, or a call's number): a whole number from 0 to 2**53
    (float64's whole numbers, beyond which +1 no longer counts), at most ``at_most``."""
    if not (math.isfinite(value) and 0 <= value <= 2.0**53 and value == int(value)):
        raise ValueError(f"{where} holds a {name} of {value!r}: not an int >= 0 (and <= 2**53)")
    if at_most is not None and value > at_most:
        raise ValueError(f"{where} holds a {name} of {value!r}: above the {bound} ({at_most!r})")


def check_guard_values(values: List[float], where: str, policy: Any = None) -> None:
    """A loaded guard state (``values``: its slots, reference.py's layout) is one the rules can
    reach: a scale in (0, 1] (a NaN or negative one would poison or reverse every update that
    follows), whole non-negative counts (the analysed and skipped calls among the calls), a
    known regime, a skip flag of 0 or 1, and ``policy``'s own slots as its ``check_slots``
    says. The measured slots (EMA, grad_ms, ...) may be NaN: with skip_nonfinite=False a NaN
    gradient reaches them."""
    scale = values[ref.SCALE]
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"{where} holds a scale of {scale!r}: not in (0, 1]")
    calls = values[ref.CALLS]
    check_count(calls, "call count", where)
    check_count(values[ref.ANALYZED], "analysed-call count", where, calls, "call count")
    check_count(values[ref.SKIPPED], "skipped-call count", where, calls, "call count")
    regime = values[ref.REGIME]
    if regime not in range(len(ref.REGIMES)):
        raise ValueError(f"{where} holds a regime code of {regime!r}: not one of 0..{len(ref.REGIMES) - 1}")
    if values[ref.SKIP] not in (0.0, 1.0):
        raise ValueError(f"{where} holds a skip flag of {values[ref.SKIP]!r}: not 0 or 1")
    if policy is not None:
        policy.check_slots(values, where)


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
