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
// (4.04 TB/s at 65536, 4.07 at 16384, 4.14 at 8192). The geometries with warp_partials
// (names ending "/w") are the same passes with one partial per warp and no barrier (a fold
// launch more): if they keep pace with the update alone at small chunks, per-warp partials
// and a smaller chunk are the default to take (csrc/cuda/geometry.h).
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
  return std::to_string(g.threads) + "x" + std::to_string(g.ilp) + "/" + std::to_string(g.chunk) +
         (g.warp_partials ? "/w" : "");
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
  // The most any geometry below needs: the smallest chunk, with a slot per warp.
  CUDA_OK(cudaMalloc(&ws, telemetry_workspace_doubles(Geometry{512, 1, 4096, 1}, n / 4096 + 1) * sizeof(double)));
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
                                 Geometry{512, 1, 8192}, Geometry{512, 1, 4096}, Geometry{512, 2, 16384},
                                 Geometry{512, 1, 4096, 1}, Geometry{512, 1, 8192, 1}, Geometry{512, 1, 16384, 1},
                                 Geometry{512, 1, 65536, 1}};
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
  CUDA_OK(cudaDeviceSynchronize());
  return 0;
}
