"""GuardedAdamW: AdamW under the Learn-by-Wire guard, as a ``torch.optim.Optimizer``.

The optimizer owns the bookkeeping: param groups, per-parameter AdamW state (same names,
shapes and dtypes as ``torch.optim.AdamW``), the guard's state vector and the call count.
The work of a call goes to a backend (``backends.py``) and the decisions to the shared
controller (``reference.guard_decide``); see ``DESIGN.md`` for the rules.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
import inspect
from copy import deepcopy
from dataclasses import asdict
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import reference as ref
from . import stream_use
from .backends import Backend, get_backend, select_backend
from .controller_op import summary_decide_
from .distributed import ShardedTelemetry, called_by_dcp_state_init, check_no_fsdp1_shards
from .early_telemetry import Launched, Recipe, launch, reads_every_call, recipe_after
from .optimizer_state import OptimizerState
from .pipeline import check_same_options, model_summary, only_rows_analyzed, resolve_pipeline_group, stage_options
from .policies import resolve_policy
from .step_plan import CallGrads, StepPlan, check_grads_cheaply, gather_grads, presence_key
from .stream_use import StreamUse, stream_is_capturing, upload
from .subclasses import is_dtensor
from .zero import (
    adopt_states_after_zero_loads,
    agree_on_loaded_guard,
    building_zero,
    check_not_wrapped_by_deepspeed,
    zero_device,
    zero_group,
)
from .validation import (
    STATE_KEYS as _STATE_KEYS,
    check_adamw_switches,
    check_group_hyperparameters,
    check_groups_at_step,
    check_guard_config,
    check_guard_values,
    check_params,
    dtensor_spec_differs,
    plain_hyperparameters,
    plain_number,
)

# The guard's state and policy name also ride in the state of the first param that has state
# (where torch.optim.LBFGS keeps its optimizer-wide state): torch.distributed.checkpoint's
# get_optimizer_state_dict, which FSDP2 trainers use, keeps only "state" and "param_groups".
# The policy name goes as a uint8 tensor of its ASCII bytes: flattening (flatten_optimizer_
# state_dict=True) takes tensors and numbers only.
_GUARD_IN_PARAM_STATE = ("lbw_guard", "lbw_guard_policy")


def _policy_tag(name: str) -> Tensor:
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8, device="cpu")


def _policy_name(tag: Any) -> Optional[str]:
    """The policy name of a tag, or None when it is not one of ours: torch.optim.AdamW's
    load_state_dict casts every state tensor but ``step`` to the param's dtype, so a guard
    entry that went through another optimizer comes back with a float tag (and a stale guard)."""
    if not (isinstance(tag, Tensor) and tag.dtype == torch.uint8 and tag.dim() == 1):
        return None
    codes = tag.tolist()
    return bytes(codes).decode("ascii") if all(0 < c < 128 for c in codes) else None


def _same_values(a: Any, b: Any) -> bool:
    """Two guard states hold the same values (NaN slots equal)."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


# torch.compiler.disable, applied lazily: decorating with it imports torch._dynamo (~1 s, and
# triton with it, before the CLI can turn on Triton's interpreter) when this module is imported;
# torch's own optimizers use torch._disable_dynamo, which imports it at the first call.
_run_eagerly = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


def _first_device_with_grad(param_groups: List[Dict[str, Any]], grads_per_group: List[List[Optional[Tensor]]]):
    """The device of the first param with a grad (the plan's device), None when none has one."""
    for group, grads in zip(param_groups, grads_per_group):
        for p, g in zip(group["params"], grads):
            if g is not None:
                return p.device
    return None


def _scaler_inputs(opt, guard: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """What GradScaler's fused path (GuardedAdamW._step_supports_amp_scaling) set on ``opt`` for
    this call, on the guard's device: ``1/grad_scale`` as GradScaler computes it (float32, in
    the guard's dtype) or None (no scale: unscale_ was called, or no scaler), and ``found_inf``
    or None. (GradScaler sums its per-device flags; over no device that sum is the int 0.)"""
    grad_scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    # (non_blocking onto a GPU only: a copy to the CPU must have landed before the CPU reads it)
    async_copy = guard.device.type == "cuda"
    inv = None
    if grad_scale is not None:
        inv = grad_scale.to(guard.device, non_blocking=async_copy).double().reciprocal().float().to(guard.dtype)
    if found_inf is not None and not isinstance(found_inf, Tensor):
        found_inf = None if found_inf == 0 else torch.ones((), dtype=guard.dtype, device=guard.device)
    elif found_inf is not None:
        found_inf = found_inf.to(guard.device, non_blocking=async_copy)
    return inv, found_inf


@functools.lru_cache(maxsize=None)
def _takes_grad_factor(backend_type: type) -> bool:
    """Whether a backend class's update takes the gradient factor (every built-in one does;
    one registered from outside may predate it). Cached per class: GradScaler asks each step."""
    try:
        return "grad_factor" in inspect.signature(backend_type.adamw_).parameters
    except (TypeError, ValueError):
        return False


def _sharded_across_ranks(param_groups) -> bool:
    """Whether a param is a DTensor while several ranks run: scanned only under a
    multi-rank torch.distributed (a DTensor needs one; on one rank its flags agree)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(is_dtensor(p) for group in param_groups for p in group["params"])


def _device_numels(numels: List[int], *, dtype: torch.dtype, device: torch.device, keep: List[Tensor]) -> Tensor:
    """A step plan's element counts on the guard's device, uploaded without blocking
    (stream_use.upload): a plan rebuilt for a new layout then does not wait for the device. The
    plan holds ``keep``, the pinned source: a plan built while a CUDA graph is captured records
    the copy into the graph, whose replays read the source again."""
    return upload(torch.tensor(numels, dtype=dtype, device="cpu"), device, keep)


class GuardedAdamW(torch.optim.Optimizer):
    r"""AdamW whose learning rate a bounded guard scales from gradient telemetry.

    A drop-in replacement for ``torch.optim.AdamW``: same per-group hyper-parameters
    (``lr, betas, eps, weight_decay, maximize``), same per-parameter state
    (``step, exp_avg, exp_avg_sq``), so AdamW checkpoints load. On top, every call:

    1. skips the whole call if a gradient holds NaN/Inf (``skip_nonfinite``);
    2. on calls 1, f, 2f, ... (``stats_freq``) reads telemetry: per tensor the mean square
       ``mean(g^2)``, its max over tensors (or mean: ``use_max_rms=False``), and the signed
       mean of all gradient elements;
    3. compares it with its EMA (``ema_decay``) and the sign with the previous one;
    4. scales the learning rate: x0.7 on a spike (ratio > ``spike_threshold``), x0.85 on
       stress or a sign flip (ratio > ``stress_threshold``), else ``+recovery_fast`` towards 1;
       never below ``min_scale``.

    ``gate="exact"`` decides before updating (one extra read of the gradients);
    ``gate="single_pass"`` updates with the scale decided so far while reading the telemetry,
    so its decision applies from the next call. ``policy`` picks the analyzer and controller:
    ``"lbw"`` (the published rules above, the default) or ``"zscore"``
    (:class:`lbw_kernels.policies.ZScorePolicy`: acts on gradient-norm outliers measured
    against the run's own noise; pass an instance to change its options).
    ``backend`` picks who does the passes over memory: ``"auto"`` (fastest available for the device), ``"reference"``, ``"triton"``,
    ``"cpp"``, ``"cuda"``. ``step()`` never waits for the device; ``telemetry()`` does.

    ``max_grad_norm``: ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` inside the
    step, from the telemetry's own norm (exact gate only: the norm must be known before the
    update). The update reads every gradient times ``min(1, max_grad_norm / (norm + 1e-6))``;
    the guard reads the gradients before clipping. ``last_grad_norm`` is the norm
    ``clip_grad_norm_`` would have returned in the latest call (for logging); ``.grad`` is
    left unclipped.

    ``pipeline_group``: under pipeline parallelism, the ranks holding the other stages (a
    ProcessGroup or a 1-D DeviceMesh, e.g. torchtitan's ``world_mesh["pp"]``); each call's
    telemetry is combined over them so every stage takes one decision (lbw_kernels.pipeline).
    Built by ``torch.distributed.optim.ZeroRedundancyOptimizer`` (``optimizer_class=GuardedAdamW``),
    it combines its telemetry over ZeRO's ranks the same way, so that the partitions take one
    decision, and resumes from ZeRO's checkpoints (lbw_kernels.zero).

    ``amsgrad``, ``foreach``, ``capturable``, ``differentiable``, ``fused``: torch.optim.AdamW's
    switches, taken so that a call written for it works unchanged. ``backend`` chooses the
    implementation here (``foreach`` and ``fused`` are ignored), every step can be captured in
    a CUDA graph, and ``amsgrad=True`` or ``differentiable=True`` raise ValueError.

    ``Guard`` is the same class, under the published package's name.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        amsgrad: bool = False,
        *,
        auto_enabled: bool = True,
        stress_threshold: float = 1.1,
        spike_threshold: float = 1.5,
        min_scale: float = 0.1,
        recovery_fast: float = 0.01,
        use_max_rms: bool = True,
        stats_freq: int = 10,
        ema_decay: float = 0.85,
        skip_nonfinite: bool = True,
        max_grad_norm: Optional[float] = None,
        gate: str = "exact",
        backend: str = "auto",
        maximize: bool = False,
        policy="lbw",
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        pipeline_group=None,
    ):
        check_adamw_switches(amsgrad, foreach, capturable, differentiable, fused)
        pipeline = resolve_pipeline_group(pipeline_group)
        zero = building_zero()  # a ZeroRedundancyOptimizer building its local optimizer (zero.py)
        zero_ranks = zero_group(zero, pipeline_group) if zero is not None else None
        # numpy scalars as the Python numbers they hold (torch.optim.AdamW takes them; a config or
        # checkpoint holding numpy objects would not load with torch.load(weights_only=True))
        stress_threshold, spike_threshold, min_scale, recovery_fast, stats_freq, ema_decay, max_grad_norm = map(
            plain_number,
            (stress_threshold, spike_threshold, min_scale, recovery_fast, stats_freq, ema_decay, max_grad_norm),
        )
        config = ref.GuardConfig(
            auto_enabled=auto_enabled,
            stress_threshold=stress_threshold,
            spike_threshold=spike_threshold,
            min_scale=min_scale,
            recovery_fast=recovery_fast,
            use_max_rms=use_max_rms,
            stats_freq=stats_freq,
            ema_decay=ema_decay,
            skip_nonfinite=skip_nonfinite,
            max_grad_norm=max_grad_norm,
            policy=resolve_policy(policy),
        )
        check_guard_config(config, gate)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        if backend != "auto":
            try:
                get_backend(backend)
            except RuntimeError as err:
                raise ValueError(f"backend={backend!r}: {err}") from err
        # (Not AdamW's switch keys: a group key is a key of every DCP checkpoint's template, so
        # adding them would refuse the checkpoints saved without them.)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
        plain_hyperparameters(defaults)
        check_group_hyperparameters(defaults)
        self.guard_config = config
        self.gate = gate
        self.backend = backend
        self.pipeline_group = pipeline  # a ProcessGroup or None (pipeline.py)
        # the groups each call's telemetry summary is gathered over, in order (pipeline.py)
        self._summary_groups = tuple(g for g in (zero_ranks, pipeline) if g is not None)
        self._zero_partition = zero is not None  # a ZeroRedundancyOptimizer's local optimizer (zero.py)
        super().__init__(params, defaults)  # validates each group through add_param_group
        self.state = OptimizerState()
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None else zero_device(zero) if zero is not None else "cpu"
        self._guard = ref.new_guard_state(device, config.policy)
        self._guard_holder: Optional[Tensor] = None  # the param whose state carries the guard
        self._policy_tag = _policy_tag(config.policy.name)
        self._calls = 0  # host copy of the CALLS slot for eager scheduling (replays do not advance it)
        self._call_layouts = None  # this call's CallGrads.layouts (set by _prepare, read by eager calls)
        self._schedule_on_device = False  # set for good once a step is captured in a CUDA graph
        self._backends: Dict[torch.device, Backend] = {}
        self._plan: Optional[StepPlan] = None  # who takes part in a call, and their state
        self._state_seen = (None, 0)  # (self.state, its edit count) when the plan was built
        self._early_recipe: Optional[Recipe] = None  # what the next exact call may launch first (early_telemetry.py)
        self._grad_norm: Optional[Tensor] = None  # each call's norm with max_grad_norm (last_grad_norm)
        self._sharded = ShardedTelemetry(self.pipeline_group)  # DTensor params: local shards, partials across ranks
        for group in self._summary_groups:  # (a collective: every part builds its optimizer)
            what = "pipeline_group" if group is pipeline else "ZeroRedundancyOptimizer"
            check_same_options(group, stage_options(config, gate), what)
        if zero is not None:
            adopt_states_after_zero_loads(zero, self, zero_ranks)

    # ------------------------------------------------------------------ copy / pickle
    # torch.optim.Optimizer pickles defaults, state and param_groups only; the guard's own
    # attributes go with them. Caches (backends, step plan, sharding layout) are rebuilt.
    _PICKLED = ("guard_config", "gate", "backend", "_guard", "_guard_holder", "_policy_tag", "_calls",
                "_schedule_on_device", "_zero_partition", "_grad_norm")

    def __getstate__(self) -> Dict[str, Any]:
        if self.__dict__.get("_summary_groups"):
            which = ("with a pipeline_group" if self.__dict__.get("pipeline_group") is not None
                     else "built by a ZeroRedundancyOptimizer over several ranks")
            raise TypeError(f"a GuardedAdamW {which} cannot be copied or pickled (its ProcessGroup cannot be); "
                            "save its state_dict() instead")
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__}}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)  # (load_state_dict passes state and param_groups only)
        self.__dict__.setdefault("_backends", {})
        self.__dict__.setdefault("_plan", None)
        self.__dict__.setdefault("_state_seen", (None, 0))
        self.__dict__.setdefault("_early_recipe", None)
        self.__dict__.setdefault("_grad_norm", None)
        self.__dict__.setdefault("pipeline_group", None)
        self.__dict__.setdefault("_summary_groups", ())
        # (pickles from before _zero_partition said it as "_guard_in_every_state")
        self.__dict__.setdefault("_zero_partition", self.__dict__.pop("_guard_in_every_state", False))
        self.__dict__.setdefault("_sharded", ShardedTelemetry(self.pipeline_group))

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler's fused path, which torch.optim.AdamW(fused=True) takes too: with the
        exact gate ``scaler.step(opt)`` calls ``step()`` on the still-scaled gradients and sets
        ``grad_scale`` and ``found_inf`` on the optimizer. The update then reads each gradient
        times ``1/grad_scale`` (the gradient factor max_grad_norm uses), the telemetry rows are
        unscaled, and a call with ``found_inf`` changes nothing (reference.kept_on_overflow), all
        on the device: no host sync, and no write of unscaled gradients (GradScaler's own Inf
        check still reads them once). GradScaler's own path (unscale_, a host read of the Inf
        flag) stays for single_pass, which updates before it could skip a call; for sharded
        params (DTensor, FSDP2) on several ranks and for pipeline stages, since on the fused path
        GradScaler (ShardedGradScaler too) takes ``found_inf`` from each rank's own gradients,
        without the all-reduce its ``unscale_`` does, so ranks would disagree on the skip; and
        for a backend registered from outside whose update takes no gradient factor."""
        if self.gate != "exact" or self._summary_groups:
            return False
        if self._params_sharded_across_ranks():
            return False
        chosen = list(self.__dict__.get("_backends", {}).values())
        if not chosen and self.backend != "auto":
            try:
                chosen = [get_backend(self.backend)]
            except (RuntimeError, ValueError):
                return False
        return all(_takes_grad_factor(type(b)) for b in chosen)

    def _params_sharded_across_ranks(self) -> bool:
        """:func:`_sharded_across_ranks`, its scan of every param (~0.2 ms for 2000, and
        GradScaler asks each step) kept with the step plan's key, which names every param of
        every group as the last step found them (a list edited since is seen one call late)."""
        plan, seen = self.__dict__.get("_plan"), self.__dict__.get("_sharded_params_seen")
        if plan is not None and seen is not None and seen[0] is plan.key:
            return seen[1]
        answer = _sharded_across_ranks(self.param_groups)
        if plan is not None:
            self._sharded_params_seen = (plan.key, answer)
        return answer

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)  # (checked as a copy: the caller's dict takes the result at the end)
        if "params" not in group:
            raise ValueError("param_group has no 'params' entry")
        params = group["params"]
        if isinstance(params, set):
            raise TypeError("params must be an ordered collection (a list), not a set: its order changes between runs")
        if not isinstance(params, Tensor) and not isinstance(params, Iterable):
            raise TypeError(f"param_group['params'] must be a Tensor or a list of them, got {type(params).__name__}")
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        if self.__dict__.get("_zero_partition") and any(map(is_dtensor, group["params"])):
            # (ZeRO's ranks would be gathered over on top of the DTensors' own reduction)
            raise ValueError("param_group['params'] holds DTensors, which a ZeroRedundancyOptimizer does not "
                             "partition: shard them with FSDP2 (fully_shard) instead")
        plain_hyperparameters(group)
        candidate = {**self.defaults, **group}
        where = f"param_groups[{len(self.param_groups)}]"
        check_group_hyperparameters(candidate, where + ": ")
        # (lazily: check_params reads the first held param only, for its device)
        held = ((f"param_groups[{gi}]['params'][{pi}]", p)
                for gi, g in enumerate(self.param_groups) for pi, p in enumerate(g["params"]))
        # (name, tensor) pairs, as model.named_parameters() gives: torch keeps the names
        # (param_groups[i]["param_names"]); the checks look at the tensors
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in group["params"]]
        named = [(f"{where}['params'][{i}]", p) for i, p in enumerate(tensors)]
        check_params(named, held)
        check_no_fsdp1_shards(named)
        super().add_param_group(group)
        # torch.optim keeps the caller's dict as the group (and writes its defaults into it), so
        # that edits through it (a layer-wise learning rate tool's) apply: the checked entries go
        # into it only now, so that a group refused above (here or by torch) leaves it as it was
        param_group.clear()
        param_group.update(group)
        self.param_groups[-1] = param_group
        self._plan = None

    # ------------------------------------------------------------------ step
    def _backend_for(self, device: torch.device) -> Backend:
        if device not in self._backends:
            self._backends[device] = select_backend(self.backend, device)
        return self._backends[device]

    def _state_for(self, p: Tensor) -> Dict[str, Tensor]:
        if not dict.get(self.state, p) and stream_is_capturing(p.device):
            # A state made inside a capture would be zeroed by every replay (its fill is
            # recorded): AdamW's moments and step count reset on each step, silently. The first
            # param without one raises, before its entry is made, so no state is.
            raise RuntimeError(
                f"GuardedAdamW: a param of shape {tuple(p.shape)} has no optimizer state yet, and a state made "
                "while a CUDA graph is captured would be reset by every replay; run one step() eagerly with "
                "these params (a warm-up on a side stream) before capturing")
        state = self.state.adopt_entry(p)
        if not state:
            dtype = ref.state_tensor_dtype(p.dtype)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    @property
    def _guard_in_every_state(self) -> bool:
        """Whether every param state carries the guard: where a part of the model's params is
        this optimizer's, a ZeroRedundancyOptimizer's partition (zero.py: whichever params a rank
        owns) or a pipeline stage (a checkpoint resumed with another split into stages finds the
        guard in whichever states a stage now holds; in the first state only, a stage that now
        starts at another param asked the checkpoint for a key it does not have)."""
        return self.__dict__.get("_zero_partition", False) or self.__dict__.get("pipeline_group") is not None

    def _attach_guard(self) -> None:
        """Keep ``_GUARD_IN_PARAM_STATE`` in the first param state, and there only: the guard
        tensor itself and its policy's tag. torch's unflattening of optimizer state dicts keeps
        only the keys the live state has, hence live entries. Runs when a step plan is built
        (new states appear only then), in ``state_dict()`` (states may have been edited) and
        when the guard tensor is replaced; the scan stops at the first param with state. In a
        ZeroRedundancyOptimizer's local optimizer and on a pipeline stage, in every param state
        (_guard_in_every_state)."""
        entries = (self._guard, self._policy_tag)
        if self._guard_in_every_state:
            for p in (p for g in self.param_groups for p in g["params"]):
                state = dict.get(self.state, p)
                if state:
                    dict.update(state, zip(_GUARD_IN_PARAM_STATE, entries))
            return
        first = next((p for g in self.param_groups for p in g["params"] if self.state.get(p)), None)
        if self._guard_holder is not None and self._guard_holder is not first:
            for key in _GUARD_IN_PARAM_STATE:
                dict.pop(self.state.get(self._guard_holder, {}), key, None)
        self._guard_holder = first
        if first is not None:  # (dict's own update: the guard's entries are not the plan's business)
            dict.update(self.state[first], zip(_GUARD_IN_PARAM_STATE, entries))

    def _plan_for(self, grads: CallGrads) -> StepPlan:
        key = presence_key(grads)
        # The plan holds the state tensors: any edit of ``self.state`` (an optimizer reset,
        # ``del opt.state[p]``, a tensor or a param's dict replaced: optimizer_state.py) or a
        # new ``self.state`` must rebuild it, creating fresh states as torch.optim.AdamW would.
        if not isinstance(self.state, OptimizerState):  # assigned from outside
            self.state = OptimizerState(self.state)
        seen_state, seen_edits = self._state_seen
        if (self._plan is None or self._plan.graph_only or self._plan.key != key or seen_state is not self.state
                or seen_edits != self.state.edits or not self._plan.views_current()):
            # The backend first: one that cannot run on the params' device (a model moved after
            # construction, as optimizers allow; TRITON_INTERPRET unset) raises before the plan
            # creates any state. (Moved params rebuild the plan: _prepare.)
            check_not_wrapped_by_deepspeed(self)
            device = _first_device_with_grad(self.param_groups, grads.per_group)
            backend = None if device is None else self._backend_for(device)
            sources: List[Tensor] = []
            numels = functools.partial(_device_numels, dtype=self._guard.dtype, device=self._guard.device, keep=sources)
            self._plan = StepPlan(key, self.param_groups, grads.per_group, lambda p: dict.get(self.state, p),
                                  self._state_for, numels, runs_subclasses=backend is None or backend.runs_subclasses)
            self._plan.pinned_sources = sources  # (see _device_numels)
            self._attach_guard()
            self._state_seen = (self.state, self.state.edits)  # (a reference: an id could be reused)
            numels_on_gpu = self._plan.numels is not None and self._plan.numels.is_cuda
            if stream_is_capturing(self._guard.device):
                # Built during a CUDA graph capture (no eager step with this layout before it):
                # its element counts were uploaded by a copy the graph records but does not run,
                # and hold nothing until the first replay. The plan serves that graph alone: the
                # next call builds its own (as the backends do with tables built during a
                # capture), and the graph's uploads are kept for good (not the plan: it holds
                # the params and states).
                self._plan.graph_only = True
            elif numels_on_gpu:
                self._plan.stream_use = StreamUse(self._guard.device)
        if not self._plan.kept_for_graphs and stream_is_capturing(self._guard.device):
            # A graph reads the plan's element counts (summarize_decide_'s) on every replay: kept
            # for good, the plan built during this capture or one built eagerly before it, which a
            # later eager call may replace (a grad set to None, a group added) and so free. Not the
            # plan itself: it holds the params and states. (The backends keep their tables the
            # same way: ops_cuda.cpp's keep, triton_kernels/ops.py's PLANS.keep.)
            self._plan.kept_for_graphs = True
            if self._plan.numels is not None:
                stream_use.GRAPH_ONLY.append((self._plan.numels, self._plan.numel_total, self._plan.pinned_sources))
        if self._plan.stream_use is not None and not torch.compiler.is_compiling():
            self._plan.stream_use.enter((self._plan.numels, self._plan.numel_total))
        return self._plan

    # Host bookkeeping runs eagerly under torch.compile (a graph break on each side of the
    # launches): dynamo installs no guards on an optimizer's attributes, so a plan, a call
    # count or a schedule read while tracing would be baked into the graph and replayed
    # (a compiled step with stats_freq=10 analysed every call); and torch 2.11's dynamo
    # fails on attribute writes to an optimizer passed into a compiled function.
    @_run_eagerly
    def _prepare(
        self, eager: bool
    ) -> Tuple[StepPlan, Optional[Backend], List[List[Optional[Tensor]]], bool, Optional[Launched]]:
        """The call's gradients, its validated plan and its backend (None when no param has a
        gradient), with the guard moved to the params' device if they moved since construction;
        whether this is DCP's state-creating call (asked before the plan creates state, and
        only while there is none); and the exact gate's telemetry pass when an ``eager`` call
        could launch it as soon as the gradients were gathered (early_telemetry.py), else None."""
        check_groups_at_step(self.param_groups)
        grads = gather_grads(self.param_groups)
        check_grads_cheaply(self.param_groups, grads)
        state_init = not self.state and called_by_dcp_state_init()
        early = None
        if (eager and self._early_recipe is not None and self.gate == "exact" and self.state
                and reads_every_call(self.guard_config) and not stream_is_capturing(self._guard.device)
                # (still-scaled gradients, GradScaler's fused path: a backend that sums them in
                # their precision reads them through scaled_telemetry, in the call)
                and (getattr(self, "grad_scale", None) is None or self._early_recipe.backend.telemetry_in_float64)):
            early = launch(self._early_recipe, grads, self._guard.dtype)
        if getattr(self, "found_inf", None) is not None:
            # GradScaler's fused path: a call it finds overflowed changes nothing, the call count
            # on the device included, which the host cannot know: rule 2's schedule is read from
            # the device from now on (as after a CUDA graph capture)
            self._schedule_on_device = True
        # The layouts go by attribute, read by eager calls only: bytes returned into a traced
        # frame would become constants that dynamo guards on (a recompile per layout).
        self._call_layouts = grads.layouts
        plan = self._plan_for(grads)
        device = plan.groups[0].params[0].device if plan.groups else None
        if device is not None and (device != plan.device or device != self._guard.device):  # moved after construction
            self._guard = self._guard_on(device)
            self._attach_guard()
            self._plan = None
            plan = self._plan_for(grads)
        if self.guard_config.max_grad_norm is not None:
            self._keep_grad_norm_buffer()
        if device is None:
            return plan, None, grads.per_group, state_init, early
        return plan, self._backend_for(device), grads.per_group, state_init, early

    def _guard_off_meta(self) -> None:
        """A guard made on meta, once the params are materialised (before the first step:
        state_dict, load_state_dict), made afresh on their device (_guard_on)."""
        if self._guard.device.type != "meta":
            return
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is not None and first.device.type != "meta":
            self._guard = self._guard_on(first.device)
            self._attach_guard()

    def _guard_on(self, device: torch.device) -> Tensor:
        """The guard moved to ``device`` (the params moved after construction). One made on the
        meta device (an optimizer made before the model's params were materialised: to_empty,
        deferred initialisation) holds no history, and no values to copy: it is made afresh,
        and the host's call count with it (steps on meta tensors are not the run's)."""
        if self._guard.device.type != "meta":
            return self._guard.to(device)
        self._calls = 0
        return ref.new_guard_state(device, self.guard_config.policy)

    def _keep_grad_norm_buffer(self) -> None:
        """The one-element tensor each call writes its norm into (last_grad_norm), beside the
        guard: made before the step is traced or captured, so that a compiled step or a graph
        replay writes into it as an eager step does. 1-D, not 0-dim: torch 2.13's compiler
        drops in-place writes to a 0-dim float64 tensor that is a graph input (unless it held
        NaN when traced), so a compiled step left the previous call's norm where a call without
        gradients writes 0 (tests/test_clipping.py). Steps write through ``_norm_view()``."""
        out, guard = self._grad_norm, self._guard
        if out is None or out.device != guard.device or out.dtype != guard.dtype or out.dim() != 1:
            self._grad_norm = torch.full((1,), float("nan"), dtype=guard.dtype, device=guard.device)

    def _norm_view(self) -> Tensor:
        """The norm buffer as the 0-dim tensor ``clip_grad_norm_`` returns; made inside the step,
        so that a traced step writes through a view of its 1-D input."""
        return self._grad_norm.view(())

    @_run_eagerly
    def _count_call(self) -> None:
        """Advance the host call count, once the call has decided (the CALLS slot moves with
        it); a call that raised is not counted."""
        self._calls += 1

    @torch.no_grad()
    def step(self, closure=None):
        """One guarded AdamW step (DESIGN.md rules 1-6). Never waits for the device. The
        zero-gradient call that torch.distributed.checkpoint.state_dict makes to create the
        state is AdamW's alone: the guard neither reads nor counts it
        (distributed.called_by_dcp_state_init)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan, backend, grads_per_group, state_init, early = self._prepare(not torch.compiler.is_compiling())
        if backend is None:
            if state_init:  # (a frozen stage's: nothing to create, and no stage gathers)
                return loss
            if not self._summary_groups:
                self._guard[ref.CALLS] += 1
                if self.guard_config.max_grad_norm is not None:
                    self._grad_norm.zero_()  # (clip_grad_norm_'s norm of no gradients)
            else:  # the other parts gather this call's summary
                self._decide_without_grads()
            self._count_call()
            return loss
        device = plan.device
        cfg = self.guard_config
        layouts = None if torch.compiler.is_compiling() else self._call_layouts
        groups = plan.group_tensors(self.param_groups, grads_per_group, layouts)
        # Telemetry rows: gradients of global numel > 0 (a DTensor's numel is global), so every
        # rank has the same rows; backends work on the local shards (distributed.py).
        guard = self._guard
        inv_scale, found_inf = _scaler_inputs(self, guard)
        # (a part without rows still sends its empty summary: every part gathers)
        rows = plan.telemetry_rows > 0 or bool(self._summary_groups)
        analyze = rows and self._telemetry_due(device, guard)
        check_finite = rows and cfg.skip_nonfinite
        # DCP's state-creating call is AdamW's alone: no reading, no decision, not counted
        # (every rank and stage is in that call together, so none gathers); nor clipped
        clip = rows and cfg.max_grad_norm is not None and not state_init
        measure = (isinstance(analyze, Tensor) or analyze or check_finite or clip) and not state_init
        groups = self._sharded.local_groups(groups, plan.has_dtensor)
        # Rows launched early (early_telemetry.py) are this call's: their list stands for the
        # plan's (joining several groups' grads again would cost ~60 us per 2000 tensors).
        served = early is not None and measure and early.serves(plan, backend)
        local_grads = early.rows if served else plan.telemetry_grads(groups)
        scale = guard[ref.SCALE]
        norm_out = self._norm_view() if clip else None
        if cfg.max_grad_norm is not None and not clip and not state_init:
            self._grad_norm.zero_()  # only 0-element gradients: clip_grad_norm_'s norm of them

        def decide(partials: Optional[Tensor]) -> Optional[Tensor]:
            """Rules 1-4 on this call's telemetry rows; returns the factor the update multiplies
            the gradients by (max_grad_norm; a fresh tensor each call), else None. The norm it
            is computed from goes into ``norm_out`` (last_grad_norm), a tensor made eagerly
            before any trace or capture, which compiled steps and graph replays write too."""
            if state_init:
                return None
            if measure:
                partials = self._sharded.reduce_partials_(partials, dtype=guard.dtype, device=device)
                if inv_scale is not None and partials is not None:  # the unscaled gradients' rows
                    partials = ref.unscale_partials(partials, inv_scale)
            before = guard.clone() if found_inf is not None else None
            summary, analyze_now = None, analyze
            if self._summary_groups:  # once on every call, measured or not: pipeline.py
                summary, rows_total = model_summary(self._summary_groups, partials, plan.numels, plan.numel_total,
                                                    cfg.use_max_rms, guard.dtype, device)
                analyze_now = only_rows_analyzed(analyze, rows_total)
            factor = None
            if clip:  # from the whole model's norm: after the DTensor reduction, over every stage
                if summary is not None:
                    norm = norm_out.copy_(summary[2])
                else:
                    norm = ref.rows_norm(partials, out=norm_out)
                factor = ref.clip_factor(norm, cfg.max_grad_norm)
            if inv_scale is not None:  # the update unscales as it reads
                factor = inv_scale if factor is None else factor * inv_scale
            if summary is not None:
                backend.decide_summary_(guard, summary, analyze=analyze_now, check_finite=check_finite, cfg=cfg)
            else:
                backend.decide_(guard, partials, plan.numels, plan.numel_total, analyze=analyze,
                                check_finite=check_finite, cfg=cfg)
            if found_inf is not None:
                guard.copy_(ref.kept_on_overflow(guard, before, found_inf))
            return factor

        if self.gate == "exact":
            skip = guard[ref.SKIP] if (check_finite or found_inf is not None) and not state_init else None
            # Rows launched early go to the backend's one-call step, which checks the update's
            # tensors before decide writes the guard, or where it has none (or declines) to the
            # passes one by one, as without them.
            partials = early.partials if served else None
            if not backend.exact_step_(groups, local_grads if measure else [], decide=decide, scale=scale, skip=skip,
                                       partials_dtype=guard.dtype, **({"partials": partials} if served else {})):
                if partials is None and measure and local_grads:
                    partials = (backend.telemetry(local_grads, guard.dtype) if inv_scale is None
                                else backend.scaled_telemetry(local_grads, inv_scale, guard.dtype))
                # Here decide writes the guard before the update checks its tensors: an update
                # that refuses them (a state moved through `.data` to one it does not take) must
                # leave the guard as it was, as the one-call steps do by checking first. Eager
                # calls (a traced step keeps no try); the copy is a few dozen float64.
                # (last_grad_norm's too: a refused call leaves the latest call's norm)
                kept = None if torch.compiler.is_compiling() else guard.clone()
                kept_norm = None if kept is None or norm_out is None else norm_out.clone()
                factor = decide(partials)
                try:
                    # (grad_factor only when clipping: a backend registered from outside without it works unclipped)
                    backend.adamw_(groups, scale=scale, skip=skip, **({} if factor is None else {"grad_factor": factor}))
                except BaseException:
                    if kept is not None:
                        guard.copy_(kept)
                    if kept_norm is not None:
                        norm_out.copy_(kept_norm)
                    raise
            # Eager calls only (a compiled step writes no attribute, nor launches early). A recipe
            # that served this call holds: kept, with the layouts the backend's tables were first
            # found by (their comparison is then one of identity, not of 48 bytes a param).
            if layouts is not None and not served:
                self._early_recipe = recipe_after(layouts, plan, backend)
        else:  # single_pass: update with the scale decided so far, decide for the next call
            if measure and local_grads:
                partials = backend.adamw_telemetry_(
                    groups, scale=scale, mask_nonfinite=check_finite, partials_dtype=guard.dtype
                )
            else:  # no telemetry, or none of the telemetry tensors has elements on this rank
                backend.adamw_(groups, scale=scale, skip=None)
                partials = None
            decide(partials)
        if not state_init:
            self._count_call()
        return loss

    def _decide_without_grads(self) -> None:
        """A call with no gradient at all on a pipeline stage or ZeRO partition: rules 1-4 on the
        other parts' summaries, gathered with an empty one from here (the gather is a collective)."""
        cfg, guard = self.guard_config, self._guard
        summary, rows_total = model_summary(self._summary_groups, None, None, None, cfg.use_max_rms, guard.dtype,
                                            guard.device)
        analyze = only_rows_analyzed(self._telemetry_due(guard.device, guard), rows_total)
        if cfg.max_grad_norm is not None:  # (the norm the other parts clip by: last_grad_norm)
            self._grad_norm.copy_(summary[2])
        # (the controller the stages with gradients run: the kernel unless backend="reference")
        summary_decide_(guard, summary, analyze=analyze, check_finite=cfg.skip_nonfinite, cfg=cfg,
                        use_kernel=self.backend != "reference")

    def _telemetry_due(self, device: torch.device, guard: Tensor) -> Union[bool, Tensor]:
        """Rule 2's schedule for this call: a host bool, or a device bool read from the guard's
        call count once a step has been captured in a CUDA graph (whose replays repeat the
        captured call's launches) and while torch.compile traces (a compiled graph is replayed
        too, and mode="reduce-overhead" captures it). The step then measures every call (no
        extra pass for the exact gate with the finite check, none for single_pass) and the
        schedule picks which calls the policy sees."""
        cfg = self.guard_config
        if not (cfg.auto_enabled and cfg.stats_freq > 1):
            return cfg.auto_enabled  # every call or none: no schedule to follow
        if torch.compiler.is_compiling():
            return cfg.telemetry_due(guard[ref.CALLS])
        self._schedule_on_device = self._schedule_on_device or stream_is_capturing(device)
        if self._schedule_on_device:
            return cfg.telemetry_due(guard[ref.CALLS])
        if guard.device.type == "cpu" and guard.untyped_storage().is_shared():  # (0.1 us; is_shared() 0.8)
            # Shared with another process (torch.multiprocessing; the shared-optimizer pattern):
            # its calls advance the guard's count, not this process's. CPU memory: no wait.
            return cfg.is_telemetry_call(int(guard[ref.CALLS]) + 1)
        return cfg.is_telemetry_call(self._calls + 1)

    # ------------------------------------------------------------------ telemetry
    @property
    def last_grad_norm(self) -> Optional[Tensor]:
        """With ``max_grad_norm``: the norm ``clip_grad_norm_`` would have returned in the latest
        call, for logging every step: the gradients' global L2 norm before clipping
        (GradScaler's unscaled one; under DDP/FSDP2 and with ``pipeline_group``, the whole
        model's), NaN or Inf for non-finite gradients, 0 for a call without gradients, NaN
        before the first call; a call that raised leaves it as it was, and so does an
        iteration GradScaler skips without calling ``step()`` (its own path: sharded params,
        pipeline stages). A copy, a 0-dim tensor in the guard's dtype (float64) on the guard's
        device (the params', as of the latest call with gradients), taken without waiting for
        the device (``float()`` waits, as on ``clip_grad_norm_``'s). None without
        ``max_grad_norm``. Copies and pickles of the optimizer keep it; ``state_dict()`` does
        not hold it, so ``load_state_dict`` leaves it as it was."""
        if self.guard_config.max_grad_norm is None:
            return None
        if self._grad_norm is None:  # (no step yet)
            self._keep_grad_norm_buffer()
        return self._norm_view().clone()

    def telemetry(self) -> Dict[str, Any]:
        """The guard's state as Python numbers. The one method that waits for the device.

        ``step``: calls so far; ``scale``: the current learning-rate multiplier; ``regime``:
        of the latest call that decided (None before any); ``grad_ms``, ``ratio``,
        ``signed_mean``, ``grad_norm``: of the latest call whose telemetry reached the analyzer
        (NaN before any); ``skipped_steps``: calls skipped for non-finite gradients; the
        ``policy``'s name, and its own state (``"zscore"``: ``z``, ``log_norm_mean``,
        ``log_norm_sd``, ``last_hot_call``). ``ratio`` is the published analyzer's: NaN under other policies.
        """
        policy = self.guard_config.policy
        if self._guard.device.type == "meta":
            raise RuntimeError("telemetry(): the guard is on the meta device, as the params were when the optimizer "
                               "was made; it moves to the params' device at the first step() after they are "
                               "materialised (to_empty)")
        v = self._guard.tolist()
        return {
            "policy": policy.name,
            "step": int(v[ref.CALLS]),
            "scale": v[ref.SCALE],
            "regime": ref.REGIMES[int(v[ref.REGIME])],
            "grad_ms": v[ref.GRAD_MS],
            "ratio": v[ref.RATIO],
            "signed_mean": v[ref.SIGNED_MEAN],
            "grad_norm": v[ref.GRAD_NORM],
            "skipped_steps": int(v[ref.SKIPPED]),
            **policy.telemetry(self._guard),
        }

    # ------------------------------------------------------------------ checkpoints
    @_run_eagerly
    def state_dict(self) -> Dict[str, Any]:
        """torch.optim.AdamW's state_dict plus ``"guard"``: the guard's state (call count
        included), policy, options and gate. The guard's state and policy name are also in the
        first param state, as in ``opt.state`` (``"lbw_guard"``; ``"lbw_guard_policy"``, the
        name's ASCII bytes as a uint8 tensor), so checkpoints made through
        torch.distributed.checkpoint.state_dict.get_optimizer_state_dict, which keeps only
        ``"state"`` and ``"param_groups"``, resume the guard too.

        torch.optim.Optimizer's hooks run as there: the pre-hooks first, the post-hooks in
        order on the complete dict (``"guard"`` and the copies in the param states included),
        a dict a post-hook returns taking the place of the one it was given."""
        self._guard_off_meta()
        self._attach_guard()
        # torch.optim.Optimizer.state_dict's packing and pre-hooks, without its post-hooks: they
        # run below, once the dict is complete
        post_hooks, self._optimizer_state_dict_post_hooks = self._optimizer_state_dict_post_hooks, OrderedDict()
        try:
            out = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        # Plain dicts (torch.load(weights_only=True) takes nothing else), with the same tensors.
        out["state"] = {pid: dict(entry) if isinstance(entry, dict) else entry for pid, entry in out["state"].items()}
        guard = self._guard.clone()  # both copies: this call's values, not the live tensor
        out["guard"] = {"state": guard, "config": asdict(self.guard_config),
                        "policy": self.guard_config.policy.name, "gate": self.gate}
        # The policy tag copied too: loads drop the entries that are the live tag or guard
        # (adopt_installed_state), and a ZeroRedundancyOptimizer checkpoint loaded back from
        # memory (its consolidation keeps this rank's CPU tensors as they are) would otherwise
        # lose its copies of the guard and start a fresh one.
        tag = self._policy_tag.clone()
        for entry in out["state"].values():  # (one entry; every one in a ZeRO partition's or pipeline stage's)
            if _GUARD_IN_PARAM_STATE[0] in entry:
                entry[_GUARD_IN_PARAM_STATE[0]] = guard
            if _GUARD_IN_PARAM_STATE[1] in entry:
                entry[_GUARD_IN_PARAM_STATE[1]] = tag
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a GuardedAdamW or torch.optim.AdamW state_dict (the latter starts a fresh guard).

        Everything is checked before anything is changed: a state_dict of another model
        (other group sizes or state shapes), AMSGrad state, a malformed guard entry or one of
        another policy raises ValueError and leaves the optimizer as it was. The guard's
        hyper-parameters and the policy's options stay this optimizer's (the checkpoint's are
        kept in ``state_dict()["guard"]["config"]`` for reference); its state is loaded.
        """
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._guard_off_meta()  # (the loaded guard goes to the live one's device)
        self._apply_loaded(*self._checked_state(state_dict)[:4])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _apply_loaded(self, groups, state, guard: Tensor, calls: int) -> None:
        self.__setstate__({"state": state, "param_groups": groups})
        self._guard, self._calls, self._plan = guard, calls, None
        self._attach_guard()
        self._schedule_on_device = False

    def adopt_installed_state(self, group=None) -> None:
        """Load the states put into ``self.state`` from outside as :meth:`load_state_dict` loads
        a checkpoint: ZeroRedundancyOptimizer.load_state_dict installs each param's saved state
        itself (zero.py). Checked the same way (a ValueError names what is wrong), moved to the
        params' devices and dtypes, and the guard taken from the copies the states carry (a
        fresh guard when none does: a torch.optim.AdamW checkpoint). Copies of the live guard
        are not the checkpoint's: states from before the load that it did not replace hold them.

        ``group``: ZeRO's ranks, when several. Then every rank's outcome is gathered first (a
        collective: every rank loads), so that all take the guard one of them found, or all
        start fresh, and an error on one rank is raised on every rank, with nothing applied.
        """
        index: Dict[int, int] = {}
        packed_groups = []
        for g in self.param_groups:
            ids = [index.setdefault(id(p), len(index)) for p in g["params"]]
            packed_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        live = (self._guard, self._policy_tag)
        packed_state = {
            index[id(p)]: {k: v for k, v in entry.items() if not any(v is x for x in live)}
            for p, entry in self.state.items() if id(p) in index and isinstance(entry, dict)
        }
        try:
            checked, error = self._checked_state({"state": packed_state, "param_groups": packed_groups}), None
        except ValueError as err:
            checked, error = None, str(err)
        if group is not None:
            checked = agree_on_loaded_guard(group, checked, error, self._guard)
        elif error is not None:
            raise ValueError(error)
        self._apply_loaded(*checked[:4])

    def checked_saved_group(self, saved: Dict[str, Any], params: List[Tensor], gi: int) -> Dict[str, Any]:
        """A checkpoint's param group ``gi`` over ``params``: this optimizer's defaults, then
        the saved hyper-parameters, checked (ValueError naming it); nothing changed. Also
        what a ZeroRedundancyOptimizer's load checks first (zero.py), since ZeRO copies the
        saved hyper-parameters into its local optimizer's groups itself."""
        if saved.get("amsgrad", False):
            raise ValueError(f"state_dict param_groups[{gi}] uses amsgrad, which GuardedAdamW does not")
        group = {**self.defaults, **saved, "params": params}
        check_group_hyperparameters(group, f"state_dict param_groups[{gi}]: ")
        return group

    def _checked_state(self, state_dict: Dict[str, Any]):
        """``state_dict`` checked and converted, nothing changed yet: (groups, state, guard, call
        count, whether the guard came from the state_dict)."""
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} entry")
        saved_groups = deepcopy(state_dict["param_groups"])
        if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups
        ):
            raise ValueError("state_dict['param_groups'] must be a list of dicts, each with a 'params' list")
        if not isinstance(state_dict["state"], dict):
            raise ValueError(f"state_dict['state'] must be a dict, got {type(state_dict['state']).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}: it is from another model"
            )
        id_map = {}
        groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict param_groups[{gi}] has {len(saved['params'])} params, this "
                    f"optimizer's {len(group['params'])}: it is from another model"
                )
            id_map.update(zip(saved["params"], group["params"]))
            checked = self.checked_saved_group(saved, group["params"], gi)
            if "param_names" in group and "param_names" not in checked:  # (kept, as torch's update_group keeps them)
                checked["param_names"] = group["param_names"]
            groups.append(checked)

        state = OptimizerState()
        riders: List[Dict[str, Any]] = []
        for pid, saved in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"state_dict has state for param id {pid!r}, which no group lists")
            p = id_map[pid]
            if not isinstance(saved, dict):
                raise ValueError(f"state_dict state[{pid!r}] must be a dict, got {type(saved).__name__}")
            if _GUARD_IN_PARAM_STATE[0] in saved:  # (in every state of a ZeRO partition's or pipeline stage's)
                rider = {"state": saved[_GUARD_IN_PARAM_STATE[0]],
                         "policy": _policy_name(saved.get(_GUARD_IN_PARAM_STATE[1])),
                         "where": f"state_dict['state'][{pid!r}]['{_GUARD_IN_PARAM_STATE[0]}']"}
                # one whose tag another optimizer's load cast is stale: left out (a fresh guard)
                if rider["policy"] is not None and (
                        not riders or rider["state"] is not riders[-1]["state"] or rider["policy"] != riders[-1]["policy"]):
                    riders.append(rider)  # (one tensor in many states: compared once)
            keys = set(saved) - set(_GUARD_IN_PARAM_STATE)
            if not keys:
                # No AdamW state yet, as torch.optim.AdamW loads it: a lookup on torch's
                # defaultdict state (``opt.state[p]``) saves one, and torch.distributed.checkpoint's
                # set_optimizer_state_dict (flatten_optimizer_state_dict=True) makes one for every
                # param that requires grad. Kept empty; the param's first step with a grad fills it.
                state[p] = state.adopt({})
                continue
            if keys != set(_STATE_KEYS):
                raise ValueError(
                    f"state_dict state[{pid!r}] has keys {sorted(keys)}, expected {sorted(_STATE_KEYS)}"
                )
            for key in ("exp_avg", "exp_avg_sq"):
                _check_saved_tensor(saved[key], f"state_dict state[{pid!r}][{key!r}]")
                if tuple(saved[key].shape) != tuple(p.shape):
                    raise ValueError(
                        f"state_dict state[{pid!r}][{key!r}] has shape {tuple(saved[key].shape)}, "
                        f"the param {tuple(p.shape)}: it is from another model"
                    )
                if is_dtensor(p) and not is_dtensor(saved[key]):
                    # (the global shapes agree; every step would then meet the full tensor
                    # beside the param's local shard, and raise)
                    raise ValueError(
                        f"state_dict state[{pid!r}][{key!r}] is a full tensor and its param a DTensor: load a "
                        "sharded checkpoint into sharded params (torch.distributed.checkpoint, or "
                        "get/set_optimizer_state_dict with full_state_dict=True, which shards it)"
                    )
                # (the same checkpoint on every rank is refused here on every rank alike)
                differs = dtensor_spec_differs(saved[key], p) if is_dtensor(saved[key]) else None
                if differs:
                    raise ValueError(
                        f"state_dict state[{pid!r}][{key!r}] {differs}: load a checkpoint sharded as the params "
                        "are (torch.distributed.checkpoint reshards a saved one into the load template's placements)"
                    )
            step = saved["step"]
            if isinstance(step, Tensor):
                _check_saved_tensor(step, f"state_dict state[{pid!r}]['step']")
                if step.numel() != 1:
                    raise ValueError(f"state_dict state[{pid!r}]['step'] must hold one value, got shape {tuple(step.shape)}")
            elif isinstance(step, bool) or not isinstance(step, (int, float)):  # (older torch saved numbers)
                raise ValueError(f"state_dict state[{pid!r}]['step'] must be a number or a tensor, got {type(step).__name__}")
            dtype = ref.state_tensor_dtype(p.dtype)
            state[p] = state.adopt({
                # (a number made a tensor on the CPU, not on torch's default device)
                "step": (step if isinstance(step, Tensor) else torch.tensor(step, device="cpu")).to(
                    p.device, torch.float32, copy=True).reshape(()),
                "exp_avg": saved["exp_avg"].to(p.device, dtype, copy=True),
                "exp_avg_sq": saved["exp_avg_sq"].to(p.device, dtype, copy=True),
            })

        if len(riders) > 1:
            _check_copies_agree(riders)
        guard_in_param_state = riders[0] if riders else None
        guard_entry = state_dict.get("guard")
        if guard_entry is not None and not isinstance(guard_entry, dict):
            raise ValueError(f"state_dict['guard'] must be a dict, got {type(guard_entry).__name__}")
        policy = self.guard_config.policy
        if guard_entry is None:
            guard_entry = guard_in_param_state
        elif guard_in_param_state is not None and not _same_values(guard_entry.get("state"), guard_in_param_state["state"]):
            raise ValueError(f"state_dict['guard']['state'] and {guard_in_param_state['where']} differ")
        if guard_entry is None:  # a torch.optim.AdamW checkpoint: the guard starts fresh
            return groups, state, ref.new_guard_state(self._guard.device, policy), 0, False
        where = guard_entry.get("where", "state_dict['guard']['state']")
        saved_guard = guard_entry.get("state")
        saved_policy = guard_entry.get("policy", "lbw")  # checkpoints from before policies: lbw
        if saved_policy != policy.name:
            raise ValueError(
                f"{where} is of policy {saved_policy!r}, this optimizer's policy is "
                f"{policy.name!r}: construct GuardedAdamW with policy={saved_policy!r} to load it"
            )
        size = ref.state_size(policy)
        old_calls = guard_entry.get("calls")
        if isinstance(saved_guard, Tensor) and saved_guard.numel() == size - 1 and old_calls is not None:
            # a checkpoint from before the call count moved into the state (then: "calls")
            if isinstance(old_calls, bool) or not isinstance(old_calls, int) or old_calls < 0:
                raise ValueError(f"state_dict['guard']['calls'] must be an int >= 0, got {old_calls!r}")
            flat = saved_guard.detach().reshape(-1)
            saved_guard = torch.cat([flat[: ref.CALLS], flat.new_tensor([old_calls]), flat[ref.CALLS :]])
        if not isinstance(saved_guard, Tensor) or saved_guard.numel() != size:
            raise ValueError(f"{where} must be a tensor of {size} values")
        _check_saved_tensor(saved_guard, where)
        if saved_guard.dtype not in (torch.float32, torch.float64):  # (MPS keeps float32 guards)
            raise ValueError(f"{where} must be float32 or float64, got {saved_guard.dtype}: a guard cast to a half "
                             "precision no longer holds the run's counts (whole only up to 2048 in float16)")
        guard = saved_guard.to(self._guard.device, self._guard.dtype, copy=True).reshape(-1)
        values = guard.tolist()  # loading a checkpoint may wait for the device
        check_guard_values(values, where, policy)
        return groups, state, guard, int(values[ref.CALLS]), True


def _check_copies_agree(riders: List[Dict[str, Any]]) -> None:
    """The guard's copies in several param states (a ZeroRedundancyOptimizer's checkpoint: every
    state holds one) hold the same values and policy: compared in one batch, one host read."""
    first = riders[0]
    if not isinstance(first["state"], Tensor):
        return  # (refused as it is checked for loading)
    for rider in riders[1:]:
        same_shape = isinstance(rider["state"], Tensor) and rider["state"].shape == first["state"].shape
        if not same_shape or rider["policy"] != first["policy"]:
            raise ValueError(f"{rider['where']} and {first['where']} differ")
    copies = torch.stack([r["state"].detach().to(first["state"].device, torch.float64) for r in riders])
    same = (copies == copies[:1]) | (copies.isnan() & copies[:1].isnan())
    differs = (~same).reshape(len(riders), -1).any(1).tolist()
    if any(differs):
        raise ValueError(f"{riders[differs.index(True)]['where']} and {first['where']} differ")


def _check_saved_tensor(t: Any, where: str) -> None:
    """A checkpoint's tensor that is copied into the optimizer: dense, real floating-point, with data."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided or not t.is_floating_point() or t.device.type == "meta":
        raise ValueError(f"{where} must be a dense real floating-point tensor with data, got a {t.layout} {t.dtype} "
                         f"tensor on {t.device}")


Guard = GuardedAdamW
