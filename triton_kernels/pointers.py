"""Typed pointers from the int64 addresses of a device-side table.

The chunk tables hold raw addresses (``Tensor.data_ptr()``) so that one launch can reach any
number of tensors; a kernel turns an address back into a typed pointer here. The element
type is a compile-time code (one kernel specialisation per dtype; tensors of one launch
share a dtype).
"""

import torch
import triton
import triton.language as tl

# Element-type codes shared by the host tables and the kernels.
FP32, BF16, FP16, FP64 = 0, 1, 2, 3
DTYPE_CODES = {torch.float32: FP32, torch.bfloat16: BF16, torch.float16: FP16, torch.float64: FP64}


@triton.jit
def as_pointer(addr, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """int64 address -> pointer to fp32/bf16/fp16/fp64 (``CODE``).

    ``ALIGNED`` (checked on the host when the table is built: every address a multiple of
    16 bytes) tells the compiler so, which lets it emit 16-byte vector loads and stores;
    an address read from memory carries no alignment information otherwise.
    """
    if CODE == 0:
        ptr = addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        ptr = addr.to(tl.pointer_type(tl.bfloat16))
    elif CODE == 2:
        ptr = addr.to(tl.pointer_type(tl.float16))
    else:
        ptr = addr.to(tl.pointer_type(tl.float64))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def round_to_bf16(x):
    """float32 -> bfloat16, rounding to nearest even (what ``Tensor.to(torch.bfloat16)`` does).

    Written out on integers because Triton's interpreter truncates in ``.to(tl.bfloat16)``
    (GPUs round to nearest even, so this is the same result there, for a few integer ops).
    """
    bits = x.to(tl.uint32, bitcast=True)
    # NaN: rounding could carry into the exponent or sign; keep its top bits, set the quiet bit.
    rounded = tl.where(x == x, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, (bits >> 16) | 0x40)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
