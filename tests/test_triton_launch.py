"""triton_kernels/launch.py: the direct-launch route (LBW_TRITON_DIRECT_LAUNCH=1) on CPU, with
stand-ins for Triton's JIT function and compiled kernel (the interpreter compiles nothing):
which calls go through the JIT, which launch a kept compiled kernel, with which arguments;
and that the backend's three launch sites pass what the route needs. On a GPU the backend
runs it for real (test_triton_backend.py: test_gpu_direct_launch_matches_the_jit_bitwise)."""

import pytest
import torch

pytest.importorskip("triton")

from lbw_kernels import GuardedAdamW  # noqa: E402
from lbw_kernels.triton_kernels import coefficients, guarded_adamw, launch, telemetry  # noqa: E402


class FakeCompiled:
    """CompiledKernel[grid]: reads grid[0], grid[1] and grid[2], as Triton 3.6 and 3.9 do."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        grid = (grid[0], grid[1], grid[2])
        return lambda *args: self.log.append(("direct", self.name, grid, args))


class FakeJIT:
    """A @triton.jit function as the Launcher sees it: arg_names, and kernel[grid](...) that
    launches and returns the compiled kernel of that specialisation."""

    def __init__(self, arg_names, name="k"):
        self.arg_names, self.name, self.log, self.compiles = list(arg_names), name, [], 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", self.name, grid, args, kwargs))
            self.compiles += 1
            return FakeCompiled(self.log, self.name)

        return run


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setenv("LBW_TRITON_DIRECT_LAUNCH", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _routes(kernel):
    return [entry[0] for entry in kernel.log]


def test_off_by_default_and_under_the_interpreter(monkeypatch):
    kernel = FakeJIT(["x", "n", "C"])
    site = launch.Launcher(kernel, device_index=lambda: 0)
    x = torch.zeros(8)
    monkeypatch.delenv("LBW_TRITON_DIRECT_LAUNCH", raising=False)
    site((1,), (x, 3), dict(C=2), dict(num_warps=4))
    site((1,), (x, 3), dict(C=2), dict(num_warps=4))
    monkeypatch.setenv("LBW_TRITON_DIRECT_LAUNCH", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    site((1,), (x, 3), dict(C=2), dict(num_warps=4))
    assert _routes(kernel) == ["jit"] * 3 and not site.compiled


def test_a_known_specialisation_is_launched_directly_with_every_parameter_in_order(direct):
    kernel = FakeJIT(["x", "y", "n", "A", "B"])
    site = launch.Launcher(kernel, device_index=lambda: 0)
    x, y = torch.zeros(8), torch.zeros(8, dtype=torch.float64)
    site((5,), (x, y, 48), dict(B=7, A=True), dict(num_warps=4))
    site((6,), (x, y, 32), dict(B=7, A=True), dict(num_warps=4))  # 32: still a multiple of 16, not 1
    assert _routes(kernel) == ["jit", "direct"]
    assert kernel.log[0][3:] == ((x, y, 48), dict(B=7, A=True, num_warps=4))
    assert kernel.log[1][2:] == ((6, 1, 1), (x, y, 32, True, 7))  # constexprs in signature order, grid padded


@pytest.mark.parametrize("change", ["dtype", "alignment", "int one", "int not 16", "int64", "constexpr",
                                    "option", "device"])
def test_each_fact_the_jit_specialises_on_keys_its_own_compiled_kernel(direct, change):
    kernel = FakeJIT(["x", "n", "C"])
    device = [0]
    site = launch.Launcher(kernel, device_index=lambda: device[0])
    buf = torch.zeros(64)
    args, constexprs, options = [buf, 32], dict(C=1), dict(num_warps=4)
    site((1,), tuple(args), constexprs, options)
    site((1,), tuple(args), constexprs, options)
    if change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.bfloat16)
    elif change == "alignment":
        args[0] = buf[1:]  # 4 bytes past a 16-byte boundary
    elif change == "int one":
        args[1] = 1
    elif change == "int not 16":
        args[1] = 33
    elif change == "int64":
        args[1] = 2**40
    elif change == "constexpr":
        constexprs = dict(C=2)
    elif change == "option":
        options = dict(num_warps=8)
    else:
        device[0] = 1
    site((1,), tuple(args), constexprs, options)
    site((1,), tuple(args), constexprs, options)
    assert _routes(kernel) == ["jit", "direct", "jit", "direct"] and kernel.compiles == 2


def test_a_future_from_asynchronous_compiling_is_not_kept(direct):
    class Future:  # what the JIT may hand back while it compiles in the background
        def result(self):
            raise AssertionError("not waited for here")

    class AsyncJIT(FakeJIT):
        def __getitem__(self, grid):
            return lambda *args, **kwargs: Future()

    site = launch.Launcher(AsyncJIT(["x", "C"]), device_index=lambda: 0)
    site((1,), (torch.zeros(4),), dict(C=1), {})
    assert not site.compiled


def test_what_it_cannot_key_goes_through_the_jit(direct):
    kernel = FakeJIT(["x", "label", "C"])
    site = launch.Launcher(kernel, device_index=lambda: 0)
    for _ in range(2):
        site((1,), (torch.zeros(4), "a string"), dict(C=1), {})
    missing = FakeJIT(["x", "C", "D"])  # D has a default in the kernel, the site leaves it out
    partial = launch.Launcher(missing, device_index=lambda: 0)
    for _ in range(2):
        partial((1,), (torch.zeros(4),), dict(C=1), {})
    assert _routes(kernel) == ["jit", "jit"] and _routes(missing) == ["jit", "jit"] and not partial.compiled


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_the_backends_launch_sites_pass_what_direct_launches_need(gate, monkeypatch):
    """Every site of a step, both gates (skip and mask variants included): the JIT once per
    specialisation, then direct launches, with the real kernels' parameter lists. (CPU tensors:
    the interpreter stays on for the backend, the route is switched on by hand.)"""
    monkeypatch.setattr(launch, "direct_launch_enabled", lambda: True)
    sites = {"update": guarded_adamw._UPDATE, "telemetry": telemetry._TELEMETRY,
             "coefficients": coefficients._COEFFICIENTS}
    fakes = {}
    for name, site in sites.items():
        fakes[name] = FakeJIT(site.kernel.arg_names, name)
        monkeypatch.setattr(site, "kernel", fakes[name])
        monkeypatch.setattr(site, "device_index", lambda: 0)
        monkeypatch.setattr(site, "compiled", {})
    params = [torch.nn.Parameter(torch.randn(n)) for n in (5, 4097, 3)]
    opt = GuardedAdamW(params, lr=1e-2, backend="triton", gate=gate, stats_freq=1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
    used = ["update", "coefficients"] + (["telemetry"] if gate == "exact" else [])
    for name in used:
        routes = _routes(fakes[name])
        assert routes and routes[0] == "jit" and routes[-1] == "direct", (name, routes)
        assert fakes[name].compiles == len(sites[name].compiled), name  # one JIT launch per specialisation
