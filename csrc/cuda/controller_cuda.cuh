// The controller kernel (rules 1-4 for one call, csrc/guard_controller.h) on the device: one
// launch instead of ~60 tiny torch ops. Torch-free; the bindings are in ops_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include "../guard_controller.h"

namespace lbw {
namespace cuda {

struct ControllerConfig {
  double values[controller::CONFIG_SIZE];
};

// In place on `state` (n float64 slots on the device). `summary`: 4 float64 on the device
// (may be null when analyze == no and !check_finite); `analyze_flag`: a device bool, read
// when analyze == on_device.
cudaError_t launch_guard_decide(double* state, int n, const double* summary, controller::Analyze analyze,
                                const bool* analyze_flag, bool check_finite, const ControllerConfig& config,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace lbw
