"""Device tensors kept from call to call, used from more than one CUDA stream.

The Triton backend's cached plans (tables uploaded, workspaces allocated), the optimizer's
step plan (its element counts on the device) and the small index tensors of ``KeptCopy`` are
made on the stream that was current when they were built; the caching allocator ties their
blocks to that stream. A later call on another stream (a step on a side stream after one on
the default stream) reads them there.
Two things then need saying, once per plan and stream:

* that stream waits for the plan's uploads (an event recorded after the build), which are
  otherwise ordered before it only by the caller's own stream syncs;
* the allocator is told that stream uses each of the plan's device tensors
  (``Tensor.record_stream``): a plan evicted from the cache (or replaced, when the params'
  layout changes) frees them, and without it their blocks go back to the build stream's pool
  at once, where an allocation can take and overwrite them while a launch queued on the other
  stream has yet to read them.

A plan's own stream costs one comparison per call. Streams are told apart by their raw
handles: torch's streams (the default one, its pools) live as long as the process, but an
external stream destroyed and another created at the same address, or CUDA's per-thread
default stream (one handle for every thread), would pass for one already handled. Nothing is
done while the stream is captured into a CUDA graph (a captured wait on an event recorded
outside the capture is an error; plans a graph uses are kept for good, ``PlanCache.keep``);
the first eager call on that stream does it. The CUDA backend does the same for its tables
(csrc/bindings/ops_cuda.cpp, ``use_on``).

The uploads themselves go from pinned memory without blocking (``upload``): a pageable
host-to-device copy waits for the device, behind whatever the stream still has queued, and
fails while a CUDA graph is captured. :class:`KeptCopy` is one small host tensor kept on the
device this way (the DTensor row maps, the C++ backend's row orders).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, List, Optional, Set

import torch
from torch import Tensor


def stream_is_capturing(device: torch.device) -> bool:
    """True while ``device``'s current CUDA stream is being captured into a graph (that device's,
    not the current device's: a step on cuda:1 while cuda:0 is current launches on cuda:1's)."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def upload(host: Tensor, device: torch.device, keep: List[Tensor]) -> Tensor:
    """``host`` (a CPU tensor) on ``device``. To a GPU from pinned memory without blocking; the
    pinned source goes to ``keep``, which the caller holds as long as the copy: it must outlive
    the copy, and a copy made while a CUDA graph is captured is recorded into the graph, whose
    replays read the source again."""
    if device.type != "cuda":
        return host.to(device)
    host = host.pin_memory()
    keep.append(host)
    return host.to(device, non_blocking=True)


def _current_stream_id(device: torch.device) -> int:
    # (the raw handle, read without making a Stream object: this runs every call)
    return torch._C._cuda_getCurrentRawStream(device.index)


class StreamUse:
    """The build stream of one plan, an event after its uploads, and the other streams that
    have launched from it."""

    def __init__(self, device: torch.device):
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.home = _current_stream_id(self.device)
        self.uploaded = torch.cuda.Event()
        self.uploaded.record(torch.cuda.current_stream(self.device))
        self.others: Set[int] = set()

    def enter(self, held: Any) -> None:
        """Before a launch that reads ``held`` (a plan, or the tensors made with this StreamUse)
        on the current stream of its device."""
        stream = _current_stream_id(self.device)
        if stream == self.home or stream in self.others:
            return
        if stream_is_capturing(self.device):
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.uploaded)
        for t in held_tensors(held):
            if t.is_cuda:  # (not the pinned sources of its uploads)
                t.record_stream(current)
        self.others.add(stream)


def held_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor ``obj`` holds: itself if it is one, and those of its dataclass fields,
    lists and tuples, recursively (a plan, and the layouts and chunk lists in it)."""
    if isinstance(obj, Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from held_tensors(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from held_tensors(item)


# What a CUDA graph's capture uploaded or read (KeptCopy objects; the device tensors and pinned
# sources of a step plan, optimizer._plan_for): that graph's replays read them for as long as
# it lives, which no one here can tell: kept for good, as the CUDA backend keeps the tables
# its captures use (ops_cuda.cpp, keep).
GRAPH_ONLY: List[Any] = []


class KeptCopy:
    """One host tensor's copy on a device, kept from call to call and read from whichever stream
    is current then: ``get()`` before each launch that reads it.

    Made while the device's stream is captured into a CUDA graph, the copy is recorded into the
    graph, not run: the tensor holds nothing until the first replay. Such a copy
    (``graph_only``) serves that graph alone: kept for good (GRAPH_ONLY) and not cached by its
    callers, so an eager call makes its own, as the GPU backends do with the tables they build
    during a capture. A capture that refuses the upload (pinning host memory) raises naming
    ``what``: one eager step with the same tensors before capturing makes the copy outside it."""

    def __init__(self, host: Tensor, device: torch.device, what: str):
        self.device = device
        self.sources: List[Tensor] = []
        self.graph_only = stream_is_capturing(device)
        try:
            self.tensor = upload(host, device, self.sources)
        except Exception as err:
            if not self.graph_only:
                raise
            raise RuntimeError(
                f"{what} could not be made while a CUDA graph was being captured ({err}); run one step() "
                "eagerly with the same params and grads before capturing"
            ) from err
        self.stream_use: Optional[StreamUse] = (
            StreamUse(device) if self.tensor.is_cuda and not self.graph_only else None
        )
        if self.graph_only:
            GRAPH_ONLY.append(self)
        self.kept_for_graphs = self.graph_only

    def get(self) -> Tensor:
        if self.stream_use is not None and not torch.compiler.is_compiling():
            if not self.kept_for_graphs and stream_is_capturing(self.device):
                # made eagerly, read by a graph being captured: its caller's cache may let it go
                # (evicted, or its layout gone) while the graph replays it: kept for good
                self.kept_for_graphs = True
                GRAPH_ONLY.append(self)
            self.stream_use.enter(self.tensor)
        return self.tensor


def kept_copy(cache: dict, key: Any, host: Callable[[], Tensor], device: torch.device, what: str) -> Tensor:
    """``cache[key]``'s device tensor, read for the current stream; made from ``host()`` (called
    only then) where there is none, and cached unless made during a capture (KeptCopy). A
    traced step (torch.compile) reads what an eager call cached, and traces a plain copy,
    keeping nothing, where there is none."""
    kept = cache.get(key)
    if torch.compiler.is_compiling():
        return kept.tensor if kept is not None else host().to(device)
    if kept is None:
        kept = KeptCopy(host(), device, what)
        if not kept.graph_only:  # (one made during a capture serves that graph alone)
            cache[key] = kept
    return kept.get()
