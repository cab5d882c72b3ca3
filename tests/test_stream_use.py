"""lbw_kernels/stream_use.py: device tensors kept from call to call and read from several CUDA
streams (the Triton plans, the step plan's element counts, the DTensor row maps, the C++
backend's row orders). On CPU, with the CUDA calls stood in for. On a GPU:
``*_evicted_while_a_side_stream_still_reads_them`` (the Triton plans, the CUDA tables, the step
plan's counts) and test_gpu_cuda_captured_group_of_two_param_dtypes_replays_like_eager (a
KeptCopy read by a captured step); no GPU test covers the DTensor row maps."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from lbw_kernels import stream_use


def test_a_plan_used_on_another_stream_is_ordered_after_its_uploads_once(monkeypatch):
    """StreamUse.enter with the CUDA calls stood in for (CPU): a call on the build stream does
    nothing; the first call on another stream waits for the upload event and records that
    stream on the plan's device tensors (not its pinned host sources); later calls on it do
    nothing more; a third stream gets its own wait and records, not while it is captured
    (then at its first eager call)."""
    current = [7]
    log = []

    class Event:
        def record(self, stream):
            log.append(("record event", stream.id))

    def current_stream(device):
        return SimpleNamespace(id=current[0], wait_event=lambda event: log.append(("wait", current[0])))

    class Held:
        def __init__(self, name, is_cuda):
            self.name, self.is_cuda = name, is_cuda

        def record_stream(self, stream):
            log.append(("record_stream", self.name, stream.id))

    capturing = [False]
    monkeypatch.setattr(stream_use, "_current_stream_id", lambda device: current[0])
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(stream_use, "held_tensors", lambda plan: [Held("table", True), Held("pinned", False)])
    use = stream_use.StreamUse(torch.device("cuda", 0))
    assert log == [("record event", 7)]
    use.enter(object())  # the build stream
    assert log == [("record event", 7)]
    current[0] = 9
    use.enter(object())
    use.enter(object())
    assert log[1:] == [("wait", 9), ("record_stream", "table", 9)]
    current[0] = 11
    capturing[0] = True  # a capture on stream 11: nothing, and 11 not taken for done
    use.enter(object())
    assert log[3:] == []
    capturing[0] = False
    use.enter(object())
    current[0] = 7
    use.enter(object())
    assert log[3:] == [("wait", 11), ("record_stream", "table", 11)]


def test_a_kept_copy_on_the_cpu_is_the_host_tensor_with_nothing_to_order():
    host = torch.tensor([2, 0, 1])
    kept = stream_use.KeptCopy(host, torch.device("cpu"), "the test's index")
    assert kept.stream_use is None and kept.sources == []
    assert torch.equal(kept.get(), host)


def test_a_kept_copy_is_ordered_on_every_read_and_one_made_during_a_capture_serves_that_graph(monkeypatch):
    """On a GPU (stood in for): the upload goes through stream_use.upload (pinned, without
    blocking, the source kept with the copy), a StreamUse is made after it, and every get()
    enters it with the copy (nothing while torch.compile traces). Made while the device's stream
    is captured: uploaded (recorded into the graph), no StreamUse, kept for good in GRAPH_ONLY
    and marked graph_only; a capture that refuses the upload raises naming what needed it."""
    log = []
    refuse = [False]

    def upload(host, device, keep):
        if refuse[0]:
            raise RuntimeError("operation not permitted when stream is capturing")
        log.append(("upload", device.type))
        keep.append("pinned source")
        return SimpleNamespace(is_cuda=True, values=host)

    class Use:
        def __init__(self, device):
            log.append(("stream use", device.type))

        def enter(self, held):
            log.append(("enter", held.values.tolist()))

    capturing = [True]
    monkeypatch.setattr(stream_use, "upload", upload)
    monkeypatch.setattr(stream_use, "StreamUse", Use)
    monkeypatch.setattr(stream_use, "stream_is_capturing", lambda device: capturing[0])
    monkeypatch.setattr(stream_use, "GRAPH_ONLY", [])
    cuda = torch.device("cuda", 0)
    captured = stream_use.KeptCopy(torch.tensor([1, 0]), cuda, "the test's row map")
    assert captured.graph_only and captured.stream_use is None and stream_use.GRAPH_ONLY == [captured]
    assert log == [("upload", "cuda")] and captured.sources == ["pinned source"]
    captured.get()
    assert log == [("upload", "cuda")]
    refuse[0] = True
    with pytest.raises(RuntimeError, match="the test's row map could not be made while a CUDA graph was being "
                                           "captured \\(operation not permitted.*run one step\\(\\) eagerly"):
        stream_use.KeptCopy(torch.tensor([1, 0]), cuda, "the test's row map")
    refuse[0] = capturing[0] = False
    log.clear()
    kept = stream_use.KeptCopy(torch.tensor([1, 0]), cuda, "the test's row map")
    assert not kept.graph_only and stream_use.GRAPH_ONLY == [captured]
    assert log == [("upload", "cuda"), ("stream use", "cuda")] and kept.sources == ["pinned source"]
    kept.get()
    kept.get()
    assert log[2:] == [("enter", [1, 0])] * 2
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kept.get()
    assert len(log) == 4


def test_a_capture_is_asked_of_the_params_device_not_the_current_one(monkeypatch):
    """stream_is_capturing(cuda:1) while cuda:0 is current asks cuda:1's current stream (a step
    launches there), switching devices only then."""
    current = [0]
    capturing_on = {1}
    switched = []

    @contextlib.contextmanager
    def device(d):
        before = current[0]
        current[0] = d.index
        switched.append(d.index)
        yield
        current[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: current[0] in capturing_on)
    assert stream_use.stream_is_capturing(torch.device("cuda", 1))
    assert not stream_use.stream_is_capturing(torch.device("cuda", 0))
    assert switched == [1]
    assert not stream_use.stream_is_capturing(torch.device("cpu"))


def test_upload_goes_from_pinned_memory_without_blocking_and_keeps_its_source(monkeypatch):
    """To a GPU (its calls stood in for): pinned first, the pinned tensor kept, the copy
    non_blocking; to the CPU a plain copy and nothing kept."""
    calls = []
    real_to = torch.Tensor.to

    def pin_memory(self):
        calls.append("pin")
        pinned = self.clone()
        pinned.pinned = True
        return pinned

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            calls.append(("to", getattr(self, "pinned", False), kwargs.get("non_blocking", False)))
            return "device copy"
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    keep = []
    host = torch.tensor([3, 1])
    assert stream_use.upload(host, torch.device("cuda", 0), keep) == "device copy"
    assert calls == ["pin", ("to", True, True)]
    assert len(keep) == 1 and getattr(keep[0], "pinned", False) and torch.equal(keep[0], host)
    calls.clear()
    keep.clear()
    assert torch.equal(stream_use.upload(host, torch.device("cpu"), keep), host)
    assert calls == [] and keep == []


def test_the_dtensor_row_maps_are_kept_copies(monkeypatch):
    """distributed._Layout's row maps go through KeptCopy: one per (map, device), the same tensor
    on every call; one made during a capture serves that graph alone (not cached: the next
    eager call makes its own); a traced step reads the copy an eager call made, and traces a
    copy (keeping nothing) where none was made."""
    from lbw_kernels.distributed import _Layout

    monkeypatch.setattr(stream_use, "GRAPH_ONLY", [])
    layout = _Layout(rows=3, index=torch.tensor([0, 2]), keep=torch.tensor([True, False, True]), sums=[],
                     partial=None)
    cpu = torch.device("cpu")
    first = layout._on("index", layout.index, cpu)
    assert torch.equal(first, layout.index) and layout._on("index", layout.index, cpu) is first
    assert isinstance(layout._cache[("index", cpu)], stream_use.KeptCopy)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert layout._on("index", layout.index, cpu) is first
    traced = layout._on("keep", layout.keep, cpu)
    assert traced.tolist() == [True, False, True] and ("keep", cpu) not in layout._cache
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(stream_use, "stream_is_capturing", lambda device: True)
    assert layout._on("keep", layout.keep, cpu).tolist() == [True, False, True]
    (captured,) = stream_use.GRAPH_ONLY
    assert captured.graph_only and ("keep", cpu) not in layout._cache
    monkeypatch.setattr(stream_use, "stream_is_capturing", lambda device: False)
    layout._on("keep", layout.keep, cpu)
    eager = layout._cache[("keep", cpu)]
    assert eager is not captured and not eager.graph_only and stream_use.GRAPH_ONLY == [captured]


def test_the_row_order_of_a_group_mixing_dtypes_is_a_kept_copy(monkeypatch):
    """cpp_backend's row order for a group whose params mix dtypes (single_pass telemetry) is a
    KeptCopy, one per dtype pattern; one made during a capture serves that step alone (not
    cached), and the step's telemetry rows still come back in the group's order."""
    from lbw_kernels import GuardedAdamW
    from lbw_kernels.backends import get_backend

    backend = get_backend("cpp")
    if not backend.supports(torch.device("cpu")):
        pytest.skip("needs the C++ extension")
    monkeypatch.setattr(stream_use, "GRAPH_ONLY", [])

    def step(dtypes):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, dtype=dt) * (i + 1)) for i, dt in enumerate(dtypes)]
        for p in params:
            p.grad = torch.randn_like(p) * (1 + 10 * (p.dtype == torch.float64))
        opt = GuardedAdamW(params, lr=1e-2, backend="cpp", gate="single_pass", stats_freq=1)
        opt.step()
        return opt.telemetry()["grad_ms"]

    key = (torch.device("cpu"), (torch.float32, torch.float64, torch.float32))
    backend._orders.pop(key, None)
    eager = step(key[1])
    assert isinstance(backend._orders[key], stream_use.KeptCopy) and not backend._orders[key].graph_only
    backend._orders.pop(key)
    monkeypatch.setattr(stream_use, "stream_is_capturing", lambda device: True)
    assert step(key[1]) == eager  # (the max of the rows' mean squares: the fp64 row's, in its place)
    assert key not in backend._orders and len(stream_use.GRAPH_ONLY) == 1


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_a_step_plan_built_during_a_capture_serves_that_graph_alone(monkeypatch, gate):
    """A step plan first built while a CUDA graph is captured (no eager step with that layout
    before it) has element counts the graph's recorded upload fills only at its first replay:
    the next call builds its own plan, and the captured plan's device tensors and pinned
    sources (not the plan: it holds the params and states) are kept for good. Stood in on CPU:
    the optimizer is told its stream captures for one call; the steps still match a twin's."""
    from lbw_kernels import GuardedAdamW, optimizer

    monkeypatch.setattr(stream_use, "GRAPH_ONLY", [])
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7,), (3, 5))]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=1e-2, backend="reference", gate=gate, stats_freq=1)
    opt, twin_opt = GuardedAdamW(params, **kw), GuardedAdamW(twin, **kw)
    capturing = [False]
    monkeypatch.setattr(optimizer, "stream_is_capturing", lambda device: capturing[0])
    plans = []
    for call in range(4):
        for p, q in zip(params, twin):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        capturing[0] = call == 1  # (call 0 built a plan eagerly; call 1 sees a new layout, kept after it)
        if call >= 1:
            params[0].grad = twin[0].grad = None
        opt.step()
        twin_opt.step()
        plans.append(opt._plan)
    eager, captured, after, kept = plans
    assert not eager.graph_only and captured.graph_only and captured is not eager
    assert after is not captured and not after.graph_only and kept is after  # rebuilt once, then cached
    # (the twin's plan of call 1 too: it is told the same)
    assert [entry for entry in stream_use.GRAPH_ONLY if entry[0] is captured.numels] == [
        (captured.numels, captured.numel_total, captured.pinned_sources)] and len(stream_use.GRAPH_ONLY) == 2
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_plan_built_eagerly_and_captured_keeps_its_device_tensors(monkeypatch):
    """A graph captured from a plan an eager call built reads its element counts on every
    replay, and a later eager call that changes the layout (a grad set to None) replaces the
    plan: its device tensors are kept for good once a capture has used them (once, however
    many captures), as those of a plan built during a capture are. Stood in on CPU."""
    from lbw_kernels import GuardedAdamW, optimizer

    monkeypatch.setattr(stream_use, "GRAPH_ONLY", [])
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7,), (3, 5))]
    opt = GuardedAdamW(params, lr=1e-2, backend="reference", stats_freq=1)
    capturing = [False]
    monkeypatch.setattr(optimizer, "stream_is_capturing", lambda device: capturing[0])
    plans = []
    for call, capture in enumerate((False, True, True, False)):
        for p in params:
            p.grad = torch.randn_like(p)
        if call == 3:
            params[0].grad = None  # a new layout: the eager call replaces the captured plan
        capturing[0] = capture
        opt.step()
        plans.append(opt._plan)
    eager, captured, again, after = plans
    assert captured is eager is again and not eager.graph_only and after is not eager
    assert stream_use.GRAPH_ONLY == [(eager.numels, eager.numel_total, eager.pinned_sources)]


def test_a_kept_copy_made_eagerly_is_kept_once_a_capture_reads_it(monkeypatch):
    """A KeptCopy (a DTensor row map, a mixed group's row order) made eagerly and read while a
    graph is captured goes to GRAPH_ONLY, once: its cache may drop it later while the graph
    still replays it. Stood in on CPU, as above."""
    capturing = [False]
    monkeypatch.setattr(stream_use, "upload", lambda host, device, keep: SimpleNamespace(is_cuda=True, values=host))
    monkeypatch.setattr(stream_use, "StreamUse", lambda device: SimpleNamespace(enter=lambda held: None))
    monkeypatch.setattr(stream_use, "stream_is_capturing", lambda device: capturing[0])
    monkeypatch.setattr(stream_use, "GRAPH_ONLY", [])
    kept = stream_use.KeptCopy(torch.tensor([1, 0]), torch.device("cuda", 0), "the test's row map")
    kept.get()
    assert stream_use.GRAPH_ONLY == []
    capturing[0] = True
    kept.get()
    kept.get()
    assert stream_use.GRAPH_ONLY == [kept]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_first_step_captured_is_refused_before_any_state_is_made(monkeypatch, backend):
    """A state made while a CUDA graph is captured would be zeroed again by every replay (its
    fill is recorded), resetting AdamW's moments and step count each step: the capture of a
    step whose params have no state yet raises, saying to step eagerly first, and makes none;
    an eager step then runs as usual, and a later captured one is taken. Stood in on CPU."""
    from lbw_kernels import GuardedAdamW, optimizer
    from lbw_kernels.backends import availability

    if availability()[backend] is not None:
        pytest.skip(f"{backend}: {availability()[backend]}")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((7,), (3, 5))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = GuardedAdamW(params, lr=1e-2, backend=backend, stats_freq=1)
    before = [p.detach().clone() for p in params]
    guard = opt._guard.clone()
    capturing = [True]
    monkeypatch.setattr(optimizer, "stream_is_capturing", lambda device: capturing[0])
    with pytest.raises(RuntimeError, match=r"shape \(7,\) has no optimizer state yet.*run one step\(\) eagerly"):
        opt.step()
    assert len(opt.state) == 0 and opt._plan is None
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    torch.testing.assert_close(opt._guard, guard, rtol=0, atol=0, equal_nan=True)
    capturing[0] = False
    opt.step()
    capturing[0] = True
    opt.step()  # (states made: a captured step is taken)
    assert opt.telemetry()["step"] == 2 and all(not torch.equal(p, b) for p, b in zip(params, before))
