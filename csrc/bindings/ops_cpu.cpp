// CPU implementations of the lbw ops: argument checks, the cached chunk table, per-tensor
// AdamW coefficients (the steps live on the host), then the kernels in csrc/cpu.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>
#include <optional>

#include "../cpu/multi_tensor_cpu.h"

#include <functional>
#include "common.h"

namespace lbw {
namespace {

using TablePtr = std::shared_ptr<const cpu::ChunkTable>;

TablePtr chunk_table(at::TensorList ts) {
  static TableCache<std::vector<int64_t>, TablePtr> cache;
  std::vector<int64_t> numels;
  numels.reserve(ts.size());
  for (const auto& t : ts) numels.push_back(t.numel());
  return cache.get(numels, [&] {
    auto table = std::make_shared<cpu::ChunkTable>();
    table->build(numels);
    return TablePtr(table);
  });
}

// Over element ranges (see cpu::ParallelFor): calls under two chunks of work stay on one thread.
void aten_for(int64_t begin, int64_t end, const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(begin, end, cpu::kChunk, body);
}

double scalar_of(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), "lbw: ", what, " must be a 0-dim CPU tensor");
  return t.item<double>();
}

at::Tensor telemetry_cpu(at::TensorList grads) {
  check_grads(grads, at::kCPU);
  const TablePtr table = chunk_table(grads);
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);
  at::Tensor out = new_output({count_nonempty(grads), 3}, opts);
  at::Tensor ws = new_output({table->nchunks(), 2}, opts);
  std::vector<cpu::GradRef> refs;
  for (const auto& g : grads) refs.push_back({g.data_ptr(), dtype_code(g, "grads")});
  cpu::kernels().telemetry(*table, refs.data(), ws.data_ptr<double>(), out.data_ptr<double>(), &aten_for);
  return out;
}

template <class P>
void run_update(cpu::AdamWFn<P> kernel, const cpu::ChunkTable& table, at::TensorList params,
                at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const std::vector<AdamWCoeffs<typename math_type<P>::type>>& coeffs, bool maximize,
                bool telemetry, bool mask, double* ws, double* out) {
  using M = typename math_type<P>::type;
  std::vector<cpu::UpdateRef<P>> refs;
  refs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i)
    refs.push_back({static_cast<P*>(params[i].data_ptr()), static_cast<const P*>(grads[i].data_ptr()),
                    exp_avgs[i].data_ptr<M>(), exp_avg_sqs[i].data_ptr<M>()});
  kernel(table, refs.data(), coeffs.data(), maximize, mask, telemetry, ws, out, &aten_for);
}

// Advances every step by one and returns the per-tensor coefficients for the new counts.
template <class M>
std::vector<AdamWCoeffs<M>> advance_steps(at::TensorList steps, double lr, double beta1, double beta2,
                                          double eps, double weight_decay) {
  std::vector<AdamWCoeffs<M>> coeffs;
  coeffs.reserve(steps.size());
  for (const auto& s : steps) {
    float* step = s.data_ptr<float>();
    *step += 1.0f;
    coeffs.push_back(adamw_coeffs<M>(lr, beta1, beta2, eps, weight_decay, double(*step)));
  }
  return coeffs;
}

std::optional<at::Tensor> update_cpu(at::TensorList params, at::TensorList grads,
                                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                     at::TensorList steps, const at::Tensor& lr_scale, double lr,
                                     double beta1, double beta2, double eps, double weight_decay,
                                     bool maximize, bool telemetry, bool mask) {
  check_update_args(params, grads, exp_avgs, exp_avg_sqs, steps, at::kCPU);
  const double lr_t = lr * scalar_of(lr_scale, "lr_scale");
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);
  at::Tensor out, ws;
  if (telemetry) out = new_output({count_nonempty(grads), 3}, opts);
  if (params.empty()) return telemetry ? std::optional<at::Tensor>(out) : std::nullopt;
  const TablePtr table = chunk_table(params);
  if (telemetry) ws = new_output({table->nchunks(), 2}, opts);
  double* wsp = telemetry ? ws.data_ptr<double>() : nullptr;
  double* outp = telemetry ? out.data_ptr<double>() : nullptr;
  switch (dtype_code(params[0], "params")) {
    case DType::f32:
      run_update<float>(cpu::kernels().adamw_f32, *table, params, grads, exp_avgs, exp_avg_sqs,
                        advance_steps<float>(steps, lr_t, beta1, beta2, eps, weight_decay), maximize,
                        telemetry, mask, wsp, outp);
      break;
    case DType::f64:
      run_update<double>(cpu::kernels().adamw_f64, *table, params, grads, exp_avgs, exp_avg_sqs,
                         advance_steps<double>(steps, lr_t, beta1, beta2, eps, weight_decay), maximize,
                         telemetry, mask, wsp, outp);
      break;
    case DType::bf16:
      run_update<bf16_t>(cpu::kernels().adamw_bf16, *table, params, grads, exp_avgs, exp_avg_sqs,
                         advance_steps<float>(steps, lr_t, beta1, beta2, eps, weight_decay), maximize,
                         telemetry, mask, wsp, outp);
      break;
    case DType::f16:
      run_update<f16_t>(cpu::kernels().adamw_f16, *table, params, grads, exp_avgs, exp_avg_sqs,
                        advance_steps<float>(steps, lr_t, beta1, beta2, eps, weight_decay), maximize,
                        telemetry, mask, wsp, outp);
      break;
  }
  return telemetry ? std::optional<at::Tensor>(out) : std::nullopt;
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr_scale, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool maximize,
               const std::optional<at::Tensor>& skip) {
  // Exact gate, rule 1: a skipped call changes nothing, not even the step counts.
  if (skip.has_value() && scalar_of(*skip, "skip") != 0.0) {
    check_update_args(params, grads, exp_avgs, exp_avg_sqs, steps, at::kCPU);
    return;
  }
  update_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr, beta1, beta2, eps, weight_decay,
             maximize, false, false);
}

at::Tensor adamw_telemetry_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList steps,
                               const at::Tensor& lr_scale, double lr, double beta1, double beta2,
                               double eps, double weight_decay, bool maximize, bool mask_nonfinite) {
  return *update_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr, beta1, beta2, eps,
                     weight_decay, maximize, true, mask_nonfinite);
}

// exp, log and sqrt exactly as the reference computes them on CPU: torch's own kernels on a
// 0-dim tensor (a few microseconds, three per zscore call), not the C library's, which
// differ in the last bit (exp on ~5% of inputs).
struct TorchCpuMath {
  static double exp(double x) { return at::exp(at::scalar_tensor(x, at::kDouble)).item<double>(); }
  static double log(double x) { return at::log(at::scalar_tensor(x, at::kDouble)).item<double>(); }
  static double sqrt(double x) { return at::sqrt(at::scalar_tensor(x, at::kDouble)).item<double>(); }
};

void guard_decide_cpu(const at::Tensor& guard, const std::optional<at::Tensor>& summary,
                      const std::optional<at::Tensor>& analyze, bool analyze_host, bool check_finite,
                      at::ArrayRef<double> config) {
  const auto mode = check_decide_args(guard, summary, analyze, analyze_host, check_finite, config, at::kCPU);
  const bool flag = mode == controller::Analyze::on_device && *analyze->data_ptr<bool>();
  controller::guard_decide<TorchCpuMath>(guard.data_ptr<double>(), int(guard.numel()),
                           summary.has_value() ? summary->data_ptr<double>() : nullptr, mode, flag, check_finite,
                           config.data());
}

}  // namespace
}  // namespace lbw

TORCH_LIBRARY_IMPL(lbw, CPU, m) {
  m.impl("telemetry", &lbw::telemetry_cpu);
  m.impl("adamw_", &lbw::adamw_cpu);
  m.impl("adamw_telemetry_", &lbw::adamw_telemetry_cpu);
  m.impl("guard_decide_", &lbw::guard_decide_cpu);
}
