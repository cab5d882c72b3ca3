"""Build and install lbw-kernels.

Pure Python installs everywhere (no compiler, no GPU). Optional compiled backends are
described by ext_modules() below; a missing toolchain prints one line and the install goes on.

    pip install --no-build-isolation -e .        # keep the torch already installed
"""

from setuptools import setup

# triton_kernels/ is installed as lbw_kernels.triton_kernels: a top-level `triton_kernels`
# would shadow the package of that name that triton publishes.
PACKAGES = ["lbw_kernels", "lbw_kernels.stress", "lbw_kernels.triton_kernels"]
PACKAGE_DIR = {"lbw_kernels.triton_kernels": "triton_kernels"}


def nvcc_major(nvcc):
    """The CUDA major version of ``nvcc`` ("release 13.0" in its --version), or None."""
    import re
    import subprocess

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.", out)
    return found.group(1) if found else None


def record_build(decision):
    """``decision`` (what was built, or why not) into lbw_kernels/_build_info.py, which ``lbw-kernels
    info`` and the cuda backend's error print: pip shows a build's own output only with -v, so
    the line this script prints would otherwise never reach the user. (Generated; not in git.)"""
    from pathlib import Path

    target = Path(__file__).parent / "lbw_kernels" / "_build_info.py"
    try:
        target.write_text(f"# written by setup.py at build time\nBUILD = {decision!r}\n", encoding="utf-8")
    except OSError:  # (a read-only source tree: info then says nothing more)
        pass


def static_libstdcxx_warning(library, cxx):
    """lbw_kernels/build_check.py's check of the built extension, loaded by path (the package
    is not importable while it is being built)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("lbw_build_check", Path(__file__).parent / "lbw_kernels" / "build_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.static_libstdcxx_warning(library, cxx)


def ext_modules():
    """The C++/CUDA backend ``lbw_kernels._C`` (csrc/), built with ninja against the installed
    torch. CUDA sources are added when torch has CUDA and an nvcc of its CUDA major version is
    found (or FORCE_CUDA=1); another major (PyPI's torch 2.9 is built with CUDA 12.8, a
    machine's nvcc may be 13.0), which torch's build refuses, builds the CPU kernels alone;
    TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX") and MAX_JOBS are honoured. Without torch, without
    a compiler, or with LBW_SKIP_BUILD=1 the install goes on pure-Python, saying so in one line.
    """
    import os
    import shlex
    import shutil
    import sys
    from pathlib import Path

    def skip(reason):
        print(f"lbw-kernels: not building the C++/CUDA extension ({reason}); installing pure-Python", file=sys.stderr)
        record_build(f"not built: {reason}")
        return [], {}

    if os.environ.get("LBW_SKIP_BUILD", "0") == "1":
        return skip("LBW_SKIP_BUILD=1")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return skip("torch is not importable at build time; use pip install --no-build-isolation")
    # The torch pip would otherwise replace (install_requires' lower bound) to satisfy this
    # package: a CUDA build of several GB over the user's own torch. Refused, with the reason.
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 5):
        sys.exit(f"lbw-kernels needs torch >= 2.5 (DTensor support reads torch.distributed.tensor); this "
                 f"Python has torch {torch.__version__}, which pip would replace: upgrade it yourself first")
    cxx = os.environ.get("CXX", "c++")
    compiler = shlex.split(cxx)[0] if cxx.strip() else "c++"  # (CXX="ccache g++": the first word runs)
    if shutil.which(compiler) is None:
        return skip(f"no C++ compiler ({cxx!r} not found)")
    # The ninja that setup.sh installs sits beside this Python, on PATH only in an activated venv
    # (PYTHON=.venv/bin/python): without it torch builds serially and MAX_JOBS does nothing.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    root = Path(__file__).parent
    sources = [
        "csrc/bindings/ops.cpp",
        "csrc/bindings/python_module.cpp",
        "csrc/bindings/ops_cpu.cpp",
        "csrc/cpu/dispatch.cpp",
        "csrc/cpu/kernels_default.cpp",
        "csrc/cpu/kernels_avx2.cpp",
        "csrc/cpu/kernels_avx512.cpp",
    ]
    # -ffp-contract=off: the kernels place their fused multiply-adds explicitly (guard_math.h),
    # so every instruction set rounds the same way and telemetry is bitwise repeatable.
    # -fno-trapping-math lets the masked loops compute both sides of a select (no FP traps
    # are enabled in torch); values are unchanged.
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template: without -fopenmp its `#pragma omp parallel`
        # is dropped and every kernel runs on one thread. The link resolves to the libgomp.so.1
        # torch already loaded (same soname), so there is one OpenMP runtime.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    cpu_only = None  # (why the CUDA kernels are left out where torch has CUDA)
    nvcc = cpp_extension.CUDA_HOME and os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    if force_cuda and torch.version.cuda is None:
        sys.exit(f"lbw-kernels: FORCE_CUDA=1 needs a CUDA build of torch; this one is {torch.__version__} (CPU)")
    with_cuda = force_cuda or (torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc))
    if with_cuda and not force_cuda:
        found, torch_major = nvcc_major(nvcc), torch.version.cuda.split(".")[0]
        if found is not None and found != torch_major:
            cpu_only = (f"CPU kernels only: {nvcc} is CUDA {found}, torch was built with CUDA {torch.version.cuda} "
                        f"(set CUDA_HOME to a CUDA {torch_major} toolkit)")
            print(f"lbw-kernels: building the {cpu_only}", file=sys.stderr)
            with_cuda = False
    if with_cuda:
        # sm_80 and sm_90 code, and sm_90's PTX, which the driver compiles for newer GPUs
        # (Blackwell): without it the extension would hold no kernel image they can run
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += ["csrc/bindings/ops_cuda.cpp", "csrc/cuda/multi_tensor_cuda.cu", "csrc/cuda/controller_cuda.cu"]
        define_macros.append(("LBW_WITH_CUDA", None))
        make = cpp_extension.CUDAExtension
        # --fmad=false: nvcc's counterpart of -ffp-contract=off; the CUDA kernels then round
        # exactly where guard_math.h says, as the CPU kernels do
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "--fmad=false"]}
    else:
        make = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
    ext = make(
        name="lbw_kernels._C",
        sources=sources,
        include_dirs=[str(root / "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_flags,
        py_limited_api=False,
    )
    built = "CPU + CUDA " + os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else "CPU only"
    print(f"lbw-kernels: building the C++ extension ({built})", file=sys.stderr)
    if not with_cuda and not cpu_only:  # (why no CUDA kernels)
        cpu_only = (f"CPU only (torch {torch.__version__} is a build without CUDA)" if torch.version.cuda is None
                    else f"CPU only (torch has CUDA {torch.version.cuda}; no nvcc found: set CUDA_HOME)")
    record_build(f"built: {cpu_only or built}")
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class build_ext(base):
        def run(self):
            super().run()
            for built in self.extensions:
                warning = static_libstdcxx_warning(self.get_ext_fullpath(built.name), cxx)
                if warning:
                    print(warning, file=sys.stderr)

    return [ext], {"build_ext": build_ext}


extensions, cmdclass = ext_modules()

setup(
    name="lbw-kernels",
    version="0.1.0",
    description="AdamW under the Learn-by-Wire guard: fused kernels and a pure-PyTorch reference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=extensions,
    cmdclass=cmdclass,
    # A lower bound only: pip keeps the torch that is installed (a CUDA build on a GPU machine).
    # 2.5: DTensor support reads the public torch.distributed.tensor (2.4 has only _tensor).
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.6", "ninja", "pybind11"],
        "plots": ["matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["lbw-kernels=lbw_kernels.cli:main"]},
    zip_safe=False,
)
