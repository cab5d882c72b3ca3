// The bodies of the CPU kernels declared in multi_tensor_cpu.h. Included once per
// instruction set by kernels_<isa>.cpp with LBW_CPU_KERNELS_FN naming the table it defines;
// everything here is static (internal linkage) so the copies never mix.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "multi_tensor_cpu.h"

#ifndef LBW_CPU_KERNELS_FN
#error "define LBW_CPU_KERNELS_FN before including kernels_impl.h"
#endif

namespace lbw {
namespace cpu {
namespace {

// Fixed-order sum of the lanes (a pairwise tree), the same on every machine.
inline double sum_lanes(const double* x) {
  double y[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) y[j] = x[j] + x[j + kLanes / 2];
  for (int w = kLanes / 4; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) y[j] = y[j] + y[j + w];
  return y[0];
}

// Runs f(c) for every chunk, threads splitting the chunks by element count: pf hands out
// element ranges and each range runs the chunks that start in it.
template <class F>
void for_chunks(const ChunkTable& table, ParallelFor pf, const F& f) {
  const int64_t* start = table.start.data();
  const int64_t n = table.nchunks();
  pf(0, table.total(), [&](int64_t eb, int64_t ee) {
    for (int64_t c = std::lower_bound(start, start + n, eb) - start; c < n && start[c] < ee; ++c) f(c);
  });
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
    out[3 * row + 2] = nonfinite_flag(sq, s);
    ++row;
  }
}

// bf16/fp16 <-> float, 8 elements at a time: the scalar conversions of guard_math.h (exact
// widening; rounding to nearest even, NaN quieted with its payload) as AVX2/F16C instructions
// give them, bit for bit (checked against each other over every fp16 and every float), so
// every instruction set stores the same bits. Without them the compiler vectorised loops over
// fp16 with 8-byte vectors or not at all: an fp16 update ran ~19x slower than an fp32 one.
#if defined(LBW_CPU_AVX2)
inline __m256 widen8(const bf16_t* s) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
inline __m256 widen8(const f16_t* s) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))); }
inline void narrow8(__m256 x, bf16_t* d) {  // bf16_from_float on 8 lanes
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  // |x|'s bits above Inf's: NaN (both sides below 2^31, so the signed compare is the unsigned one)
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet_nan, nan);  // each lane < 2^16
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
inline void narrow8(__m256 x, f16_t* d) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(d), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif
#if defined(LBW_CPU_AVX512)
// 16 at a time, so that the update's 64-byte loads of the widened block each read one store
// (two 32-byte stores under a 64-byte load stall the load: store forwarding fails); narrowed
// 16 at a time too (as narrow8 twice, the bf16 update took 19% longer on the EPYC VM).
inline __m512 widen16(const bf16_t* s) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
inline __m512 widen16(const f16_t* s) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
}
inline void narrow16(__m512 x, bf16_t* d) {  // bf16_from_float on 16 lanes
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i r = _mm512_mask_blend_epi32(nan, rounded, quiet_nan);  // each lane < 2^16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtepi32_epi16(r));
}
inline void narrow16(__m512 x, f16_t* d) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

// n (<= kLanes) elements of a param or gradient as float, and back.
template <class T>
inline void widen(const T* s, float* d, int64_t n) {
  int64_t i = 0;
  if constexpr (!std::is_same_v<T, float>) {
#if defined(LBW_CPU_AVX512)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, widen16(s + i));
#endif
#if defined(LBW_CPU_AVX2)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, widen8(s + i));
#endif
  }
  for (; i < n; ++i) d[i] = load_as<float>(s[i]);
}
template <class T>
inline void narrow(const float* s, T* d, int64_t n) {
  int64_t i = 0;
  if constexpr (!std::is_same_v<T, float>) {
#if defined(LBW_CPU_AVX512)
    for (; i + 16 <= n; i += 16) narrow16(_mm512_loadu_ps(s + i), d + i);
#endif
#if defined(LBW_CPU_AVX2)
    for (; i + 8 <= n; i += 8) narrow8(_mm256_loadu_ps(s + i), d + i);
#endif
  }
  for (; i < n; ++i) store_from(d[i], s[i]);
}

// Four doubles, as one AVX2 register (two SSE2 registers on the baseline build): the lanes
// of the telemetry sums are written out so that the compiler cannot reorder them, and every
// instruction set adds the same numbers in the same order.
typedef double d4 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));

inline d4 load4(const float* g) {
#if defined(LBW_CPU_AVX2)
  return d4(_mm256_cvtps_pd(_mm_loadu_ps(g)));  // one instruction for 4 floats -> 4 doubles
#else
  f4 x;
  std::memcpy(&x, g, sizeof(x));
  return __builtin_convertvector(x, d4);
#endif
}
inline d4 load4(const double* g) {
  d4 x;
  std::memcpy(&x, g, sizeof(x));
  return x;
}

// The widest double vector the build's instruction set has (8 doubles with AVX-512, else 4).
#if defined(LBW_CPU_AVX512)
typedef double dv __attribute__((vector_size(64)));
inline dv loadv(const float* g) { return dv(_mm512_cvtps_pd(_mm256_loadu_ps(g))); }
inline dv loadv(const double* g) { return dv(_mm512_loadu_pd(g)); }
#else
typedef d4 dv;
inline dv loadv(const float* g) { return load4(g); }
inline dv loadv(const double* g) { return load4(g); }
#endif
constexpr int kWidth = int(sizeof(dv) / sizeof(double));

// acc + x * x for x widened from float, bf16 or fp16: its square is exact in double (24-bit
// significands square into 48 bits; no overflow or underflow from float's range), so one
// fused multiply-add rounds exactly where the multiply then the add does: the same bits, with
// one instruction instead of two on the adders that the float -> double conversions also
// keep busy (built for AVX2, the pass over gradients held in cache ran 25-43% faster with it
// on a 2-core AMD EPYC VM; from DRAM it made no difference). A double gradient's square
// rounds: the multiply then the add, as the scalar accumulate().
template <class G>
inline dv add_square(dv acc, dv x) {
  if constexpr (std::is_same_v<G, double>) {
    return acc + x * x;
  } else {
#if defined(LBW_CPU_AVX512)
    return dv(_mm512_fmadd_pd(__m512d(x), __m512d(x), __m512d(acc)));
#elif defined(LBW_CPU_AVX2)
    return dv(_mm256_fmadd_pd(__m256d(x), __m256d(x), __m256d(acc)));
#else
    return acc + x * x;
#endif
  }
}
template <class G>
inline dv loadv(const G* g) {
  dv x;
  for (int h = 0; h < kWidth / 4; ++h) {
    const d4 part = load4(g + 4 * h);
    std::memcpy(reinterpret_cast<char*>(&x) + sizeof(d4) * h, &part, sizeof(d4));
  }
  return x;
}

// Telemetry lanes: kLanes doubles of sum g^2 and of sum g, held in vectors of kWidth lanes
// (several independent chains keep the adders busy). Element i + j of a block goes to lane j,
// tail element j to lane j, whatever the vector width; the lanes then add up in a fixed tree,
// so every instruction set gives the same bits.
struct Lanes {
  static constexpr int kVecs = kLanes / kWidth;
  dv sq[kVecs] = {}, s[kVecs] = {};

  // Adds one block of kLanes elements; with CHECK, returns whether all of them are finite.
  template <bool CHECK, class G>
  bool block(const G* g) {
    if constexpr (std::is_same_v<G, bf16_t> || std::is_same_v<G, f16_t>) {
      float f[kLanes];  // widened exactly: the same sums
      widen(g, f, kLanes);
      return block<CHECK>(static_cast<const float*>(f));
    } else {
      dv zero = {};
      for (int a = 0; a < kVecs; ++a) {
        const dv x = loadv(g + kWidth * a);
        sq[a] = add_square<G>(sq[a], x);
        s[a] += x;
        if (CHECK) zero += x - x;  // stays 0 unless an element is NaN or Inf
      }
      if (!CHECK) return true;
      double z[kWidth];
      std::memcpy(z, &zero, sizeof(z));
      double total = 0.0;
      for (int j = 0; j < kWidth; ++j) total += z[j];
      return total == 0.0;
    }
  }
  template <class G>
  void finish(const G* tail, int64_t n, double* out2) const {
    double sql[kLanes], sl[kLanes];
    std::memcpy(sql, sq, sizeof(sql));
    std::memcpy(sl, s, sizeof(sl));
    for (int64_t j = 0; j < n; ++j) accumulate(sql[j], sl[j], load_as<double>(tail[j]));
    out2[0] = sum_lanes(sql);
    out2[1] = sum_lanes(sl);
  }
};

// Software prefetch, kPrefetch elements ahead (1 KiB of fp32), in the update's loop: one
// core's hardware prefetchers leave DRAM latency exposed (gpt2-quick, 1 thread: the update
// -12%, the telemetry pass -18% with it). Hints only: prefetching past an array's end never
// faults, bits unchanged.
constexpr int64_t kPrefetch = 256;
// The telemetry pass reads 4 B per element where the update reads and writes 28: it runs
// further ahead (4 KiB of fp32). Measured on a 2-core AMD EPYC VM with AVX-512 (2026-11-27,
// gpt2-30m's 148 tensors from DRAM, variants interleaved in one binary): one stream per chunk
// at this distance took 20-22% less time than the chunk read as 4 interleaved streams (its
// quarters, each 1 KiB ahead: what this pass did before) in quiet runs, 7-17% in busier ones
// (equal in the busiest), 5-8% more than a plain float sum of the same memory; 4 streams at
// 4 KiB were slower than at 1 KiB (bench/results/cpu-epyc-avx512-2core-passes-gpt2-30m-
// 20261127.txt). On an earlier AVX2 EPYC VM 1, 2, 4 or 8 streams at 1 KiB were within noise
// of each other, 8 slower.
constexpr int64_t kTelemetryPrefetch = 1024;

// One stream of lanes over the chunk, in the order update_chunk's telemetry reads it: the two
// passes give the same bits (single_pass's telemetry is the exact gate's).
template <class G>
void reduce_chunk(const G* __restrict__ g, int64_t n, double* out2) {
  Lanes lanes;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    __builtin_prefetch(g + i + kTelemetryPrefetch, 0, 3);
    lanes.block<false>(g + i);
  }
  lanes.finish(g + i, n - i, out2);
}

void telemetry(const ChunkTable& table, const GradRef* grads, double* ws, double* out, ParallelFor pf) {
  const Chunk* chunks = table.chunks.data();
  for_chunks(table, pf, [&](int64_t c) {
    const Chunk& k = chunks[c];
    const GradRef& g = grads[k.tensor];
    const int64_t n = k.end - k.begin;
    switch (g.dtype) {
      case DType::f32: reduce_chunk(static_cast<const float*>(g.data) + k.begin, n, ws + 2 * c); break;
      case DType::f64: reduce_chunk(static_cast<const double*>(g.data) + k.begin, n, ws + 2 * c); break;
      case DType::bf16: reduce_chunk(static_cast<const bf16_t*>(g.data) + k.begin, n, ws + 2 * c); break;
      case DType::f16: reduce_chunk(static_cast<const f16_t*>(g.data) + k.begin, n, ws + 2 * c); break;
    }
  });
  combine_partials(table, ws, out);
}

template <bool MASK, class P, class G, class M>
inline void update_elements(P* __restrict__ p, const G* __restrict__ g, M* __restrict__ m, M* __restrict__ v,
                            int64_t n, const AdamWCoeffs<M>& c, M sign) {
  if constexpr (!std::is_same_v<P, M> || !std::is_same_v<G, M>) {
    // bf16/fp16 params or grads (n <= kLanes): widened into float blocks, updated there (a
    // loop the compiler vectorises as the fp32 one), the params narrowed back.
    M pf[kLanes], gf[kLanes];
    widen(p, pf, n);
    const M* gm = gf;
    if constexpr (std::is_same_v<G, M>)
      gm = g;  // (fp32 grads of bf16/fp16 params: read in place)
    else
      widen(g, gf, n);
    update_elements<MASK>(pf, gm, m, v, n, c, sign);
    narrow(static_cast<const M*>(pf), p, n);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      M pi = p[i], mi = m[i], vi = v[i];
      if (MASK)
        adamw_element_masked(pi, g[i] * sign, mi, vi, c);
      else
        adamw_element(pi, g[i] * sign, mi, vi, c);
      p[i] = pi;
      m[i] = mi;
      v[i] = vi;
    }
  }
}

template <class P, class G, class M>
inline void prefetch_update(const P* p, const G* g, const M* m, const M* v) {
  __builtin_prefetch(p + kPrefetch, 1, 3);
  __builtin_prefetch(g + kPrefetch, 0, 3);
  __builtin_prefetch(m + kPrefetch, 1, 3);
  __builtin_prefetch(v + kPrefetch, 1, 3);
}

// One chunk of the update in one fused loop over p, g, m, v (MASK: single_pass's per-element
// non-finite mask). TEL: the loop also sums the gradients as read (before maximize's sign
// flip) into the telemetry lanes; that work hides behind the update's divisions and square
// roots. The same lanes in the same order as reduce_chunk: the telemetry pass's bits.
template <bool MASK, bool TEL, class P, class G, class M>
void update_chunk(P* __restrict__ p, const G* __restrict__ g, M* __restrict__ m, M* __restrict__ v,
                  int64_t n, const AdamWCoeffs<M> c, M sign, double* out2) {
  if (!TEL) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      prefetch_update(p + i, g + i, m + i, v + i);
      update_elements<MASK>(p + i, g + i, m + i, v + i, kLanes, c, sign);
    }
    update_elements<MASK>(p + i, g + i, m + i, v + i, n - i, c, sign);
    return;
  }
  Lanes lanes;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_update(p + i, g + i, m + i, v + i);
    // With the mask on, only a block holding a NaN/Inf takes the masked (slower) loop.
    if (lanes.block<MASK>(g + i) || !MASK)
      update_elements<false>(p + i, g + i, m + i, v + i, kLanes, c, sign);
    else
      update_elements<MASK>(p + i, g + i, m + i, v + i, kLanes, c, sign);
  }
  lanes.finish(g + i, n - i, out2);
  update_elements<MASK>(p + i, g + i, m + i, v + i, n - i, c, sign);
}

template <bool MASK, bool TEL, class P, class G>
void adamw_pass(const ChunkTable& table, const UpdateRef<P, G>* ts,
                const AdamWCoeffs<typename math_type<P>::type>* coeffs, double grad_sign, double* ws,
                double* out, ParallelFor pf) {
  using M = typename math_type<P>::type;
  const Chunk* chunks = table.chunks.data();
  const M sign = M(grad_sign);  // (+-1 times the clipping factor, rounded once to M)
  for_chunks(table, pf, [&](int64_t c) {
    const Chunk& k = chunks[c];
    const UpdateRef<P, G>& t = ts[k.tensor];
    update_chunk<MASK, TEL>(t.p + k.begin, t.g + k.begin, t.m + k.begin, t.v + k.begin, k.end - k.begin,
                            coeffs[k.tensor], sign, TEL ? ws + 2 * c : nullptr);
  });
  if (TEL) combine_partials(table, ws, out);
}

template <class P, class G>
void adamw(const ChunkTable& table, const UpdateRef<P, G>* ts, const AdamWCoeffs<typename math_type<P>::type>* coeffs,
           double grad_sign, bool mask, bool telemetry, double* ws, double* out, ParallelFor pf) {
  if (!telemetry)
    adamw_pass<false, false>(table, ts, coeffs, grad_sign, ws, out, pf);
  else if (mask)
    adamw_pass<true, true>(table, ts, coeffs, grad_sign, ws, out, pf);
  else
    adamw_pass<false, true>(table, ts, coeffs, grad_sign, ws, out, pf);
}

}  // namespace

const Kernels& LBW_CPU_KERNELS_FN() {
  static const Kernels table = {LBW_CPU_ISA_NAME, &telemetry, &adamw<float, float>, &adamw<double, double>,
                                &adamw<bf16_t, bf16_t>, &adamw<f16_t, f16_t>, &adamw<bf16_t, float>,
                                &adamw<f16_t, float>};
  return table;
}

}  // namespace cpu
}  // namespace lbw
