"""Optimizer-step throughput: our backends beside torch's AdamW and the published procedure.

The one benchmark implementation: ``lbw-kernels bench`` and the pytest-benchmark suites in
``bench/`` both build their rows here, so there is no second copy to drift.

What is timed is one ``optimizer.step()`` over fp32 parameters laid out like a real model
(gradients already present, as after ``backward()``). Every row of a table runs in the same
process, on the same tensors, beside its baselines:

* ``torch AdamW foreach`` / ``torch AdamW fused`` / ``clip_grad_norm_ + fused``;
* ``published``: the published guard procedure (:mod:`lbw_kernels.published`);
* ``GuardedAdamW`` for every available backend x gate (exact, single_pass) x stats_freq.

Columns: ``ms`` (median; on CUDA of CUDA-event timings after warm-up, on CPU of
``time.perf_counter``), ``GB/s`` (the row's nominal bytes per parameter / time), ``x floor``
(time over the floor: 28 B per parameter, or 32 B where the gradients must be read once more
before the update, over the copy bandwidth measured in the same run: ``copy_bandwidth``), peak
memory (CUDA only) and the ratio to torch fused AdamW.

On CUDA each step is timed twice. ``ms``: alone, the device synchronised after it, so the host
time before its first launch is on the clock (the device idles through it). ``loop ms``: steps
run back to back, a CUDA event before and after each and one synchronisation at the end, as in
a training loop whose host runs ahead of the device (the step's host work then overlaps the
work queued before it, unless the host is the slower of the two: 2000 small tensors). Each has
its ``x floor`` and ratio to torch fused AdamW, timed the same way.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Shape = Tuple[int, ...]

FLOOR_BYTES_UPDATE = 28  # fp32 AdamW: read p, g, m, v; write p, m, v
FLOOR_BYTES_GATED = 32  # the same plus one more read of g before the update


# ---------------------------------------------------------------------------------------
# Layouts: lists of parameter shapes of real models
# ---------------------------------------------------------------------------------------
def llama_shapes(vocab: int, hidden: int, inter: int, layers: int, kv_dim: int) -> List[Shape]:
    """Llama-style decoder: embedding, per layer q/k/v/o, gate/up/down and two RMSNorms,
    final norm and an untied lm_head (TinyLlama-1.1B: 201 tensors)."""
    shapes: List[Shape] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden)]
        shapes += [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def gpt2_shapes(vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12) -> List[Shape]:
    """GPT-2 (HF layout, tied lm_head): wte, wpe, 12 tensors per block, ln_f (124M: 148 tensors)."""
    shapes: List[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


LAYOUTS: Dict[str, Callable[[], List[Shape]]] = {
    # TinyLlama-1.1B: 32000 vocab, 2048 hidden, 5632 MLP, 22 layers, 4 KV heads of 64.
    "tinyllama-1.1b": lambda: llama_shapes(32000, 2048, 5632, 22, 256),
    "gpt2-124m": lambda: gpt2_shapes(),
    "2000x65536": lambda: [(65536,)] * 2000,
    # GPT-2's 148 tensors, widths scaled so a CPU step takes tens of milliseconds.
    "gpt2-30m": lambda: gpt2_shapes(d=320),
    "gpt2-quick": lambda: gpt2_shapes(d=128),
    # For tests: a handful of small tensors, odd sizes included.
    "tiny": lambda: [(1,), (3,), (4097,), (33, 65), (64, 64), (0,)],
}
FULL_LAYOUTS = ("tinyllama-1.1b", "gpt2-124m", "2000x65536")


def layout_numel(shapes: Sequence[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


# ---------------------------------------------------------------------------------------
# Rows: one optimizer configuration each
# ---------------------------------------------------------------------------------------
@dataclass
class Row:
    """One thing to time. ``make(params)`` returns the step function to time.

    ``bytes_per_param`` is what the row's algorithm must move at least: 28 B for AdamW, 32 B
    when the gradients are read once more before the update (exact gate, clip_grad_norm_,
    the published procedure on telemetry calls)."""

    name: str
    kind: str  # "baseline" | "published" | "guard"
    bytes_per_param: int  # the floor's bytes: 28, or 32 where g is read again before the update
    make: Callable[[List[torch.Tensor]], Callable[[], None]]
    backend: Optional[str] = None
    gate: Optional[str] = None
    stats_freq: Optional[int] = None
    graph: bool = False  # the step captured in a CUDA graph, each timed call one replay (_captured)


# Rows of steps captured in a CUDA graph are named as their eager twins plus this.
GRAPH_SUFFIX = " (CUDA graph)"
# Who can be captured and is timed that way: the kernel backends (the reference backend can be
# captured too, but its step is 5-50x theirs: not what a captured run would choose).
GRAPH_BACKENDS = ("cuda", "triton")
GRAPH_MODES = ("off", "add", "only")  # build_rows(graphs=...), bench --graphs


def _torch_adamw(fused: bool, clip: bool, capturable: bool = False):
    def make(params):
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=fused, foreach=not fused,
                                capturable=capturable)

        def step():
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()

        step.optimizer = opt
        return step

    return make


def _published(stats_freq: int):
    def make(params):
        from .published import PublishedGuardAdamW

        opt = PublishedGuardAdamW(params, lr=1e-4, weight_decay=0.01, stats_freq=stats_freq)
        step = opt.step
        return step

    return make


def _guarded(backend: str, gate: str, stats_freq: int, skip_nonfinite: bool = True,
             max_grad_norm: Optional[float] = None):
    def make(params):
        from .optimizer import GuardedAdamW

        opt = GuardedAdamW(
            params, lr=1e-4, weight_decay=0.01, stats_freq=stats_freq, gate=gate, backend=backend,
            skip_nonfinite=skip_nonfinite, max_grad_norm=max_grad_norm,
        )
        return opt.step

    return make


def _captured(make):
    """``make``'s step captured in a CUDA graph, as a training loop that captures its optimizer
    step runs it: three eager steps on a side stream first (capture needs the state created and
    the kernels compiled, off the capturing stream), then one step captured; each call of the
    returned step replays it. Its time is the device's work with no host work per step beyond
    the replay's launch: the eager rows' ms less their host time before the first launch."""

    def make_captured(params):
        step = make(params)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        before = torch.cuda.current_stream()
        failed = []  # what the captured step raised, if it did
        try:
            with torch.cuda.graph(graph):
                try:
                    step()
                except BaseException as err:
                    failed.append(err)
                    raise
        except BaseException:
            # Ending a capture the step broke raises again, hiding the step's own error, and
            # leaves the capture stream current: the row reports the step's error and the
            # next rows run on the stream they had.
            torch.cuda.set_stream(before)
            if failed:
                raise failed[0]
            raise

        def replay():
            graph.replay()

        replay.step = step  # (the optimizer, whose state the graph reads and writes, lives as long)
        return replay

    return make_captured


def usable_backends(device: torch.device, include: Optional[Sequence[str]] = None) -> Tuple[List[str], Dict[str, str]]:
    """Backends that ``availability()`` reports and that run on ``device``; and why others are left out.

    A backend that only emulates the device (Triton's interpreter on CPU: a correctness tool,
    orders of magnitude slower) is timed only when named in ``include``.
    """
    from .backends import availability, get_backend

    names, skipped = [], {}
    for name, reason in availability().items():
        if include and name not in include:
            continue
        if reason is not None:
            skipped[name] = reason
            continue
        backend = get_backend(name)
        if not backend.supports(device):
            skipped[name] = f"does not run on {device.type}"
            continue
        selectable = getattr(backend, "auto_selectable", backend.supports)(device)
        if not selectable and not (include and name in include):
            skipped[name] = f"only emulated on {device.type} (correctness tool); --backend {name} to time it anyway"
            continue
        names.append(name)
    return names, skipped


def graph_rows(backends: Sequence[str], gates: Sequence[str], stats_freqs: Sequence[int]) -> List[Row]:
    """Captured twins (GRAPH_SUFFIX) of torch fused AdamW (``capturable=True``) and of the
    kernel backends' guard rows. (A captured step with stats_freq > 1 reads every call's
    telemetry and follows rule 2's schedule on the device: optimizer._telemetry_due.)"""
    rows = [Row("torch AdamW fused" + GRAPH_SUFFIX, "baseline", FLOOR_BYTES_UPDATE,
                _captured(_torch_adamw(True, False, capturable=True)), graph=True)]
    for backend in (b for b in backends if b in GRAPH_BACKENDS):
        for gate in gates:
            for sf in stats_freqs:
                nominal = FLOOR_BYTES_GATED if gate == "exact" else FLOOR_BYTES_UPDATE
                rows.append(Row(f"guard {backend} {gate} sf={sf}" + GRAPH_SUFFIX, "guard", nominal,
                                _captured(_guarded(backend, gate, sf)), backend=backend, gate=gate, stats_freq=sf,
                                graph=True))
    return rows


def build_rows(
    backends: Sequence[str],
    gates: Sequence[str] = ("exact", "single_pass"),
    stats_freqs: Sequence[int] = (1, 10),
    graphs: str = "off",
) -> List[Row]:
    """The rows of a table. ``graphs``: "off", "add" (graph_rows after the eager ones) or
    "only" (torch fused AdamW eager, as the reference for what capture saves, and graph_rows)."""
    if graphs not in GRAPH_MODES:
        raise ValueError(f"graphs must be one of {', '.join(GRAPH_MODES)}, got {graphs!r}")
    if graphs == "only":
        return [Row("torch AdamW fused", "baseline", FLOOR_BYTES_UPDATE, _torch_adamw(True, False))] + graph_rows(
            backends, gates, stats_freqs)
    rows = [
        Row("torch AdamW foreach", "baseline", FLOOR_BYTES_UPDATE, _torch_adamw(False, False)),
        Row("torch AdamW fused", "baseline", FLOOR_BYTES_UPDATE, _torch_adamw(True, False)),
        Row("clip_grad_norm_ + fused", "baseline", FLOOR_BYTES_GATED, _torch_adamw(True, True)),
    ]
    for sf in stats_freqs:
        # The published procedure reads g once more on telemetry calls only.
        nominal = FLOOR_BYTES_GATED if sf == 1 else FLOOR_BYTES_UPDATE
        rows.append(Row(f"published sf={sf}", "published", nominal, _published(sf), stats_freq=sf))
    for backend in backends:
        for gate in gates:
            for sf in stats_freqs:
                # exact reads g before every update (the finite check runs every call).
                nominal = FLOOR_BYTES_GATED if gate == "exact" else FLOOR_BYTES_UPDATE
                rows.append(
                    Row(
                        f"guard {backend} {gate} sf={sf}", "guard", nominal,
                        _guarded(backend, gate, sf), backend=backend, gate=gate, stats_freq=sf,
                    )
                )
                if gate == "exact" and sf == 1:
                    # clip_grad_norm_(1.0) inside the step: beside "clip_grad_norm_ + fused"
                    # (the norm is the telemetry's; the gradients are read no more often)
                    rows.append(
                        Row(
                            f"guard {backend} exact sf=1 max_grad_norm=1", "guard", FLOOR_BYTES_GATED,
                            _guarded(backend, gate, sf, max_grad_norm=1.0), backend=backend, gate=gate,
                            stats_freq=sf,
                        )
                    )
                if gate == "exact" and sf > 1:
                    # Without the finite check, calls between telemetry calls are AdamW alone
                    # (28 B): what stats_freq > 1 can save, and what rule 1 costs.
                    rows.append(
                        Row(
                            f"guard {backend} exact sf={sf} skip_nonfinite=False", "guard", FLOOR_BYTES_UPDATE,
                            _guarded(backend, gate, sf, skip_nonfinite=False), backend=backend, gate=gate,
                            stats_freq=sf,
                        )
                    )
    return rows + (graph_rows(backends, gates, stats_freqs) if graphs == "add" else [])


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int, reps: int, budget_s: float) -> List[float]:
    """Milliseconds per call after ``warmup`` calls: CUDA events on CUDA, perf_counter on CPU.

    Stops early (at least 3 timed calls) when ``budget_s`` seconds of timing are spent.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 3 and time.perf_counter() - start_all > budget_s:
            break
    return times


def time_loop(fn: Callable[[], None], device: torch.device, steps: int) -> Optional[List[float]]:
    """Milliseconds per call of ``steps`` calls run back to back: a CUDA event before and after
    each, one synchronisation after the last. None on CPU, where a call returns when its work
    is done, so back to back is ``time_fn`` again.

    Each call's events wait behind the work queued before them, so a call's time is the
    device's from the end of the previous call's work to the end of its own: its own work and
    any idle gap while the device waits for the host's next launch. One untimed call runs
    first, its work still queued when the first timed call's host work runs, as every later
    call's host work runs beside its predecessor's work."""
    if device.type != "cuda" or steps < 1:
        return None
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    _sync(device)
    fn()
    for start, end in events:
        start.record()
        fn()
        end.record()
    events[-1][1].synchronize()
    return [start.elapsed_time(end) for start, end in events]


def copy_bandwidth(device: torch.device, numel: int, warmup: int = 3, reps: int = 10) -> float:
    """Bytes/s the memory system streams on fp32 tensors of ``numel`` elements: the floor's rate.

    On CUDA, ``dst.copy_(src)`` counted as 8 B per element (read + write). On CPU, the higher of
    that and an in-place ``dst.add_(src)`` counted as 12 B (reads both, writes dst): a CPU cache
    reads a line before a store fills it (write-allocate), so a copy into a separate buffer
    moves 12 B per element while counted as 8, and the copy alone understated the memory ~1.6x
    (the floor came out above what fused AdamW, which writes in place, reaches: x floor < 1). An
    in-place stream hides no such read (the line it writes was read anyway). A GPU writes whole
    sectors without reading them first: the copy alone.

    The fastest repetition, not the median: the floor is what the memory system can do, and on a
    shared machine the median of a copy measures the neighbours as much as the memory."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    rates = [_fastest_rate(lambda: dst.copy_(src), 2 * 4 * numel, device, warmup, reps)]
    if device.type == "cpu":
        # (dst holds src's values after the copy: finite, and finite after a few more adds)
        rates.append(_fastest_rate(lambda: dst.add_(src), 3 * 4 * numel, device, warmup, reps))
    return max(rates)


def _fastest_rate(fn: Callable[[], None], nbytes: int, device: torch.device, warmup: int, reps: int) -> float:
    """Bytes/s of ``fn``, which moves ``nbytes``, in its fastest repetition."""
    ms = min(time_fn(fn, device, warmup, reps, budget_s=5.0))
    return nbytes / (ms * 1e-3)


def make_params(shapes: Sequence[Shape], device: torch.device, seed: int = 0) -> List[torch.Tensor]:
    """fp32 parameters with gradients set; gradients scaled to a global norm of 0.5 so that
    ``clip_grad_norm_(1.0)`` computes its scaling but leaves values unchanged between rows."""
    gen = torch.Generator(device=device).manual_seed(seed)
    total = max(layout_numel(shapes), 1)
    params = []
    for s in shapes:
        p = torch.randn(s, device=device, generator=gen) * 0.02
        p.grad = torch.randn(s, device=device, generator=gen) * (0.5 / math.sqrt(total))
        params.append(p)
    return params


@dataclass
class Result:
    name: str
    kind: str
    backend: Optional[str]
    gate: Optional[str]
    stats_freq: Optional[int]
    bytes_per_param: float
    graph: bool = False
    ms: Optional[float] = None
    ms_min: Optional[float] = None
    # With stats_freq > 1 the median is a call without telemetry; the mean over the timed calls
    # (a multiple of stats_freq when reps is) is the amortised cost per step.
    ms_mean: Optional[float] = None
    ms_all: List[float] = field(default_factory=list)
    gbps: Optional[float] = None
    x_floor: Optional[float] = None
    floor_ms: Optional[float] = None
    peak_mib: Optional[float] = None
    step_extra_mib: Optional[float] = None
    vs_fused: Optional[float] = None
    # CUDA: the same steps run back to back (time_loop), their median, x floor and ratio to
    # torch fused's loop time; None on CPU.
    ms_loop: Optional[float] = None
    ms_loop_all: List[float] = field(default_factory=list)
    x_floor_loop: Optional[float] = None
    vs_fused_loop: Optional[float] = None
    error: Optional[str] = None


def run_row(row: Row, params: List[torch.Tensor], device: torch.device, warmup: int, reps: int, budget_s: float) -> Result:
    res = Result(row.name, row.kind, row.backend, row.gate, row.stats_freq, row.bytes_per_param, row.graph)
    try:
        step = row.make(params)
        step()  # first call: allocates state (and compiles kernels) outside the measurement
        _sync(device)
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        res.ms_all = time_fn(step, device, warmup, reps, budget_s)
        res.ms = statistics.median(res.ms_all)
        res.ms_min = min(res.ms_all)
        res.ms_mean = statistics.fmean(res.ms_all)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            res.peak_mib = peak / 2**20
            res.step_extra_mib = (peak - base) / 2**20
        # Half as many steps as timed alone: rounds pool them, and a lent GPU's minutes are few.
        res.ms_loop_all = time_loop(step, device, max(3, reps // 2)) or []
    except Exception as err:  # one broken backend must not lose the other rows
        res.error = f"{type(err).__name__}: {err}"
    finally:
        step = None  # drops the optimizer and its state before the next row allocates its own
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------
# A whole table
# ---------------------------------------------------------------------------------------
def environment(device: torch.device) -> Dict[str, object]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = _git_state()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo", encoding="utf-8"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {
        "device": str(device),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": commit,
        # True: the code that ran is not git_commit's (a kept result must not name it as such);
        # None: not known (LBW_COMMIT given, or no git here)
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # launch geometries overridden for a tuning run (None: the defaults)
        "cuda_geometry": os.environ.get("LBW_CUDA_GEOMETRY") or None,
        "triton_geometry": os.environ.get("LBW_TRITON_GEOMETRY") or None,
        "triton_direct_launch": os.environ.get("LBW_TRITON_DIRECT_LAUNCH") == "1",
        # Every switch of this package and of Triton as set (LBW_EARLY_TELEMETRY, LBW_POISON,
        # TRITON_INTERPRET, ...): they change timings, and a tuning run differs from a default
        # one by them alone.
        "lbw_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("LBW_", "TRITON_"))},
    }


def _git_state() -> Tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the checkout holding this file: ``git rev-parse HEAD`` and whether
    ``git status --porcelain`` lists anything. LBW_COMMIT, where set, is the commit, and dirty is
    then unknown (None): it is what to record where the checkout's git metadata is not its
    tree's (a working tree copied to a lent GPU machine kept an older .git). None for what git
    cannot tell (not installed, not a checkout)."""
    given = os.environ.get("LBW_COMMIT") or None
    if given:
        return given, None
    head, status = _git("rev-parse", "HEAD"), _git("status", "--porcelain")
    commit = head.strip() if head else None
    dirty = None if status is None else bool(status.strip())
    return commit or None, dirty


def _git(*args: str) -> Optional[str]:
    """stdout of ``git ARGS`` in this file's folder; None where git fails or is missing."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def bench_layout(
    layout: str,
    device: torch.device,
    rows: Sequence[Row],
    warmup: int,
    reps: int,
    budget_s: float,
    progress: Optional[Callable[[str], None]] = None,
    rounds: int = 1,
) -> Dict[str, object]:
    """Time every row on one layout; the copy bandwidth is measured in the same run.

    With ``rounds > 1`` the whole sequence of rows runs that many times (fresh optimizers each
    round) and each row's samples are pooled: a burst of load from elsewhere then lands on
    several rows' samples instead of making one row look 100x slower (seen on a shared CPU).
    """
    shapes = LAYOUTS[layout]()
    numel = layout_numel(shapes)
    params = make_params(shapes, device)
    # At least 64 MiB (past the caches), at most 1 GiB (enough to saturate any memory system).
    bandwidth = copy_bandwidth(device, min(max(numel, 1 << 24), 1 << 28))
    results: List[Result] = []
    for round_ in range(rounds):
        for i, row in enumerate(rows):
            if progress:
                progress(f"{layout}: {row.name}" + (f" (round {round_ + 1}/{rounds})" if rounds > 1 else ""))
            res = run_row(row, params, device, warmup, reps, budget_s)
            if round_ == 0:
                results.append(res)
                continue
            pooled = results[i]
            pooled.ms_all += res.ms_all
            pooled.ms_loop_all += res.ms_loop_all
            pooled.error = pooled.error or res.error
            if res.peak_mib is not None:
                pooled.peak_mib = max(pooled.peak_mib or 0.0, res.peak_mib)
                pooled.step_extra_mib = max(pooled.step_extra_mib or 0.0, res.step_extra_mib)
    for row, res in zip(rows, results):
        if res.ms_all and res.error is None:
            res.ms = statistics.median(res.ms_all)
            res.ms_min = min(res.ms_all)
            res.ms_mean = statistics.fmean(res.ms_all)
        else:
            res.ms = None
        res.ms_loop = statistics.median(res.ms_loop_all) if res.ms is not None and res.ms_loop_all else None
        if res.ms is not None:
            res.floor_ms = row.bytes_per_param * numel / bandwidth * 1e3
            res.x_floor = res.ms / res.floor_ms
            res.gbps = row.bytes_per_param * numel / (res.ms * 1e-3) / 1e9
        if res.ms_loop is not None:
            res.x_floor_loop = res.ms_loop / res.floor_ms
    # (a captured row beside captured torch fused AdamW: both without host time per step)
    fused_of = {graph: next((r for r in results if r.name == "torch AdamW fused" + (GRAPH_SUFFIX if graph else "")
                             and r.ms), None) for graph in (False, True)}
    for r in results:
        fused = fused_of[r.graph]
        if fused and r.ms:
            r.vs_fused = r.ms / fused.ms
        if fused and fused.ms_loop and r.ms_loop:
            r.vs_fused_loop = r.ms_loop / fused.ms_loop
    del params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "layout": layout,
        "tensors": len(shapes),
        "params": numel,
        "copy_gbps": bandwidth / 1e9,
        "floor_ms_28B": FLOOR_BYTES_UPDATE * numel / bandwidth * 1e3,
        "floor_ms_32B": FLOOR_BYTES_GATED * numel / bandwidth * 1e3,
        "rows": [asdict(r) for r in results],
    }


def _count(n: int) -> str:
    # (the tiny layout's 10,342 params read "0.0M")
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def format_table(table: Dict[str, object]) -> str:
    head = (
        f"{table['layout']}: {table['tensors']} tensors, {_count(table['params'])} params; "
        f"copy {table['copy_gbps']:.1f} GB/s; floor {table['floor_ms_28B']:.3g} ms (28 B) / "
        f"{table['floor_ms_32B']:.3g} ms (32 B)"
    )
    w = max([34] + [len(r["name"]) for r in table["rows"]])  # the name column fits the longest name
    # (rows written before the loop columns existed have no such keys)
    loop = any(r.get("ms_loop") is not None for r in table["rows"])
    title = f"{'row':<{w}} {'ms':>9} {'GB/s':>8} {'x floor':>8} {'vs fused':>9} {'peak MiB':>9}"
    if loop:
        title += f" {'loop ms':>9} {'x floor':>8} {'vs fused':>9}"
    lines = [head, title]

    def ratio(x: Optional[float]) -> str:
        return f"{x:8.2f}x" if x else f"{'-':>9}"

    for r in table["rows"]:
        if r["ms"] is None:
            lines.append(f"{r['name']:<{w}} ERROR {r['error']}")
            continue
        peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        line = f"{r['name']:<{w}} {r['ms']:9.2f} {r['gbps']:8.1f} {r['x_floor']:8.2f} {ratio(r['vs_fused'])} {peak}"
        if loop and r.get("ms_loop") is not None:
            line += f" {r['ms_loop']:9.2f} {r['x_floor_loop']:8.2f} {ratio(r['vs_fused_loop'])}"
        lines.append(line)
    return "\n".join(lines)


def plot_tables(tables: Sequence[Dict[str, object]], path: Path, title: str) -> None:
    """A horizontal bar chart of ms per row, one panel per layout, floors drawn as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tables)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 0.32 * max(len(t["rows"]) for t in tables) + 1.8), squeeze=False)
    colors = {"baseline": "tab:gray", "published": "tab:red", "guard": "tab:blue"}
    for ax, table in zip(axes[0], tables):
        rows = [r for r in table["rows"] if r["ms"] is not None]
        names = [r["name"] for r in rows][::-1]
        ms = [r["ms"] for r in rows][::-1]
        ax.barh(names, ms, color=[colors[r["kind"]] for r in rows][::-1])
        ax.axvline(table["floor_ms_28B"], color="k", ls="--", lw=1, label="floor 28 B")
        ax.axvline(table["floor_ms_32B"], color="k", ls=":", lw=1, label="floor 32 B")
        ax.set_xlabel("ms per step (median)")
        ax.set_title(f"{table['layout']} ({_count(table['params'])} params)")
        for kind in dict.fromkeys(r["kind"] for r in rows):  # (the bars' colours, beside the floors)
            ax.barh([], [], color=colors[kind], label=kind)
        ax.legend(loc="lower right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class NothingToTime(ValueError):
    """The backends named to time (``--backend``) run nowhere here."""


def run_bench(
    layouts: Sequence[str],
    device: torch.device,
    backends: Optional[Sequence[str]] = None,
    gates: Sequence[str] = ("exact", "single_pass"),
    stats_freqs: Sequence[int] = (1, 10),
    warmup: int = 3,
    reps: int = 20,
    budget_s: float = 3.0,
    progress: Optional[Callable[[str], None]] = None,
    rounds: int = 1,
    graphs: str = "off",
) -> Dict[str, object]:
    if graphs != "off" and device.type != "cuda":
        raise ValueError(f"graphs={graphs!r}: steps are captured in CUDA graphs on a CUDA device only, got {device}")
    names, skipped = usable_backends(device, backends)
    if backends and not names:  # (else the baselines alone would be timed, as if that were asked)
        why = "; ".join(f"backend {name} left out: {reason}" for name, reason in skipped.items())
        raise NothingToTime(f"none of the backends named runs on {device}, nothing to time ({why})")
    rows = build_rows(names, gates, stats_freqs, graphs)
    tables = [bench_layout(layout, device, rows, warmup, reps, budget_s, progress, rounds) for layout in layouts]
    notes = ["ms_mean in the JSON: the mean over the timed calls; where stats_freq > 1, the amortised cost per "
             "step only when the timed calls span whole multiples of stats_freq (reps a multiple of it, and no "
             "row cut short by the time budget: see each row's ms_all)"]
    if device.type == "cuda":
        notes.append(
            "CUDA: ms is each step timed alone (host time before its first launch on the clock); loop ms the "
            "same steps run back to back, as in a training loop whose host runs ahead (bench.time_loop)"
        )
        if graphs != "off":
            notes.append(
                f"rows named '...{GRAPH_SUFFIX}': the step captured in a CUDA graph after 3 eager steps, each call one "
                "replay; their vs fused is against torch fused AdamW (capturable=True) captured the same way"
            )
    else:
        notes.append(
            "CPU: ms is the median of time.perf_counter per step (ms_min in the JSON: the fastest); "
            "peak memory not measured on CPU"
        )
        notes.append(
            "CPU: copy bandwidth (copy_gbps, the floor's rate) is the higher of copy_ counted as 8 B per element "
            "and an in-place add_ counted as 12 B, each its fastest repetition: a copy into a separate buffer "
            "also reads each destination line first (write-allocate), so alone it understates the memory's rate "
            "(bench.copy_bandwidth)"
        )
    return {
        "environment": environment(device),
        "backends": names,
        "skipped_backends": skipped,
        "settings": {"warmup": warmup, "reps": reps, "budget_s_per_row": budget_s, "rounds": rounds},
        "notes": notes,
        "tables": tables,
    }


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def default_layouts(device: torch.device, quick: bool) -> List[str]:
    if device.type == "cuda":
        return ["gpt2-124m"] if quick else list(FULL_LAYOUTS)
    return ["gpt2-quick"] if quick else ["gpt2-30m"]


def add_parser(subparsers) -> None:
    from . import cli_args
    from .backends import BACKEND_NAMES  # (the ones usable_backends times)

    p = subparsers.add_parser(
        "bench",
        help="time one optimizer step: our backends beside torch AdamW and the published procedure",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--quick", action="store_true", help="one small layout, fewer repetitions (CPU: gpt2-quick, CUDA: gpt2-124m)")
    p.add_argument("--layout", action="append", choices=sorted(LAYOUTS), help="layout to time (repeatable); default: by device")
    p.add_argument("--device", type=cli_args.device, default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--backend", action="append", choices=BACKEND_NAMES,
                   help="only this backend (repeatable); default: every available one")
    p.add_argument("--gate", action="append", choices=["exact", "single_pass"], help="default: both")
    p.add_argument("--stats-freq", action="append", type=cli_args.int_at_least(1), help="default: 1 and 10")
    p.add_argument("--warmup", type=cli_args.int_at_least(0), default=None)
    p.add_argument("--reps", type=cli_args.int_at_least(1), default=None)
    p.add_argument("--budget", type=cli_args.positive_float, default=None, help="seconds of timing per row at most")
    p.add_argument("--rounds", type=cli_args.int_at_least(1), default=None,
                   help="run the rows this many times and pool the samples (default: CUDA 1, CPU 3 with --quick, else 2)")
    p.add_argument("--graphs", choices=GRAPH_MODES, default="off",
                   help="CUDA: also time the kernel backends' steps and torch fused AdamW captured in CUDA graphs "
                        "(add), or only those beside eager torch fused (only)")
    p.add_argument("--threads", type=cli_args.int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="lbw-runs/bench", help="folder for bench.json and bench.png")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    graphs = getattr(args, "graphs", "off")
    if graphs != "off" and device.type != "cuda":
        print(f"lbw-kernels bench: --graphs {graphs} needs a CUDA device (steps are captured in CUDA graphs); "
              f"device is {device}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    layouts = args.layout or default_layouts(device, args.quick)
    # A CPU step of the slow rows (reference, published) takes up to seconds at 30M params.
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 3)
    reps = args.reps if args.reps is not None else (10 if args.quick else 20)
    budget = args.budget if args.budget is not None else (2.0 if args.quick else 4.0)
    rounds = args.rounds if args.rounds is not None else (1 if device.type == "cuda" else 3 if args.quick else 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = run_bench(
            layouts, device, backends=args.backend, gates=args.gate or ("exact", "single_pass"),
            stats_freqs=args.stats_freq or (1, 10), warmup=warmup, reps=reps, budget_s=budget, rounds=rounds,
            graphs=graphs, progress=lambda msg: print(f"  timing {msg}", flush=True),
        )
    except NothingToTime as err:
        print(f"lbw-kernels bench: {err}", file=sys.stderr)
        return 2
    env = report["environment"]
    print(f"\n{env['device_name']} ({env['device']}), torch {env['torch']}, triton {env['triton']}, commit {str(env['git_commit'])[:10]}")
    for name, why in report["skipped_backends"].items():
        print(f"  backend {name} left out: {why}")
    for note in report["notes"]:
        print(f"  note: {note}")
    for table in report["tables"]:
        print()
        print(format_table(table))
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        _plot(report, out / "bench.png")
    failed = [r["name"] for t in report["tables"] for r in t["rows"] if r["error"]]
    if failed:
        print(f"rows that failed: {', '.join(failed)}")
    # A backend named but left out (Triton failed to import on a GPU machine) is a run that did
    # not time what it was asked to: not exit 0, which a device check would record as "ok".
    missing = [name for name in dict.fromkeys(args.backend or []) if name not in report["backends"]]
    if missing:
        print(f"backends named but not timed: {', '.join(missing)} (the reasons above)")
    return 1 if failed or missing else 0


def _plot(report: Dict[str, object], png: Path) -> None:
    """bench.png of the report's tables. matplotlib is an extra: without it the PNG is said to be
    left out and the command goes on (the JSON, already written, holds every number)."""
    env = report["environment"]
    try:
        plot_tables(report["tables"], png, f"{env['device_name']} - torch {env['torch']}")
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "matplotlib":
            raise
        print(f"{png} not written: matplotlib is not installed (pip install matplotlib)")
        return
    print(f"wrote {png}")
