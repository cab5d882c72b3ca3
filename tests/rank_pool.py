"""A pool of CPU worker processes, one per rank, for the multi-process tests: each test's
function runs on every rank inside its own gloo process group (127.0.0.1, a free port), which
is destroyed even when the function fails; a failure on any rank fails the test with its
traceback."""

from __future__ import annotations

import math
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torch_compat import TORCH_VERSION


# Worker processes serve a whole test module (starting a Python with torch costs seconds);
# each test gets its own gloo process group on a fresh port, destroyed even when it fails.
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# torch < 2.8 destroys a ProcessGroup's Gloo backend with the GIL held (pytorch/pytorch#154976
# releases it), and ~ProcessGroupGloo joins Gloo's worker threads, one of which may still be
# freeing the tensors of the work it just finished, which takes the GIL: the rank then hangs in
# destroy_process_group. A moment without the GIL before it lets those threads finish.
_PG_DESTRUCTOR_HOLDS_GIL = TORCH_VERSION < (2, 8)


def _worker(rank: int, world: int, tasks, results) -> None:
    torch.set_num_threads(1)
    while (task := tasks.get()) is not None:
        fn, args, port = task
        try:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                timeout=timedelta(seconds=30),
            )
            try:
                fn(rank, *args)
                dist.barrier()
            finally:
                if _PG_DESTRUCTOR_HOLDS_GIL:
                    time.sleep(0.1)
                dist.destroy_process_group()
            results.put((rank, None))
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results.put((rank, traceback.format_exc()))


class Ranks:
    """``run(fn, *args)`` calls ``fn(rank, *args)`` on every rank inside a fresh process group."""

    def __init__(self, world: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, self.tasks[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, *args, timeout: float = 120) -> None:
        port = _free_port()
        for q in self.tasks:
            q.put((fn, args, port))
        errors = []
        for _ in range(self.world):
            try:
                rank, err = self.results.get(timeout=timeout)
            except queue.Empty:
                self.close()
                pytest.fail(f"a rank did not finish {fn.__name__} within {timeout} s")
            if err is not None:
                errors.append(f"rank {rank}:\n{err}")
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


# ------------------------------------------------------------------------------ comparisons
# (last_grad_norm: max_grad_norm's norm of each call, None without it)
RECORD = ("scale", "regime", "skipped_steps", "grad_ms", "ratio", "signed_mean", "grad_norm", "step", "last_grad_norm")


def same_on_every_rank(value) -> None:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    assert all(repr(g) == repr(gathered[0]) for g in gathered), gathered


def assert_close_records(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs), start=1):
        for name, x, y in zip(RECORD, a, b):
            if isinstance(x, float) and isinstance(y, float):
                assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12), (
                    f"call {k}: {name} {x} vs {y}"
                )
            else:
                assert x == y, f"call {k}: {name} {x!r} vs {y!r}"


def telemetry_row(opt) -> tuple:
    t = opt.telemetry()
    norm = opt.last_grad_norm
    t["last_grad_norm"] = None if norm is None else float(norm)
    return tuple(t[k] for k in RECORD)


def step_with(opt, params, grads, reader=None) -> tuple:
    """Put ``grads`` (None: no gradient) on ``params``, ``opt.step()``, and return the telemetry
    row of ``reader`` (default ``opt``; a ZeroRedundancyOptimizer's local optimizer)."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()
    return telemetry_row(opt if reader is None else reader)
