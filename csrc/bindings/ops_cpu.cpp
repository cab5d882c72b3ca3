// CPU implementations of the lbw ops: argument checks, the cached chunk table, per-tensor
// AdamW coefficients (the steps live on the host), then the kernels in csrc/cpu.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <functional>
#include <memory>
#include <optional>

#include "../cpu/multi_tensor_cpu.h"
#include "../guard_summary.h"
#include "common.h"

namespace lbw {
namespace {

using TablePtr = std::shared_ptr<const cpu::ChunkTable>;

TablePtr chunk_table(std::vector<int64_t> numels) {
  static TableCache<std::vector<int64_t>, TablePtr> cache;
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
  check_scalar(t, at::Device(at::kCPU), what);
  return *t.const_data_ptr<double>();
}

at::Tensor telemetry_cpu(at::TensorList grads) {
  // One pass: each grad checked where its pointer and size are read.
  std::vector<int64_t> numels;
  std::vector<cpu::GradRef> refs;
  numels.reserve(grads.size());
  refs.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const DType code = check_grad_at(i, grads, at::kCPU);
    refs.push_back({grads[i].const_data_ptr(), code});
    numels.push_back(grads[i].numel());
  }
  const TablePtr table = chunk_table(std::move(numels));
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);
  at::Tensor out = new_output({table->nonempty(), 3}, opts);
  at::Tensor ws = new_output({table->nchunks(), 2}, opts);
  cpu::kernels().telemetry(*table, refs.data(), ws.data_ptr<double>(), out.data_ptr<double>(), &aten_for);
  return out;
}

// Tensor i of each list checked where its pointers are read: one pass over the TensorImpls
// (each further pass over 5 x 2000 of them costs cache misses, not arithmetic).
template <class P, class G>
std::vector<cpu::UpdateRef<P, G>> update_refs(const UpdateCheck& check, at::TensorList params, at::TensorList grads,
                                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps,
                                           std::vector<int64_t>& numels) {
  using M = typename math_type<P>::type;
  std::vector<cpu::UpdateRef<P, G>> refs;
  refs.reserve(params.size());
  numels.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_update_at(i, check, params, grads, exp_avgs, exp_avg_sqs, steps);
    refs.push_back({static_cast<P*>(params[i].data_ptr()), static_cast<const G*>(grads[i].const_data_ptr()),
                    static_cast<M*>(exp_avgs[i].data_ptr()), static_cast<M*>(exp_avg_sqs[i].data_ptr())});
    numels.push_back(params[i].numel());
  }
  return refs;
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

template <class P, class G = P>
void run_update(cpu::AdamWFn<P, G> kernel, const UpdateCheck& check, at::TensorList params, at::TensorList grads,
                at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr_t,
                double beta1, double beta2, double eps, double weight_decay, double grad_sign, bool telemetry,
                bool mask, at::Tensor& out) {
  using M = typename math_type<P>::type;
  std::vector<int64_t> numels;
  const auto refs = update_refs<P, G>(check, params, grads, exp_avgs, exp_avg_sqs, steps, numels);
  const TablePtr table = chunk_table(std::move(numels));
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(at::kCPU);
  at::Tensor ws;
  if (telemetry) {
    out = new_output({table->nonempty(), 3}, opts);
    ws = new_output({table->nchunks(), 2}, opts);
  }
  // Every check passed: from here on the call changes the steps, then the tensors.
  const auto coeffs = advance_steps<M>(steps, lr_t, beta1, beta2, eps, weight_decay);
  kernel(*table, refs.data(), coeffs.data(), grad_sign, mask, telemetry, telemetry ? ws.data_ptr<double>() : nullptr,
         telemetry ? out.data_ptr<double>() : nullptr, &aten_for);
}

std::optional<at::Tensor> update_cpu(at::TensorList params, at::TensorList grads,
                                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                     at::TensorList steps, double lr_scale, double lr,
                                     double beta1, double beta2, double eps, double weight_decay,
                                     bool maximize, double grad_factor, bool telemetry, bool mask) {
  const UpdateCheck check = check_update_lists(params, grads, exp_avgs, exp_avg_sqs, steps, at::kCPU);
  const double lr_t = lr * lr_scale;
  const double grad_sign = (maximize ? -1.0 : 1.0) * grad_factor;
  at::Tensor out;  // (run_update fills it when telemetry is asked for)
  if (params.empty())
    return telemetry ? std::optional<at::Tensor>(new_output({0, 3}, at::TensorOptions().dtype(at::kDouble)))
                     : std::nullopt;
  switch (dtype_code(params[0], "params")) {
    case DType::f32:
      run_update<float>(cpu::kernels().adamw_f32, check, params, grads, exp_avgs, exp_avg_sqs, steps, lr_t, beta1,
                        beta2, eps, weight_decay, grad_sign, telemetry, mask, out);
      break;
    case DType::f64:
      run_update<double>(cpu::kernels().adamw_f64, check, params, grads, exp_avgs, exp_avg_sqs, steps, lr_t, beta1,
                         beta2, eps, weight_decay, grad_sign, telemetry, mask, out);
      break;
    case DType::bf16:
      if (check.grad_dtype == at::kFloat)  // (float32 grads: check_update_lists allows them for 16-bit params)
        run_update<bf16_t, float>(cpu::kernels().adamw_bf16_f32, check, params, grads, exp_avgs, exp_avg_sqs, steps,
                                  lr_t, beta1, beta2, eps, weight_decay, grad_sign, telemetry, mask, out);
      else
        run_update<bf16_t>(cpu::kernels().adamw_bf16, check, params, grads, exp_avgs, exp_avg_sqs, steps, lr_t, beta1,
                           beta2, eps, weight_decay, grad_sign, telemetry, mask, out);
      break;
    case DType::f16:
      if (check.grad_dtype == at::kFloat)
        run_update<f16_t, float>(cpu::kernels().adamw_f16_f32, check, params, grads, exp_avgs, exp_avg_sqs, steps,
                                 lr_t, beta1, beta2, eps, weight_decay, grad_sign, telemetry, mask, out);
      else
        run_update<f16_t>(cpu::kernels().adamw_f16, check, params, grads, exp_avgs, exp_avg_sqs, steps, lr_t, beta1,
                          beta2, eps, weight_decay, grad_sign, telemetry, mask, out);
      break;
  }
  return telemetry ? std::optional<at::Tensor>(out) : std::nullopt;
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr_scale, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool maximize,
               const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& grad_factor) {
  // (every argument checked, a skipped call's too: the CUDA op's checks)
  const double scale = scalar_of(lr_scale, "lr_scale");
  const double factor = grad_factor.has_value() ? scalar_of(*grad_factor, "grad_factor") : 1.0;
  // Exact gate, rule 1: a skipped call changes nothing, not even the step counts.
  if (skip.has_value() && scalar_of(*skip, "skip") != 0.0) {
    check_update_args(params, grads, exp_avgs, exp_avg_sqs, steps, at::kCPU);
    return;
  }
  update_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, scale, lr, beta1, beta2, eps, weight_decay, maximize,
             factor, false, false);
}

at::Tensor adamw_telemetry_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList steps,
                               const at::Tensor& lr_scale, double lr, double beta1, double beta2,
                               double eps, double weight_decay, bool maximize, bool mask_nonfinite) {
  return *update_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, scalar_of(lr_scale, "lr_scale"), lr, beta1, beta2,
                     eps, weight_decay, maximize, 1.0, true, mask_nonfinite);
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
  const auto mode = check_decide_args(guard, analyze, analyze_host, config, at::kCPU);
  check_summary_arg(guard, summary, mode != controller::Analyze::no || check_finite);
  const bool flag = mode == controller::Analyze::on_device && *analyze->data_ptr<bool>();
  controller::guard_decide<TorchCpuMath>(guard.data_ptr<double>(), int(guard.numel()),
                           summary.has_value() ? summary->data_ptr<double>() : nullptr, mode, flag, check_finite,
                           config.data());
}

at::Tensor summarize_decide_cpu(const at::Tensor& guard, const std::optional<at::Tensor>& partials,
                                const std::optional<at::Tensor>& numels, bool use_max_rms,
                                const std::optional<at::Tensor>& analyze, bool analyze_host, bool check_finite,
                                at::ArrayRef<double> config) {
  const auto mode = check_decide_args(guard, analyze, analyze_host, config, at::kCPU);
  const bool due = mode != controller::Analyze::no || check_finite;
  const int64_t rows = check_rows_args(guard, partials, numels, due);
  at::Tensor summary = at::empty({due ? 4 : 0}, guard.options());
  if (due)
    controller::summarize_rows<TorchCpuMath>(partials->data_ptr<double>(), numels->data_ptr<double>(), rows,
                                             use_max_rms, summary.data_ptr<double>());
  const bool flag = mode == controller::Analyze::on_device && *analyze->data_ptr<bool>();
  controller::guard_decide<TorchCpuMath>(guard.data_ptr<double>(), int(guard.numel()),
                                         due ? summary.data_ptr<double>() : nullptr, mode, flag, check_finite,
                                         config.data());
  return summary;
}

}  // namespace
}  // namespace lbw

TORCH_LIBRARY_IMPL(lbw, CPU, m) {
  m.impl("telemetry", &lbw::telemetry_cpu);
  m.impl("adamw_", &lbw::adamw_cpu);
  m.impl("adamw_telemetry_", &lbw::adamw_telemetry_cpu);
  m.impl("guard_decide_", &lbw::guard_decide_cpu);
  m.impl("summarize_decide_", &lbw::summarize_decide_cpu);
}
