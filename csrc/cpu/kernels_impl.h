// The bodies of the CPU kernels declared in multi_tensor_cpu.h. Included once per
// instruction set by kernels_<isa>.cpp with LBW_CPU_KERNELS_FN naming the table it defines;
// everything here is static (internal linkage) so the copies never mix.
#include "multi_tensor_cpu.h"

#ifndef LBW_CPU_KERNELS_FN
#error "define LBW_CPU_KERNELS_FN before including kernels_impl.h"
#endif

namespace lbw {
namespace cpu {
namespace {

// Fixed-order sum of the lanes (a pairwise tree), the same on every machine.
inline double sum_lanes(const double* x) {
  static_assert(kLanes == 8, "tree below assumes 8 lanes");
  return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

// Chunk partials -> one [sumsq, sum, nonfinite] row per non-empty tensor, in tensor order.
void combine_partials(const ChunkTable& table, const double* ws, double* out) {
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

void telemetry(const ChunkTable& table, const GradRef* grads, double* ws, double* out, ParallelFor pf) {
  const Chunk* chunks = table.chunks.data();
  pf(0, table.nchunks(), [&](int64_t cb, int64_t ce) {
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

// One chunk of the update, in one fused loop over p, g, m, v. MASK: single_pass's
// per-element non-finite mask; TEL: also accumulate the partials of the gradients as read
// (before maximize's sign flip).
template <bool MASK, bool TEL, class P, class M>
void update_chunk(P* __restrict__ p, const P* __restrict__ g, M* __restrict__ m, M* __restrict__ v,
                  int64_t n, const AdamWCoeffs<M> c, M sign, double* out2) {
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

template <bool MASK, bool TEL, class P>
void adamw_pass(const ChunkTable& table, const UpdateRef<P>* ts,
                const AdamWCoeffs<typename math_type<P>::type>* coeffs, bool maximize, double* ws,
                double* out, ParallelFor pf) {
  using M = typename math_type<P>::type;
  const Chunk* chunks = table.chunks.data();
  const M sign = maximize ? M(-1) : M(1);
  pf(0, table.nchunks(), [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& k = chunks[c];
      const UpdateRef<P>& t = ts[k.tensor];
      update_chunk<MASK, TEL>(t.p + k.begin, t.g + k.begin, t.m + k.begin, t.v + k.begin, k.end - k.begin,
                              coeffs[k.tensor], sign, TEL ? ws + 2 * c : nullptr);
    }
  });
  if (TEL) combine_partials(table, ws, out);
}

template <class P>
void adamw(const ChunkTable& table, const UpdateRef<P>* ts, const AdamWCoeffs<typename math_type<P>::type>* coeffs,
           bool maximize, bool mask, bool telemetry, double* ws, double* out, ParallelFor pf) {
  if (!telemetry)
    adamw_pass<false, false>(table, ts, coeffs, maximize, ws, out, pf);
  else if (mask)
    adamw_pass<true, true>(table, ts, coeffs, maximize, ws, out, pf);
  else
    adamw_pass<false, true>(table, ts, coeffs, maximize, ws, out, pf);
}

}  // namespace

const Kernels& LBW_CPU_KERNELS_FN() {
  static const Kernels table = {LBW_CPU_ISA_NAME, &telemetry, &adamw<float>, &adamw<double>,
                                &adamw<bf16_t>, &adamw<f16_t>};
  return table;
}

}  // namespace cpu
}  // namespace lbw
