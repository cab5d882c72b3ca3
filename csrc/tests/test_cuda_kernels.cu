// The CUDA kernels without torch, on a GPU machine: the update (fp32 and bf16 params, masked
// single_pass, skip) bitwise guard_math.h run on the host, telemetry against a host sum and
// bitwise repeatable, for every launch geometry with kernels (geometry.h). Exits 77 (ctest:
// skipped) where there is no CUDA device.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "../cuda/multi_tensor_cuda.cuh"
#include "check.h"

using namespace lbw;
using namespace lbw::cuda;

#define CUDA_OK(x) CHECK((x) == cudaSuccess)

template <class T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, h.size() * sizeof(T) + 16));
  CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <class T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  CUDA_OK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// Host-built table for one call: entries + chunks in one device buffer.
struct Table {
  std::vector<TensorEntry> e;
  std::vector<ChunkEntry> c;
  uint8_t* d = nullptr;
  void upload(int64_t chunk) {
    int64_t row = 0;
    c.clear();
    for (size_t t = 0; t < e.size(); ++t) {
      e[t].first_chunk = int64_t(c.size());
      for (int64_t b = 0; b < e[t].numel; b += chunk) c.push_back({int64_t(t), b});
      e[t].nchunks = int64_t(c.size()) - e[t].first_chunk;
      e[t].row = e[t].numel > 0 ? row++ : -1;
    }
    std::vector<uint8_t> h(table_bytes(e.size(), c.size()));
    std::memcpy(h.data(), e.data(), e.size() * sizeof(TensorEntry));
    std::memcpy(h.data() + e.size() * sizeof(TensorEntry), c.data(), c.size() * sizeof(ChunkEntry));
    d = to_device(h);
  }
  const TensorEntry* tensors() const { return reinterpret_cast<const TensorEntry*>(d); }
  const ChunkEntry* chunks() const { return reinterpret_cast<const ChunkEntry*>(d + e.size() * sizeof(TensorEntry)); }
};

// Bitwise equal, or both NaN (NaN payloads may differ between the device and the host).
bool same_bits(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0; }

template <class P>
void test_update(const Geometry& geo, bool mask, double skip_value) {
  const std::vector<int64_t> sizes = {1, 3, 4097, 0, 2 * geo.chunk + 5};
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> u(-1, 1);
  std::vector<std::vector<P>> p, g;
  std::vector<std::vector<float>> m, v;
  Table table;
  for (int64_t n : sizes) {
    std::vector<P> pp(n), gg(n);
    std::vector<float> mm(n), vv(n);
    for (int64_t i = 0; i < n; ++i) {
      store_from(pp[i], u(gen));
      store_from(gg[i], 2 * u(gen));
      mm[i] = 0.1f * u(gen);
      vv[i] = 1e-3f * (1.5f + u(gen));
    }
    p.push_back(pp), g.push_back(gg), m.push_back(mm), v.push_back(vv);
  }
  store_from(g[2][7], std::nanf(""));
  std::vector<float> steps(sizes.size(), 4.0f);
  float* d_steps = to_device(steps);
  for (size_t t = 0; t < sizes.size(); ++t) {
    TensorEntry e{};
    e.p = to_device(p[t]);
    e.g = to_device(g[t]);
    e.m = to_device(m[t]);
    e.v = to_device(v[t]);
    e.step = d_steps + t;
    e.numel = sizes[t];
    e.aligned = 1;  // cudaMalloc gives 256-byte alignment
    table.e.push_back(e);
  }
  table.upload(geo.chunk);
  const double lr_scale = 0.5, skip = skip_value;
  AdamWArgs a{};
  a.param_dtype = sizeof(P) == 4 ? DType::f32 : DType::bf16;
  a.lr_scale = to_device(std::vector<double>{lr_scale});
  a.lr = 1e-2, a.beta1 = 0.9, a.beta2 = 0.999, a.eps = 1e-8, a.weight_decay = 0.1, a.maximize = true;
  a.skip = mask ? nullptr : to_device(std::vector<double>{skip});
  // The exact gate's update also clips (max_grad_norm): every gradient read times the factor.
  const float factor = mask ? 1.0f : 0.375f;
  a.grad_factor = mask ? nullptr : to_device(std::vector<double>{factor});
  a.mask_nonfinite = mask;
  a.telemetry = mask;
  AdamWCoeffs<double>* coeffs = nullptr;
  double *ws = nullptr, *out = nullptr;
  CUDA_OK(cudaMalloc(&coeffs, sizes.size() * sizeof(AdamWCoeffs<double>)));
  CUDA_OK(cudaMalloc(&ws, telemetry_workspace_doubles(geo, table.c.size()) * sizeof(double)));
  CUDA_OK(cudaMalloc(&out, 3 * sizes.size() * sizeof(double)));
  CUDA_OK(launch_adamw(geo, a, table.tensors(), sizes.size(), table.chunks(), table.c.size(), coeffs, ws, out, 0));
  CUDA_OK(cudaDeviceSynchronize());
  const bool skipped = !mask && skip != 0.0;
  const auto new_steps = to_host(d_steps, sizes.size());
  const auto device_coeffs = to_host(coeffs, sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t) {
    CHECK(new_steps[t] == (skipped ? 4.0f : 5.0f));
    // The device's coefficients (its pow is libdevice's, the host's glibc's: they may differ in
    // the last bit), checked against the host's, then rounded to float as the kernel rounds
    // them. With them, every element is bitwise the host's guard_math.h: both sides round
    // each IEEE operation once (nvcc --fmad=false, no fast math; explicit fmas alike).
    const AdamWCoeffs<double>& d = device_coeffs[t];
    const auto h = adamw_coeffs<double>(1e-2 * lr_scale, 0.9, 0.999, 1e-8, 0.1, skipped ? 4.0 : 5.0);
    const std::pair<double, double> fields[] = {{d.decay, h.decay}, {d.w1, h.w1},
                                                {d.beta2, h.beta2}, {d.w2, h.w2},
                                                {d.step_size, h.step_size}, {d.bc2_sqrt, h.bc2_sqrt},
                                                {d.eps, h.eps}};
    for (const auto& [x, y] : fields) CHECK_NEAR(x, y, 1e-15 * std::fabs(y));
    const AdamWCoeffs<float> c{float(d.decay), float(d.w1),        float(d.beta2), float(d.w2),
                               float(d.step_size), float(d.bc2_sqrt), float(d.eps)};
    const auto gp = to_host(static_cast<P*>(table.e[t].p), sizes[t]);
    const auto gm = to_host(static_cast<float*>(table.e[t].m), sizes[t]);
    const auto gv = to_host(static_cast<float*>(table.e[t].v), sizes[t]);
    int64_t differ = 0;
    for (int64_t i = 0; i < sizes[t]; ++i) {
      float pw = load_as<float>(p[t][i]), mw = m[t][i], vw = v[t][i];
      if (!skipped) {
        const float gi = -load_as<float>(g[t][i]) * factor;
        if (mask) adamw_element_masked(pw, gi, mw, vw, c); else adamw_element(pw, gi, mw, vw, c);
      }
      P rounded;
      store_from(rounded, pw);  // the param's dtype, rounded as the kernel stores it
      differ += !same_bits(load_as<float>(gp[i]), load_as<float>(rounded)) || !same_bits(gm[i], mw) ||
                !same_bits(gv[i], vw);
    }
    if (differ != 0) std::printf("tensor %zu: %lld of %lld elements differ from the host\n", t, (long long)differ,
                                 (long long)sizes[t]);
    CHECK(differ == 0);
  }
  if (mask) {
    const auto rows = to_host(out, 3 * 4);
    CHECK(std::isnan(rows[3 * 2 + 1]) && rows[3 * 2 + 2] == 1.0 && rows[3 * 0 + 2] == 0.0);
    double sq = 0;
    for (auto x : g[4]) sq += double(load_as<float>(x)) * load_as<float>(x);
    CHECK_NEAR(rows[3 * 3], sq, 1e-12 * sq);
  }
}

void test_telemetry_repeatable(const Geometry& geo) {
  // With small chunks, more chunks than the combine kernel has threads (128): its strided loop.
  const int64_t n = (geo.chunk <= 8192 ? 300 : 5) * geo.chunk + 3;
  std::vector<float> g(n);
  std::mt19937 gen(4);
  std::normal_distribution<float> d;
  for (auto& x : g) x = d(gen);
  Table table;
  TensorEntry e{};
  e.g = to_device(g);
  e.numel = n;
  e.dtype = int32_t(DType::f32);
  e.aligned = 1;
  table.e.push_back(e);
  table.upload(geo.chunk);
  double *ws, *out;
  CUDA_OK(cudaMalloc(&ws, telemetry_workspace_doubles(geo, table.c.size()) * sizeof(double)));
  CUDA_OK(cudaMalloc(&out, 3 * sizeof(double)));
  CUDA_OK(launch_telemetry(geo, table.tensors(), 1, table.chunks(), table.c.size(), ws, out, 0));
  const auto first = to_host(out, 3);
  for (int k = 0; k < 5; ++k) {
    CUDA_OK(launch_telemetry(geo, table.tensors(), 1, table.chunks(), table.c.size(), ws, out, 0));
    CHECK(to_host(out, 3) == first);
  }
  double sq = 0, s = 0;
  for (float x : g) sq += double(x) * x, s += x;
  CHECK_NEAR(first[0], sq, 1e-12 * sq);
  CHECK_NEAR(first[1], s, 1e-12 * sq);
}

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  const Geometry geometries[] = {Geometry{},          Geometry{512, 2, 8192},    Geometry{256, 2, 1 << 20},
                                 Geometry{256, 4, 4096}, Geometry{512, 1, 8192, 1}, Geometry{256, 2, 4096, 1}};
  for (const Geometry& geo : geometries) {
    CHECK(geometry_supported(geo));
    test_telemetry_repeatable(geo);
    test_update<float>(geo, false, 0.0);
    test_update<float>(geo, false, 1.0);
    test_update<float>(geo, true, 0.0);
    test_update<bf16_t>(geo, true, 0.0);
  }
  CHECK(!geometry_supported(Geometry{512, 4, 65536}) && !geometry_supported(Geometry{512, 1, 3000}) &&
        !geometry_supported(Geometry{512, 1, 8192, 2}));
  CHECK(launch_telemetry(Geometry{1024, 1, 65536}, nullptr, 0, nullptr, 0, nullptr, nullptr, 0) == cudaErrorInvalidValue);
  TEST_MAIN_END
}
