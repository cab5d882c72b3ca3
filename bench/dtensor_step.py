"""Host time of one step over FSDP2-style DTensor params: GuardedAdamW beside torch's AdamW.

Under FSDP2 every param is a DTensor: torch.optim.AdamW's fused and foreach kernels then go
through DTensor's dispatch for every op, while GuardedAdamW takes each DTensor's local shard
(distributed.py) and runs its own kernels on plain tensors. With many small params both are
host-bound; this times them on one process (a 1-rank gloo group and mesh, CPU tensors: the
per-tensor Python work is what is measured; the kernels' own share is small at these sizes).

    python bench/dtensor_step.py [--params 2000] [--numel 64] [--steps 20] [--backend cpp]

Prints one JSON line per row: median ms per step over --steps timed steps after 3 warm-up
steps, for GuardedAdamW (exact gate, telemetry every call) and torch AdamW fused and foreach.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import time

import torch
import torch.distributed as dist


def timed(step, steps: int) -> float:
    for _ in range(3):
        step()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=2000)
    parser.add_argument("--numel", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="cpp")
    args = parser.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free port: another run may hold any fixed one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from lbw_kernels import GuardedAdamW

        mesh = init_device_mesh("cpu", (1,))
        params = [torch.nn.Parameter(distribute_tensor(torch.randn(args.numel), mesh, [Shard(0)]))
                  for _ in range(args.params)]
        for p in params:
            p.grad = distribute_tensor(torch.randn(args.numel) * 1e-3, mesh, [Shard(0)])
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        rows = [(f"guard {args.backend} exact sf=1",
                 GuardedAdamW(params, lr=1e-3, backend=args.backend, stats_freq=1)),
                ("torch AdamW fused", torch.optim.AdamW(params, lr=1e-3, fused=True)),
                ("torch AdamW foreach", torch.optim.AdamW(params, lr=1e-3, foreach=True))]
        for name, opt in rows:
            ms = timed(opt.step, args.steps)
            print(json.dumps({"row": name, "ms": round(ms, 3), "params": args.params, "numel": args.numel,
                              "torch": torch.__version__, "commit": commit}), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
