// The controller kernels (rules 1-4 for one call, csrc/guard_controller.h; with the reading of
// the telemetry rows, csrc/guard_summary.h) on the device: one launch instead of ~60 tiny torch
// ops. Torch-free; the bindings are in ops_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include "../guard_controller.h"
#include "../guard_summary.h"

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

// summarize (guard_summary.h) of `rows` (> 0) telemetry rows, `partials` [rows, 3] and `numels`
// [rows] float64 on the device, into `summary` (4 float64 on the device), then guard_decide on
// it: one launch of one block.
cudaError_t launch_summarize_decide(double* state, int n, const double* partials, const double* numels, int64_t rows,
                                    bool use_max, double* summary, controller::Analyze analyze,
                                    const bool* analyze_flag, bool check_finite, const ControllerConfig& config,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace lbw
