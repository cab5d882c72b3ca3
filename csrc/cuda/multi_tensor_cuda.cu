// Kernels declared in multi_tensor_cuda.cuh. Per-element math: csrc/guard_math.h.
#include "multi_tensor_cuda.cuh"

#include <type_traits>

namespace lbw {
namespace cuda {
namespace {

// N elements of T, read or written with 16-byte accesses (two for 8 floats: m and v of
// bf16/fp16 params are only known to be 16-byte aligned).
template <class T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Vec {
  T x[N];
};

// Deterministic warp sum of two doubles (a fixed shuffle tree); the totals in lane 0. Every
// lane of the warp must take part.
__device__ __forceinline__ void warp_sum2(double& a, double& b) {
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
}

// Deterministic block sum of two doubles: warp_sum2 per warp, then warp 0 sums the warps'
// results the same way. Returns the totals in thread 0.
template <int THREADS>
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[THREADS / 32], sb[THREADS / 32];
  warp_sum2(a, b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < THREADS / 32 ? sa[lane] : 0.0;
    b = lane < THREADS / 32 ? sb[lane] : 0.0;
    warp_sum2(a, b);
  }
}

// A block's telemetry partial of its chunk (block b of a grid of one block per chunk): into
// chunk slot b of ws, or with `warp_slots` (Geometry::warp_partials; uniform per launch) one
// per warp, into the warp slots behind the gridDim.x chunk slots, which fold_warp_slots_kernel
// then adds into chunk slot b. The warp-slot path has no barrier: no warp waits for another.
template <int THREADS>
__device__ __forceinline__ void write_partials(double sq, double s, double* __restrict__ ws, bool warp_slots) {
  if (warp_slots) {
    warp_sum2(sq, s);
    if (threadIdx.x % 32 == 0) {
      double* slot = ws + 2 * (int64_t(gridDim.x) + int64_t(blockIdx.x) * (THREADS / 32) + threadIdx.x / 32);
      slot[0] = sq;
      slot[1] = s;
    }
  } else {
    block_sum2<THREADS>(sq, s);
    if (threadIdx.x == 0) {
      ws[2 * blockIdx.x] = sq;
      ws[2 * blockIdx.x + 1] = s;
    }
  }
}

// warp_partials' middle stage: a warp per chunk adds the chunk's WARPS warp slots with the
// fixed shuffle tree into its chunk slot (where combine_kernel reads). Scales with the
// chunks, where one block per tensor reading every warp slot would not (a 268M-element
// tensor at 8192-element chunks has 524,288 of them).
template <int WARPS>
__global__ void __launch_bounds__(256) fold_warp_slots_kernel(double* __restrict__ ws, int64_t nchunks) {
  const int64_t chunk = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (chunk >= nchunks) return;  // whole warps: the tree below has all its lanes
  const double* warp_ws = ws + 2 * nchunks + 2 * chunk * WARPS;
  double a = lane < WARPS ? warp_ws[2 * lane] : 0.0;
  double b = lane < WARPS ? warp_ws[2 * lane + 1] : 0.0;
  warp_sum2(a, b);
  if (lane == 0) {
    ws[2 * chunk] = a;
    ws[2 * chunk + 1] = b;
  }
}

void launch_fold(const Geometry& geo, double* ws, int64_t nchunks, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((nchunks * 32 + 255) / 256);
  if (geo.threads == 256)
    fold_warp_slots_kernel<8><<<blocks, 256, 0, stream>>>(ws, nchunks);
  else
    fold_warp_slots_kernel<16><<<blocks, 256, 0, stream>>>(ws, nchunks);
}

__device__ __forceinline__ int64_t chunk_len(const TensorEntry& t, const ChunkEntry& c, int64_t chunk) {
  const int64_t left = t.numel - c.begin;
  return left < chunk ? left : chunk;
}

// ------------------------------------------------------------------------------------------
// Telemetry
// ------------------------------------------------------------------------------------------
template <int THREADS, class G>
__device__ __forceinline__ void reduce_range(const G* __restrict__ g, int64_t n, bool aligned, double& sq,
                                             double& s) {
  constexpr int V = 16 / sizeof(G);
  int64_t done = 0;
  if (aligned) {
    const int64_t nvec = n / V;
    const Vec<G, V>* gv = reinterpret_cast<const Vec<G, V>*>(g);
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < nvec; i += THREADS) {
      const Vec<G, V> x = gv[i];
#pragma unroll
      for (int j = 0; j < V; ++j) accumulate(sq, s, load_as<double>(x.x[j]));
    }
    done = nvec * V;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += THREADS) accumulate(sq, s, load_as<double>(g[i]));
}

template <int THREADS>
__global__ void __launch_bounds__(THREADS) telemetry_kernel(const TensorEntry* __restrict__ tensors,
                                                            const ChunkEntry* __restrict__ chunks, int64_t chunk,
                                                            double* __restrict__ ws, bool warp_slots) {
  const ChunkEntry c = chunks[blockIdx.x];
  const TensorEntry& t = tensors[c.tensor];
  const int64_t n = chunk_len(t, c, chunk);
  double sq = 0.0, s = 0.0;
  switch (DType(t.dtype)) {
    case DType::f32: reduce_range<THREADS>(static_cast<const float*>(t.g) + c.begin, n, t.aligned, sq, s); break;
    case DType::f64: reduce_range<THREADS>(static_cast<const double*>(t.g) + c.begin, n, t.aligned, sq, s); break;
    case DType::bf16: reduce_range<THREADS>(static_cast<const bf16_t*>(t.g) + c.begin, n, t.aligned, sq, s); break;
    case DType::f16: reduce_range<THREADS>(static_cast<const f16_t*>(t.g) + c.begin, n, t.aligned, sq, s); break;
  }
  write_partials<THREADS>(sq, s, ws, warp_slots);
}

// Second stage: one block per tensor. Thread i sums the tensor's chunk slots i, i +
// COMBINE_THREADS, ... in that order, then block_sum2's fixed tree: a fixed order for a given
// number of chunks, so bitwise repeatable. (One thread per tensor summing every slot in
// order, as before, cost ~86 ns per slot on an H200: 0.35 ms after the pass for one
// 268M-element tensor, ~0.09 ms for TinyLlama's 65M-element embedding, more than 1% of
// its whole step; the loop's dependent loads were the time.)
constexpr int COMBINE_THREADS = 128;

__global__ void __launch_bounds__(COMBINE_THREADS) combine_kernel(const TensorEntry* __restrict__ tensors,
                                                                  const double* __restrict__ ws,
                                                                  double* __restrict__ out) {
  const TensorEntry& e = tensors[blockIdx.x];
  if (e.row < 0) return;  // uniform per block: no thread reaches block_sum2's barrier
  double sq = 0.0, s = 0.0;
  const int64_t end = e.first_chunk + e.nchunks;
#pragma unroll 4
  for (int64_t c = e.first_chunk + threadIdx.x; c < end; c += COMBINE_THREADS) {
    sq += ws[2 * c];
    s += ws[2 * c + 1];
  }
  block_sum2<COMBINE_THREADS>(sq, s);
  if (threadIdx.x == 0) {
    out[3 * e.row] = sq;
    out[3 * e.row + 1] = s;
    out[3 * e.row + 2] = nonfinite_flag(sq, s);
  }
}

void launch_combine(const TensorEntry* tensors, int64_t ntensors, const double* ws, double* out, cudaStream_t stream) {
  combine_kernel<<<static_cast<unsigned>(ntensors), COMBINE_THREADS, 0, stream>>>(tensors, ws, out);
}

// ------------------------------------------------------------------------------------------
// AdamW
// ------------------------------------------------------------------------------------------
// Step counts and coefficients, one thread per tensor: the steps advance here (by 0 when the
// call is skipped) before the update kernel, launched next on the same stream, reads them.
__global__ void coeffs_kernel(const TensorEntry* __restrict__ tensors, int64_t ntensors, AdamWArgs args,
                              AdamWCoeffs<double>* __restrict__ coeffs) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= ntensors) return;
  const bool skipped = args.skip != nullptr && *args.skip != 0.0;
  float* step = tensors[t].step;
  const float s = *step + (skipped ? 0.0f : 1.0f);
  *step = s;
  coeffs[t] = adamw_coeffs<double>(args.lr * *args.lr_scale, args.beta1, args.beta2, args.eps,
                                   args.weight_decay, double(s));
}

template <class M>
__device__ __forceinline__ AdamWCoeffs<M> coeffs_as(const AdamWCoeffs<double>& c) {
  return AdamWCoeffs<M>{M(c.decay), M(c.w1), M(c.beta2), M(c.w2), M(c.step_size), M(c.bc2_sqrt), M(c.eps)};
}

template <bool MASK, bool TEL, class P, class G, class M>
__device__ __forceinline__ void update_one(P& p, G g, M& m, M& v, const AdamWCoeffs<M>& c, M sign, double& sq,
                                           double& s) {
  if (TEL) accumulate(sq, s, load_as<double>(g));
  M pm = load_as<M>(p);
  if (MASK)
    adamw_element_masked(pm, load_as<M>(g) * sign, m, v, c);
  else
    adamw_element(pm, load_as<M>(g) * sign, m, v, c);
  store_from(p, pm);
}

// One chunk's aligned part, ILP vectors of each stream loaded before any is used (see
// geometry.h); with ILP 1 the loop is unrolled twice and the compiler schedules the loads.
template <bool MASK, bool TEL, int THREADS, int ILP, class P, class G, class M>
__device__ __forceinline__ void update_vectors(P* __restrict__ p, const G* __restrict__ g, M* __restrict__ m,
                                               M* __restrict__ v, int64_t nvec, const AdamWCoeffs<M>& k, M sign,
                                               double& sq, double& s) {
  // V elements per access: 16 bytes of p; g (of p's type or fp32), m and v (fp32/fp64) take
  // 1 or 2 accesses.
  constexpr int V = 16 / sizeof(P);
  using PV = Vec<P, V>;
  using GV = Vec<G, V>;
  using MV = Vec<M, V>;
  PV* pv = reinterpret_cast<PV*>(p);
  const GV* gv = reinterpret_cast<const GV*>(g);
  MV* mv = reinterpret_cast<MV*>(m);
  MV* vv = reinterpret_cast<MV*>(v);
  if constexpr (ILP == 1) {
#pragma unroll 2
    for (int64_t i = threadIdx.x; i < nvec; i += THREADS) {
      PV pr = pv[i];
      const GV gr = gv[i];
      MV mr = mv[i], vr = vv[i];
#pragma unroll
      for (int j = 0; j < V; ++j) update_one<MASK, TEL>(pr.x[j], gr.x[j], mr.x[j], vr.x[j], k, sign, sq, s);
      pv[i] = pr;
      mv[i] = mr;
      vv[i] = vr;
    }
  } else {
    for (int64_t base = threadIdx.x; base < nvec; base += int64_t(THREADS) * ILP) {
      PV pr[ILP];
      GV gr[ILP];
      MV mr[ILP], vr[ILP];
#pragma unroll
      for (int u = 0; u < ILP; ++u) {
        const int64_t i = base + int64_t(u) * THREADS;
        if (i < nvec) {
          pr[u] = pv[i];
          gr[u] = gv[i];
          mr[u] = mv[i];
          vr[u] = vv[i];
        }
      }
#pragma unroll
      for (int u = 0; u < ILP; ++u) {
        const int64_t i = base + int64_t(u) * THREADS;
        if (i < nvec) {
#pragma unroll
          for (int j = 0; j < V; ++j)
            update_one<MASK, TEL>(pr[u].x[j], gr[u].x[j], mr[u].x[j], vr[u].x[j], k, sign, sq, s);
          pv[i] = pr[u];
          mv[i] = mr[u];
          vv[i] = vr[u];
        }
      }
    }
  }
}

template <class P, class G, bool MASK, bool TEL, int THREADS, int ILP>
__global__ void __launch_bounds__(THREADS) adamw_kernel(const TensorEntry* __restrict__ tensors,
                                                        const ChunkEntry* __restrict__ chunks, int64_t chunk,
                                                        const AdamWCoeffs<double>* __restrict__ all_coeffs,
                                                        const double* __restrict__ skip, bool maximize,
                                                        const double* __restrict__ grad_factor,
                                                        double* __restrict__ ws, bool warp_slots) {
  using M = typename math_type<P>::type;
  if (skip != nullptr && *skip != 0.0) return;  // rule 1: a skipped call changes nothing
  const ChunkEntry c = chunks[blockIdx.x];
  const TensorEntry& t = tensors[c.tensor];
  const int64_t n = chunk_len(t, c, chunk);
  const AdamWCoeffs<M> k = coeffs_as<M>(all_coeffs[c.tensor]);
  // -1 when maximizing, times max_grad_norm's factor rounded once to M (the reference's order)
  const M sign = (maximize ? M(-1) : M(1)) * (grad_factor != nullptr ? M(*grad_factor) : M(1));
  P* __restrict__ p = static_cast<P*>(t.p) + c.begin;
  const G* __restrict__ g = static_cast<const G*>(t.g) + c.begin;
  M* __restrict__ m = static_cast<M*>(t.m) + c.begin;
  M* __restrict__ v = static_cast<M*>(t.v) + c.begin;
  double sq = 0.0, s = 0.0;
  int64_t done = 0;
  if (t.aligned) {
    constexpr int V = 16 / sizeof(P);
    update_vectors<MASK, TEL, THREADS, ILP>(p, g, m, v, n / V, k, sign, sq, s);
    done = n / V * V;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += THREADS) update_one<MASK, TEL>(p[i], g[i], m[i], v[i], k, sign, sq, s);
  if (TEL) write_partials<THREADS>(sq, s, ws, warp_slots);
}

template <class P, class G, int THREADS, int ILP>
void launch_update(const AdamWArgs& a, const TensorEntry* tensors, const ChunkEntry* chunks, int64_t nchunks,
                   int64_t chunk, const AdamWCoeffs<double>* coeffs, double* ws, bool warp_slots,
                   cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(nchunks));
  if (!a.telemetry)
    adamw_kernel<P, G, false, false, THREADS, ILP>
        <<<grid, THREADS, 0, stream>>>(tensors, chunks, chunk, coeffs, a.skip, a.maximize, a.grad_factor, ws, false);
  else if (a.mask_nonfinite)
    adamw_kernel<P, G, true, true, THREADS, ILP>
        <<<grid, THREADS, 0, stream>>>(tensors, chunks, chunk, coeffs, nullptr, a.maximize, a.grad_factor, ws,
                                       warp_slots);
  else
    adamw_kernel<P, G, false, true, THREADS, ILP>
        <<<grid, THREADS, 0, stream>>>(tensors, chunks, chunk, coeffs, nullptr, a.maximize, a.grad_factor, ws,
                                       warp_slots);
}

// The geometry's instantiation (geometry_supported() was checked).
template <class P, class G>
void launch_update(const Geometry& geo, const AdamWArgs& a, const TensorEntry* tensors, const ChunkEntry* chunks,
                   int64_t nchunks, const AdamWCoeffs<double>* coeffs, double* ws, cudaStream_t stream) {
  const auto run = [&](auto threads, auto ilp) {
    launch_update<P, G, decltype(threads)::value, decltype(ilp)::value>(a, tensors, chunks, nchunks, geo.chunk, coeffs,
                                                                      ws, geo.warp_partials != 0, stream);
  };
  using T256 = std::integral_constant<int, 256>;
  using T512 = std::integral_constant<int, 512>;
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I4 = std::integral_constant<int, 4>;  // (512 x 4 spills registers for 16-bit params)
  if (geo.threads == 512 && geo.ilp == 1) run(T512{}, I1{});
  else if (geo.threads == 512) run(T512{}, I2{});
  else if (geo.ilp == 2) run(T256{}, I2{});
  else run(T256{}, I4{});
}

// 16-bit params: grads of their own type, or float32 (AdamWArgs::f32_grads).
template <class P>
void launch_update_16bit(const Geometry& geo, const AdamWArgs& a, const TensorEntry* tensors, const ChunkEntry* chunks,
                         int64_t nchunks, const AdamWCoeffs<double>* coeffs, double* ws, cudaStream_t stream) {
  if (a.f32_grads)
    launch_update<P, float>(geo, a, tensors, chunks, nchunks, coeffs, ws, stream);
  else
    launch_update<P, P>(geo, a, tensors, chunks, nchunks, coeffs, ws, stream);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

cudaError_t launch_telemetry(const Geometry& geo, const TensorEntry* tensors, int64_t ntensors,
                             const ChunkEntry* chunks, int64_t nchunks, double* ws, double* out,
                             cudaStream_t stream) {
  if (!geometry_supported(geo)) return cudaErrorInvalidValue;
  if (nchunks == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(nchunks);
  const bool warp_slots = geo.warp_partials != 0;
  if (geo.threads == 256)
    telemetry_kernel<256><<<grid, 256, 0, stream>>>(tensors, chunks, geo.chunk, ws, warp_slots);
  else
    telemetry_kernel<512><<<grid, 512, 0, stream>>>(tensors, chunks, geo.chunk, ws, warp_slots);
  if (warp_slots) launch_fold(geo, ws, nchunks, stream);
  launch_combine(tensors, ntensors, ws, out, stream);
  return cudaGetLastError();
}

cudaError_t launch_adamw(const Geometry& geo, const AdamWArgs& args, const TensorEntry* tensors,
                         int64_t ntensors, const ChunkEntry* chunks, int64_t nchunks, AdamWCoeffs<double>* coeffs,
                         double* ws, double* out, cudaStream_t stream) {
  if (!geometry_supported(geo)) return cudaErrorInvalidValue;
  if (ntensors == 0) return cudaSuccess;
  coeffs_kernel<<<blocks_for(ntensors, 128), 128, 0, stream>>>(tensors, ntensors, args, coeffs);
  if (nchunks > 0) {
    switch (args.param_dtype) {
      case DType::f32: launch_update<float, float>(geo, args, tensors, chunks, nchunks, coeffs, ws, stream); break;
      case DType::f64: launch_update<double, double>(geo, args, tensors, chunks, nchunks, coeffs, ws, stream); break;
      case DType::bf16: launch_update_16bit<bf16_t>(geo, args, tensors, chunks, nchunks, coeffs, ws, stream); break;
      case DType::f16: launch_update_16bit<f16_t>(geo, args, tensors, chunks, nchunks, coeffs, ws, stream); break;
    }
    if (args.telemetry) {
      if (geo.warp_partials) launch_fold(geo, ws, nchunks, stream);
      launch_combine(tensors, ntensors, ws, out, stream);
    }
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lbw
