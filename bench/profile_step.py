"""Where the host time of one guarded step goes: cProfile's top functions and torch.profiler's
operator and kernel-launch counts per step, for one layout and backend.

With many small tensors (2000 x 65536) a step is host-bound: the GPU waits for launches and a
CUDA-event timing measures the host. This says which Python functions and aten ops the time
goes to, so host-side work can be cut where it is.

    python bench/profile_step.py --layout 2000x65536 --backend cuda --gate exact

Without a GPU, ``--stub-triton-kernels`` measures the Triton backend's host work alone: on CPU
tensors (as many as the layout has, of 64 elements each: the host work depends on the number
of tensors, not their size) with its three kernels' launches replaced by no-ops and the
partials they would write zeroed (left unwritten, their garbage holds denormals, which make the
controller's float64 arithmetic ~10x slower). What a CPU-only session can compare before and
after a host-side change; a GPU adds each launch's own cost on top.

    TRITON_INTERPRET=1 python bench/profile_step.py --stub-triton-kernels --top 0

With the stub it also prints when each launch is issued, in microseconds from the start of
``step()`` (median over the timed calls): the host time before the first kernel is time the
device sits idle in a step timed alone, and host time between launches is hidden only while
the device still runs the previous kernel. The exact gate's line comes twice, with its early
telemetry pass (lbw_kernels/early_telemetry.py) and without, their steps interleaved.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from typing import List, Optional, Tuple

import torch

from lbw_kernels import GuardedAdamW
from lbw_kernels.bench import LAYOUTS, make_params


def stub_triton_kernels() -> List[Tuple[str, float]]:
    """Replace the Triton backend's kernel launches with no-ops; its passes' outputs are zeroed.
    Returns the list each launch appends its kernel's name and ``perf_counter()`` to."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--stub-triton-kernels runs on CPU tensors: set TRITON_INTERPRET=1")
    from lbw_kernels.triton_kernels import coefficients, guarded_adamw, ops, telemetry

    launches: List[Tuple[str, float]] = []

    class NoLaunch:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, time.perf_counter()))

    for name, site in (("update", guarded_adamw._UPDATE), ("telemetry", telemetry._TELEMETRY),
                       ("coefficients", coefficients._COEFFICIENTS)):
        site.kernel = NoLaunch(name)
    new_partials = telemetry.new_partials
    ops.new_partials = telemetry.new_partials = lambda layout, dtype: new_partials(layout, dtype).zero_()
    return launches


def launch_times(opt, launches: List[Tuple[str, float]], steps: int, early: Optional[List[bool]] = None) -> List[str]:
    """``telemetry 190 us, coefficients 400 us, ..., return 435 us``: when each launch of a
    step is issued, from the start of ``step()``, median over ``steps`` calls. With ``early``
    (booleans), one such line per value, the steps interleaved: the exact gate's early
    telemetry pass on and off (lbw_kernels/early_telemetry.py) in the same process."""
    from lbw_kernels import early_telemetry

    settings, enabled = early or [early_telemetry.ENABLED], early_telemetry.ENABLED
    rows: dict = {on: [] for on in settings}
    try:
        for i in range(steps * len(settings)):
            on = settings[i % len(settings)]
            early_telemetry.ENABLED = on
            launches.clear()
            t0 = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            rows[on].append([(name, t - t0) for name, t in launches] + [("return", end - t0)])
    finally:
        early_telemetry.ENABLED = enabled
    out = []
    for on, calls in rows.items():
        label = "" if early is None else f"early telemetry {'on' if on else 'off'}: "
        if len({tuple(name for name, _ in row) for row in calls}) > 1:
            out.append(label + "launches differ between calls (stats_freq > 1?): no median")
            continue
        out.append(label + ", ".join(f"{name} {statistics.median(row[i][1] for row in calls) * 1e6:.0f} us"
                                     for i, (name, _) in enumerate(calls[0])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="2000x65536", choices=sorted(LAYOUTS))
    ap.add_argument("--backend", action="append", help="repeatable; default: cuda and triton (cpp on CPU)")
    ap.add_argument("--gate", action="append", choices=["exact", "single_pass"])
    ap.add_argument("--stats-freq", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--stub-triton-kernels", action="store_true",
                    help="CPU: the triton backend's host work, its kernel launches replaced by no-ops")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = args.backend or (["cuda", "triton"] if device.type == "cuda" else ["cpp"])
    shapes = LAYOUTS[args.layout]()
    launches = None
    if args.stub_triton_kernels:
        device, backends, shapes = torch.device("cpu"), ["triton"], [(64,)] * len(shapes)
        launches = stub_triton_kernels()
    params = make_params(shapes, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for backend in backends:
        for gate in args.gate or ["exact", "single_pass"]:
            opt = GuardedAdamW(params, lr=1e-4, weight_decay=0.01, backend=backend, gate=gate,
                               stats_freq=args.stats_freq)
            for _ in range(3):
                opt.step()
            sync()
            # host time alone: launches queue up, the device is not waited for inside the loop
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            host_ms = (time.perf_counter() - t0) / args.steps * 1e3
            sync()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.steps):
                opt.step()
            prof.disable()
            sync()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as tp:
                for _ in range(args.steps):
                    opt.step()
                sync()
            events = tp.key_averages()
            n_launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
            aten = sum(e.count for e in events if e.key.startswith("aten::"))
            print(f"\n=== {args.layout} {backend} {gate} sf={args.stats_freq}: host {host_ms:.3f} ms/step, "
                  f"{aten / args.steps:.0f} aten ops and {n_launches / args.steps:.0f} kernel launches per step")
            if launches is not None:
                # (the exact gate: with its early telemetry pass and without, steps interleaved)
                for line in launch_times(opt, launches, args.steps * 5, [True, False] if gate == "exact" else None):
                    print(f"launches issued at (from step start, median): {line}")
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
            print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
            del opt


if __name__ == "__main__":
    main()
