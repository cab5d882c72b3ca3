"""Device-side chunk tables: which memory one launch visits, built once per storage layout.

A *plan* turns lists of tensors into small int64 tables of raw addresses, so one launch per
dtype covers every tensor of every group (the multi-tensor-apply idea of apex/torch foreach,
with the table kept on the device between calls). Tables are keyed by the tensors' storage
(``data_ptr``), sizes, dtypes and the group hyper-parameters; a plan is rebuilt only when one
of those changes (grads set to None and reallocated elsewhere, params or states replaced,
groups edited). Plans hold addresses, never the tensors themselves: holding a gradient would
keep its memory alive after the user drops it.

Telemetry rows are numbered in the order of :func:`lbw_kernels.backends.nonempty_grads`;
each non-empty gradient owns ``ceil(numel / chunk)`` consecutive chunk rows of the partials
workspace, so the per-tensor reduction reads a contiguous range in a fixed order, and one
counter (the chunks of it done so far in a pass; see telemetry.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from operator import methodcaller
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lbw_kernels.element_order import element_order
from lbw_kernels.stream_use import upload
from lbw_kernels.validation import check_state_tensors

from .pointers import BF16, DTYPE_CODES, FP16, FP32, FP64

# Columns of the per-tensor table of an update plan (int64).
P, G, M, V, STEP, NUMEL, GROUP = range(7)
TENSOR_COLS = 8
# Columns of the per-group hyper-parameter table (float64); LR is read through LR_PTRS.
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, SIGN = range(6)
GROUP_COLS = 8
# The GroupTensors field each hyper-parameter column holds.
HYPER_FIELDS = {LR: "lr", BETA1: "beta1", BETA2: "beta2", EPS: "eps", WEIGHT_DECAY: "weight_decay"}
# Per-tensor AdamW coefficients (float32), written by the coefficient kernel each call.
COEF_COLS = 16

_ptr = methodcaller("data_ptr")
_numel = methodcaller("numel")


def _layout_key_python(tensors: Sequence[Tensor]) -> tuple:
    strides = tuple((i, t.stride()) for i, t in enumerate(tensors) if not t.is_contiguous())
    return tuple(map(_ptr, tensors)) + tuple(map(_numel, tensors)) + tuple(t.dtype for t in tensors) + strides


def _key_function():
    """``layout_key``: (address, numel, dtype) of every tensor and the strides of those that are
    not contiguous (a grad buffer reused with other strides must not find the old plan: the
    kernels walk p, g, m, v in one element order; a state moved through `.data` to a view of
    itself, or to another dtype the allocator put at the freed address, must not either). From
    the C++ extension when it is built (one call reads a list into one bytes object: ~0.05 ms
    for 2000 tensors against ~0.75 ms of Python, and a bytes key hashes and compares at memory
    speed), else in Python. Either way every call reads every tensor's address: a table must
    never outlive its memory."""
    try:
        from lbw_kernels._C import _layout_key
    except ImportError:  # the extension is optional; so are its attributes in an older build
        return _layout_key_python
    return _layout_key


layout_key = _key_function()


@dataclass
class ChunkList:
    """Chunks of the tensors of one dtype (update lists: of one param and one grad dtype) and
    alignment: rows of ``table`` are one program each.

    Update lists: ``(tensor row, first element, partial row, telemetry row)``. Telemetry-only
    lists: ``(gradient address, numel, first element, partial row, telemetry row)``.
    """

    code: int
    table: Tensor
    n_chunks: int
    # Every address of its tensors a multiple of 16 bytes (enables vector access). Lists are
    # split by it (one launch each), so one tensor off 16 bytes (a view into a flat buffer)
    # takes only itself to scalar access, and a tensor's telemetry bits follow its own
    # alignment, not that of the others of its dtype.
    aligned: bool
    # Update lists: the grads' dtype code (the params' but for bf16/fp16 params holding fp32
    # grads, UPDATE_GRAD_CODES); telemetry lists: ``code`` is the grads'.
    g_code: int = -1


@dataclass
class TelemetryLayout:
    n_tensors: int  # non-empty gradients
    n_chunks: int
    first_chunk: Tensor  # [n_tensors + 1] int64: tensor t owns partial rows [first[t], first[t+1])
    workspace: Tensor  # [n_chunks, 2] float64 per-chunk (sum g^2, sum g)
    counters: Tensor  # [n_tensors] int32: chunks of tensor t done so far in a pass (0 between passes)
    lists: List[ChunkList]  # telemetry-only passes (the exact gate; delegated params' grads in single_pass)
    keep: List[Tensor] = field(default_factory=list)  # pinned sources of async uploads
    # Gradients that are not dense (expanded, gapped: what a kernel cannot walk as a flat array)
    # are read from a dense buffer of the layout's own, copied into before each pass: (index of
    # the gradient in the list the layout was built over, buffer). See stage_.
    staged: List[Tuple[int, Tensor]] = field(default_factory=list)
    # The streams a cached CUDA layout is used on (lbw_kernels/stream_use.py; set when cached).
    stream_use: Any = None


@dataclass
class UpdatePlan:
    tensors: Tensor  # [N, TENSOR_COLS] int64
    n_tensors: int
    hyper: Tensor  # [n_groups, GROUP_COLS] float64
    lr_ptrs: Tensor  # [n_groups] int64: where each group's lr (float64) is read
    # Per group, per hyper-parameter column (LR .. WEIGHT_DECAY): the float last written to hyper
    # when read on the host (None: a device tensor, read or copied on the device)
    host_floats: List[List[Optional[float]]]
    copies: List[Tuple[int, int]]  # (group, column): device tensors copied into hyper each call
    copy_slots: List[Tensor]  # the 0-dim views of hyper they are copied into (made once)
    coefs: Tensor  # [N, COEF_COLS] float32
    updates: List[ChunkList]
    telemetry: TelemetryLayout
    delegated: List[Tuple[int, List[int]]]  # (group, tensor indices) updated by the reference
    keep: List[Tensor] = field(default_factory=list)  # pinned sources of async uploads
    # Used while a CUDA graph was captured: the graph's replays rewrite hyper with the values
    # of capture time, so eager calls must write their lr whether or not it changed.
    captured: bool = False
    stream_use: Any = None  # as TelemetryLayout's


def _upload(rows: Sequence[Sequence], cols: int, dtype: torch.dtype, device: torch.device, keep: list) -> Tensor:
    # (without blocking, the plan keeping the pinned source: stream_use.upload)
    host = (torch.tensor(list(rows), dtype=dtype, device="cpu").reshape(-1, cols) if rows
            else torch.zeros((0, cols), dtype=dtype, device="cpu"))
    return upload(host, device, keep)


def _telemetry_source(g: Tensor, index: int, staged: List[Tuple[int, Tensor]]) -> Tensor:
    """What the telemetry kernel reads for gradient ``g`` (``index`` in the list the layout is
    built over): ``g`` itself when dense in any order, else a dense buffer, recorded in
    ``staged``, that stage_ fills before each pass. torch lets a .grad be any tensor of the
    param's shape (an expanded one, a slice with a step); the sums do not depend on the order."""
    if element_order(g) is not None:
        return g
    buffer = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    staged.append((index, buffer))
    return buffer


def stage_(layout: TelemetryLayout, grads: Sequence[Tensor]) -> None:
    """Copy the gradients the layout reads through buffers of its own (``layout.staged``) into
    them: one device copy each, before the pass that reads them. ``grads``: the list the layout
    was built over (for an update plan's, every grad of its groups in order)."""
    for index, buffer in layout.staged:
        buffer.copy_(grads[index])


def _chunk_starts(numel: int, chunk: int) -> range:
    return range(0, numel, chunk)


# ---------------------------------------------------------------------------------------
# Cache keys: the only per-call Python work proportional to the number of tensors. A key is
# (kind, layout): kind a small tuple (device, pass, chunk, group hyper-parameters), layout
# the bytes objects of layout_key (tens of kB for thousands of tensors).
# ---------------------------------------------------------------------------------------
def telemetry_key(grads: Sequence[Tensor], chunk: int, device: torch.device) -> Tuple[tuple, tuple]:
    return (device, "telemetry", chunk), (layout_key(grads),)


def exact_telemetry_key(layouts: Sequence[Optional[bytes]], grads: Sequence[Tensor], chunk: int,
                        device: torch.device) -> Tuple[tuple, tuple]:
    """The exact gate's telemetry pass over ``grads`` (the nonempty grads of the groups whose
    ``layouts`` these are): keyed by the params' and grads' layouts the optimizer gathered this
    call (``GroupTensors.layout_key``; they fix those gradients) when it did, a lookup with no
    walk over any tensor list."""
    gathered = tuple(layouts)
    if any(k is None for k in gathered):
        return telemetry_key(grads, chunk, device)
    return (device, "exact telemetry", chunk), gathered


def read_on_host(value: Any, device: torch.device) -> bool:
    """Whether a group's hyper-parameter is read on the host each call: a number, or a
    one-element CPU tensor while the params are on a GPU (reading it waits for nothing, and a
    pageable host-to-device copy could not be captured in a CUDA graph). A tensor on the
    params' device is copied into ``hyper`` on the device instead (no sync), so an in-place
    edit of it (a scheduler's ``fill_``) is seen, as the reference sees it."""
    return not isinstance(value, Tensor) or (value.device.type == "cpu" and device.type != "cpu")


def _hyper_key(value: Tensor, device: torch.device) -> Any:
    # A device tensor by its address, never by its value (reading it would sync, and an
    # in-place edit keeps the key: its value is copied each call instead).
    return ("tensor", value.data_ptr(), value.dtype, value.device)


def update_key(groups: Sequence[Any], chunk: int, device: torch.device) -> Tuple[tuple, tuple]:
    # Every tensor's layout, every call: optimizer state can be moved behind the optimizer's
    # back (state offload through `.data`), and a stale table would write through freed memory.
    kind: List[Any] = [device, "update", chunk]
    layout: List[Any] = []
    for g in groups:
        # Hyper-parameters read on the host are rewritten with fill_ when they change
        # (refresh_hyper), not keyed: a schedule of lr, betas (OneCycleLR cycles beta1 every
        # step), eps or weight_decay would otherwise build and upload a plan every call.
        kind.append(tuple("host" if read_on_host(v, device) else _hyper_key(v, device)
                          for v in (getattr(g, name) for name in HYPER_FIELDS.values())) + (g.maximize,))
        # The params and grads as the optimizer gathered them this call, when it did (every
        # param of the group: the sub-list with grads follows from it), else read here.
        gathered = g.layout_key
        layout += ((gathered,) if gathered is not None else (layout_key(g.params), layout_key(g.grads)))
        # The states by address, numel, dtype and strides: a state moved through `.data` to a
        # tensor at the same address (a view of itself, another dtype the allocator put in the
        # freed block) must rebuild the plan, whose build checks it (check_state_tensors).
        layout += (layout_key(g.exp_avgs), layout_key(g.exp_avg_sqs), layout_key(g.steps))
    return tuple(kind), tuple(layout)


class PlanCache:
    """The most recent plans: update plans, and telemetry layouts (the exact gate's, keyed by the
    layouts the optimizer gathered, and those of direct ``telemetry`` calls: compiled steps).

    Found by kind (hashed), then told apart by layout (compared). A dict keyed by the whole
    key would hash every layout bytes object afresh each call (the objects are new each call
    and Python hashes bytes at a few GB/s): ~60 us per update lookup for 2000 tensors on a
    2-core Xeon, against ~15 us to compare them with the cached plan's (memcmp).
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        # One cache serves every Triton optimizer of the process, and optimizers stepped in
        # threads look plans up at once: each lookup, build and eviction holds the lock (without
        # it a lookup that moved an entry while another thread evicted raised, and the size count
        # drifted from the entries for good). Reentrant: a build may look another plan up.
        self._lock = threading.RLock()
        # kind -> [[layout, plan, last use]], most recently used first
        self._plans: Dict[tuple, List[list]] = {}
        self._size = 0
        self._clock = 0
        self.builds = 0  # how many plans were built (tests check reuse and rebuilds)
        self.kept: List[Any] = []  # plans a CUDA graph captured: never freed (see keep)

    def get(self, key: Tuple[tuple, tuple], build) -> Any:
        """The plan of ``key``; ``build()`` makes (and caches) it when there is none, and
        ``build=None`` returns None instead."""
        with self._lock:
            return self._get(key, build)

    def _get(self, key: Tuple[tuple, tuple], build) -> Any:
        kind, layout = key
        self._clock += 1
        entries = self._plans.get(kind)
        if entries is not None:
            for i, entry in enumerate(entries):
                if entry[0] == layout:
                    entry[2] = self._clock
                    if i:
                        entries.insert(0, entries.pop(i))
                    return entry[1]
        if build is None:
            return None
        plan = build()
        self.builds += 1
        self._plans.setdefault(kind, []).insert(0, [layout, plan, self._clock])
        self._size += 1
        while self._size > self.capacity:
            # The least recently used plan goes, whatever its kind: kinds are used together (an
            # exact call looks up its telemetry layout, then its update plan), so evicting by
            # kind would drop the one live plan of the kind looked up first in every call.
            oldest_kind, oldest = min(
                ((k, entries[-1]) for k, entries in self._plans.items()), key=lambda ke: ke[1][2]
            )
            self._plans[oldest_kind].pop()
            if not self._plans[oldest_kind]:
                del self._plans[oldest_kind]
            self._size -= 1
        return plan

    def keep(self, plan: Any) -> None:
        """Hold ``plan`` for the life of the process, evicted or not: a CUDA graph that captured
        a launch from it replays from its tables' and workspaces' addresses (the CUDA backend
        keeps its captured tables the same way: csrc/bindings/ops_cuda.cpp). Grows with the
        layouts ever captured (graphs re-recorded for new shapes add theirs), not with calls."""
        with self._lock:
            if not any(kept is plan for kept in self.kept):
                self.kept.append(plan)

    def plans(self) -> List[Any]:
        """Every cached plan (tests inspect their workspaces)."""
        with self._lock:
            return [entry[1] for entries in self._plans.values() for entry in entries]

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._size = 0


# ---------------------------------------------------------------------------------------
# Builders (run once per layout; plain Python loops are fine here)
# ---------------------------------------------------------------------------------------
def _layout(numels: Sequence[int], chunk: int, device: torch.device, keep: list) -> Tuple[List[int], dict]:
    """First chunk row of each tensor, and the TelemetryLayout fields but its lists."""
    first = [0]
    for n in numels:
        first.append(first[-1] + -(-n // chunk))
    return first, dict(
        n_tensors=len(numels), n_chunks=first[-1],
        first_chunk=_upload([[f] for f in first], 1, torch.int64, device, keep).reshape(-1),
        workspace=torch.empty((first[-1], 2), dtype=torch.float64, device=device),
        counters=torch.zeros(len(numels), dtype=torch.int32, device=device),
    )


def _chunk_lists(rows_by_kind: Dict[Tuple, list], cols: int, device, keep) -> List[ChunkList]:
    """One list per kind that has rows: (dtype code, aligned), and for update lists the grads'
    dtype code after them."""
    return [
        ChunkList(kind[0], _upload(rows, cols, torch.int64, device, keep), len(rows), kind[1], *kind[2:])
        for kind, rows in sorted(rows_by_kind.items())
        if rows
    ]


# The (param, grad) dtype codes of the update kernel when they differ: bf16/fp16 params with
# fp32 grads (torch >= 2.10's grad_dtype; the math is fp32 either way). Other pairs go to the
# reference.
UPDATE_GRAD_CODES = {(BF16, FP32), (FP16, FP32)}


def build_telemetry(grads: Sequence[Tensor], chunk: int, device: torch.device) -> TelemetryLayout:
    """Layout of the exact gate's telemetry pass over ``grads`` (all non-empty)."""
    keep: list = []
    staged: List[Tuple[int, Tensor]] = []
    first, fields = _layout([g.numel() for g in grads], chunk, device, keep)
    rows: Dict[Tuple[int, bool], list] = {}
    for t, g in enumerate(grads):
        code = _code(g.dtype, "gradient")
        addr = _telemetry_source(g, t, staged).data_ptr()
        for c, start in enumerate(_chunk_starts(g.numel(), chunk)):
            rows.setdefault((code, addr % 16 == 0), []).append((addr, g.numel(), start, first[t] + c, t))
    return TelemetryLayout(**fields, lists=_chunk_lists(rows, 5, device, keep), keep=keep, staged=staged)


def _code(dtype: torch.dtype, what: str) -> int:
    if dtype not in DTYPE_CODES:
        raise TypeError(f"the Triton backend supports fp32, bf16, fp16 and fp64 {what}s, got {dtype}")
    return DTYPE_CODES[dtype]


def build_update(groups: Sequence[Any], chunk: int, device: torch.device) -> UpdatePlan:
    """Plan of one guarded-AdamW pass over ``groups`` (``GroupTensors``), telemetry included.

    *Delegated* to the reference update: fp64 params (their math is fp64), params whose grad
    has another dtype (except bf16/fp16 params with fp32 grads, torch >= 2.10's ``grad_dtype``,
    which the kernel reads: UPDATE_GRAD_CODES), and
    params whose p, grad, exp_avg and exp_avg_sq do not all hold their elements in one order (a
    grad of other strides than its param's, a param sliced with a step: the update kernel walks
    the four as flat arrays; a grad that is not dense). Their gradients are still read by the
    telemetry kernel (a grad that is not dense through a buffer: _telemetry_source) so the
    partials keep the order of ``nonempty_grads``.
    """
    keep: list = []
    staged: List[Tuple[int, Tensor]] = []
    flat = 0  # index of the current grad among all the groups' grads (stage_'s list)
    tensor_rows, group_rows = [], []
    update_rows: Dict[Tuple[int, bool], list] = {}
    tel_rows: Dict[Tuple[int, bool], list] = {}
    delegated: List[Tuple[int, List[int]]] = []
    numels = [g.numel() for group in groups for g in group.grads if g.numel() > 0]
    first, fields = _layout(numels, chunk, device, keep)
    tel = 0
    for gi, group in enumerate(groups):
        values = [getattr(group, name) for name in HYPER_FIELDS.values()]  # LR .. WEIGHT_DECAY
        group_rows.append(
            tuple(float(v) if read_on_host(v, device) else 0.0 for v in values)  # 0.0: copied in each call
            + (-1.0 if group.maximize else 1.0, 0.0, 0.0)
        )
        delegated_idx = []
        for ti, (p, g, m, v, s) in enumerate(zip(group.params, group.grads, group.exp_avgs, group.exp_avg_sqs, group.steps)):
            code = _code(p.dtype, "param")
            if g.shape != p.shape:
                raise TypeError(f"group {gi} param {ti}: grad {g.dtype}{tuple(g.shape)} does not match param {p.dtype}{tuple(p.shape)}")
            # (a param moved through `.data` with its states, as an offload library does, keeps
            # its Parameter: the optimizer's checks saw the first param's device; a launch on
            # this one would be handed another device's addresses)
            for what, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v), ("step", s)):
                if t.device != device:
                    raise ValueError(f"group {gi} param {ti}: its {what} is on {t.device}, the step's params on {device}")
            # The states as the update finds them: a key of new addresses (state moved through
            # `.data`) may bring a tensor of another shape, which the kernel would write past.
            check_state_tensors(p, m, v, s, f"the state of the step's group {gi}, param {ti}")
            n = p.numel()
            flat += 1
            g_code = _code(g.dtype, "gradient")
            orders = {element_order(t) for t in (p, g, m, v)}  # (None: not dense)
            if (code == FP64 or (g_code != code and (code, g_code) not in UPDATE_GRAD_CODES)
                    or None in orders or len(orders) > 1):
                delegated_idx.append(ti)
                if n > 0:  # its telemetry still comes from the kernel, which reads the grad's dtype
                    addr = _telemetry_source(g, flat - 1, staged).data_ptr()
                    kind = (g_code, addr % 16 == 0)
                    for c, start in enumerate(_chunk_starts(n, chunk)):
                        tel_rows.setdefault(kind, []).append((addr, n, start, first[tel] + c, tel))
                    tel += 1
                continue
            row = len(tensor_rows)
            tensor_rows.append((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr(), n, gi, 0))
            addrs = (p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr())
            kind = (code, all(a % 16 == 0 for a in addrs), g_code)
            if n > 0:
                for c, start in enumerate(_chunk_starts(n, chunk)):
                    update_rows.setdefault(kind, []).append((row, start, first[tel] + c, tel))
                tel += 1
        if delegated_idx:
            delegated.append((gi, delegated_idx))

    hyper = _upload(group_rows, GROUP_COLS, torch.float64, device, keep)
    lr_ptrs, host_floats, copies = [], [], []
    for gi, group in enumerate(groups):
        lr = group.lr
        slot = hyper.data_ptr() + gi * GROUP_COLS * hyper.element_size()
        host_floats.append([float(getattr(group, name)) if read_on_host(getattr(group, name), device) else None
                            for name in HYPER_FIELDS.values()])
        if read_on_host(lr, device):
            lr_ptrs.append(slot)
        elif lr.dtype == torch.float64 and lr.device == device and lr.numel() == 1:
            lr_ptrs.append(lr.data_ptr())  # read in place: a scheduler's fill_ is seen on the device
        else:
            lr_ptrs.append(slot)  # another dtype: copied into the slot each call
            copies.append((gi, LR))
        copies += [(gi, col) for col in (BETA1, BETA2, EPS, WEIGHT_DECAY)
                   if not read_on_host(getattr(group, HYPER_FIELDS[col]), device)]
    telemetry = TelemetryLayout(**fields, lists=_chunk_lists(tel_rows, 5, device, keep), keep=keep, staged=staged)
    updates = _chunk_lists(update_rows, 4, device, keep)
    return UpdatePlan(
        tensors=_upload(tensor_rows, TENSOR_COLS, torch.int64, device, keep),
        n_tensors=len(tensor_rows),
        hyper=hyper,
        lr_ptrs=_upload([[a] for a in lr_ptrs], 1, torch.int64, device, keep).reshape(-1),
        host_floats=host_floats,
        copies=copies,
        copy_slots=[hyper[gi, col] for gi, col in copies],
        coefs=torch.empty((len(tensor_rows), COEF_COLS), dtype=torch.float32, device=device),
        updates=updates,
        telemetry=telemetry,
        delegated=delegated,
        keep=keep,
    )


def refresh_hyper(plan: UpdatePlan, groups: Sequence[Any]) -> None:
    """Bring ``plan.hyper`` up to date with the groups: a hyper-parameter read on the host is
    written with ``fill_`` (a kernel with the value as argument: no host sync) when it changed,
    or every call once a CUDA graph has captured the plan (its replays write their own), one
    small launch each; tensors on the device are copied device to device, all in one launch."""
    for gi, lasts in enumerate(plan.host_floats):
        for col, name in HYPER_FIELDS.items():  # (lasts is indexed by column, as hyper's rows)
            last = lasts[col]
            if last is not None:
                value = float(getattr(groups[gi], name))
                if value != last or plan.captured:
                    plan.hyper[gi, col].fill_(value)
                    lasts[col] = value
    if plan.copies:
        sources = [getattr(groups[gi], HYPER_FIELDS[col]) for gi, col in plan.copies]  # (0-dim)
        torch._foreach_copy_(plan.copy_slots, sources, non_blocking=True)
