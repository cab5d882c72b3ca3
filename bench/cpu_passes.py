"""Where a guarded exact step's time goes on a CPU: the C++ kernels' two passes called alone
(the update op, 28 B per parameter; the telemetry pass, 4 B), the whole step, and fused AdamW,
beside what the machine's memory gives torch's own streaming ops (in-place ``mul_``, ``add_``,
``addcmul_``: read and write; ``sum()``: read only). Every call interleaved with the others in
one process, so a slow minute of a shared machine lands on all of them; medians.

    python bench/cpu_passes.py [--layout gpt2-30m] [--calls 30] [--dtype bfloat16]

With ``--dtype bfloat16`` or ``float16`` the params and grads are in that dtype (the guard's
states stay fp32: 22 B per parameter for its update; torch's fused AdamW keeps states in the
params' dtype: 14 B); torch's streaming ops stay fp32, the machine's rates.

Why: issue 4's CPU targets put the exact gate (telemetry pass + update) within 1.15x of fused
AdamW and, with stats_freq=10, within 1.02x. When the update alone runs at the machine's
read-write rate, the exact step is that plus the telemetry pass's read of every gradient
(rule 1's finite check reads them on every call): this says how far each pass is from what
the memory gives, so a missed target can be told apart from a slow kernel. The stats_freq=10
step's median is that of its calls without telemetry (9 in 10), which still read every
gradient for the finite check.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

from lbw_kernels import GuardedAdamW
from lbw_kernels.bench import LAYOUTS, make_params

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timings(fns: Dict[str, Callable[[], object]], calls: int, warmup: int = 3) -> Dict[str, List[float]]:
    """Seconds per call of each function, the functions interleaved call by call."""
    out: Dict[str, List[float]] = {name: [] for name in fns}
    for i in range(warmup + calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                out[name].append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="gpt2-30m", choices=sorted(LAYOUTS))
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                    help="params and grads (the guard's AdamW states stay fp32; torch's take the params' dtype)")
    args = ap.parse_args()
    import lbw_kernels.cpp_backend  # noqa: F401  (registers torch.ops.lbw)

    shapes = LAYOUTS[args.layout]()
    cpu = torch.device("cpu")
    dtype = DTYPES[args.dtype]

    def in_dtype(params):
        for p in params:
            p.data, p.grad = p.data.to(dtype), p.grad.to(dtype)
        return params

    params = in_dtype(make_params(shapes, cpu, seed=0))
    opt = GuardedAdamW(params, lr=1e-4, weight_decay=0.01, backend="cpp", gate="exact", stats_freq=1)
    opt.step()  # creates the state the ops below update
    opt10 = GuardedAdamW(in_dtype(make_params(shapes, cpu, seed=2)), lr=1e-4, weight_decay=0.01, backend="cpp",
                         gate="exact", stats_freq=10)
    grads = [p.grad for p in params]
    exp_avgs = [opt.state[p]["exp_avg"] for p in params]
    exp_avg_sqs = [opt.state[p]["exp_avg_sq"] for p in params]
    steps = [opt.state[p]["step"] for p in params]
    scale = torch.ones((), dtype=torch.float64)
    fused = torch.optim.AdamW(in_dtype(make_params(shapes, cpu, seed=1)), lr=1e-4, weight_decay=0.01, fused=True)
    n = sum(p.numel() for p in params)
    flat = torch.cat([g.flatten() for g in grads])
    a, b, c = torch.randn(n), torch.randn(n), torch.randn(n)  # (fp32: the machine's streaming rates)
    fns = {
        "torch AdamW fused step": fused.step,
        "guard cpp exact step": opt.step,
        "guard cpp exact step sf=10": opt10.step,
        "lbw update op (adamw_)": lambda: torch.ops.lbw.adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, scale, 1e-4,
                                                                0.9, 0.999, 1e-8, 0.01, False, None),
        "lbw telemetry pass": lambda: torch.ops.lbw.telemetry(grads),
        "torch sum() of the grads": flat.sum,
        "torch mul_": lambda: a.mul_(1.0),
        "torch add_": lambda: a.add_(b, alpha=0.0),
        "torch addcmul_": lambda: a.addcmul_(b, c, value=0.0),
    }
    # Bytes each call moves per parameter (read + written): what its GB/s column counts. The
    # guard reads p, g and fp32 m, v and writes p, m, v (and reads g once more on the exact
    # gate); torch's fused AdamW keeps its states in the params' dtype.
    e = dtype.itemsize
    update = 2 * e + 4 + 4 + e + 4 + 4
    moved = {"torch AdamW fused step": 7 * e, "guard cpp exact step": update + e,
             "guard cpp exact step sf=10": update + e, "lbw update op (adamw_)": update,
             "lbw telemetry pass": e, "torch sum() of the grads": e, "torch mul_": 8, "torch add_": 12,
             "torch addcmul_": 16}
    times = timings(fns, args.calls)
    fused_ms = statistics.median(times["torch AdamW fused step"]) * 1e3
    print(f"{args.layout}: {len(shapes)} tensors, {n / 1e6:.1f}M {args.dtype} parameters, "
          f"{torch.get_num_threads()} threads, {args.calls} calls each, interleaved; medians")
    print(f"{'':28s} {'ms':>8s} {'GB/s':>7s} {'vs fused':>9s}")
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        # (4 significant digits: a tiny layout's passes take microseconds, which 2 decimals show as 0.00)
        print(f"{name:28s} {ms:8.4g} {moved[name] * n / ms / 1e6:7.1f} {ms / fused_ms:8.3f}x")


if __name__ == "__main__":
    main()
