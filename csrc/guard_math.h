// Per-element math of the guarded AdamW step and of its telemetry: the one source of truth
// shared by the CPU kernels (plain C++) and the CUDA kernels (nvcc), so both compute what
// lbw_kernels/reference.py computes (DESIGN.md rules 5, 6).
//
// Nothing here depends on torch: storage types for bf16/fp16 are 2-byte structs with the
// same layout as at::BFloat16 / at::Half / __nv_bfloat16 / __half.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Fast math would round where this file does not say (contractions, approximate division and
// square root) and give other bits than the CPU kernels and the reference: refuse the flags.
#if defined(__USE_FAST_MATH__) || defined(__FAST_MATH__)
#error "guard_math.h: build without nvcc --use_fast_math / -ffast-math: the kernels' rounding is part of what they promise"
#endif

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LBW_HD __host__ __device__ __forceinline__
#else
// static: every translation unit keeps its own copy, so the CPU kernels compiled once per
// instruction set (csrc/cpu/kernels_*.cpp) never share a function across ISAs.
#define LBW_HD static inline
#endif

namespace lbw {

// ------------------------------------------------------------------------------------------
// Storage types and conversions (round to nearest even, NaN kept NaN, as torch rounds).
// ------------------------------------------------------------------------------------------
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

enum class DType : int32_t { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

LBW_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}

LBW_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

LBW_HD float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }

LBW_HD bf16_t bf16_from_float(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // half to even
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  // a select, not a branch, so loops over bf16 vectorise
  return bf16_t{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}

// fp16 <-> float as x86's F16C instructions convert (vcvtph2ps, and vcvtps2ph rounding to
// nearest even), which the AVX2 and AVX-512 CPU kernels use: every case computed and one
// selected (selects, not branches, so loops over fp16 vectorise). A NaN keeps its sign and
// payload (its top bits, going to fp16) and comes out quiet.
LBW_HD float to_float(f16_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  const uint32_t man = x.bits & 0x3ffu;
  const uint32_t inf_nan = sign | 0x7f800000u | (man << 13) | (man != 0 ? 0x400000u : 0u);
  const uint32_t normal = sign | ((exp + 112u) << 23) | (man << 13);
  // zero or subnormal: man * 2^-24, exact in float, with the sign
  const uint32_t subnormal = sign | float_bits(float(int32_t(man)) * 5.9604644775390625e-08f);
  return bits_float(exp == 0x1fu ? inf_nan : exp != 0 ? normal : subnormal);
#endif
}

LBW_HD f16_t f16_from_float(float x) {
#if defined(__CUDA_ARCH__)
  return f16_t{__half_as_ushort(__float2half_rn(x))};
#else
  // (no case traps: the kernels are built with -fno-trapping-math)
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // below the smallest normal (2^-14): the result is a multiple of 2^-24; adding 0.5 makes
  // the float addition itself round the dropped bits half to even.
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  uint32_t r = a - (uint32_t(127 - 15) << 23);  // rebias the exponent
  r += 0xfffu + ((r >> 13) & 1u);  // round half to even on the dropped 13 bits
  const uint32_t bits = a > 0x7f800000u ? 0x7e00u | ((a >> 13) & 0x3ffu)  // NaN
                        : a >= 0x477ff000u ? 0x7c00u                       // rounds to >= 65520: Inf
                        : a < 0x38800000u ? subnormal : (r >> 13);
  return f16_t{uint16_t(sign | bits)};
#endif
}

// Load/store a parameter or gradient element in its math type.
template <class M>
LBW_HD M load_as(float x) { return M(x); }
template <class M>
LBW_HD M load_as(double x) { return M(x); }
template <class M>
LBW_HD M load_as(bf16_t x) { return M(to_float(x)); }
template <class M>
LBW_HD M load_as(f16_t x) { return M(to_float(x)); }

LBW_HD void store_from(float& dst, float x) { dst = x; }
LBW_HD void store_from(double& dst, double x) { dst = x; }
LBW_HD void store_from(bf16_t& dst, float x) { dst = bf16_from_float(x); }
LBW_HD void store_from(f16_t& dst, float x) { dst = f16_from_float(x); }

// fp32, bf16 and fp16 params are updated in fp32 (states fp32); fp64 params in fp64.
template <class P>
struct math_type {
  using type = float;
};
template <>
struct math_type<double> {
  using type = double;
};

LBW_HD float sqrt_(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
LBW_HD double sqrt_(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// Fused multiply-add, rounded once, as torch's lerp kernels (CPU and CUDA) and its CPU addcmul
// round (see adamw_element for where the reference's ops round otherwise).
LBW_HD float fma_(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
LBW_HD double fma_(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return ::fma(a, b, c);
#else
  return __builtin_fma(a, b, c);
#endif
}

// True for finite values; NaN and +-Inf give x - x = NaN. Branch free, so loops vectorise.
template <class M>
LBW_HD bool is_finite(M x) { return (x - x) == M(0); }

// ------------------------------------------------------------------------------------------
// AdamW (rule 5): per-tensor coefficients, then the per-element update.
// ------------------------------------------------------------------------------------------
// Coefficients of one tensor for one call, computed in double (as torch.optim.AdamW computes
// them in Python floats, and the reference in float64) and rounded once to the math type M.
template <class M>
struct AdamWCoeffs {
  M decay;       // 1 - lr*wd
  M w1;          // 1 - beta1 (the lerp weight of exp_avg towards g)
  M beta2;
  M w2;          // 1 - beta2
  M step_size;   // -lr / (1 - beta1^t)
  M bc2_sqrt;    // sqrt(1 - beta2^t)
  M eps;
};

// `step` is the step count after this call's advance; a skipped first call leaves it at 0, and
// clamping to 1 keeps the (unused) coefficients finite, as the reference does.
template <class M>
LBW_HD AdamWCoeffs<M> adamw_coeffs(double lr, double beta1, double beta2, double eps,
                                   double weight_decay, double step) {
  const double t = step < 1.0 ? 1.0 : step;
  AdamWCoeffs<M> c;
  c.decay = M(1.0 - lr * weight_decay);
  c.w1 = M(1.0 - beta1);
  c.beta2 = M(beta2);
  c.w2 = M(1.0 - beta2);
  c.step_size = M(-lr / (1.0 - ::pow(beta1, t)));
  c.bc2_sqrt = M(sqrt_(1.0 - ::pow(beta2, t)));
  c.eps = M(eps);
  return c;
}

// One element, in place:
//   p *= 1 - lr*wd;  m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g
//   p += step_size * m / (sqrt(v)/sqrt(bc2) + eps)
// The operation order and the fused multiply-adds follow torch's CPU kernels for the
// reference's ops (lerp picks its formula by the weight and rounds once; CPU addcmul is
// fma(value*a, b, self)), so on the CPU m and v are bitwise the reference's where torch's own
// CPU kernels fuse them too: its AVX2 and AVX-512 builds. (Its baseline build, picked on a CPU
// without AVX2 or by ATEN_CPU_CAPABILITY=default, rounds twice: m and v then differ from the
// reference by an ulp or a few, while this file's kernels keep their bits on every ISA.) Not bitwise it:
// torch's CUDA addcmul rounds fma(value, a*b, self), so on the GPU v may differ from the
// reference's by an ulp; and the last line is torch.optim.AdamW's addcdiv (p + step_size*m/denom)
// where the reference folds the step size into denom (p + m/(denom/step_size)), so p may differ
// by an ulp on either device. The tests compare with the reference within tolerances written
// for that; the CPU and CUDA kernels are bitwise each other's (GPU: test_gpu_cuda_update_has_the_cpu_kernels_bits).
template <class M>
LBW_HD void adamw_element(M& p, M g, M& m, M& v, const AdamWCoeffs<M>& c) {
  p = p * c.decay;
  m = c.w1 < M(0.5) ? fma_(c.w1, g - m, m) : fma_(-(g - m), M(1) - c.w1, g);
  v = fma_(c.w2 * g, g, v * c.beta2);
  const M denom = sqrt_(v) / c.bc2_sqrt + c.eps;
  p = p + (m * c.step_size) / denom;
}

// single_pass with mask_nonfinite (rule 6): an element whose gradient is NaN/Inf keeps its
// p, m, v. Computed unconditionally and selected, so the loop stays branch free.
template <class M>
LBW_HD void adamw_element_masked(M& p, M g, M& m, M& v, const AdamWCoeffs<M>& c) {
  const bool ok = is_finite(g);
  M p2 = p, m2 = m, v2 = v;
  adamw_element(p2, ok ? g : M(0), m2, v2, c);
  p = ok ? p2 : p;
  m = ok ? m2 : m;
  v = ok ? v2 : v;
}

// ------------------------------------------------------------------------------------------
// Telemetry: per tensor (sum g^2, sum g) accumulated in double, and the non-finite flag read
// off the two double sums, as reference.telemetry_partials reads its own: a NaN/Inf element
// makes the sum NaN/Inf; an fp64 gradient of finite elements above ~1.3e154 makes the sum of
// squares Inf, and the call is skipped too, as the reference skips it (an Inf grad_ms would
// otherwise reach the analyzer as a calm reading and its EMA for good).
// ------------------------------------------------------------------------------------------
LBW_HD void accumulate(double& sumsq, double& sum, double g) {
  sumsq += g * g;
  sum += g;
}

LBW_HD double nonfinite_flag(double sumsq, double sum) { return is_finite(sum) && is_finite(sumsq) ? 0.0 : 1.0; }

}  // namespace lbw
