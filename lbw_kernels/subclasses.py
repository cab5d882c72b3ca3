"""Tensor subclasses among the params: the plain tensor the kernels update in a param's place.

The kernels reach a tensor through its address. A *wrapper* subclass
(``torch.utils._python_dispatch.is_traceable_wrapper_subclass``) has no storage of its own:
its ``data_ptr()`` is 0 and its values live in inner tensors (``__tensor_flatten__``). The one
large-scale training meets is torchao's float8 training with FSDP2's float8 all-gather, as
torchtitan runs it: every linear weight is a ``WeightWithDynamicFloat8CastTensor``, a plain fp32
(or bf16) tensor in a wrapper that casts it to float8 for its matmuls, whose values are its
inner ``_tensor``'s. Launched on such a param's address the kernels would read and write
address 0.

The rule: a wrapper subclass is updated through the inner tensor its own ``aten.alias`` returns
as a plain tensor (the same storage address), when that tensor has the param's dtype, shape,
strides and device. The subclass itself then says its elements are that tensor's (an alias is
a view of the same elements), so updating them in place updates the param, exactly as the
subclass's own in-place ops would. A subclass whose inner tensors *encode* its values (a
quantised weight: float8 data and scales, NF4 blocks) has no such tensor: the kernel backends
refuse it, naming the param; the reference backend runs on it through the subclass's own
operators (it calls torch ops only).

``DTensor`` is not resolved here: its local shard is taken on every call (distributed.py) and
that shard is then resolved by the same rule (FSDP2 with float8 all-gather: a DTensor whose
local shard is the float8 wrapper).
"""

from __future__ import annotations

import sys
import weakref
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_PLAIN = (Tensor, torch.nn.Parameter)  # (the extension's THPVariable_CheckExact: a subclass's address need not be its elements')


def dtensor_class() -> Optional[type]:
    """DTensor once torch.distributed.tensor is imported, else None: no tensor is a DTensor
    before that, and checking sys.modules keeps that import (most of a second) out of
    `import lbw_kernels` and out of step()."""
    global _DTENSOR
    if _DTENSOR is None:
        module = sys.modules.get("torch.distributed.tensor")
        _DTENSOR = getattr(module, "DTensor", None) if module is not None else None
    return _DTENSOR


_DTENSOR: Optional[type] = None


def is_dtensor(t: Tensor) -> bool:
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def is_plain(t: Tensor) -> bool:
    """A tensor or Parameter itself, no subclass: what the kernels take as it is."""
    return type(t) in _PLAIN


def is_wrapper(t: Tensor) -> bool:
    """Whether ``t`` is a wrapper subclass other than DTensor (whose kernels need its inner tensor)."""
    return type(t) not in _PLAIN and not is_dtensor(t) and is_traceable_wrapper_subclass(t)


def inner_view(t: Tensor) -> Optional[Tuple[str, Tensor]]:
    """For a wrapper subclass ``t``: ``(attribute, inner tensor)`` when the rule above finds the
    plain tensor holding its elements, else None."""
    names = t.__tensor_flatten__()[0]
    try:
        with torch.no_grad():
            alias = torch.ops.aten.alias.default(t)
    except Exception:  # a subclass without alias: nothing says which tensor holds its values
        return None
    if type(alias) not in _PLAIN or (alias.data_ptr() == 0 and t.numel() > 0):  # (0 elements: no address)
        return None
    for name in names:
        inner = getattr(t, name, None)
        if (
            type(inner) in _PLAIN
            and inner.data_ptr() == alias.data_ptr()
            and inner.dtype == t.dtype
            and inner.shape == t.shape
            and inner.stride() == t.stride()
            and inner.device == t.device
        ):
            return name, inner
    return None


class InnerViews:
    """``views(t)``: ``t`` as the kernels take it: itself when it is not a wrapper subclass, the
    inner tensor holding its elements when the rule finds one, else None.

    Found once per wrapper object (``aten.alias`` runs through the subclass's Python dispatch:
    tens of microseconds, per param and call under FSDP2, whose local shards are resolved on
    every call) and checked on each use by one attribute read, so that an inner tensor the
    wrapper has since replaced (a module moved with ``.to()``) is found anew."""

    def __init__(self) -> None:
        # id(wrapper) -> (weak reference to it, attribute, inner tensor); keyed by id, as tensors
        # compare elementwise (a WeakKeyDictionary's lookups would compare them with ==)
        self._found: Dict[int, Tuple["weakref.ref[Tensor]", str, Tensor]] = {}

    def __call__(self, t: Tensor) -> Optional[Tensor]:
        if not is_wrapper(t):
            return t
        found = self.lookup(t)
        return None if found is None else found[1]

    def lookup(self, t: Tensor) -> Optional[Tuple[str, Tensor]]:
        """For a wrapper ``t``: (attribute, inner tensor), or None (:func:`inner_view`)."""
        hit = self._found.get(id(t))
        if hit is not None and hit[0]() is t and getattr(t, hit[1], None) is hit[2]:
            return hit[1:]
        found = inner_view(t)
        if found is not None:
            key = id(t)
            self._found[key] = (weakref.ref(t, lambda _, key=key: self._found.pop(key, None)), *found)
        return found


views = InnerViews()


def kernel_tensor(t: Tensor) -> Tensor:
    """``views(t)``, or ``t`` itself for a wrapper no inner tensor holds (only the reference
    backend is given those: the step plan refuses them to the kernel backends)."""
    view = views(t)
    return t if view is None else view
