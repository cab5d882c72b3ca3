"""Registers per thread of the Triton kernels, and how many programs fit on one SM, without a GPU.

Why: on an H200 the Triton update ran ~3.5% slower than the CUDA one and its single_pass
~4% slower again, and the geometry candidates timed so far ranked as their occupancy does
(bench/results/nvidia-h200-triton-geometry-20261126.json: 2048 x 8 warps, one program per SM
for single_pass, was the slowest). The telemetry accumulators are float64 vectors of BLOCK
elements: with 8 fp32 per thread they hold 32 registers. This compiles each kernel for the
target with Triton (no device needed), runs ptxas -v on the PTX and prints the occupancy the
register count allows (H100/H200 SM: 65536 registers, 2048 threads, 32 blocks).

    python bench/triton_registers.py                      # the GPU geometry and candidates
    python bench/triton_registers.py --geometry block=512,num_warps=4 --arch 90
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Compiled for the target, not interpreted (the test suite sets TRITON_INTERPRET=1, and the
# kernels read it when they are defined).
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402

from lbw_kernels.triton_kernels.chunk_table import COEF_COLS, TENSOR_COLS  # noqa: E402
from lbw_kernels.triton_kernels.config import GPU, _overridden, pass_stages  # noqa: E402
from lbw_kernels.triton_kernels.guarded_adamw import _guarded_adamw_kernel  # noqa: E402
from lbw_kernels.triton_kernels.pointers import BF16, FP32  # noqa: E402
from lbw_kernels.triton_kernels.telemetry import _telemetry_chunks_kernel  # noqa: E402

# The ahead-of-time compile of the CI check (tests/triton_aot.py): the same signatures and
# alignment attributes as the backend's launches.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from triton_aot import TELEMETRY_TYPES, UPDATE_TYPES, compile_kernel  # noqa: E402

# H100/H200 SM: registers, threads, resident blocks, shared memory (228 KB, 1 KB of it reserved
# per block).
SM_REGISTERS, SM_THREADS, SM_BLOCKS, SM_SHARED, BLOCK_RESERVED = 65536, 2048, 32, 228 * 1024, 1024
CANDIDATES = ("block=512,num_warps=4", "block=1024,num_warps=8", "telemetry_fold=4",
              "block=512,num_warps=4,telemetry_fold=4", "block=512,num_warps=4,telemetry_fold=4,maxnreg=64",
              "num_stages=3", "block=512,num_warps=4,telemetry_fold=4,num_stages=3")


def ptxas_registers(ptx: str, arch: int) -> tuple:
    """(registers, spill store bytes) from ptxas -v on the PTX (the CUDA toolkit's ptxas; the
    PTX's .version is lowered to what it reads when Triton wrote a newer one: these kernels
    use nothing newer)."""
    ptxas, supported = _ptxas(arch)
    if supported:
        ptx = re.sub(r"^\.version \d+\.\d+", f".version {supported}", ptx, flags=re.M)
    out = _run_ptxas(ptxas, ptx, arch)
    found = re.search(r"Used (\d+) registers", out)
    if not found:
        sys.exit(f"ptxas gave no register count:\n{out}")
    spills = re.search(r"(\d+) bytes spill stores", out)
    return int(found.group(1)), int(spills.group(1)) if spills else 0


@functools.lru_cache(maxsize=None)
def _ptxas(arch: int) -> tuple:
    """(ptxas path, the newest PTX .version it reads, or None): asked once, with a PTX file
    of an impossible version, whose error message names the supported one."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        sys.exit("ptxas not found (the CUDA toolkit's bin/ must be on PATH)")
    supported = re.search(r"current version is '(\d+\.\d+)'", _run_ptxas(ptxas, ".version 99.0\n", arch))
    return ptxas, supported.group(1) if supported else None


def _run_ptxas(ptxas: str, ptx: str, arch: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", str(src),
                               "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
        return done.stdout + done.stderr


def occupancy(registers: int, threads: int, shared: int = 0) -> int:
    """Programs resident per SM as registers, threads, shared memory and the block limit allow."""
    return min(SM_REGISTERS // (registers * threads), SM_THREADS // threads, SM_BLOCKS,
               SM_SHARED // (shared + BLOCK_RESERVED))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", action="append", help="LBW_TRITON_GEOMETRY-style overrides of the GPU geometry; "
                    "repeatable (default: the GPU geometry and " + ", ".join(CANDIDATES) + ")")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as a number (90: H100/H200)")
    args = ap.parse_args()
    geometries = [("default", GPU)] + [(spec, _overridden(GPU, spec)) for spec in (args.geometry or CANDIDATES)]
    print(f"triton {triton.__version__}, sm_{args.arch}; per SM: {SM_REGISTERS} registers, {SM_THREADS} threads")
    print(f"{'geometry':64s} {'kernel':34s} {'regs':>5s} {'spilled':>8s} {'smem':>7s} {'programs/SM':>12s} "
          f"{'threads/SM':>11s}")
    for label, geo in geometries:
        threads = 32 * geo.num_warps
        rows = []
        for code, dtype in ((FP32, "fp32"), (BF16, "bf16")):
            for name, tel, skip in (("update (exact)", False, True), ("update+telemetry (single_pass)", True, False)):
                consts = dict(P_CODE=code, G_CODE=code, ALIGNED=True, TELEMETRY=tel, MASK_NONFINITE=tel, HAS_SKIP=skip,
                              TENSOR_COLS_=TENSOR_COLS, COEF_COLS_=COEF_COLS, CHUNK=geo.chunk, BLOCK=geo.block,
                              FOLD=geo.telemetry_fold, RBLOCK=geo.reduce_block,
                              STAGES=pass_stages(geo, single_pass=tel))  # (as guarded_adamw_ launches)
                rows.append((f"{name} {dtype}", compile_kernel(_guarded_adamw_kernel, UPDATE_TYPES, consts, args.arch,
                                                              geo.num_warps, geo.maxnreg if tel else 0)))
        consts = dict(G_CODE=FP32, ALIGNED=True, CHUNK=geo.chunk, BLOCK=geo.block, FOLD=geo.telemetry_fold,
                      RBLOCK=geo.reduce_block, STAGES=geo.num_stages)
        rows.append(("telemetry fp32", compile_kernel(_telemetry_chunks_kernel, TELEMETRY_TYPES, consts, args.arch,
                                                      geo.num_warps)))
        name = f"{label} ({geo.block // threads} per thread)"
        for kernel, compiled in rows:
            regs, spilled = ptxas_registers(compiled.asm["ptx"], args.arch)
            shared = compiled.metadata.shared
            programs = occupancy(regs, threads, shared)
            print(f"{name:64s} {kernel:34s} {regs:5d} {spilled:6d} B {shared // 1024:4d} KB {programs:12d} "
                  f"{programs * threads:11d}")
            name = ""


if __name__ == "__main__":
    main()
