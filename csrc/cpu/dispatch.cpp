// Chunk tables and the choice of instruction set (compiled for the baseline ISA only).
#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "multi_tensor_cpu.h"

namespace lbw {
namespace cpu {

void ChunkTable::build(const std::vector<int64_t>& sizes) {
  numels = sizes;
  chunks.clear();
  first.assign(sizes.size() + 1, 0);
  for (size_t t = 0; t < sizes.size(); ++t) {
    first[t] = int64_t(chunks.size());
    for (int64_t b = 0; b < sizes[t]; b += kChunk)
      chunks.push_back(Chunk{int32_t(t), b, b + kChunk < sizes[t] ? b + kChunk : sizes[t]});
  }
  first[sizes.size()] = int64_t(chunks.size());
  start.resize(chunks.size() + 1);
  int64_t offset = 0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    start[c] = offset;
    offset += chunks[c].end - chunks[c].begin;
  }
  start[chunks.size()] = offset;
}

int64_t ChunkTable::nonempty() const {
  int64_t n = 0;
  for (int64_t x : numels) n += x > 0;
  return n;
}

void serial_for(int64_t begin, int64_t end, const std::function<void(int64_t, int64_t)>& body) {
  if (begin < end) body(begin, end);
}

// LBW_CPU_ISA caps the instruction set: unset or empty, no cap; "default", "avx2" or
// "avx512". Anything else (a typo, "AVX512", "avx512f") is refused rather than read as the
// baseline: the slowest kernels, chosen without a word, look like a performance bug.
static const Kernels& pick() {
  const char* env = std::getenv("LBW_CPU_ISA");
  const std::string cap = env == nullptr ? "" : env;
  if (!cap.empty() && cap != "default" && cap != "avx2" && cap != "avx512")
    throw std::invalid_argument("LBW_CPU_ISA must be default, avx2 or avx512 (or unset: the best the CPU has), got '" +
                                cap + "'");
  const bool allow_avx2 = cap.empty() || cap == "avx2" || cap == "avx512";
  const bool allow_avx512 = cap.empty() || cap == "avx512";
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  // (F16C: the bf16/fp16 conversions of both builds; every AVX2 CPU has it)
  const bool fma_f16c = __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (allow_avx512 && kernels_avx512() != nullptr && fma_f16c && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return *kernels_avx512();
  if (allow_avx2 && kernels_avx2() != nullptr && fma_f16c && __builtin_cpu_supports("avx2")) return *kernels_avx2();
#else
  (void)allow_avx2;
  (void)allow_avx512;
#endif
  return kernels_default();
}

// (A refused LBW_CPU_ISA throws from every call: a static whose initialiser throws is tried
// again on the next call.)
const Kernels& kernels() {
  static const Kernels& chosen = pick();
  return chosen;
}

}  // namespace cpu
}  // namespace lbw
