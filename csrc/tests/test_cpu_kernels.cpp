// The multi-tensor CPU kernels without torch: telemetry against a plain double loop,
// bitwise repeatability under any split of the chunks (what threads do) and on every
// instruction set, the update against guard_math.h element by element, masks and maximize.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "../cpu/multi_tensor_cpu.h"
#include "check.h"

using namespace lbw;
using namespace lbw::cpu;

// Runs the body over [begin, end) in pieces of 3 chunks, last piece first: another order and
// partition than serial_for, as threads would give.
static void reversed_pieces(int64_t begin, int64_t end, const std::function<void(int64_t, int64_t)>& body) {
  std::vector<std::pair<int64_t, int64_t>> pieces;
  for (int64_t b = begin; b < end; b += 3) pieces.push_back({b, std::min(end, b + 3)});
  std::reverse(pieces.begin(), pieces.end());
  for (auto& pc : pieces) body(pc.first, pc.second);
}

static std::vector<float> random_vec(int64_t n, std::mt19937& gen, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> x(n);
  for (auto& e : x) e = d(gen);
  return x;
}

static const std::vector<int64_t> kSizes = {1, 3, 4097, 0, kChunk * 2 + 5, 1000};

static void test_telemetry(const Kernels& k) {
  std::mt19937 gen(1);
  std::vector<std::vector<float>> gs;
  std::vector<GradRef> refs;
  for (int64_t n : kSizes) gs.push_back(random_vec(n, gen, -2.f, 2.f));
  gs[2][100] = 1e30f;  // large but finite: the double sum stays finite
  for (auto& g : gs) refs.push_back({g.data(), DType::f32});
  ChunkTable table;
  table.build(kSizes);
  std::vector<double> ws(2 * table.nchunks()), out(3 * table.nonempty()), out2(out.size());
  k.telemetry(table, refs.data(), ws.data(), out.data(), &serial_for);
  int64_t row = 0;
  for (size_t t = 0; t < gs.size(); ++t) {
    if (gs[t].empty()) continue;
    double sq = 0, s = 0;
    for (float x : gs[t]) sq += double(x) * x, s += x;
    CHECK_NEAR(out[3 * row], sq, 1e-12 * sq);
    CHECK_NEAR(out[3 * row + 1], s, 1e-12 * sq);
    CHECK(out[3 * row + 2] == 0.0);
    ++row;
  }
  CHECK(row == table.nonempty());
  std::fill(ws.begin(), ws.end(), std::nan(""));
  k.telemetry(table, refs.data(), ws.data(), out2.data(), &reversed_pieces);
  CHECK(out == out2);  // bitwise, whatever the split
  gs[4][kChunk + 7] = std::numeric_limits<float>::infinity();
  k.telemetry(table, refs.data(), ws.data(), out.data(), &serial_for);
  CHECK(out[3 * 3 + 2] == 1.0 && out[3 * 0 + 2] == 0.0);  // row 3 is tensor 4 (tensor 3 is empty)
}

struct Problem {
  std::vector<std::vector<float>> p, g, m, v;
  std::vector<UpdateRef<float>> refs;
  std::vector<AdamWCoeffs<float>> coeffs;
  Problem() {
    std::mt19937 gen(2);
    for (size_t t = 0; t < kSizes.size(); ++t) {
      p.push_back(random_vec(kSizes[t], gen, -1, 1));
      g.push_back(random_vec(kSizes[t], gen, -2, 2));
      m.push_back(random_vec(kSizes[t], gen, -0.1f, 0.1f));
      v.push_back(random_vec(kSizes[t], gen, 1e-4f, 1e-2f));
      coeffs.push_back(adamw_coeffs<float>(1e-2, 0.9, 0.999, 1e-8, 0.1, double(t + 1)));
    }
    for (size_t t = 0; t < kSizes.size(); ++t) refs.push_back({p[t].data(), g[t].data(), m[t].data(), v[t].data()});
  }
};

// grad_sign: -1 when maximizing, times a clipping factor (rounded to float as the kernels do)
static void test_update(const Kernels& k, double grad_sign, bool mask) {
  Problem a, want;
  a.g[2][5] = want.g[2][5] = std::nanf("");
  ChunkTable table;
  table.build(kSizes);
  std::vector<double> ws(2 * table.nchunks()), out(3 * table.nonempty());
  k.adamw_f32(table, a.refs.data(), a.coeffs.data(), grad_sign, mask, true, ws.data(), out.data(), &reversed_pieces);
  for (size_t t = 0; t < kSizes.size(); ++t) {
    for (int64_t i = 0; i < kSizes[t]; ++i) {
      float g = want.g[t][i] * float(grad_sign);
      if (mask)
        adamw_element_masked(want.p[t][i], g, want.m[t][i], want.v[t][i], want.coeffs[t]);
      else
        adamw_element(want.p[t][i], g, want.m[t][i], want.v[t][i], want.coeffs[t]);
    }
    // bitwise: the kernels are guard_math.h applied element by element (NaN compares unequal,
    // so compare bits)
    CHECK(std::equal(a.p[t].begin(), a.p[t].end(), want.p[t].begin(),
                     [](float x, float y) { return std::memcmp(&x, &y, 4) == 0; }));
    CHECK(std::equal(a.m[t].begin(), a.m[t].end(), want.m[t].begin(),
                     [](float x, float y) { return std::memcmp(&x, &y, 4) == 0; }));
  }
  // The NaN element: kept with the mask, NaN without; its neighbour updated either way.
  CHECK(mask ? a.p[2][5] == Problem().p[2][5] : std::isnan(a.p[2][5]));
  CHECK(a.p[2][6] != Problem().p[2][6]);
  CHECK(std::isnan(out[3 * 2 + 1]) && out[3 * 2 + 2] == 1.0);  // partials of the grads as read
}

// Every instruction set the CPU runs gives the same bits as the baseline build.
static void test_same_on_every_isa() {
  const Kernels* isas[2] = {kernels_avx2(), kernels_avx512()};
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  const bool runs[2] = {__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")};
#else
  const bool runs[2] = {false, false};
#endif
  for (int k = 0; k < 2; ++k) {
    if (isas[k] == nullptr || !runs[k]) continue;
    std::printf("comparing %s with the baseline\n", isas[k]->isa);
    for (bool mask : {false, true}) {
      Problem a, b;
      a.g[4][100] = b.g[4][100] = std::nanf("");
      ChunkTable table;
      table.build(kSizes);
      std::vector<double> ws(2 * table.nchunks()), oa(3 * table.nonempty()), ob(oa.size());
      kernels_default().adamw_f32(table, a.refs.data(), a.coeffs.data(), false, mask, true, ws.data(), oa.data(), &serial_for);
      isas[k]->adamw_f32(table, b.refs.data(), b.coeffs.data(), false, mask, true, ws.data(), ob.data(), &serial_for);
      CHECK(std::memcmp(oa.data(), ob.data(), oa.size() * sizeof(double)) == 0);
      for (size_t t = 0; t < kSizes.size(); ++t) {
        CHECK(std::memcmp(a.p[t].data(), b.p[t].data(), a.p[t].size() * 4) == 0);
        CHECK(std::memcmp(a.m[t].data(), b.m[t].data(), a.m[t].size() * 4) == 0);
        CHECK(std::memcmp(a.v[t].data(), b.v[t].data(), a.v[t].size() * 4) == 0);
      }
      std::vector<GradRef> refs;
      for (auto& g : a.g) refs.push_back({g.data(), DType::f32});
      kernels_default().telemetry(table, refs.data(), ws.data(), oa.data(), &serial_for);
      isas[k]->telemetry(table, refs.data(), ws.data(), ob.data(), &serial_for);
      CHECK(std::memcmp(oa.data(), ob.data(), oa.size() * sizeof(double)) == 0);
    }
  }
}

int main() {
  std::printf("kernels chosen: %s\n", kernels().isa);
  const Kernels* isas[2] = {&kernels_default(), &kernels()};
  for (const Kernels* k : isas) {
    test_telemetry(*k);
    for (double grad_sign : {1.0, -1.0, 0.3, -0.3})
      for (bool mask : {false, true}) test_update(*k, grad_sign, mask);
  }
  test_same_on_every_isa();
  TEST_MAIN_END
}
