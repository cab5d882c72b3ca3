"""Build and install lbw-kernels.

Pure Python installs everywhere (no compiler, no GPU). Optional compiled backends are
described by ext_modules() below; a missing toolchain prints one line and the install goes on.

    pip install --no-build-isolation -e .        # keep the torch already installed
"""

from setuptools import setup

# triton_kernels/ is installed as lbw_kernels.triton_kernels: a top-level `triton_kernels`
# would shadow the package of that name that triton publishes.
PACKAGES = ["lbw_kernels"]
PACKAGE_DIR = {}


def ext_modules():
    """Compiled extensions (the C++/CUDA backend); none yet."""
    return [], {}


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
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.2", "ninja", "pybind11"],
        "plots": ["matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["lbw-kernels=lbw_kernels.cli:main"]},
    zip_safe=False,
)
