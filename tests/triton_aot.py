"""Compile every Triton kernel specialisation the triton backend launches for NVIDIA GPUs,
without a GPU (triton ships ptxas): GPU-only code generation errors, which the interpreter
used by the CPU tests never meets, show up in CI. A script, because the tests run with
TRITON_INTERPRET=1, under which nothing compiles:

    python tests/triton_aot.py [ARCH ...]     # default: 80 90

prints one line per compiled variant, then for the sm_90 PTX of the fp32 single_pass update
``pipelined-loads N`` (16-byte cp.async copies of the num_stages=3 variant: Triton pipelined
its loop), ``fma-instructions N`` (the update's explicit tl.fma calls alone: config.COMPILE_OPTIONS turns
contraction off) and ``vector-access
LOADS STORES`` (16-byte global loads and stores); tests/test_triton_backend.py checks all three.
"""

from __future__ import annotations

import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lbw_kernels.triton_kernels import coefficients, guarded_adamw, telemetry
from lbw_kernels.triton_kernels.chunk_table import COEF_COLS, GROUP_COLS, TENSOR_COLS, UPDATE_GRAD_CODES
from lbw_kernels.triton_kernels.config import COMPILE_OPTIONS, GPU, pass_stages
from lbw_kernels.triton_kernels.pointers import BF16, FP16, FP32, FP64

CODE_NAMES = {FP32: "fp32", BF16: "bf16", FP16: "fp16", FP64: "fp64"}
# Pointer arguments of the passes' kernels (the partials out: float64 unless asked otherwise)
TELEMETRY_TYPES = {"chunks": "*i64", "workspace": "*fp64", "first_chunk": "*i64", "counters": "*i32",
                   "out": "*fp64"}
UPDATE_TYPES = {"chunks": "*i64", "tensors": "*i64", "coefs": "*fp32"} | TELEMETRY_TYPES
# (TELEMETRY, MASK_NONFINITE, HAS_SKIP) of each way optimizer.step() launches the update
UPDATE_MODES = {
    "exact": (False, False, True),
    "exact skip_nonfinite=False": (False, False, False),
    "single_pass": (True, True, False),
    "single_pass skip_nonfinite=False": (True, False, False),
}


def variants():
    """(name, kernel, typed args, constexprs, num_warps) for every launch the backend makes."""
    for code in (FP32, BF16, FP16, FP64):
        for aligned in (True, False):
            for out in ("fp64", "fp32"):
                yield (f"telemetry {CODE_NAMES[code]} aligned={aligned} -> {out}",
                       telemetry._telemetry_chunks_kernel, TELEMETRY_TYPES | {"out": f"*{out}"},
                       dict(G_CODE=code, ALIGNED=aligned, CHUNK=GPU.chunk, BLOCK=GPU.block, FOLD=GPU.telemetry_fold,
                            RBLOCK=GPU.reduce_block, STAGES=GPU.num_stages),
                       GPU.num_warps)
    for has_skip, has_factor in ((True, False), (False, False), (True, True), (False, True)):
        yield (f"coefficients skip={has_skip} factor={has_factor}", coefficients._adamw_coefficients_kernel,
               {"tensors": "*i64", "hyper": "*fp64", "lr_ptrs": "*i64", "scale_ptr": "*fp64",
                "skip_ptr": "*fp64", "factor_ptr": "*fp64", "coefs": "*fp32", "n_tensors": "i32"},
               dict(HAS_SKIP=has_skip, HAS_FACTOR=has_factor, TENSOR_COLS_=TENSOR_COLS, GROUP_COLS_=GROUP_COLS, COEF_COLS_=COEF_COLS,
                    BLOCK_T=GPU.tensors_per_program), 4)
    # (param, grad) dtype codes: each dtype with its own grads, and bf16/fp16 params with fp32 grads
    pairs = [(code, code) for code in (FP32, BF16, FP16)] + sorted(UPDATE_GRAD_CODES)
    for code, g_code in pairs:
        grads = "" if g_code == code else f" with {CODE_NAMES[g_code]} grads"
        for mode, (tel, mask, skip) in UPDATE_MODES.items():
            for aligned in (True, False):
                yield (f"update {CODE_NAMES[code]}{grads} {mode} aligned={aligned}", guarded_adamw._guarded_adamw_kernel,
                       UPDATE_TYPES,
                       dict(P_CODE=code, G_CODE=g_code, ALIGNED=aligned, TELEMETRY=tel, MASK_NONFINITE=mask, HAS_SKIP=skip,
                            TENSOR_COLS_=TENSOR_COLS, COEF_COLS_=COEF_COLS, CHUNK=GPU.chunk, BLOCK=GPU.block,
                            FOLD=GPU.telemetry_fold, RBLOCK=GPU.reduce_block,
                            STAGES=pass_stages(GPU, single_pass=tel)),  # (as guarded_adamw_ launches it)
                       GPU.num_warps)
    # The software-pipelined loops (config.Geometry.num_stages, a tuning option): both passes
    yield ("telemetry fp32 aligned=True stages=3", telemetry._telemetry_chunks_kernel, TELEMETRY_TYPES,
           dict(G_CODE=FP32, ALIGNED=True, CHUNK=GPU.chunk, BLOCK=GPU.block, FOLD=GPU.telemetry_fold,
                RBLOCK=GPU.reduce_block, STAGES=3), GPU.num_warps)
    for code in (FP32, BF16):
        for mode in ("exact", "single_pass"):
            tel, mask, skip = UPDATE_MODES[mode]
            yield (f"update {CODE_NAMES[code]} {mode} aligned=True stages=3", guarded_adamw._guarded_adamw_kernel,
                   UPDATE_TYPES,
                   dict(P_CODE=code, G_CODE=code, ALIGNED=True, TELEMETRY=tel, MASK_NONFINITE=mask, HAS_SKIP=skip,
                        TENSOR_COLS_=TENSOR_COLS, COEF_COLS_=COEF_COLS, CHUNK=GPU.chunk, BLOCK=GPU.block,
                        FOLD=GPU.telemetry_fold, RBLOCK=GPU.reduce_block, STAGES=3),
                   GPU.num_warps)


def compile_ptx(kernel, typed, consts, arch: int, num_warps: int, maxnreg: int = 0) -> str:
    return compile_kernel(kernel, typed, consts, arch, num_warps, maxnreg).asm["ptx"]


def compile_kernel(kernel, typed, consts, arch: int, num_warps: int, maxnreg: int = 0):
    """The compiled kernel (``.asm["ptx"]``, ``.metadata.shared``: bytes of shared memory)."""
    names = kernel.arg_names
    signature = {n: typed.get(n, "constexpr") for n in names}
    missing = set(names) - set(typed) - set(consts)
    if missing:
        raise TypeError(f"{kernel.__name__}: no type or value for {sorted(missing)}")
    src = ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in consts.items()},
        # table and workspace pointers come from torch allocations: 16-byte aligned
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n, t in typed.items() if t.startswith("*")},
    )
    options = {"num_warps": num_warps, **COMPILE_OPTIONS}  # as the launches pass them (config.pass_options)
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def main(archs) -> int:
    vector = None
    for arch in archs:
        for name, kernel, typed, consts, warps in variants():
            ptx = compile_ptx(kernel, typed, consts, arch, warps)
            print(f"compiled sm_{arch} {name}", flush=True)
            if arch == 90 and name == "update fp32 single_pass aligned=True":
                vector = (len(re.findall(r"ld\.global\.v4\.b32", ptx)), len(re.findall(r"st\.global\.v4\.b32", ptx)))
                fused = len(re.findall(r"\bfma\.", ptx))
            if arch == 90 and name == "update fp32 single_pass aligned=True stages=3":
                pipelined = len(re.findall(r"cp\.async\.cg\.shared\.global [^;]*, 0x10", ptx))
    if vector is not None:
        print("pipelined-loads", pipelined)
        print("fma-instructions", fused)
        print("vector-access", *vector)
    return 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [80, 90]))
