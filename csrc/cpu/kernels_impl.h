// Multi-tensor CPU kernels: telemetry, the AdamW update, and the two fused (single_pass).
//
// Torch-free: the caller passes raw pointers and a parallel-for (at::parallel_for in the
// extension, a serial loop in the C++ tests). Work is a FIXED partition of every tensor into
// chunks of kChunk elements, independent of the thread count; each chunk reduces into its own
// slot with kLanes fixed accumulators, and chunks combine per tensor in index order, so the
// telemetry is bitwise the same for any number of threads.
#pragma once

#include <cstdint>
#include <vector>

#include "../guard_math.h"

namespace lbw {
namespace cpu {

// 16K elements: p, g, m, v of an fp32 chunk are 256 KiB, which stays in L2 while one fused
// loop reads and writes them.
constexpr int64_t kChunk = 16384;
constexpr int kLanes = 8;

struct Chunk {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

// The chunk table depends on the element counts only. first[t]..first[t+1] are tensor t's
// chunks; a zero-element tensor has none.
struct ChunkTable {
  std::vector<int64_t> numels;
  std::vector<Chunk> chunks;
  std::vector<int64_t> first;

  void build(const std::vector<int64_t>& sizes) {
    numels = sizes;
    chunks.clear();
    first.assign(sizes.size() + 1, 0);
    for (size_t t = 0; t < sizes.size(); ++t) {
      first[t] = int64_t(chunks.size());
      for (int64_t b = 0; b < sizes[t]; b += kChunk)
        chunks.push_back(Chunk{int32_t(t), b, b + kChunk < sizes[t] ? b + kChunk : sizes[t]});
    }
    first[sizes.size()] = int64_t(chunks.size());
  }
  int64_t ntensors() const { return int64_t(numels.size()); }
  int64_t nchunks() const { return int64_t(chunks.size()); }
};

// Fixed-order sum of the lanes (a pairwise tree), the same on every machine.
inline double sum_lanes(const double* x) {
  static_assert(kLanes == 8, "tree below assumes 8 lanes");
  return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

// Chunk partials -> one [sumsq, sum, nonfinite] row per non-empty tensor, in tensor order.
inline void combine_partials(const ChunkTable& table, const double* ws, double* out) {
  int64_t row = 0;
  for (int64_t t = 0; t < table.ntensors(); ++t) {
    if (table.first[t] == table.first[t + 1]) continue;
    double sq = 0.0, s = 0.0;
    for (int64_t c = table.first[t]; c < table.first[t + 1]; ++c) {
      sq += ws[2 * c];
      s += ws[2 * c + 1];
    }
    out[3 * row] = sq;
    out[3 * row + 1] = s;
    out[3 * row + 2] = nonfinite_flag(s);
    ++row;
  }
}

template <class G>
void reduce_chunk(const G* __restrict__ g, int64_t n, double* out2) {
  double sq[kLanes] = {}, s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) accumulate(sq[j], s[j], load_as<double>(g[i + j]));
  }
  for (int j = 0; i < n; ++i, ++j) accumulate(sq[j], s[j], load_as<double>(g[i]));
  out2[0] = sum_lanes(sq);
  out2[1] = sum_lanes(s);
}

struct GradRef {
  const void* data;
  DType dtype;
};

// Exact gate's first pass: `out` gets one row per non-empty gradient; `ws` holds 2 doubles
// per chunk. Gradients may mix dtypes (each chunk dispatches on its tensor's).
template <class ParallelFor>
void telemetry(const ChunkTable& table, const GradRef* grads, double* ws, double* out,
               ParallelFor&& parallel_for) {
  const Chunk* chunks = table.chunks.data();
  parallel_for(int64_t(0), table.nchunks(), int64_t(1), [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& k = chunks[c];
      const GradRef& g = grads[k.tensor];
      const int64_t n = k.end - k.begin;
      switch (g.dtype) {
        case DType::f32: reduce_chunk(static_cast<const float*>(g.data) + k.begin, n, ws + 2 * c); break;
        case DType::f64: reduce_chunk(static_cast<const double*>(g.data) + k.begin, n, ws + 2 * c); break;
        case DType::bf16: reduce_chunk(static_cast<const bf16_t*>(g.data) + k.begin, n, ws + 2 * c); break;
        case DType::f16: reduce_chunk(static_cast<const f16_t*>(g.data) + k.begin, n, ws + 2 * c); break;
      }
    }
  });
  combine_partials(table, ws, out);
}

template <class P>
struct UpdateRef {
  using M = typename math_type<P>::type;
  P* p;
  const P* g;
  M* m;
  M* v;
};

// One chunk of the update. MASK: single_pass's per-element non-finite mask; TEL: also
// accumulate the partials of the gradients as read (before maximize's sign flip).
template <bool MASK, bool TEL, class P, class M>
void update_chunk(P* __restrict__ p, const P* __restrict__ g, M* __restrict__ m,
                  M* __restrict__ v, int64_t n, const AdamWCoeffs<M> c, M sign, double* out2) {
  double sq[kLanes] = {}, s[kLanes] = {};
  auto one = [&](int64_t i, int j) {
    const M gi = load_as<M>(g[i]);
    if (TEL) accumulate(sq[j], s[j], load_as<double>(g[i]));
    M pi = load_as<M>(p[i]), mi = m[i], vi = v[i];
    if (MASK)
      adamw_element_masked(pi, gi * sign, mi, vi, c);
    else
      adamw_element(pi, gi * sign, mi, vi, c);
    store_from(p[i], pi);
    m[i] = mi;
    v[i] = vi;
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) one(i + j, j);
  }
  for (int j = 0; i < n; ++i, ++j) one(i, j);
  if (TEL) {
    out2[0] = sum_lanes(sq);
    out2[1] = sum_lanes(s);
  }
}

// The update of tensors sharing param dtype P, with per-tensor coefficients (their step
// counts differ). `ws` (2 doubles per chunk) and `out` (3 per non-empty tensor) are used when
// TEL. Zero-element tensors have no chunks.
template <bool MASK, bool TEL, class P, class ParallelFor>
void adamw(const ChunkTable& table, const UpdateRef<P>* ts,
           const AdamWCoeffs<typename math_type<P>::type>* coeffs, bool maximize, double* ws,
           double* out, ParallelFor&& parallel_for) {
  using M = typename math_type<P>::type;
  const Chunk* chunks = table.chunks.data();
  const M sign = maximize ? M(-1) : M(1);
  parallel_for(int64_t(0), table.nchunks(), int64_t(1), [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& k = chunks[c];
      const UpdateRef<P>& t = ts[k.tensor];
      update_chunk<MASK, TEL>(t.p + k.begin, t.g + k.begin, t.m + k.begin, t.v + k.begin,
                              k.end - k.begin, coeffs[k.tensor], sign, TEL ? ws + 2 * c : nullptr);
    }
  });
  if (TEL) combine_partials(table, ws, out);
}

// Serial parallel-for, for builds without torch (the C++ tests).
struct SerialFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t, const F& f) const {
    if (begin < end) f(begin, end);
  }
};

}  // namespace cpu
}  // namespace lbw
