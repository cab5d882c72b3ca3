"""lbw-kernels: AdamW under the Learn-by-Wire guard, with fused kernels and a pure-PyTorch reference.

    from lbw_kernels import GuardedAdamW          # or: from lbw_kernels import Guard
    opt = GuardedAdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

See README.md ("The guard, in brief") and lbw_kernels/reference.py for the guard's rules; ``python -m lbw_kernels info`` for what is built.
"""

from .backends import Backend, GroupTensors, availability, get_backend, register_backend
from .optimizer import Guard, GuardedAdamW
from .reference import GuardConfig

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Guard",
    "GuardConfig",
    "GuardedAdamW",
    "GroupTensors",
    "availability",
    "get_backend",
    "register_backend",
    "__version__",
]
