"""torch.library.opcheck on the lbw ops (schemas, fake impls, aliasing, dispatch), on CPU and,
with a GPU, on CUDA. Skips with the reason when the C++ extension is not built."""

import pytest
import torch

from lbw_kernels.backends import availability

_reason = availability()["cpp"]
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"C++ extension not built: {_reason}")


def _update_args(device, dtype=torch.float32, skip=None):
    gen = torch.Generator().manual_seed(0)
    sizes = (5, 0, 4099)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    params = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(device, dtype) for n in sizes]
    exp_avgs = [torch.randn(n, generator=gen).to(device, sdt) * 0.1 for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=gen).to(device, sdt) * 0.01 for n in sizes]
    steps = [torch.tensor(3.0, device=device) for _ in sizes]
    lr_scale = torch.tensor(0.7, dtype=torch.float64, device=device)
    return params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, 1e-2, 0.9, 0.999, 1e-8, 0.1, False


def _devices():
    out = ["cpu"]
    if torch.cuda.is_available() and availability()["cuda"] is None:
        out.append("cuda")
    return out


@pytest.mark.parametrize("device", _devices())
def test_opcheck_telemetry(device):
    grads = [torch.randn(n, device=device) for n in (3, 4097)] + [torch.randn(7, device=device).bfloat16()]
    torch.library.opcheck(torch.ops.lbw.telemetry.default, (grads,))


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("skip", [None, 0.0, 1.0])
def test_opcheck_adamw_(device, skip):
    args = _update_args(device)
    skip_t = None if skip is None else torch.tensor(skip, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.lbw.adamw_.default, (*args, skip_t))


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask", [True, False])
def test_opcheck_adamw_telemetry_(device, dtype, mask):
    args = _update_args(device, dtype)
    torch.library.opcheck(torch.ops.lbw.adamw_telemetry_.default, (*args, mask))


def test_fake_shapes_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        grads = [torch.empty(3), torch.empty(0), torch.empty(8)]
        assert torch.ops.lbw.telemetry(grads).shape == (2, 3)
        args = _update_args("cpu")
        assert torch.ops.lbw.adamw_telemetry_(*args, True).shape == (2, 3)


def test_layout_key_reads_address_numel_and_dtype_of_each_tensor():
    from lbw_kernels import _C

    base = torch.zeros(10)
    tensors = [torch.randn(4, 3), torch.zeros(0), torch.ones(5, dtype=torch.bfloat16), base[2:], torch.tensor(1.0)]
    key = _C._layout_key(tensors)
    assert key[0::3] == tuple(t.data_ptr() for t in tensors)
    assert key[1::3] == (12, 0, 5, 8, 1)
    codes = key[2::3]
    assert codes[0] == codes[3] == codes[4] != codes[2]  # float32 x3, bfloat16
    assert _C._layout_key(()) == ()
    with pytest.raises(TypeError, match="item 1 is not a tensor"):
        _C._layout_key([base, 3.0])


def test_triton_plan_keys_use_the_extension():
    pytest.importorskip("triton")
    from lbw_kernels import _C
    from lbw_kernels.triton_kernels import chunk_table

    assert chunk_table.layout_key is chunk_table.address_key is _C._layout_key
    a, b = torch.zeros(3), torch.zeros(3)
    assert chunk_table.telemetry_key([a], 64) != chunk_table.telemetry_key([b], 64)  # another address
