// The guard's analyzer and controller (DESIGN.md rules 1-4) for one call, as scalar code for
// the CPU and CUDA controller kernels. It is lbw_kernels/reference.py's guard_decide with
// LBWPolicy.analyze or policies.ZScorePolicy.analyze, operation for operation and in the same
// order (no contraction: the build passes -ffp-contract=off / --fmad=false), so on float64
// state the results are the reference's (tests compare them bit for bit). Why a kernel: the
// reference runs ~60 tiny torch ops per call, ~60 launches on a GPU, which is most of a step's
// host time when a model has thousands of tensors.
//
// Torch-free, like guard_math.h. The state layout is reference.py's (slot constants below).
#pragma once

#include <cmath>
#include <cstdint>

#include "guard_math.h"  // LBW_HD

namespace lbw {
namespace controller {

// Slots of the guard state (reference.py), then ZScorePolicy's own (policies.py).
enum Slot : int {
  SCALE = 0, EMA, PREV_SIGN, ANALYZED, SKIPPED, REGIME, SKIP, GRAD_MS, RATIO, SIGNED_MEAN, GRAD_NORM, CALLS,
  STATE_SIZE,
  LOG_NORM_MEAN = STATE_SIZE, LOG_NORM_VAR, Z, LAST_HOT, SEEN,
  ZSCORE_STATE_SIZE
};
constexpr double CALM = 1, OSCILLATION = 2, SPIKE = 3, NONFINITE = 4, STRESS = 5;  // regime codes
constexpr double RATIO_EPS = 1e-12;

// The numbers the controller reads, in the order of the float[] the op takes
// (lbw_kernels/cpp_backend.py builds it from GuardConfig and its policy).
enum Config : int {
  AUTO_ENABLED = 0, STRESS_THRESHOLD, SPIKE_THRESHOLD, MIN_SCALE, RECOVERY_FAST, EMA_DECAY,
  POLICY,  // 0: LBWPolicy, 1: ZScorePolicy
  Z_EMA_DECAY, Z_THRESHOLD, SD_FLOOR, WINDOW, CUT_PER_Z, MAX_CUT, GROWTH, STAY_ALERT,
  CONFIG_SIZE
};
constexpr int POLICY_LBW = 0, POLICY_ZSCORE = 1;

// How this call's rule 2 decision is known: on the host (no / yes) or as a device bool.
enum class Analyze : int { no = 0, yes = 1, on_device = 2 };

// exp, log and sqrt as the reference computes them on the device: on CUDA, std:: functions are
// libdevice's, which torch's CUDA kernels call too. On CPU, torch's differ from the C
// library's in the last bit (exp on ~5% of inputs, even sqrt on some), so the CPU binding
// passes its own Math that calls torch's.
#if defined(__CUDACC__)
#define LBW_HD_MEMBER __host__ __device__ __forceinline__
#else
#define LBW_HD_MEMBER inline
#endif
struct StdMath {
  template <class T>
  LBW_HD_MEMBER static T exp(T x) { return std::exp(x); }
  template <class T>
  LBW_HD_MEMBER static T log(T x) { return std::log(x); }
  template <class T>
  LBW_HD_MEMBER static T sqrt(T x) { return std::sqrt(x); }
};

// torch's clamp_min / clamp_max / minimum / maximum: a NaN operand gives NaN.
template <class T>
LBW_HD T clamp_min(T v, T lo) { return v != v ? v : (v < lo ? lo : v); }
template <class T>
LBW_HD T clamp_max(T v, T hi) { return v != v ? v : (v > hi ? hi : v); }
template <class T>
LBW_HD T nan_max(T a, T b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }
template <class T>
LBW_HD T nan_min(T a, T b) { return (a != a || b != b) ? a + b : (a < b ? a : b); }

// LBWPolicy.analyze on state `s` (CALLS already advanced): writes the slots it decides into
// `out` (EMA, PREV_SIGN, RATIO, SCALE) and returns the regime.
template <class T>
LBW_HD T analyze_lbw(const T* s, T x, T sign, const double* c, T* out) {
  const T scale = s[SCALE], prev_ema = s[EMA], prev_sign = s[PREV_SIGN];
  const bool first = s[ANALYZED] == T(0);
  const T d = T(c[EMA_DECAY]);
  const T ema = first ? x : d * prev_ema + (T(1.0) - d) * x;
  const T ratio = x / (ema + T(RATIO_EPS));
  const bool flip = (prev_sign > T(0) && sign < T(0)) || (prev_sign < T(0) && sign > T(0));
  const bool spike = ratio > T(c[SPIKE_THRESHOLD]);
  const bool oscillation = !spike && (ratio > T(c[STRESS_THRESHOLD]) || flip);
  const T min_scale = T(c[MIN_SCALE]);
  out[EMA] = ema;
  out[PREV_SIGN] = sign;
  out[RATIO] = ratio;
  out[SCALE] = spike         ? clamp_min(T(0.7) * scale, min_scale)
               : oscillation ? clamp_min(T(0.85) * scale, min_scale)
                             : clamp_max(scale + T(c[RECOVERY_FAST]), T(1.0));
  return spike ? T(SPIKE) : oscillation ? T(OSCILLATION) : T(CALM);
}

// ZScorePolicy.analyze: writes LOG_NORM_MEAN, LOG_NORM_VAR, Z, LAST_HOT, SEEN and SCALE.
template <class Math, class T>
LBW_HD T analyze_zscore(const T* s, T norm, const double* c, T* out) {
  const T scale = s[SCALE], mean = s[LOG_NORM_MEAN], var = s[LOG_NORM_VAR], seen = s[SEEN];
  const bool usable = norm > T(0);
  const bool first = usable && seen == T(0);
  const T log_norm = Math::log(usable ? norm : T(1.0));
  const T sd = clamp_min(Math::sqrt(var), T(c[SD_FLOOR]));
  const T z_threshold = T(c[Z_THRESHOLD]);
  const T z = (usable && seen > T(0)) ? (log_norm - mean) / sd : T(0);
  const bool hot = z > z_threshold;
  const T call = s[ANALYZED] + T(1);
  const T last_hot = s[LAST_HOT];
  const T window = T(c[WINDOW]);
  bool act = hot && ((last_hot > T(0) && call - last_hot <= window) || c[WINDOW] == 0.0);
  if (c[STAY_ALERT] != 0.0) act = act || (hot && scale < T(1.0));
  const T cut = clamp_min(Math::exp(T(-c[CUT_PER_Z]) * (z - z_threshold)), T(c[MAX_CUT]));
  const T grown = usable ? clamp_max(scale * T(1.0 + c[GROWTH]), T(1.0)) : scale;
  const T d = T(c[Z_EMA_DECAY]);
  const T band = z_threshold * sd;
  const T delta = nan_min(nan_max(log_norm, mean - band), mean + band) - mean;
  out[LOG_NORM_MEAN] = first ? log_norm : usable ? mean + (T(1) - d) * delta : mean;
  out[LOG_NORM_VAR] = (first || !usable) ? var : d * (var + (T(1) - d) * delta * delta);
  out[Z] = z;
  out[LAST_HOT] = hot ? call : last_hot;
  out[SEEN] = seen + (usable ? T(1) : T(0));
  out[SCALE] = act ? clamp_min(cut * scale, T(c[MIN_SCALE])) : hot ? scale : grown;
  return act ? T(SPIKE) : hot ? T(STRESS) : T(CALM);
}

// reference.guard_decide, in place on `state` (n slots). `summary` = summarize()'s
// (x, signed_mean, grad_norm, nonfinite count); not read when neither telemetry nor the
// finite check is due. `analyze_flag`: the device bool when analyze == on_device.
template <class Math = StdMath, class T>
LBW_HD void guard_decide(T* state, int n, const T* summary, Analyze analyze, bool analyze_flag, bool check_finite,
                         const double* c) {
  T s[ZSCORE_STATE_SIZE] = {};  // (slots past n, unused by the policy, zero: no read of indeterminate values)
  for (int i = 0; i < n; ++i) s[i] = state[i];
  s[CALLS] = s[CALLS] + T(1);
  if (analyze == Analyze::no && !check_finite) {
    s[SKIP] = T(0);
    for (int i = 0; i < n; ++i) state[i] = s[i];
    return;
  }
  const T x = summary[0], sign = summary[1], norm = summary[2], nonfinite_count = summary[3];
  const bool nonfinite = check_finite && nonfinite_count > T(0);
  const T scale = s[SCALE];
  if (analyze != Analyze::no) {
    T decided[ZSCORE_STATE_SIZE] = {};
    for (int i = 0; i < n; ++i) decided[i] = s[i];
    const bool zscore = c[POLICY] == double(POLICY_ZSCORE);
    const T regime = zscore ? analyze_zscore<Math>(s, norm, c, decided) : analyze_lbw(s, x, sign, c, decided);
    const bool ok = !nonfinite && (analyze == Analyze::yes || analyze_flag);
    if (ok) {
      for (int i = 0; i < n; ++i) s[i] = decided[i];
      s[GRAD_MS] = x;
      s[SIGNED_MEAN] = sign;
      s[GRAD_NORM] = norm;
      s[REGIME] = regime;
    }
    s[ANALYZED] = s[ANALYZED] + (ok ? T(1) : T(0));
  }
  if (check_finite) {
    const T skipped_scale = c[AUTO_ENABLED] != 0.0 ? clamp_min(T(0.7) * scale, T(c[MIN_SCALE])) : scale;
    if (nonfinite) {
      s[SCALE] = skipped_scale;
      s[REGIME] = T(NONFINITE);
    }
    s[SKIPPED] = s[SKIPPED] + (nonfinite ? T(1) : T(0));
  }
  s[SKIP] = nonfinite ? T(1) : T(0);
  for (int i = 0; i < n; ++i) state[i] = s[i];
}

}  // namespace controller
}  // namespace lbw
