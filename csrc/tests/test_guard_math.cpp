// guard_math.h per element against values worked out by hand, and the bf16/fp16 conversions
// against their definition (round to nearest even), exhaustively where it is cheap.
#include <cmath>
#include <cstdint>
#include <limits>

#include "../guard_math.h"
#include "check.h"

using namespace lbw;

static void test_coeffs_and_element() {
  // lr 0.1, wd 0.01, betas (0.9, 0.999), eps 1e-8, first step: bc1 = 0.1, bc2 = 0.001.
  const auto c = adamw_coeffs<double>(0.1, 0.9, 0.999, 1e-8, 0.01, 1.0);
  CHECK_NEAR(c.decay, 0.999, 1e-15);
  CHECK_NEAR(c.step_size, -1.0, 1e-14);  // -lr / bc1
  CHECK_NEAR(c.bc2_sqrt, std::sqrt(0.001), 1e-15);
  double p = 1.0, m = 0.0, v = 0.0;
  adamw_element(p, 0.5, m, v, c);
  // m = 0.1*0.5, v = 0.001*0.25, denom = sqrt(v)/sqrt(bc2) + eps = 0.5 + 1e-8
  CHECK_NEAR(m, 0.05, 1e-16);
  CHECK_NEAR(v, 0.00025, 1e-18);
  CHECK_NEAR(p, 0.999 - 0.05 / (0.5 + 1e-8), 1e-15);

  // Step 10, float math: the coefficients round once from double.
  const auto f = adamw_coeffs<float>(1e-3, 0.9, 0.999, 1e-8, 0.1, 10.0);
  CHECK(f.step_size == float(-1e-3 / (1.0 - std::pow(0.9, 10.0))));
  CHECK(f.bc2_sqrt == float(std::sqrt(1.0 - std::pow(0.999, 10.0))));
  // A skipped first call (step 0) keeps the coefficients finite.
  const auto z = adamw_coeffs<float>(1e-3, 0.9, 0.999, 1e-8, 0.1, 0.0);
  CHECK(std::isfinite(z.step_size) && std::isfinite(z.bc2_sqrt));

  // beta1 <= 0.5 takes lerp's other formula: m = g - (g - m)*(1 - w).
  const auto h = adamw_coeffs<double>(0.1, 0.25, 0.999, 1e-8, 0.0, 1.0);
  double p2 = 2.0, m2 = 1.0, v2 = 1.0;
  adamw_element(p2, 3.0, m2, v2, h);
  CHECK_NEAR(m2, 0.25 * 1.0 + 0.75 * 3.0, 1e-15);
}

static void test_masked() {
  const auto c = adamw_coeffs<float>(1e-2, 0.9, 0.999, 1e-8, 0.1, 3.0);
  const float bad[3] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                        -std::numeric_limits<float>::infinity()};
  for (float g : bad) {
    float p = 0.3f, m = -0.1f, v = 0.02f;
    adamw_element_masked(p, g, m, v, c);
    CHECK(p == 0.3f && m == -0.1f && v == 0.02f);
  }
  float p = 0.3f, m = -0.1f, v = 0.02f, p2 = p, m2 = m, v2 = v;
  adamw_element_masked(p, 0.7f, m, v, c);
  adamw_element(p2, 0.7f, m2, v2, c);
  CHECK(p == p2 && m == m2 && v == v2 && p != 0.3f);
  CHECK(is_finite(1.0f) && !is_finite(bad[0]) && !is_finite(bad[1]) && !is_finite(double(bad[2])));
  CHECK(nonfinite_flag(1e300, 1e300) == 0.0 && nonfinite_flag(1.0, std::nan("")) == 1.0);
  CHECK(nonfinite_flag(std::numeric_limits<double>::infinity(), 1e160) == 1.0);  // squares overflowed
}

static void test_bf16() {
  CHECK(bf16_from_float(1.0f).bits == 0x3f80);
  CHECK(bf16_from_float(1.0f + 0x1p-8f).bits == 0x3f80);      // tie -> even
  CHECK(bf16_from_float(1.0f + 3 * 0x1p-8f).bits == 0x3f82);  // tie -> even (up)
  CHECK(bf16_from_float(1.0f + 0x1p-8f + 0x1p-20f).bits == 0x3f81);
  CHECK(std::isnan(to_float(bf16_from_float(std::nanf("")))));
  for (uint32_t b = 0; b < 0x10000u; ++b) {  // every bf16 survives a round trip
    const bf16_t x{uint16_t(b)};
    const float f = to_float(x);
    if (!std::isnan(f)) CHECK(bf16_from_float(f).bits == b);
  }
}

static void test_f16() {
  CHECK(f16_from_float(1.0f).bits == 0x3c00);
  CHECK(f16_from_float(65504.0f).bits == 0x7bff);
  CHECK(f16_from_float(65519.0f).bits == 0x7bff);
  CHECK(f16_from_float(65520.0f).bits == 0x7c00);  // rounds to infinity
  CHECK(f16_from_float(0x1p-24f).bits == 0x0001);  // smallest subnormal
  CHECK(f16_from_float(0x1p-25f).bits == 0x0000);  // tie -> even (0)
  CHECK(f16_from_float(3 * 0x1p-25f).bits == 0x0002);
  CHECK(f16_from_float(-2.0f).bits == 0xc000);
  CHECK(f16_from_float(1.0f + 0x1p-11f).bits == 0x3c00);  // tie -> even
  CHECK(f16_from_float(1.0f + 3 * 0x1p-11f).bits == 0x3c02);
  CHECK(to_float(f16_t{0x0001}) == 0x1p-24f);
  CHECK(to_float(f16_t{0x7c00}) == std::numeric_limits<float>::infinity());
  CHECK(std::isnan(to_float(f16_from_float(std::nanf("")))));
  for (uint32_t b = 0; b < 0x10000u; ++b) {  // every fp16 survives a round trip
    const float f = to_float(f16_t{uint16_t(b)});
    if (!std::isnan(f)) CHECK(f16_from_float(f).bits == b);
  }
}

// NaN payloads as x86's F16C converts them, which the AVX2/AVX-512 CPU kernels use.
static void test_f16_nans() {
  CHECK(float_bits(to_float(f16_t{0x7c01})) == 0x7fc02000u);  // signalling: quieted, payload kept
  CHECK(float_bits(to_float(f16_t{0xfe3f})) == 0xffc7e000u);
  CHECK(f16_from_float(bits_float(0x7f800001u)).bits == 0x7e00);  // payload below fp16's: dropped
  CHECK(f16_from_float(bits_float(0xffc12345u)).bits == 0xfe09);  // its top 10 bits kept
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
// Every fp16 widened and every float narrowed, against the F16C instructions (where the CPU
// has them): the scalar conversions are what the baseline CPU kernels store, the instructions
// what the AVX2/AVX-512 ones store, and every instruction set must store the same bits.
__attribute__((target("f16c"))) static void test_f16_matches_f16c() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("f16c")) return;
  uint64_t wrong = 0;
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float hw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(int16_t(h))));
    wrong += float_bits(hw) != float_bits(to_float(f16_t{uint16_t(h)}));
  }
  uint32_t u = 0;
  do {
    const __m128i hw = _mm_cvtps_ph(_mm_set1_ps(bits_float(u)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    wrong += uint16_t(_mm_extract_epi16(hw, 0)) != f16_from_float(bits_float(u)).bits;
  } while (++u != 0);
  CHECK(wrong == 0);
}
#else
static void test_f16_matches_f16c() {}
#endif

int main() {
  test_coeffs_and_element();
  test_masked();
  test_bf16();
  test_f16();
  test_f16_nans();
  test_f16_matches_f16c();
  TEST_MAIN_END
}
