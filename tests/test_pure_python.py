"""Without the C++ extension: what a pure-Python install runs (no compiler at install time, or
LBW_SKIP_BUILD=1). Every place that uses ``lbw_kernels._C`` when it is there has a Python
fallback (gathering grads, the Triton plans' cache keys, the controller as reference ops); CI
builds the extension, so this runs them in a child process where importing it fails, as it
does on such an install, and checks the optimizer there against the reference run here.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lbw_kernels.verify import PARAM_TOLERANCES, worst
from streams import random_stream

SHAPES = [(7,), (4097,), (3,), (0,), (33, 5)]
STEPS = 12

CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["lbw_kernels._C"] = None  # `import lbw_kernels._C` now fails, as without the build
    sys.path.insert(0, sys.argv[1])
    import torch
    from lbw_kernels import step_plan
    from lbw_kernels.backends import availability, select_backend
    from test_pure_python import run_stream

    report = {
        "availability": availability(),
        "auto": select_backend("auto", torch.device("cpu")).name,
        "python gather": step_plan.gather_grads is step_plan._gather_grads_python,
        "runs": {},
    }
    backends = ["reference"]
    if report["availability"]["triton"] is None:
        from lbw_kernels.triton_kernels import chunk_table
        report["python keys"] = chunk_table.layout_key is chunk_table._layout_key_python
        backends.append("triton")
    for backend in backends:
        for gate in ("exact", "single_pass"):
            report["runs"][backend, gate] = run_stream(backend, gate)
    torch.save(report, sys.argv[2])
    """
)


def run_stream(backend, gate):
    """Final params and (scale, regime, skipped) per call, over a spike/flip/NaN stream."""
    from lbw_kernels import GuardedAdamW

    stream = random_stream(STEPS, SHAPES, seed=3, spikes=(4, 9), flips=(6, 7), nan_at=(8,))
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64).float()) for s in SHAPES]
    opt = GuardedAdamW([{"params": params[::2]}, {"params": params[1::2], "lr": 0.025}], lr=0.05,
                       backend=backend, gate=gate, stats_freq=1)
    trajectory = []
    for grads in stream:
        for p, g in zip(params, grads):
            p.grad = g.float()
        opt.step()
        t = opt.telemetry()
        trajectory.append((t["scale"], t["regime"], t["skipped_steps"]))
    return [p.detach() for p in params], trajectory


@pytest.fixture(scope="module")
def child_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("pure") / "report.pt"
    tests = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", CHILD, tests, str(out)], check=True, timeout=600)
    return torch.load(out, weights_only=False)


def test_without_the_extension_the_kernel_backends_say_why_and_auto_is_the_reference(child_report):
    availability = child_report["availability"]
    for name in ("cpp", "cuda"):
        assert "lbw_kernels._C (the C++/CUDA extension) is not built" in availability[name]
        assert "pip install --no-build-isolation" in availability[name]
    assert availability["reference"] is None
    assert child_report["auto"] == "reference"  # (Triton's interpreter is never picked by auto)
    assert child_report["python gather"]
    assert child_report.get("python keys", True)


@pytest.mark.parametrize("gate", ["exact", "single_pass"])
def test_without_the_extension_every_backend_matches_the_reference(child_report, gate):
    """The reference there is the reference here, bitwise (it never used the extension); the
    Triton backend there (Python gather and cache keys) is within the tolerance its own tests
    allow over 12 steps of a spike/flip/NaN stream."""
    want_p, want_t = run_stream("reference", gate)
    assert {r for _, r, _ in want_t} >= {"spike", "oscillation", "nonfinite"}, want_t
    runs = child_report["runs"]
    got_p, got_t = runs["reference", gate]
    assert got_t == want_t and all(torch.equal(a, b) for a, b in zip(got_p, want_p))
    if ("triton", gate) not in runs:
        pytest.skip("triton is not installed")
    got_p, got_t = runs["triton", gate]
    assert [r for _, r, _ in got_t] == [r for _, r, _ in want_t]
    for (gs, _, gk), (ws, _, wk) in zip(got_t, want_t):
        assert abs(gs - ws) <= 1e-12 and gk == wk
    for a, b in zip(got_p, want_p):
        assert worst(a, b, *(STEPS * x for x in PARAM_TOLERANCES[torch.float32])) is None


@pytest.mark.parametrize(
    "env, reason",
    [({"LBW_SKIP_BUILD": "1"}, "LBW_SKIP_BUILD=1"), ({"CXX": "no-such-compiler"}, "no C++ compiler ('no-such-compiler' not found)")],
)
def test_setup_without_a_build_says_so_in_one_line(env, reason):
    """setup.py decides at its start; ``--name`` runs that decision without installing anything."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env={**os.environ, **env},
                          capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.split()[-1] == "lbw-kernels"
    said = [line for line in done.stderr.splitlines() if line.startswith("lbw-kernels:")]
    assert said == [f"lbw-kernels: not building the C++/CUDA extension ({reason}); installing pure-Python"]
