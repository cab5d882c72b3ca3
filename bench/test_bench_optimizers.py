"""pytest-benchmark suite: one optimizer step per row of ``lbw_kernels.bench``, per layout.

Kept out of the default test run (pyproject's testpaths is tests/). Rows, layouts and parameter
set-up come from ``lbw_kernels.bench``, the same code as ``lbw-kernels bench``::

    pytest bench/ --benchmark-json bench/results/<device>-pytest.json
    LBW_BENCH_LAYOUTS=gpt2-124m,2000x65536 pytest bench/ -k fused

Environment: ``LBW_BENCH_DEVICE`` (default cuda when present), ``LBW_BENCH_LAYOUTS`` (comma list;
default: the three full layouts on CUDA, gpt2-30m on CPU), ``LBW_BENCH_BACKENDS`` (comma list;
default every available one).
"""

import gc
import os

import pytest
import torch

from lbw_kernels.bench import LAYOUTS, build_rows, default_layouts, layout_numel, make_params, usable_backends

DEVICE = torch.device(os.environ.get("LBW_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
LAYOUT_NAMES = [x for x in os.environ.get("LBW_BENCH_LAYOUTS", "").split(",") if x] or default_layouts(DEVICE, quick=False)
_ASKED = [x for x in os.environ.get("LBW_BENCH_BACKENDS", "").split(",") if x] or None
ROWS = build_rows(usable_backends(DEVICE, _ASKED)[0])


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.fixture(scope="module", params=LAYOUT_NAMES)
def layout(request):
    params = make_params(LAYOUTS[request.param](), DEVICE)
    yield request.param, params
    del params
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("row", ROWS, ids=[r.name.replace(" ", "_") for r in ROWS])
def test_step(benchmark, layout, row):
    name, params = layout
    step = row.make(params)
    step()  # state allocation and kernel compilation stay outside the timing
    _sync()

    def one_step():
        step()
        _sync()

    numel = layout_numel(LAYOUTS[name]())
    benchmark.group = name
    benchmark.extra_info.update(layout=name, params=numel, bytes_per_param=row.bytes_per_param, device=str(DEVICE))
    benchmark.pedantic(one_step, rounds=10, warmup_rounds=2, iterations=1)
