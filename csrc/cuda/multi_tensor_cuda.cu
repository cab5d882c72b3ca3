// Kernels declared in multi_tensor_cuda.cuh. Per-element math: csrc/guard_math.h.
#include "multi_tensor_cuda.cuh"

namespace lbw {
namespace cuda {
namespace {

// N elements of T, read or written with 16-byte accesses (two for 8 floats: m and v of
// bf16/fp16 params are only known to be 16-byte aligned).
template <class T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) Vec {
  T x[N];
};

// Deterministic block sum of two doubles: a fixed shuffle tree per warp, then warp 0 sums the
// warps' results the same way. Returns the totals in thread 0.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[kThreads / 32], sb[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? sa[lane] : 0.0;
    b = lane < kThreads / 32 ? sb[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

__device__ __forceinline__ int64_t chunk_len(const TensorEntry& t, const ChunkEntry& c) {
  const int64_t left = t.numel - c.begin;
  return left < kChunk ? left : kChunk;
}

// ------------------------------------------------------------------------------------------
// Telemetry
// ------------------------------------------------------------------------------------------
template <class G>
__device__ __forceinline__ void reduce_range(const G* __restrict__ g, int64_t n, bool aligned, double& sq,
                                             double& s) {
  constexpr int V = 16 / sizeof(G);
  int64_t done = 0;
  if (aligned) {
    const int64_t nvec = n / V;
    const Vec<G, V>* gv = reinterpret_cast<const Vec<G, V>*>(g);
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const Vec<G, V> x = gv[i];
#pragma unroll
      for (int j = 0; j < V; ++j) accumulate(sq, s, load_as<double>(x.x[j]));
    }
    done = nvec * V;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) accumulate(sq, s, load_as<double>(g[i]));
}

__global__ void __launch_bounds__(kThreads) telemetry_kernel(const TensorEntry* __restrict__ tensors,
                                                             const ChunkEntry* __restrict__ chunks,
                                                             double* __restrict__ ws) {
  const ChunkEntry c = chunks[blockIdx.x];
  const TensorEntry& t = tensors[c.tensor];
  const int64_t n = chunk_len(t, c);
  double sq = 0.0, s = 0.0;
  switch (DType(t.dtype)) {
    case DType::f32: reduce_range(static_cast<const float*>(t.g) + c.begin, n, t.aligned, sq, s); break;
    case DType::f64: reduce_range(static_cast<const double*>(t.g) + c.begin, n, t.aligned, sq, s); break;
    case DType::bf16: reduce_range(static_cast<const bf16_t*>(t.g) + c.begin, n, t.aligned, sq, s); break;
    case DType::f16: reduce_range(static_cast<const f16_t*>(t.g) + c.begin, n, t.aligned, sq, s); break;
  }
  block_sum2(sq, s);
  if (threadIdx.x == 0) {
    ws[2 * blockIdx.x] = sq;
    ws[2 * blockIdx.x + 1] = s;
  }
}

// Second stage: each tensor's chunk slots summed in chunk order, one thread per tensor.
__global__ void combine_kernel(const TensorEntry* __restrict__ tensors, int64_t ntensors,
                               const double* __restrict__ ws, double* __restrict__ out) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= ntensors) return;
  const TensorEntry& e = tensors[t];
  if (e.row < 0) return;
  double sq = 0.0, s = 0.0;
  for (int64_t c = e.first_chunk; c < e.first_chunk + e.nchunks; ++c) {
    sq += ws[2 * c];
    s += ws[2 * c + 1];
  }
  out[3 * e.row] = sq;
  out[3 * e.row + 1] = s;
  out[3 * e.row + 2] = nonfinite_flag(s);
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

template <bool MASK, bool TEL, class P, class M>
__device__ __forceinline__ void update_one(P& p, P g, M& m, M& v, const AdamWCoeffs<M>& c, M sign, double& sq,
                                           double& s) {
  if (TEL) accumulate(sq, s, load_as<double>(g));
  M pm = load_as<M>(p);
  if (MASK)
    adamw_element_masked(pm, load_as<M>(g) * sign, m, v, c);
  else
    adamw_element(pm, load_as<M>(g) * sign, m, v, c);
  store_from(p, pm);
}

template <class P, bool MASK, bool TEL>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const TensorEntry* __restrict__ tensors,
                                                         const ChunkEntry* __restrict__ chunks,
                                                         const AdamWCoeffs<double>* __restrict__ all_coeffs,
                                                         const double* __restrict__ skip, bool maximize,
                                                         double* __restrict__ ws) {
  using M = typename math_type<P>::type;
  if (skip != nullptr && *skip != 0.0) return;  // rule 1: a skipped call changes nothing
  const ChunkEntry c = chunks[blockIdx.x];
  const TensorEntry& t = tensors[c.tensor];
  const int64_t n = chunk_len(t, c);
  const AdamWCoeffs<M> k = coeffs_as<M>(all_coeffs[c.tensor]);
  const M sign = maximize ? M(-1) : M(1);
  P* __restrict__ p = static_cast<P*>(t.p) + c.begin;
  const P* __restrict__ g = static_cast<const P*>(t.g) + c.begin;
  M* __restrict__ m = static_cast<M*>(t.m) + c.begin;
  M* __restrict__ v = static_cast<M*>(t.v) + c.begin;
  double sq = 0.0, s = 0.0;
  int64_t done = 0;
  if (t.aligned) {
    // V elements per access: 16 bytes of p and g; m and v (fp32/fp64) take 1 or 2 accesses.
    constexpr int V = 16 / sizeof(P);
    using PV = Vec<P, V>;
    using MV = Vec<M, V>;
    const int64_t nvec = n / V;
#pragma unroll 2
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      PV pv = reinterpret_cast<PV*>(p)[i];
      const PV gv = reinterpret_cast<const PV*>(g)[i];
      MV mv = reinterpret_cast<MV*>(m)[i];
      MV vv = reinterpret_cast<MV*>(v)[i];
#pragma unroll
      for (int j = 0; j < V; ++j) update_one<MASK, TEL>(pv.x[j], gv.x[j], mv.x[j], vv.x[j], k, sign, sq, s);
      reinterpret_cast<PV*>(p)[i] = pv;
      reinterpret_cast<MV*>(m)[i] = mv;
      reinterpret_cast<MV*>(v)[i] = vv;
    }
    done = nvec * V;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) update_one<MASK, TEL>(p[i], g[i], m[i], v[i], k, sign, sq, s);
  if (TEL) {
    block_sum2(sq, s);
    if (threadIdx.x == 0) {
      ws[2 * blockIdx.x] = sq;
      ws[2 * blockIdx.x + 1] = s;
    }
  }
}

template <class P>
void launch_update(const AdamWArgs& a, const TensorEntry* tensors, const ChunkEntry* chunks, int64_t nchunks,
                   const AdamWCoeffs<double>* coeffs, double* ws, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(nchunks));
  if (!a.telemetry)
    adamw_kernel<P, false, false><<<grid, kThreads, 0, stream>>>(tensors, chunks, coeffs, a.skip, a.maximize, ws);
  else if (a.mask_nonfinite)
    adamw_kernel<P, true, true><<<grid, kThreads, 0, stream>>>(tensors, chunks, coeffs, nullptr, a.maximize, ws);
  else
    adamw_kernel<P, false, true><<<grid, kThreads, 0, stream>>>(tensors, chunks, coeffs, nullptr, a.maximize, ws);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

cudaError_t launch_telemetry(const TensorEntry* tensors, int64_t ntensors, const ChunkEntry* chunks,
                             int64_t nchunks, double* ws, double* out, cudaStream_t stream) {
  if (nchunks == 0) return cudaSuccess;
  telemetry_kernel<<<static_cast<unsigned>(nchunks), kThreads, 0, stream>>>(tensors, chunks, ws);
  combine_kernel<<<blocks_for(ntensors, 128), 128, 0, stream>>>(tensors, ntensors, ws, out);
  return cudaGetLastError();
}

cudaError_t launch_adamw(const AdamWArgs& args, const TensorEntry* tensors, int64_t ntensors,
                         const ChunkEntry* chunks, int64_t nchunks, AdamWCoeffs<double>* coeffs, double* ws,
                         double* out, cudaStream_t stream) {
  if (ntensors == 0) return cudaSuccess;
  coeffs_kernel<<<blocks_for(ntensors, 128), 128, 0, stream>>>(tensors, ntensors, args, coeffs);
  if (nchunks > 0) {
    switch (args.param_dtype) {
      case DType::f32: launch_update<float>(args, tensors, chunks, nchunks, coeffs, ws, stream); break;
      case DType::f64: launch_update<double>(args, tensors, chunks, nchunks, coeffs, ws, stream); break;
      case DType::bf16: launch_update<bf16_t>(args, tensors, chunks, nchunks, coeffs, ws, stream); break;
      case DType::f16: launch_update<f16_t>(args, tensors, chunks, nchunks, coeffs, ws, stream); break;
    }
    if (args.telemetry) combine_kernel<<<blocks_for(ntensors, 128), 128, 0, stream>>>(tensors, ntensors, ws, out);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lbw
