"""Argument types of the command line (``info``, ``verify``, ``bench``, ``stress``).

Each turns a value the command cannot use (0 repetitions, a learning rate that is not a
number, a device this machine does not have) into argparse's usage error, which names the
option, before anything runs: a typo must not run a different experiment (a backend name that
is not one timed no guard row and exited 0) nor end in a traceback from deep inside.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, List, TypeVar

T = TypeVar("T")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _comma_list(text: str, item: Callable[[str], T], what: str) -> List[T]:
    values = [item(x.strip()) for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"needs at least one {what}")
    # A repeated value would run the same experiment twice and count it as two independent
    # ones (stress averages over seeds): refused rather than silently dropped.
    seen = set()
    for value in values:
        if value in seen:
            raise argparse.ArgumentTypeError(f"duplicate value {value!r} in {text!r}")
        seen.add(value)
    return values


def positive_floats(text: str) -> List[float]:
    """A comma list of distinct numbers > 0 (at least one)."""
    return _comma_list(text, positive_float, "number")


def whole_numbers(text: str) -> List[int]:
    """A comma list of distinct whole numbers (at least one)."""
    return _comma_list(text, _int, "whole number")


# torch.manual_seed takes a signed 64-bit seed, and stress seeds its base model with seed + 1000.
MAX_SEED = 2**63 - 1000


def seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1000), got {value}")
    return value


def seeds(text: str) -> List[int]:
    """A comma list of distinct seeds, each in [0, 2**63 - 1000) (at least one)."""
    return _comma_list(text, seed, "seed")


def backend(text: str) -> str:
    """A backend name that is registered (lbw_kernels.backends), built or not (verify says
    which are not); bench times the built-in ones alone (its choices)."""
    from .backends import registered_names

    if text not in registered_names():
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; known: {', '.join(registered_names())}")
    return text


def backend_or_auto(text: str) -> str:
    return text if text == "auto" else backend(text)


def device(text: str) -> str:
    """A device torch knows and this machine has: ``cpu``, or ``cuda``/``cuda:N`` with a
    visible CUDA device of that index."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: cpu, cuda or cuda:N")
    return text
