"""GPU checks shared by the kernel backends' tests (triton, cuda): no host sync inside step(),
and a CUDA-graph-captured step that replays like eager steps. Callers mark their tests gpu.
Also the launch geometries bench/device_check.sh times (its TUNE_DEFAULT), for the tests that
check them, and the device parameters of the C++ ops' tests."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from lbw_kernels import GuardedAdamW


DEVICE_CHECK = Path(__file__).resolve().parents[1] / "bench" / "device_check.sh"


def extension_devices() -> list:
    """``device`` parameters of the C++ ops' tests: "cpu", and "cuda" marked gpu, so that
    bench/device_check.sh (``pytest -m gpu``) runs it; skipped, with the reason, where there
    is no CUDA device or the extension was built without CUDA."""
    import pytest

    from lbw_kernels.backends import availability

    reason = availability()["cuda"] if torch.cuda.is_available() else None
    cuda_marks = [pytest.mark.gpu, pytest.mark.skipif(reason is not None, reason=f"cuda backend: {reason}")]
    return ["cpu", pytest.param("cuda", marks=cuda_marks)]


def device_check_entries() -> list:
    """The entries device_check times by default (its TUNE_DEFAULT lines): ``BACKEND:GEOMETRY``
    and ``BACKEND:LBW_NAME=VALUE`` (another switch)."""
    text = DEVICE_CHECK.read_text()
    return " ".join(re.findall(r'^TUNE_DEFAULT\+?="([^"]*)"', text, flags=re.M)).split()


def device_check_candidates() -> list:
    """The ``BACKEND:GEOMETRY`` entries among them: the launch geometries."""
    return [e for e in device_check_entries() if not e.split(":", 1)[1].startswith("LBW_")]


def kernel_gpu_backends() -> list:
    """``backend`` parameters of GPU tests that run both kernel backends, marked gpu."""
    import pytest

    return [pytest.param(b, marks=pytest.mark.gpu) for b in ("triton", "cuda")]


def require_backend(name: str) -> None:
    """Skip, with the reason, where backend ``name`` is not built."""
    import pytest

    from lbw_kernels.backends import availability

    reason = availability()[name]
    if reason is not None:
        pytest.skip(reason)


def record_cuda_exact_calls(monkeypatch) -> list:
    """What each call of the cuda backend's one-call exact step (``_C._adamw_exact_``) gives:
    ``(taken, early)``, whether it took the call (False: declined, the optimizer then runs the
    passes one by one) and whether it was handed the rows of an early telemetry pass; an error
    it raises is recorded as ``(error, early)`` and raised on."""
    from lbw_kernels import _C

    calls = []
    real = _C._adamw_exact_

    def recorded(*args):
        early = len(args) > 14 and args[14] is not None  # (13 update arguments, decide, partials)
        try:
            taken = real(*args)
        except Exception as err:
            calls.append((err, early))
            raise
        calls.append((taken, early))
        return taken

    monkeypatch.setattr(_C, "_adamw_exact_", recorded)
    return calls


def assert_steps_never_sync(opt: GuardedAdamW, calls: int = 3) -> None:
    """``calls`` steps of ``opt`` (warmed up already) under set_sync_debug_mode("error")."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(calls):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def assert_step_never_syncs(model: torch.nn.Module, **opt_kwargs) -> None:
    opt = GuardedAdamW(model.parameters(), **{"lr": 1e-3, "stats_freq": 1, **opt_kwargs})
    first = next(model.parameters())
    model(torch.randn(32, first.shape[1], device="cuda")).square().mean().backward()
    opt.step()  # warm-up: kernels compiled, chunk tables built and uploaded
    assert_steps_never_sync(opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def assert_relayout_step_never_syncs(**opt_kwargs) -> None:
    """A step whose layout changed (a grad set to None: the optimizer's step plan and the
    backend's tables built anew) does not wait for the device either: the plan's element counts
    and the tables go up from pinned memory without blocking."""
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in ((33, 17), (4097,), (5,))]
    opt = GuardedAdamW(params, lr=1e-3, stats_freq=1, **opt_kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # warm-up: kernels compiled, states created
    params[-1].grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.telemetry()["step"] == 2


def step_other_layouts(n: int, sync: bool = True, **opt_kwargs) -> None:
    """One step each of ``n`` optimizers over ``n`` distinct layouts (fresh tensors): pushes
    every earlier plan or table out of a backend's cache of fewer than ``n`` entries. (Their
    plans, of the same small sizes, likely take the blocks an eviction frees, so a replay
    through freed memory likely shows; not certainly. Filling freed blocks with garbage would
    make it certain but could crash the CUDA context, and every GPU test after it.)"""
    for i in range(n):
        params = [torch.nn.Parameter(torch.randn(17 + i, device="cuda")), torch.nn.Parameter(torch.randn(3, device="cuda"))]
        opt = GuardedAdamW(params, lr=1e-3, **opt_kwargs)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    if sync:
        torch.cuda.synchronize()


# torch.cuda._sleep cycles (~1.5 s at the H100/H200's ~2 GHz): a side stream held back while the
# host runs dozens of other optimizers' first steps on the default stream.
HOLD_BACK_CYCLES = 3_000_000_000


def assert_side_stream_step_survives_eviction(n_other: int, *, rtol: float, atol: float, relayout: bool = False,
                                              **opt_kwargs) -> None:
    """A step whose tables (or plans) the backend built and cached on the default stream runs
    next on a side stream held back by a sleep; before the side stream gets to it, ``n_other``
    optimizers stepping on the default stream push those tables out of the cache and allocate
    their own. The side stream's launches must still read the tables they were handed: the
    backend tells the allocator that stream uses them (record_stream), so their blocks are not
    handed out again before it is done. Without that, the other optimizers' new tables likely
    take the freed blocks (same small sizes) and the held-back step updates through their
    addresses. With ``relayout``, one more step on the side stream, after the last param's
    grad is set to None, replaces the optimizer's step plan: the element counts on the device
    that the held-back step reads are freed then (lbw_kernels/stream_use.py covers them too).
    Compared with a twin stepping on the default stream (rtol = atol = 0: bitwise)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(33, 17), (4097,), (5, 3)]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen)) for s in shapes]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = {"lr": 1e-2, "stats_freq": 1, **opt_kwargs}
    # Once first: every kernel those steps launch is loaded (and compiled) before the timed
    # part, where a load or compile could outlast the side stream's hold-back.
    step_other_layouts(n_other, **opt_kwargs)
    opt, twin_opt = GuardedAdamW(params, **kw), GuardedAdamW(twin, **kw)
    for p, q in zip(params, twin):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    # The grad dropped for the relayout is the test's own tensor, made on the default stream and
    # read by the held-back step: held here until the end, or its block would go back to the
    # default stream's pool at once and the evicting steps could overwrite it (a failure that
    # would look like one of the backend's own).
    dropped = params[-1].grad
    for call in range(2):
        for p, q in zip(params, twin):  # in place: the second step finds the first one's tables
            g = torch.randn(p.shape, device="cuda", generator=gen)
            p.grad.copy_(g)
            q.grad.copy_(g)
        twin_opt.step()
        if call == 0:
            opt.step()  # builds and caches its tables on the default stream
            continue
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(HOLD_BACK_CYCLES)
            opt.step()
            if relayout:
                params[-1].grad = twin[-1].grad = None
                twin_opt.step()  # (on the side stream too: it reads only the twin's own tensors)
                opt.step()
        step_other_layouts(n_other, sync=False, **opt_kwargs)  # (on the default stream, while side sleeps)
        # The evictions and the new tables' uploads came while the side stream still slept
        # (else nothing here tests the fix: raise HOLD_BACK_CYCLES).
        assert not side.query(), "the side stream finished before the evicting steps were queued"
    torch.cuda.synchronize()
    del dropped
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    torch.testing.assert_close(opt._guard, twin_opt._guard, rtol=rtol, atol=atol, equal_nan=True)


def assert_graph_replay_matches_eager(
    model: torch.nn.Module, *, rtol: float, atol: float, stats_freq: int = 1, after_capture=None, **opt_kwargs
) -> None:
    """Capture one step, replay it on 5 more gradient sets (calls 2-6), and compare with a twin
    optimizer stepping eagerly. With stats_freq > 1 the replays must follow rule 2's schedule
    (read from the guard's call count on the device), not repeat the captured call's choice.
    The last two telemetry calls spike (two hot calls in a row), so every policy moves the scale.
    ``after_capture()`` runs between the capture and the first replay."""
    kw = {"lr": 1e-2, "stats_freq": stats_freq, **opt_kwargs}
    spikes = [c for c in range(2, 7) if c % stats_freq == 0][-2:]
    twin = copy.deepcopy(model)
    opt = GuardedAdamW(model.parameters(), **kw)
    twin_opt = GuardedAdamW(twin.parameters(), **kw)
    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [[torch.randn(p.shape, device="cuda", generator=gen, dtype=p.dtype) * (30 if k + 1 in spikes else 1)
              for p in model.parameters()] for k in range(6)]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()  # warm up on a side stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for p, g in zip(model.parameters(), grads[0]):
            p.grad.copy_(g)
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for p, g in zip(twin.parameters(), grads[0]):
        p.grad = g.clone()
    twin_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    if after_capture is not None:
        after_capture()
    for k in range(1, 6):
        for p, g in zip(model.parameters(), grads[k]):
            p.grad.copy_(g)
        graph.replay()
        for p, g in zip(twin.parameters(), grads[k]):
            p.grad = g.clone()
        twin_opt.step()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    # NaN slots (a policy's unused ones) compare equal; rtol=atol=0 means bitwise
    torch.testing.assert_close(opt._guard, twin_opt._guard, rtol=rtol, atol=atol, equal_nan=True)
    if opt.guard_config.max_grad_norm is not None:  # (the last replay's norm, written into the eager step's tensor)
        torch.testing.assert_close(opt.last_grad_norm, twin_opt.last_grad_norm, rtol=rtol, atol=atol)
    assert opt.telemetry()["scale"] < 1
