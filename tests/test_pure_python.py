"""Without the C++ extension: what a pure-Python install runs (no compiler at install time, or
LBW_SKIP_BUILD=1). Every place that uses ``lbw_kernels._C`` when it is there has a Python
fallback (gathering grads, the Triton plans' cache keys, the controller as reference ops); CI
builds the extension, so this runs them in a child process where importing it fails, as it
does on such an install, and checks the optimizer there against the reference.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["lbw_kernels._C"] = None  # `import lbw_kernels._C` now fails, as without the build
    import torch
    from lbw_kernels import step_plan
    from lbw_kernels.backends import availability, select_backend
    from lbw_kernels.verify import check_optimizer_stream

    report = {
        "availability": availability(),
        "auto": select_backend("auto", torch.device("cpu")).name,
        "python gather": step_plan.gather_grads is step_plan._gather_grads_python,
    }
    if report["availability"]["triton"] is None:
        from lbw_kernels.triton_kernels import chunk_table
        report["python keys"] = chunk_table.layout_key is chunk_table._layout_key_python
        report["triton stream"] = {
            str(dtype): [str(m) for m in check_optimizer_stream("triton", dtype)]
            for dtype in (torch.float32, torch.bfloat16)
        }
    torch.save(report, sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def child_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("pure") / "report.pt"
    # (Triton on CPU tensors: through its interpreter, on a GPU machine too)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", CHILD, str(out)], check=True, timeout=600, env=env)
    return torch.load(out, weights_only=False)


def test_without_the_extension_the_kernel_backends_say_why_and_auto_is_the_reference(child_report):
    availability = child_report["availability"]
    for name in ("cpp", "cuda"):
        assert "lbw_kernels._C (the C++/CUDA extension) is not built" in availability[name]
        assert "pip install --no-build-isolation" in availability[name]
    assert availability["reference"] is None
    assert child_report["auto"] == "reference"  # (Triton's interpreter is never picked by auto)
    assert child_report["python gather"]


def test_without_the_extension_triton_matches_the_reference(child_report):
    """verify's optimizer stream (spike, sign flip, NaN; both gates; fp32 and bf16) with the
    grads gathered and the Triton plans keyed in Python, the reference beside it likewise."""
    if "triton stream" not in child_report:
        pytest.skip(f"triton: {child_report['availability']['triton']}")
    assert child_report["python keys"]
    assert child_report["triton stream"] == {"torch.float32": [], "torch.bfloat16": []}


def _setup_copy(tmp_path: Path) -> Path:
    """setup.py and what ``--name`` reads, in a folder of their own: setup.py records its
    decision in lbw_kernels/_build_info.py, which the repository's own must not get from a test."""
    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "src"
    (copy / "lbw_kernels").mkdir(parents=True)
    for name in ("setup.py", "README.md", "lbw_kernels/build_check.py"):
        (copy / name).write_text((root / name).read_text())
    return copy


def _recorded(copy: Path) -> str:
    namespace: dict = {}
    exec((copy / "lbw_kernels" / "_build_info.py").read_text(), namespace)
    return namespace["BUILD"]


@pytest.mark.parametrize(
    "env, reason",
    [({"LBW_SKIP_BUILD": "1"}, "LBW_SKIP_BUILD=1"), ({"CXX": "no-such-compiler"}, "no C++ compiler ('no-such-compiler' not found)")],
)
def test_setup_without_a_build_says_so_in_one_line(env, reason, tmp_path):
    """setup.py decides at its start; ``--name`` runs that decision without installing anything.
    The decision is also recorded for ``lbw-kernels info`` (pip shows the line only with -v)."""
    copy = _setup_copy(tmp_path)
    env = {**{k: v for k, v in os.environ.items() if k not in ("LBW_SKIP_BUILD", "CXX")}, **env}
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=copy, env=env,
                          capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.split()[-1] == "lbw-kernels"
    said = [line for line in done.stderr.splitlines() if line.startswith("lbw-kernels:")]
    assert said == [f"lbw-kernels: not building the C++/CUDA extension ({reason}); installing pure-Python"]
    assert _recorded(copy) == f"not built: {reason}"


@pytest.mark.parametrize("nvcc_release, builds_cuda", [("13.0", False), ("12.6", True)])
def test_setup_builds_the_cpu_kernels_alone_beside_an_nvcc_of_another_cuda_major(tmp_path, nvcc_release, builds_cuda):
    """A CUDA torch (here one that says CUDA 12.8) beside an nvcc of another major version:
    torch's build would refuse that nvcc and fail the whole install, so setup.py builds the
    CPU kernels alone and says why; an nvcc of the same major builds both."""
    copy = _setup_copy(tmp_path)
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.1'\n")
    nvcc.chmod(0o755)
    # (torch.utils.cpp_extension looks for CUDA_HOME only where torch says it was built with
    # CUDA, then asks whether a device is there)
    (tmp_path / "sitecustomize.py").write_text(
        "import torch\ntorch.version.cuda = '12.8'\ntorch.cuda._is_compiled = lambda: True\n"
        "torch.cuda.is_available = lambda: False\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LBW_SKIP_BUILD", "CXX", "FORCE_CUDA")}
    env.update(CUDA_HOME=str(tmp_path / "cuda"), PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=copy, env=env,
                          capture_output=True, text=True, check=True, timeout=120)
    said = [line for line in done.stderr.splitlines() if line.startswith("lbw-kernels:")]
    if builds_cuda:
        assert said == ["lbw-kernels: building the C++ extension (CPU + CUDA 8.0;9.0+PTX)"], said
        assert _recorded(copy) == "built: CPU + CUDA 8.0;9.0+PTX"
    else:
        why = f"CPU kernels only: {nvcc} is CUDA 13, torch was built with CUDA 12.8 (set CUDA_HOME to a CUDA 12 toolkit)"
        assert said == [f"lbw-kernels: building the {why}", "lbw-kernels: building the C++ extension (CPU only)"], said
        assert _recorded(copy) == f"built: {why}"


def _setup_function(name: str):
    """A function of setup.py, without running setup.py (which installs when run)."""
    import ast

    path = Path(__file__).resolve().parents[1] / "setup.py"
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {"__file__": str(path)}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("static", [False, True])
def test_a_build_whose_extension_carries_its_own_libstdcxx_is_warned_of(tmp_path, static):
    """lbw_kernels/build_check.py, which setup.py runs after building (loading the file by path)
    and `lbw-kernels info` on the extension it loaded: a shared object that loads the shared
    libstdc++ passes; one linked with a static copy (as a lent GPU image's /opt/gcc/bin/g++
    linked the extension, whose error messages then crashed the process) gets a warning that
    says how to rebuild."""
    import shutil

    from lbw_kernels.build_check import static_libstdcxx_warning

    cxx = shutil.which("g++")
    if cxx is None or shutil.which("readelf") is None or not sys.platform.startswith("linux"):
        pytest.skip("needs g++ and readelf on Linux")
    src = tmp_path / "lib.cpp"
    src.write_text('#include <sstream>\n#include <string>\n'
                   'extern "C" int digits(unsigned long n) { std::ostringstream s; s << n; return int(s.str().size()); }\n')
    lib = tmp_path / "lib.so"
    subprocess.run([cxx, "-shared", "-fPIC", *(["-static-libstdc++"] if static else []), str(src), "-o", str(lib)],
                   check=True, capture_output=True, timeout=120)
    warning = static_libstdcxx_warning(str(lib), "the-compiler")
    assert _setup_function("static_libstdcxx_warning")(str(lib), "the-compiler") == warning
    if static:
        assert warning is not None and "the-compiler" in warning and "CXX=/usr/bin/g++" in warning
    else:
        assert warning is None
    try:  # the extension as built here loads the shared one
        from lbw_kernels import _C
    except ImportError:
        return
    assert static_libstdcxx_warning(_C.__file__) is None


def test_info_says_when_the_extension_carries_its_own_libstdcxx(monkeypatch, capsys):
    """pip shows a successful build's output only with -v: `lbw-kernels info` repeats the
    warning for the extension it loaded."""
    from lbw_kernels import build_check, cli

    try:
        from lbw_kernels import _C
    except ImportError:
        pytest.skip("the extension is not built")
    asked = []
    monkeypatch.setattr(build_check, "static_libstdcxx_warning", lambda library: asked.append(library) or "WARN-LINE")
    assert cli._info(None) == 0
    assert asked == [_C.__file__] and "WARN-LINE" in capsys.readouterr().out.splitlines()
