"""Host time of one kernel launch by route, on a GPU: a Triton launch through its JIT against
the same compiled kernel launched directly, a call of the C++/CUDA ops, and a torch op.

Why: with thousands of small tensors a guarded step is host-bound, and cProfile put ~50 us of
host time on each Triton launch on the H200 machine (bench/results/nvidia-h200-profile-host-
2000x65536-20261126.txt; cProfile itself inflates Python calls). This says, without a
profiler, what one launch costs and how much of it is the JIT's argument binding and cache
lookup, which a launch of the compiled kernel (``CompiledKernel[grid](*args)``, what the JIT
does last) skips: whether keeping the compiled kernels in the plans is worth doing.

    python bench/launch_overhead.py [--launches 2000]      # one JSON object per line

Routes (each the min over 5 rounds of ``--launches`` back-to-back launches, the device
synchronised before and after each round; tiny kernels, so the device keeps up):
``torch add_`` (an aten op on a 1-element tensor), ``lbw _C._telemetry`` (the CUDA op's
eager entry on one gradient: a table lookup, an output allocation, two launches),
``triton jit`` (the telemetry kernel of a one-gradient layout, as the backend launches it),
``triton compiled`` (the kernel the JIT returned, launched with the same arguments) and
``triton direct (launch.py)`` (the backend's own launch with LBW_TRITON_DIRECT_LAUNCH=1: the
compiled route plus its keying of the arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def per_launch_us(launch, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            launch()
        best = min(best, time.perf_counter() - t0)
        torch.cuda.synchronize()
    return best / n * 1e6


def triton_routes(device: torch.device):
    """(jit launch, compiled launch) of the telemetry kernel of a one-gradient layout."""
    from lbw_kernels.triton_kernels import telemetry
    from lbw_kernels.triton_kernels.chunk_table import build_telemetry
    from lbw_kernels.triton_kernels.config import geometry, pass_options

    geo = geometry()
    layout = build_telemetry([torch.randn(1024, device=device)], geo.chunk, device)
    out = telemetry.new_partials(layout, torch.float64)
    chunks = layout.lists[0]
    kernel = telemetry._telemetry_chunks_kernel
    constexprs = dict(G_CODE=chunks.code, ALIGNED=chunks.aligned, CHUNK=geo.chunk, BLOCK=geo.block,
                      FOLD=geo.telemetry_fold, RBLOCK=geo.reduce_block, STAGES=geo.num_stages)
    args = [chunks.table, layout.workspace, layout.first_chunk, layout.counters, out]
    compiled = kernel[(chunks.n_chunks,)](*args, **constexprs, **pass_options(geo))
    # The compiled kernel takes every argument in signature order, constexprs included.
    values = dict(zip(kernel.arg_names, args), **constexprs)
    ordered = [values[name] for name in kernel.arg_names]
    runner = compiled[(chunks.n_chunks, 1, 1)]
    jit = lambda: telemetry.telemetry_chunks_(layout, out)  # noqa: E731
    return jit, (lambda: runner(*ordered)), jit  # the third timed with LBW_TRITON_DIRECT_LAUNCH=1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=2000)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    x = torch.zeros(1, device=device)
    routes = {"torch add_": lambda: x.add_(1.0)}
    try:
        from lbw_kernels import _C

        if _C.WITH_CUDA:
            g = [torch.randn(1024, device=device)]
            routes["lbw _C._telemetry"] = lambda: _C._telemetry(g)
    except ImportError:
        pass
    try:
        routes["triton jit"], routes["triton compiled"], routes["triton direct (launch.py)"] = triton_routes(device)
    except Exception as err:  # noqa: BLE001 - reported, the other routes still run
        print(json.dumps({"route": "triton", "error": f"{type(err).__name__}: {err}"}), flush=True)
    for name, launch in routes.items():
        direct = name == "triton direct (launch.py)"
        os.environ["LBW_TRITON_DIRECT_LAUNCH"] = "1" if direct else "0"
        try:
            launch()  # warm-up (compiles; on the direct route, keeps the compiled kernel)
            us = per_launch_us(launch, args.launches)
            print(json.dumps({"route": name, "host_us_per_launch": round(us, 2), "launches": args.launches}),
                  flush=True)
        except Exception as err:  # noqa: BLE001
            print(json.dumps({"route": name, "error": f"{type(err).__name__}: {err}"}), flush=True)


if __name__ == "__main__":
    main()
