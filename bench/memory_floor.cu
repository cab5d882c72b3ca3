// What the memory system allows for the update's traffic on one GPU, without torch: the AdamW
// update and telemetry kernels of csrc/cuda (every launch geometry with kernels) beside plain
// kernels that move the same bytes with no math.
//
// What it showed on an H200 (bench/results/nvidia-h200-memory-floor-20261126.jsonl): the
// 4-read/3-write traffic with no math (`streams7`) runs at 0.95-0.98x a grid-stride copy's
// time, the update kernel at 0.97x: the update is at what the traffic allows. The fused
// single_pass kernel was 1.6% slower than the update alone at 16384-element chunks, 0.5% at
// 65536, which points at its per-chunk block reduction (a barrier: the block's warps stop
// loading until the slowest arrives), while the update alone got faster as chunks shrank
// (4.04 TB/s at 65536, 4.07 at 16384, 4.14 at 8192). `adamw_telemetry_warp_partials` and
// `telemetry_warp_partials` below are the same passes with one partial per warp and no
// barrier (a bigger second stage): if they keep pace with the update alone at small chunks,
// per-warp partials and a smaller chunk are the change for csrc/cuda.
//
//   cmake -S . -B build/gpu -G Ninja -DLBW_CUDA=ON && cmake --build build/gpu --target bench_memory_floor
//   build/gpu/bench_memory_floor [ELEMENTS]     # default 1 << 28 (1 GiB per fp32 stream, 4 GiB)
//
// One JSON object per line: name, geometry, bytes moved, min and median ms of REPS CUDA-event
// timings after warm-up, TB/s at the min, and x_copy_floor = min ms over (bytes / copy
// bandwidth at the copy's min), as lbw-kernels bench computes its floors.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../csrc/cuda/multi_tensor_cuda.cuh"

using namespace lbw;
using namespace lbw::cuda;

#define CUDA_OK(x)                                                                               \
  do {                                                                                           \
    const cudaError_t err_ = (x);                                                                \
    if (err_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(err_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace {

constexpr int kReps = 20;
constexpr int kThreads = 512;

__device__ __forceinline__ int64_t first_index() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t stride() { return int64_t(gridDim.x) * blockDim.x; }
__device__ __forceinline__ float4 add(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }

// dst = src: 8 B per fp32 element, the reference every floor divides by.
__global__ void copy_kernel(const float4* __restrict__ src, float4* __restrict__ dst, int64_t n4) {
  for (int64_t i = first_index(); i < n4; i += stride()) dst[i] = src[i];
}

// The update's streams without its math: read p, g, m, v; write p, m, v (28 B per element).
// Variants map what the traffic itself allows: LOADS vectors of each stream in flight per
// thread (grid-stride), STREAMING cache hints (ld.global.cs / st.global.cs: evict first, as
// every byte is touched once), or one vector per thread and no loop (GRID_STRIDE false: as
// many blocks as the data needs, torch's elementwise style).
template <int LOADS, bool STREAMING, bool GRID_STRIDE>
__global__ void streams7_kernel(float4* __restrict__ p, const float4* __restrict__ g, float4* __restrict__ m,
                                float4* __restrict__ v, int64_t n4) {
  // Coalesced as the update kernel's ILP: the u-th vector of a thread is blockDim.x further on.
  const int64_t step = GRID_STRIDE ? stride() * LOADS : n4;
  for (int64_t base = blockIdx.x * int64_t(blockDim.x) * LOADS + threadIdx.x; base < n4; base += step) {
    float4 pr[LOADS], gr[LOADS], mr[LOADS], vr[LOADS];
#pragma unroll
    for (int u = 0; u < LOADS; ++u) {
      const int64_t i = base + int64_t(u) * blockDim.x;
      if (i < n4) {
        pr[u] = STREAMING ? __ldcs(p + i) : p[i];
        gr[u] = STREAMING ? __ldcs(g + i) : g[i];
        mr[u] = STREAMING ? __ldcs(m + i) : m[i];
        vr[u] = STREAMING ? __ldcs(v + i) : v[i];
      }
    }
#pragma unroll
    for (int u = 0; u < LOADS; ++u) {
      const int64_t i = base + int64_t(u) * blockDim.x;
      if (i < n4) {
        if (STREAMING) {
          __stcs(p + i, add(pr[u], gr[u]));
          __stcs(m + i, add(mr[u], gr[u]));
          __stcs(v + i, add(vr[u], gr[u]));
        } else {
          p[i] = add(pr[u], gr[u]);
          m[i] = add(mr[u], gr[u]);
          v[i] = add(vr[u], gr[u]);
        }
      }
    }
  }
}

// The telemetry pass's traffic: read g (4 B per element). The sum is stored only when it
// equals a value it never takes, so the loads stay.
__global__ void read_kernel(const float4* __restrict__ g, int64_t n4, float* __restrict__ sink) {
  float s = 0.f;
  for (int64_t i = first_index(); i < n4; i += stride()) {
    const float4 x = g[i];
    s += x.x + x.y + x.z + x.w;
  }
  if (s == -12345.f) *sink = s;
}

// Fixed shuffle tree over a warp's two sums; lane 0 writes the warp's own slot (no barrier).
__device__ __forceinline__ void warp_sum2(double& a, double& b) {
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
}

template <int THREADS>
__device__ __forceinline__ void write_warp_slot(double sq, double s, double* __restrict__ ws) {
  warp_sum2(sq, s);
  if (threadIdx.x % 32 == 0) {
    const int64_t slot = blockIdx.x * int64_t(THREADS / 32) + threadIdx.x / 32;
    ws[2 * slot] = sq;
    ws[2 * slot + 1] = s;
  }
}

// The fused single_pass kernel (fp32, one tensor, chunk elements per block, mask_nonfinite)
// with one telemetry partial per warp instead of per block: each warp reduces its sums with
// shuffles and writes its own slot, so no warp waits for the others at the chunk's end.
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
    adamw_telemetry_warp_partials_kernel(float4* __restrict__ p, const float4* __restrict__ g, float4* __restrict__ m,
                                         float4* __restrict__ v, int64_t n4, int64_t chunk4,
                                         const AdamWCoeffs<double>* __restrict__ coeffs, double* __restrict__ ws) {
  const AdamWCoeffs<double>& c = *coeffs;
  const AdamWCoeffs<float> k{float(c.decay), float(c.w1),        float(c.beta2), float(c.w2),
                             float(c.step_size), float(c.bc2_sqrt), float(c.eps)};
  const int64_t begin = blockIdx.x * chunk4;
  const int64_t end = begin + chunk4 < n4 ? begin + chunk4 : n4;
  double sq = 0.0, s = 0.0;
#pragma unroll 2
  for (int64_t i = begin + threadIdx.x; i < end; i += THREADS) {
    float4 pr = p[i], mr = m[i], vr = v[i];
    const float4 gr = g[i];
    const auto one = [&](float& pj, float gj, float& mj, float& vj) {
      accumulate(sq, s, double(gj));
      adamw_element_masked(pj, gj, mj, vj, k);
    };
    one(pr.x, gr.x, mr.x, vr.x);
    one(pr.y, gr.y, mr.y, vr.y);
    one(pr.z, gr.z, mr.z, vr.z);
    one(pr.w, gr.w, mr.w, vr.w);
    p[i] = pr;
    m[i] = mr;
    v[i] = vr;
  }
  write_warp_slot<THREADS>(sq, s, ws);
}

// The telemetry-only pass (the exact gate's read of g) the same way: a partial per warp.
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
    telemetry_warp_partials_kernel(const float4* __restrict__ g, int64_t n4, int64_t chunk4, double* __restrict__ ws) {
  const int64_t begin = blockIdx.x * chunk4;
  const int64_t end = begin + chunk4 < n4 ? begin + chunk4 : n4;
  double sq = 0.0, s = 0.0;
#pragma unroll 4
  for (int64_t i = begin + threadIdx.x; i < end; i += THREADS) {
    const float4 x = g[i];
    accumulate(sq, s, double(x.x));
    accumulate(sq, s, double(x.y));
    accumulate(sq, s, double(x.z));
    accumulate(sq, s, double(x.w));
  }
  write_warp_slot<THREADS>(sq, s, ws);
}

// Their second stage, in two launches so it scales with the slots: a warp per chunk folds the
// chunk's 16 warp slots into one chunk slot (fixed shuffle tree), then 1024 threads sum the
// one tensor's chunk slots in a fixed strided order and a fixed tree, as the library's
// combine kernel does per tensor.
__global__ void fold_warp_slots_kernel(const double* __restrict__ warp_ws, int64_t nchunks,
                                       double* __restrict__ chunk_ws) {
  const int64_t chunk = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (chunk >= nchunks) return;  // whole warps: nothing below waits for another warp
  constexpr int kSlots = kThreads / 32;
  double a = lane < kSlots ? warp_ws[2 * (chunk * kSlots + lane)] : 0.0;
  double b = lane < kSlots ? warp_ws[2 * (chunk * kSlots + lane) + 1] : 0.0;
  warp_sum2(a, b);
  if (lane == 0) chunk_ws[2 * chunk] = a, chunk_ws[2 * chunk + 1] = b;
}

__global__ void __launch_bounds__(1024) sum_chunk_slots_kernel(const double* __restrict__ ws, int64_t nslots,
                                                               double* __restrict__ out) {
  __shared__ double sa[32], sb[32];
  double a = 0.0, b = 0.0;
  for (int64_t i = threadIdx.x; i < nslots; i += 1024) {
    a += ws[2 * i];
    b += ws[2 * i + 1];
  }
  warp_sum2(a, b);
  if (threadIdx.x % 32 == 0) sa[threadIdx.x / 32] = a, sb[threadIdx.x / 32] = b;
  __syncthreads();
  if (threadIdx.x < 32) {
    a = sa[threadIdx.x];
    b = sb[threadIdx.x];
    warp_sum2(a, b);
    if (threadIdx.x == 0) out[0] = a, out[1] = b, out[2] = nonfinite_flag(b);
  }
}

// Both stages after a warp-partials pass over nchunks chunks.
void reduce_warp_slots(const double* warp_ws, int64_t nchunks, double* chunk_ws, double* out) {
  const unsigned fold_blocks = static_cast<unsigned>((nchunks * 32 + 255) / 256);
  fold_warp_slots_kernel<<<fold_blocks, 256>>>(warp_ws, nchunks, chunk_ws);
  sum_chunk_slots_kernel<<<1, 1024>>>(chunk_ws, nchunks, out);
}

__global__ void fill_kernel(float* x, int64_t n, float value) {
  for (int64_t i = first_index(); i < n; i += stride()) x[i] = value;
}

// Min and median ms of kReps launches after 3 warm-up ones.
template <class Launch>
std::pair<float, float> time_ms(Launch launch) {
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> ms;
  for (int i = 0; i < kReps; ++i) {
    CUDA_OK(cudaEventRecord(start));
    launch();
    CUDA_OK(cudaEventRecord(stop));
    CUDA_OK(cudaEventSynchronize(stop));
    float t = 0;
    CUDA_OK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaEventDestroy(start));
  CUDA_OK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return {ms.front(), ms[ms.size() / 2]};
}

double g_copy_bytes_per_ms = 0;  // set by the copy row, which runs first

void report(const std::string& name, const std::string& geometry, double bytes, std::pair<float, float> ms) {
  if (g_copy_bytes_per_ms == 0) g_copy_bytes_per_ms = bytes / ms.first;
  std::printf(
      "{\"name\": \"%s\", \"geometry\": \"%s\", \"bytes\": %.0f, \"ms_min\": %.4f, \"ms_median\": %.4f, "
      "\"tb_per_s\": %.3f, \"x_copy_floor\": %.4f}\n",
      name.c_str(), geometry.c_str(), bytes, ms.first, ms.second, bytes / ms.first / 1e9,
      ms.first / (bytes / g_copy_bytes_per_ms));
  std::fflush(stdout);
}

// One fp32 tensor of n elements as the bindings would upload it for `geo`.
struct OneTensorTable {
  uint8_t* device = nullptr;
  int64_t nchunks = 0;
  OneTensorTable(const TensorEntry& entry, int64_t chunk) {
    TensorEntry e = entry;
    std::vector<ChunkEntry> chunks;
    for (int64_t b = 0; b < e.numel; b += chunk) chunks.push_back({0, b});
    e.first_chunk = 0;
    e.nchunks = nchunks = int64_t(chunks.size());
    e.row = 0;
    std::vector<uint8_t> host(table_bytes(1, nchunks));
    std::copy_n(reinterpret_cast<const uint8_t*>(&e), sizeof(TensorEntry), host.begin());
    std::copy_n(reinterpret_cast<const uint8_t*>(chunks.data()), chunks.size() * sizeof(ChunkEntry),
                host.begin() + sizeof(TensorEntry));
    CUDA_OK(cudaMalloc(&device, host.size()));
    CUDA_OK(cudaMemcpy(device, host.data(), host.size(), cudaMemcpyHostToDevice));
  }
  ~OneTensorTable() { cudaFree(device); }
  const TensorEntry* tensors() const { return reinterpret_cast<const TensorEntry*>(device); }
  const ChunkEntry* chunks() const { return reinterpret_cast<const ChunkEntry*>(device + sizeof(TensorEntry)); }
};

std::string name_of(const Geometry& g) {
  return std::to_string(g.threads) + "x" + std::to_string(g.ilp) + "/" + std::to_string(g.chunk);
}

}  // namespace

int main(int argc, char** argv) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device\n");
    return 77;
  }
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : (int64_t(1) << 28);
  if (n <= 0 || n % 4 != 0) {
    std::fprintf(stderr, "ELEMENTS must be a positive multiple of 4, got %lld\n", static_cast<long long>(n));
    return 2;
  }
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  int per_sm = 0;
  CUDA_OK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, streams7_kernel<1, false, true>, kThreads, 0));
  const int grid = prop.multiProcessorCount * std::max(per_sm, 1);
  std::printf("{\"device\": \"%s\", \"elements\": %lld, \"grid_stride_blocks\": %d}\n", prop.name,
              static_cast<long long>(n), grid);

  float *p, *g, *m, *v, *sink, *steps;
  double *lr_scale, *ws, *out;
  for (float** x : {&p, &g, &m, &v}) CUDA_OK(cudaMalloc(x, n * sizeof(float)));
  CUDA_OK(cudaMalloc(&sink, sizeof(float)));
  CUDA_OK(cudaMalloc(&steps, sizeof(float)));
  CUDA_OK(cudaMalloc(&lr_scale, sizeof(double)));
  CUDA_OK(cudaMalloc(&ws, 2 * (n / 4096 + 1) * sizeof(double)));  // the smallest chunk's count
  double* warp_ws;  // one slot per warp of 512-thread blocks, chunks of 4096 or more
  CUDA_OK(cudaMalloc(&warp_ws, 2 * (n / 4096 + 1) * (kThreads / 32) * sizeof(double)));
  CUDA_OK(cudaMalloc(&out, 3 * sizeof(double)));
  const float init[4] = {0.5f, 0.01f, 0.f, 1e-4f};
  float* all[4] = {p, g, m, v};
  for (int k = 0; k < 4; ++k) fill_kernel<<<grid, kThreads>>>(all[k], n, init[k]);
  CUDA_OK(cudaMemset(steps, 0, sizeof(float)));
  const double one = 1.0;
  CUDA_OK(cudaMemcpy(lr_scale, &one, sizeof(double), cudaMemcpyHostToDevice));
  AdamWCoeffs<double>* coeffs;
  CUDA_OK(cudaMalloc(&coeffs, sizeof(AdamWCoeffs<double>)));
  CUDA_OK(cudaDeviceSynchronize());

  const int64_t n4 = n / 4;
  auto* p4 = reinterpret_cast<float4*>(p);
  auto* g4 = reinterpret_cast<float4*>(g);
  auto* m4 = reinterpret_cast<float4*>(m);
  auto* v4 = reinterpret_cast<float4*>(v);
  const double N = double(n);
  report("copy", "grid-stride", 8 * N, time_ms([&] { copy_kernel<<<grid, kThreads>>>(g4, m4, n4); }));
  report("cudaMemcpy", "driver", 8 * N,
         time_ms([&] { CUDA_OK(cudaMemcpyAsync(m, g, n * sizeof(float), cudaMemcpyDeviceToDevice)); }));
  for (int k : {2, 3}) fill_kernel<<<grid, kThreads>>>(all[k], n, init[k]);
  report("streams7", "grid-stride", 28 * N,
         time_ms([&] { streams7_kernel<1, false, true><<<grid, kThreads>>>(p4, g4, m4, v4, n4); }));
  report("streams7", "grid-stride, 2 loads per stream", 28 * N,
         time_ms([&] { streams7_kernel<2, false, true><<<grid, kThreads>>>(p4, g4, m4, v4, n4); }));
  report("streams7", "grid-stride, 4 loads per stream", 28 * N,
         time_ms([&] { streams7_kernel<4, false, true><<<grid, kThreads>>>(p4, g4, m4, v4, n4); }));
  report("streams7", "grid-stride, streaming hints", 28 * N,
         time_ms([&] { streams7_kernel<1, true, true><<<grid, kThreads>>>(p4, g4, m4, v4, n4); }));
  report("streams7", "grid-stride, 2 loads, streaming hints", 28 * N,
         time_ms([&] { streams7_kernel<2, true, true><<<grid, kThreads>>>(p4, g4, m4, v4, n4); }));
  const unsigned one_per_thread = static_cast<unsigned>((n4 + kThreads - 1) / kThreads);
  report("streams7", "one vector per thread, no loop", 28 * N,
         time_ms([&] { streams7_kernel<1, false, false><<<one_per_thread, kThreads>>>(p4, g4, m4, v4, n4); }));
  report("read", "grid-stride", 4 * N, time_ms([&] { read_kernel<<<grid, kThreads>>>(g4, n4, sink); }));
  for (int k = 0; k < 4; ++k) fill_kernel<<<grid, kThreads>>>(all[k], n, init[k]);

  TensorEntry entry{};
  entry.p = p;
  entry.g = g;
  entry.m = m;
  entry.v = v;
  entry.step = steps;
  entry.numel = n;
  entry.dtype = int32_t(DType::f32);
  entry.aligned = 1;
  const Geometry geometries[] = {Geometry{},  // the default, then the other candidates
                                 Geometry{512, 1, 65536}, Geometry{512, 2, 65536}, Geometry{256, 2, 65536},
                                 Geometry{256, 4, 65536}, Geometry{256, 2, 32768}, Geometry{512, 1, 131072},
                                 Geometry{512, 1, 8192}, Geometry{512, 1, 4096}, Geometry{512, 2, 16384}};
  for (const Geometry& geo : geometries) {
    const OneTensorTable table(entry, geo.chunk);
    AdamWArgs args{};
    args.param_dtype = DType::f32;
    args.lr_scale = lr_scale;
    args.lr = 1e-6, args.beta1 = 0.9, args.beta2 = 0.999, args.eps = 1e-8, args.weight_decay = 0.0;
    report("adamw", name_of(geo), 28 * N, time_ms([&] {
             CUDA_OK(launch_adamw(geo, args, table.tensors(), 1, table.chunks(), table.nchunks, coeffs, ws, out, 0));
           }));
    args.telemetry = args.mask_nonfinite = true;
    report("adamw_telemetry", name_of(geo), 28 * N, time_ms([&] {
             CUDA_OK(launch_adamw(geo, args, table.tensors(), 1, table.chunks(), table.nchunks, coeffs, ws, out, 0));
           }));
    report("telemetry", name_of(geo), 4 * N, time_ms([&] {
             CUDA_OK(launch_telemetry(geo, table.tensors(), 1, table.chunks(), table.nchunks, ws, out, 0));
           }));
  }
  // After the loop: the coefficients the launches above left in `coeffs` are read here.
  for (int64_t chunk : {int64_t(4096), int64_t(8192), int64_t(16384), int64_t(65536)}) {
    const int64_t chunk4 = chunk / 4, nchunks = (n4 + chunk4 - 1) / chunk4;
    const unsigned blocks = static_cast<unsigned>(nchunks);
    report("adamw_telemetry_warp_partials", "512x1/" + std::to_string(chunk), 28 * N, time_ms([&] {
             adamw_telemetry_warp_partials_kernel<kThreads>
                 <<<blocks, kThreads>>>(p4, g4, m4, v4, n4, chunk4, coeffs, warp_ws);
             reduce_warp_slots(warp_ws, nchunks, ws, out);
           }));
    report("telemetry_warp_partials", "512x1/" + std::to_string(chunk), 4 * N, time_ms([&] {
             telemetry_warp_partials_kernel<kThreads><<<blocks, kThreads>>>(g4, n4, chunk4, warp_ws);
             reduce_warp_slots(warp_ws, nchunks, ws, out);
           }));
  }
  CUDA_OK(cudaDeviceSynchronize());
  return 0;
}
