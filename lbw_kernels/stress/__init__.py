"""``lbw-kernels stress``: train a small byte-level transformer at rising learning rates, per optimizer arm."""

from .run import add_parser, main

__all__ = ["add_parser", "main"]
