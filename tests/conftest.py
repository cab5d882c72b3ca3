"""Test-wide setup: CPU-only machines run Triton kernels through its interpreter.

TRITON_INTERPRET must be set before a kernel is decorated (Triton reads it in @triton.jit),
so it is set here, before any test module imports lbw_kernels.triton_kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _run_before(path: str) -> set:
    """The test ids listed in ``path`` (tests/gpu_tests_run_before.txt: one per line, # comments)."""
    with open(path, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.gpu`` skip, with the reason, where there is no CUDA device.

    LBW_GPU_TESTS_RUN_BEFORE=FILE (bench/device_check.sh sets it): the tests FILE lists (those
    that have run on a GPU) run after the others, each part in its own order, so that a GPU run
    cut short by its time budget loses tests that have passed before, not ones that never ran."""
    listed = os.environ.get("LBW_GPU_TESTS_RUN_BEFORE")
    if listed:
        before = _run_before(listed)
        items.sort(key=lambda item: item.nodeid in before)  # (stable)
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
