"""``lbw-kernels`` / ``python -m lbw_kernels``: info | verify (and the commands other modules add).

Each subcommand lives in its own module with ``add_parser(subparsers)`` that registers it and
sets ``func``; this file only assembles them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional

# Subcommands provided by other modules: (module, attribute holding add_parser).
_COMMAND_MODULES: List[str] = ["lbw_kernels.bench", "lbw_kernels.stress"]


def _devices_here() -> list:
    import torch

    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .backends import availability, get_backend

    print(f"lbw_kernels {__version__}")
    print(f"python      {platform.python_version()} ({sys.executable})")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton      {triton.__version__}")
    except ImportError:
        print("triton      not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device      cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print("device      cpu only (no CUDA device visible)")
    print(f"cpu threads {torch.get_num_threads()}")
    try:
        from . import _C

        try:
            isa = _C._cpu_isa()
        except RuntimeError as err:  # an LBW_CPU_ISA that names no instruction set
            isa = f"refused ({err})"
        print(f"extension   lbw_kernels._C: CPU kernels {isa}, CUDA kernels {'built' if _C.WITH_CUDA else 'not built'}")
        from .build_check import static_libstdcxx_warning

        warning = static_libstdcxx_warning(_C.__file__)
        if warning:
            print(warning)
    except ImportError as err:
        print(f"extension   lbw_kernels._C not built ({err})")
    try:  # (what setup.py decided, and why: pip shows its output only with -v)
        from ._build_info import BUILD

        print(f"build       {BUILD}")
    except ImportError:
        pass
    print("backends:")
    backends = availability()  # (constructing the cuda backend applies LBW_CUDA_GEOMETRY)
    devices = _devices_here()
    for name, reason in backends.items():
        if reason is not None:
            print(f"  {name:<10} unavailable: {reason}")
            continue
        # (built is not enough: Triton takes CPU tensors only through its interpreter)
        backend = get_backend(name)
        runs_on = [d.type if backend.auto_selectable(d) else f"{d.type} (emulated: by name only, never 'auto')"
                   for d in devices if backend.supports(d)]
        where = ", ".join(runs_on) if runs_on else f"no device here ({backend.device_hint(devices[-1])})"
        print(f"  {name:<10} available, runs on {where}")
    if backends["cuda"] is None:
        from . import _C

        threads, ilp, chunk, warp_partials = _C._cuda_geometry()
        source = "LBW_CUDA_GEOMETRY" if os.environ.get("LBW_CUDA_GEOMETRY") else "default"
        print(f"cuda launch threads={threads} ilp={ilp} chunk={chunk} warp_partials={warp_partials} ({source})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    # Triton kernels run on CPU tensors through its interpreter; it must be on before the
    # kernels are first imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .backends import BACKEND_NAMES, availability, get_backend
    from .verify import verify_backend

    status = availability()
    names = args.backend or [n for n in BACKEND_NAMES if status[n] is None]
    failed = False
    for name in names:
        if status.get(name) is not None:
            print(f"{name:<10} SKIPPED   {status[name]}")
            failed |= bool(args.backend)  # (named, so asked for: not verified is a failure)
            continue
        backend = get_backend(name)
        devices = [device for device in _devices_here() if backend.supports(device)]
        if not devices:  # (Triton with TRITON_INTERPRET=0 and no GPU, a CUDA build without one)
            print(f"{name:<10} SKIPPED   runs on none of this machine's devices "
                  f"({', '.join(map(str, _devices_here()))})")
            failed |= bool(args.backend)
            continue
        for device in devices:
            failures = verify_backend(backend, device=device, seeds=args.seeds)
            verdict = "OK" if not failures else f"FAILED ({len(failures)} mismatches)"
            print(f"{name:<10} {str(device):<6} {verdict}")
            for f in failures[: args.show]:
                print(f"    {f}")
            failed |= bool(failures)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    from . import cli_args

    parser = argparse.ArgumentParser(prog="lbw-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices, and which backends are built (and why not)")
    p.set_defaults(func=_info)
    p = sub.add_parser(
        "verify", help="check every available backend against the float64 reference; non-zero exit on a mismatch"
    )
    p.add_argument("--backend", action="append", type=cli_args.backend, help="only this backend (repeatable)")
    p.add_argument("--seeds", type=cli_args.int_at_least(1), default=3, help="random problems per dtype (default 3)")
    p.add_argument("--show", type=cli_args.int_at_least(0), default=5, help="mismatches printed per backend (default 5)")
    p.set_defaults(func=_verify)
    for module in _COMMAND_MODULES:
        __import__(module, fromlist=["add_parser"]).add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
