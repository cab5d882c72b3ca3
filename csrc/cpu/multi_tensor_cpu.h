// Multi-tensor CPU kernels: telemetry, the AdamW update, and the two fused (single_pass).
//
// Torch-free: callers pass raw pointers and a parallel-for (at::parallel_for in the
// extension, a serial loop in the C++ tests). Work is a FIXED partition of every tensor into
// chunks of kChunk elements, independent of the thread count; each chunk reduces into its own
// slot with kLanes fixed accumulators, and chunks combine per tensor in index order, so the
// telemetry is bitwise the same for any number of threads (and on every instruction set:
// the kernels are built with -ffp-contract=off and explicit fused multiply-adds).
//
// The kernels are compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp) and kernels() picks the best the CPU runs when first called.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "../guard_math.h"

namespace lbw {
namespace cpu {

// 16K elements: p, g, m, v of an fp32 chunk are 256 KiB, which stays in L2 while one fused
// loop reads and writes them.
constexpr int64_t kChunk = 16384;
constexpr int kLanes = 16;

struct Chunk {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

// The chunk table depends on the element counts only. first[t]..first[t+1] are tensor t's
// chunks; a zero-element tensor has none. start[c] is chunk c's first element counted over all
// tensors (start[nchunks] the total): the kernels hand threads ranges of elements, not of
// chunks, so that threads get equal work when chunk sizes differ (many small tensors).
struct ChunkTable {
  std::vector<int64_t> numels;
  std::vector<Chunk> chunks;
  std::vector<int64_t> first;
  std::vector<int64_t> start;

  void build(const std::vector<int64_t>& sizes);
  int64_t ntensors() const { return int64_t(numels.size()); }
  int64_t nchunks() const { return int64_t(chunks.size()); }
  int64_t total() const { return start.empty() ? 0 : start.back(); }
  int64_t nonempty() const;
};

struct GradRef {
  const void* data;
  DType dtype;
};

// G: the grads' type, the params' own or, for bf16/fp16 params, float (torch >= 2.10's
// grad_dtype); the math is the params' math type either way.
template <class P, class G = P>
struct UpdateRef {
  using M = typename math_type<P>::type;
  P* p;
  const G* g;
  M* m;
  M* v;
};

// parallel_for(begin, end, body): run body over sub-ranges of [begin, end), in any order. The
// kernels call it over element ranges [0, table.total()); a chunk is run by the sub-range that
// holds its first element, so the chunks and their partials do not depend on the split.
using ParallelFor = void (*)(int64_t begin, int64_t end, const std::function<void(int64_t, int64_t)>& body);
void serial_for(int64_t begin, int64_t end, const std::function<void(int64_t, int64_t)>& body);

// Entry points of one instruction set.
//  telemetry: `out` gets (sum g^2, sum g, nonfinite) per non-empty gradient; grads may mix dtypes.
//  adamw_*: rule 5 on tensors of one param dtype with per-tensor coefficients, every gradient
//    element read times `grad_sign` (-1 when maximizing, times the clipping factor; rounded to
//    the math type); with `telemetry` also the rows of the grads as read (before that factor);
//    `mask`: single_pass's non-finite mask.
//  `ws` holds 2 doubles per chunk (only read/written when telemetry is computed).
template <class P, class G = P>
using AdamWFn = void (*)(const ChunkTable& table, const UpdateRef<P, G>* ts,
                         const AdamWCoeffs<typename math_type<P>::type>* coeffs, double grad_sign,
                         bool mask, bool telemetry, double* ws, double* out, ParallelFor pf);
struct Kernels {
  const char* isa;
  void (*telemetry)(const ChunkTable& table, const GradRef* grads, double* ws, double* out, ParallelFor pf);
  AdamWFn<float> adamw_f32;
  AdamWFn<double> adamw_f64;
  AdamWFn<bf16_t> adamw_bf16;
  AdamWFn<f16_t> adamw_f16;
  AdamWFn<bf16_t, float> adamw_bf16_f32;  // bf16 params, float32 grads
  AdamWFn<f16_t, float> adamw_f16_f32;    // fp16 params, float32 grads
};

const Kernels& kernels_default();
const Kernels* kernels_avx2();    // nullptr where not compiled (not x86-64 GCC/Clang)
const Kernels* kernels_avx512();  // idem
// The best kernels this CPU runs; LBW_CPU_ISA=default|avx2|avx512 in the environment caps
// the choice (default: the baseline build).
const Kernels& kernels();

}  // namespace cpu
}  // namespace lbw
