"""Test-wide setup: CPU-only machines run Triton kernels through its interpreter.

TRITON_INTERPRET must be set before a kernel is decorated (Triton reads it in @triton.jit),
so it is set here, before any test module imports lbw_kernels.triton_kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.gpu`` skip, with the reason, where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Backends that run on CPU tensors here; the optimizer's semantics tests run on each of them.
# One that is not built shows up as a skip with the reason, not as a silent omission.
CPU_BACKENDS = ("reference", "cpp", "triton")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    from lbw_kernels.backends import availability, get_backend

    reason = availability()[request.param]
    if reason is not None:
        pytest.skip(reason)
    if not get_backend(request.param).supports(torch.device("cpu")):
        pytest.skip(f"backend {request.param!r} does not run on CPU tensors here")
    return request.param


@pytest.fixture(scope="module")
def ranks():
    """Two CPU worker processes serving a test module's multi-process tests (rank_pool.py)."""
    from rank_pool import Ranks

    with Ranks() as pool:
        yield pool
