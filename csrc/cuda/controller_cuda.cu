// The controller kernel: one thread runs csrc/guard_controller.h on the guard state. The state
// is ~17 doubles; the launch, not the arithmetic, is the cost it saves.
#include "controller_cuda.cuh"

namespace lbw {
namespace cuda {
namespace {

__global__ void guard_decide_kernel(double* state, int n, const double* summary, controller::Analyze analyze,
                                    const bool* analyze_flag, bool check_finite, ControllerConfig config) {
  const bool flag = analyze == controller::Analyze::on_device && *analyze_flag;
  controller::guard_decide(state, n, summary, analyze, flag, check_finite, config.values);
}

}  // namespace

cudaError_t launch_guard_decide(double* state, int n, const double* summary, controller::Analyze analyze,
                                const bool* analyze_flag, bool check_finite, const ControllerConfig& config,
                                cudaStream_t stream) {
  guard_decide_kernel<<<1, 1, 0, stream>>>(state, n, summary, analyze, analyze_flag, check_finite, config);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lbw
