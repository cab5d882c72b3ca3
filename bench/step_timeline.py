"""Where the time of one optimizer step goes on the device's timeline: host prefix, kernels, gaps.

The bench times each step alone (CUDA events around ``step()``, then a sync), so a row's
milliseconds are the sum of three things this script separates, per step, from a
torch.profiler trace (CPU and CUDA activity, one clock):

* **prefix**: from the step's start on the host to its first kernel's start on the device:
  host work before the first launch, with the device idle (gathering, plan keys, the launch);
* **busy**: the device's kernels, memcpys and memsets of the step (union of their intervals),
  beside the floor (the layout's bytes per parameter over the copy bandwidth measured here);
  ``kernels`` lists each one's median time per step;
* **gaps**: the device idle between the step's first and last kernel (host work between
  launches that the device outran).

**launch** splits the prefix: from the step's start to the host's first call that puts work
on the device (a kernel launch, an async memcpy or memset, as the CUDA runtime and driver
calls are named in the trace). ``prefix - launch`` is then the time from that call to the
work's start on the device: launch latency, or a wait the device had before it.

**loop** is another measurement, without the profiler: the time per step of steps run back to
back (CUDA events around them, one sync at the end), as in a training loop whose host runs
ahead of the device: a step's host work before its first launch then overlaps the previous
step's kernels, and what is left is the device's time plus any gaps the host still causes.

``span = prefix + busy + gaps`` (or the host call's length, where the host returns after the
device is done: the bench's end event then fires when the host records it). On TinyLlama's
layout the question is whether a row over 1.05x the floor is over it in its kernels (busy /
floor) or in host time (prefix, gaps); on 2000 x 65,536 it says how much of the step the
device waits. The profiler itself adds host time to every op, so prefix and gaps read high
against the bench's numbers; busy does not.

    python bench/step_timeline.py --layout tinyllama-1.1b [--backend cuda --backend triton]
        [--gate exact] [--stats-freq 1 --stats-freq 10] [--steps 5] [--json timeline.jsonl]

Without a CUDA device it still runs (CPU tensors, ``cpp`` backend): every step is host time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lbw_kernels.bench import (
    FLOOR_BYTES_GATED, FLOOR_BYTES_UPDATE, LAYOUTS, copy_bandwidth, layout_numel, make_params, time_loop,
)

STEP_PREFIX = "Optimizer.step#"  # torch.optim's record_function around every step()
# Device-side rows that are the profiler's own (CUPTI buffer requests; seen on the H200 with
# ~0.1 ms of "CUDA time" once per run), not the step's. The GPU's copy of the step's annotation
# is left out as a user annotation.
PROFILER_OVERHEAD = frozenset({"Activity Buffer Request"})


@dataclass
class Span:
    name: str
    start: float  # microseconds, the profiler's clock (CPU and device events share it)
    end: float


@dataclass
class StepSplit:
    """One step's time, split (microseconds); ``kernels``: device time per kernel name."""

    host: float  # the step() call on the host
    prefix: float
    launch: Optional[float]  # the step's first launch call on the host (None: the step launched nothing)
    busy: float
    gaps: float
    span: float
    kernels: Dict[str, float] = field(default_factory=dict)


def _union_length(spans: Sequence[Span]) -> float:
    total, reach = 0.0, float("-inf")
    for s in sorted(spans, key=lambda s: s.start):
        if s.end > reach:
            total += s.end - max(s.start, reach)
            reach = s.end
    return total


def split_steps(steps: Sequence[Span], device: Sequence[Span], launches: Sequence[Span] = ()) -> List[StepSplit]:
    """Each step's split. A device event belongs to the step it starts after (and before the
    next step's start): steps are synchronised one by one, so their work does not interleave.
    ``launches``: the host's launch calls (:func:`is_launch_call`); those inside a step's host
    call give its ``launch``."""
    steps = sorted(steps, key=lambda s: s.start)
    out = []
    for i, step in enumerate(steps):
        until = steps[i + 1].start if i + 1 < len(steps) else float("inf")
        mine = [d for d in device if step.start <= d.start < until]
        calls = [c.start for c in launches if step.start <= c.start <= step.end]
        launch = min(calls) - step.start if calls else None
        if not mine:
            out.append(StepSplit(host=step.end - step.start, prefix=0.0, launch=launch, busy=0.0, gaps=0.0,
                                 span=step.end - step.start))
            continue
        first, last = min(d.start for d in mine), max(d.end for d in mine)
        busy = _union_length(mine)
        kernels: Dict[str, float] = {}
        for d in mine:
            kernels[d.name] = kernels.get(d.name, 0.0) + (d.end - d.start)
        out.append(StepSplit(host=step.end - step.start, prefix=first - step.start, launch=launch, busy=busy,
                             gaps=(last - first) - busy, span=max(last, step.end) - step.start, kernels=kernels))
    return out


def median_split(splits: Sequence[StepSplit]) -> StepSplit:
    """Field-wise medians; a kernel's median over the steps that ran it."""
    names = sorted({k for s in splits for k in s.kernels})
    launches = [s.launch for s in splits if s.launch is not None]
    return StepSplit(
        host=statistics.median(s.host for s in splits),
        prefix=statistics.median(s.prefix for s in splits),
        launch=statistics.median(launches) if launches else None,
        busy=statistics.median(s.busy for s in splits),
        gaps=statistics.median(s.gaps for s in splits),
        span=statistics.median(s.span for s in splits),
        kernels={k: statistics.median(s.kernels[k] for s in splits if k in s.kernels) for k in names},
    )


def is_launch_call(name: str) -> bool:
    """A host-side CUDA runtime or driver call that enqueues work on the device, as the trace
    names it (cudaLaunchKernel, cuLaunchKernelEx for Triton's kernels, cudaMemcpyAsync, ...)."""
    return name.startswith(("cudaLaunch", "cuLaunch")) or name in ("cudaMemcpyAsync", "cudaMemsetAsync")


def spans_of(prof) -> tuple:
    """(step spans on the host, device activity spans, launch calls on the host) of a finished
    torch.profiler run."""
    steps, device, launches = [], [], []
    for e in prof.events():
        kind = getattr(e.device_type, "name", str(e.device_type))
        if kind == "CPU":
            if e.name.startswith(STEP_PREFIX):
                steps.append(Span(e.name, e.time_range.start, e.time_range.end))
            elif is_launch_call(e.name):
                launches.append(Span(e.name, e.time_range.start, e.time_range.end))
        elif not (e.name.startswith(STEP_PREFIX) or getattr(e, "is_user_annotation", False)
                  or e.name in PROFILER_OVERHEAD or str(getattr(e, "activity_type", "")) == "overhead"):
            device.append(Span(e.name, e.time_range.start, e.time_range.end))
    return steps, device, launches


def loop_us(step: Callable[[], None], device: torch.device, steps: int) -> float:
    """Microseconds per step over ``steps`` steps run back to back (on CUDA the bench's
    ``time_loop``: its steps' times add up to the loop's span)."""
    if device.type != "cuda":
        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t0) / steps * 1e6
    return statistics.fmean(time_loop(step, device, steps)) * 1e3


def profile_steps(step: Callable[[], None], device: torch.device, steps: int, warmup: int = 3) -> List[StepSplit]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
            sync()  # as the bench: each step alone
    return split_steps(*spans_of(prof))


@dataclass
class Row:
    name: str
    bytes_per_param: int
    split: StepSplit
    floor_us: float
    loop_us: float  # per step, steps back to back (loop_us())


def _shorten(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def format_rows(layout: str, rows: Sequence[Row]) -> str:
    lines = [f"{layout}: per step, median (us); launch = the host's first launch call (within the prefix); "
             "busy/floor = the device's time over the floor of the row's bytes; loop = per step, steps back "
             "to back (no profiler)"]
    lines.append(f"{'row':38s} {'span':>9s} {'prefix':>8s} {'launch':>8s} {'busy':>9s} {'gaps':>8s} {'host':>9s} "
                 f"{'busy/floor':>10s} {'loop':>9s} {'loop/floor':>10s}")
    for r in rows:
        s = r.split
        ratio = f"{s.busy / r.floor_us:.3f}" if s.busy else "-"
        launch = "-" if s.launch is None else f"{s.launch:.1f}"
        lines.append(f"{r.name:38s} {s.span:9.1f} {s.prefix:8.1f} {launch:>8s} {s.busy:9.1f} {s.gaps:8.1f} "
                     f"{s.host:9.1f} {ratio:>10s} {r.loop_us:9.1f} {r.loop_us / r.floor_us:10.3f}")
        for k, us in sorted(s.kernels.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {_shorten(k):60s} {us:9.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="tinyllama-1.1b", choices=sorted(LAYOUTS))
    ap.add_argument("--backend", action="append", help="repeatable; default: cuda and triton (cpp on CPU)")
    ap.add_argument("--gate", action="append", choices=["exact", "single_pass"])
    ap.add_argument("--stats-freq", type=int, action="append",
                    help="repeatable; default 1. With 10 the profiled steps (calls 4-8) are calls without "
                         "telemetry, as the bench's sf=10 medians")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--loop-steps", type=int, default=20, help="steps timed back to back for the loop column")
    ap.add_argument("--json", help="append one JSON line per row to this file")
    args = ap.parse_args(argv)
    from lbw_kernels import GuardedAdamW

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = args.backend or (["cuda", "triton"] if device.type == "cuda" else ["cpp"])
    shapes = LAYOUTS[args.layout]()
    numel = layout_numel(shapes)
    params = make_params(shapes, device)
    bandwidth = copy_bandwidth(device, min(max(numel, 1 << 24), 1 << 28))
    candidates = [("torch AdamW fused", FLOOR_BYTES_UPDATE,
                   lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True))]
    for backend in backends:
        for gate in args.gate or ["exact", "single_pass"]:
            for sf in args.stats_freq or [1]:
                candidates.append((f"guard {backend} {gate} sf={sf}",
                                   FLOOR_BYTES_GATED if gate == "exact" else FLOOR_BYTES_UPDATE,
                                   lambda b=backend, g=gate, f=sf: GuardedAdamW(params, lr=1e-4, weight_decay=0.01,
                                                                             backend=b, gate=g, stats_freq=f)))
    rows = []
    for name, bytes_per_param, make in candidates:
        opt = make()
        splits = profile_steps(opt.step, device, args.steps)
        loop = loop_us(opt.step, device, args.loop_steps)
        del opt
        if not splits:
            print(f"{name}: no step annotations in the trace", file=sys.stderr)
            continue
        rows.append(Row(name, bytes_per_param, median_split(splits), bytes_per_param * numel / bandwidth * 1e6, loop))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(layout=args.layout, device=str(torch.cuda.get_device_name(device))
                                        if device.type == "cuda" else "cpu", copy_gbps=bandwidth / 1e9,
                                        steps=args.steps, row=name, floor_us=rows[-1].floor_us,
                                        loop_steps=args.loop_steps, loop_us=loop, **asdict(rows[-1].split))) + "\n")
    print(format_rows(args.layout, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
