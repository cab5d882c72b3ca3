// The lbw operator library: schemas (TORCH_LIBRARY) and the process-wide switches the kernels
// read. Kernels are registered per device in ops_cpu.cpp and ops_cuda.cpp; the fake (meta)
// implementations are in lbw_kernels/cpp_backend.py; the Python module lbw_kernels._C (its
// direct entries to these ops included) is python_module.cpp.
#include <torch/library.h>

#include "common.h"

namespace lbw {
std::atomic<bool>& poison_outputs() {
  static std::atomic<bool> flag{false};
  return flag;
}
cuda::Geometry& cuda_geometry() {
  static cuda::Geometry geometry;
  return geometry;
}
ExactStepFn& cuda_exact_step() {
  static ExactStepFn fn = nullptr;
  return fn;
}
}  // namespace lbw

TORCH_LIBRARY(lbw, m) {
  // Per non-empty gradient, in order: (sum g^2, sum g, nonfinite 0/1), float64 [T, 3].
  m.def("telemetry(Tensor[] grads) -> Tensor");
  // AdamW with lr = lr * lr_scale (lr_scale: 0-dim float64 on the params' device, the guard's
  // scale). skip (0-dim, non-zero = skip): nothing changes, steps included. grad_factor (0-dim
  // float64 on the params' device; max_grad_norm's clipping): every gradient element is read
  // times it (rounded to the math type); the grads are not written.
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor lr_scale, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool maximize, Tensor? skip, "
      "Tensor? grad_factor=None) -> ()");
  // single_pass: the update plus the telemetry rows of the non-empty grads as read; with
  // mask_nonfinite an element whose grad is NaN/Inf keeps its p, m, v.
  m.def(
      "adamw_telemetry_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor lr_scale, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool maximize, bool mask_nonfinite) -> Tensor");
  // Rules 1-4 for one call, in place on the guard state (reference.guard_decide with the
  // policy's analyze; csrc/guard_controller.h). summary: summarize()'s 4 values (None when
  // neither telemetry nor the finite check is due); analyze: a device bool deciding rule 2 on
  // the device, else analyze_host; config: the numbers of guard_controller.h's Config.
  m.def(
      "guard_decide_(Tensor(a!) guard, Tensor? summary, Tensor? analyze, bool analyze_host, "
      "bool check_finite, float[] config) -> ()");
  // The same from the telemetry rows themselves: summarize (csrc/guard_summary.h: the
  // reference's values, its sums over tensors in a fixed order of their own) and guard_decide_
  // in one kernel. partials [T, 3], numels [T] float64 (None when neither is due). Returns the
  // summary decided on (4 float64; no elements when none was due).
  m.def(
      "summarize_decide_(Tensor(a!) guard, Tensor? partials, Tensor? numels, bool use_max_rms, "
      "Tensor? analyze, bool analyze_host, bool check_finite, float[] config) -> Tensor");
}
