// The controller's reading of one call's telemetry: reference.summarize (partials [T, 3] and
// element counts [T] -> x, signed_mean, grad_norm, nonfinite count) as scalar code, so the
// CPU and CUDA controller kernels can take the telemetry rows themselves. On a GPU
// reference.summarize is ~8 torch ops, ~8 launches per call: with thousands of tensors a
// step is host-bound and those launches are part of its time (bench/profile_step.py).
//
// The order of the sums over tensors is fixed, and it is not torch.sum's: row r goes to lane
// r % kSummaryLanes (rows in increasing order), then the lanes are added by a halving tree
// (lane j += lane j + w for w = kSummaryLanes / 2, ..., 1). The CPU runs the lanes one after
// another, the CUDA kernel one per thread: the same partials give the same bits on both.
// Against reference.summarize: each row's mean square (sum g^2 / numel) is the same
// division, so x under use_max_rms (a max) and the nonfinite count (a sum of integers) are
// bitwise the reference's; signed_mean, grad_norm and the mean of the mean squares differ
// by the order of a float64 sum (relative ~T * 2^-53 of the sum of magnitudes).
//
// Torch-free, like guard_math.h and guard_controller.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "guard_controller.h"  // nan_max, LBW_HD_MEMBER

namespace lbw {
namespace controller {

constexpr int kSummaryLanes = 256;  // the CUDA kernel's block size: one lane per thread

// (No member initialisers: the CUDA kernel keeps the lanes in __shared__ memory, which takes
// trivially constructible types only. empty() starts a lane.)
struct SummaryLane {
  double sumsq, sum, nonfinite, numel;
  double ms;  // max (use_max_rms; starts at -inf) or sum of the rows' mean squares

  LBW_HD_MEMBER static SummaryLane empty(bool use_max) {
    SummaryLane lane;
    lane.sumsq = lane.sum = lane.nonfinite = lane.numel = 0.0;
    lane.ms = use_max ? -INFINITY : 0.0;
    return lane;
  }
  // Row r of partials (sum g^2, sum g, nonfinite) with its element count.
  LBW_HD_MEMBER void add_row(const double* partials, const double* numels, int64_t r, bool use_max) {
    const double row_sumsq = partials[3 * r], n = numels[r];
    const double ms_r = row_sumsq / n;  // reference: sumsq / numels
    sumsq += row_sumsq;
    sum += partials[3 * r + 1];
    nonfinite += partials[3 * r + 2];
    numel += n;
    ms = use_max ? nan_max(ms, ms_r) : ms + ms_r;
  }
  // this = this (lower lane) combined with `o` (upper lane).
  LBW_HD_MEMBER void merge(const SummaryLane& o, bool use_max) {
    sumsq += o.sumsq;
    sum += o.sum;
    nonfinite += o.nonfinite;
    numel += o.numel;
    ms = use_max ? nan_max(ms, o.ms) : ms + o.ms;
  }
  // The four values of reference.summarize, from the lane holding every row (rows > 0).
  template <class Math>
  LBW_HD_MEMBER void finish(int64_t rows, bool use_max, double* out) const {
    out[0] = use_max ? ms : ms / double(rows);
    out[1] = sum / numel;
    out[2] = Math::sqrt(sumsq);
    out[3] = nonfinite;
  }
};

// The halving tree over lanes[0, kSummaryLanes): lanes[0] ends up holding every row.
// (The CUDA kernel runs each level's merges in parallel, the same merges in the same order.)
inline void merge_lanes(SummaryLane* lanes, bool use_max) {
  for (int w = kSummaryLanes / 2; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) lanes[j].merge(lanes[j + w], use_max);
}

// summarize on the host: `rows` rows of `partials` ([rows, 3] row-major) and `numels`.
template <class Math>
inline void summarize_rows(const double* partials, const double* numels, int64_t rows, bool use_max, double* out) {
  SummaryLane lanes[kSummaryLanes];
  for (int j = 0; j < kSummaryLanes; ++j) lanes[j] = SummaryLane::empty(use_max);
  for (int64_t r = 0; r < rows; ++r) lanes[r % kSummaryLanes].add_row(partials, numels, r, use_max);
  merge_lanes(lanes, use_max);
  lanes[0].finish<Math>(rows, use_max, out);
}

}  // namespace controller
}  // namespace lbw
