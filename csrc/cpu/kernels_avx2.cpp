// The CPU kernels again, for AVX2 + FMA + F16C (chosen at run time by kernels() when the CPU
// has them). Everything the kernels define has internal linkage (static), so nothing compiled
// here for AVX2 can be picked by the linker for the baseline path.
#include "multi_tensor_cpu.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <vector>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define LBW_CPU_KERNELS_FN kernels_avx2_table
#define LBW_CPU_ISA_NAME "avx2"
#define LBW_CPU_AVX2 1
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace lbw {
namespace cpu {
const Kernels* kernels_avx2() { return &kernels_avx2_table(); }
}  // namespace cpu
}  // namespace lbw
#else
namespace lbw {
namespace cpu {
const Kernels* kernels_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace lbw
#endif
