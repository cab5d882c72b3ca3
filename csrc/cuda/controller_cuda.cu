// The controller kernels: csrc/guard_controller.h on the guard state, by one thread. The state
// is ~17 doubles; the launches, not the arithmetic, are the cost they save. summarize_decide
// first reads the telemetry rows with one block (guard_summary.h: a lane per thread, then
// the halving tree in shared memory), so a call's reading of its telemetry is one launch too.
#include "controller_cuda.cuh"

namespace lbw {
namespace cuda {
namespace {

using controller::kSummaryLanes;
using controller::SummaryLane;

__global__ void guard_decide_kernel(double* state, int n, const double* summary, controller::Analyze analyze,
                                    const bool* analyze_flag, bool check_finite, ControllerConfig config) {
  const bool flag = analyze == controller::Analyze::on_device && *analyze_flag;
  controller::guard_decide(state, n, summary, analyze, flag, check_finite, config.values);
}

__global__ void __launch_bounds__(kSummaryLanes)
    summarize_decide_kernel(double* state, int n, const double* partials, const double* numels, int64_t rows,
                            bool use_max, double* summary, controller::Analyze analyze, const bool* analyze_flag,
                            bool check_finite, ControllerConfig config) {
  __shared__ SummaryLane lanes[kSummaryLanes];
  const int j = threadIdx.x;
  SummaryLane lane = SummaryLane::empty(use_max);
  for (int64_t r = j; r < rows; r += kSummaryLanes) lane.add_row(partials, numels, r, use_max);
  lanes[j] = lane;
  __syncthreads();
  // guard_summary.h's merge_lanes, each level's merges in parallel.
  for (int w = kSummaryLanes / 2; w >= 1; w /= 2) {
    if (j < w) lanes[j].merge(lanes[j + w], use_max);
    __syncthreads();
  }
  if (j == 0) {
    double values[4];
    lanes[0].finish<controller::StdMath>(rows, use_max, values);
    for (int i = 0; i < 4; ++i) summary[i] = values[i];
    const bool flag = analyze == controller::Analyze::on_device && *analyze_flag;
    controller::guard_decide(state, n, values, analyze, flag, check_finite, config.values);
  }
}

}  // namespace

cudaError_t launch_guard_decide(double* state, int n, const double* summary, controller::Analyze analyze,
                                const bool* analyze_flag, bool check_finite, const ControllerConfig& config,
                                cudaStream_t stream) {
  guard_decide_kernel<<<1, 1, 0, stream>>>(state, n, summary, analyze, analyze_flag, check_finite, config);
  return cudaGetLastError();
}

cudaError_t launch_summarize_decide(double* state, int n, const double* partials, const double* numels, int64_t rows,
                                    bool use_max, double* summary, controller::Analyze analyze,
                                    const bool* analyze_flag, bool check_finite, const ControllerConfig& config,
                                    cudaStream_t stream) {
  summarize_decide_kernel<<<1, kSummaryLanes, 0, stream>>>(state, n, partials, numels, rows, use_max, summary, analyze,
                                                          analyze_flag, check_finite, config);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lbw
