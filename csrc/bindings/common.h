// Shared by the torch-facing bindings: argument checks, the chunk-table cache and the
// test-only switch that poisons freshly allocated outputs with NaN.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <functional>
#include <list>
#include <mutex>
#include <optional>
#include <vector>

#include "../cuda/geometry.h"
#include "../guard_controller.h"
#include "../guard_math.h"

namespace lbw {

// When on, outputs and workspaces the ops allocate are filled with NaN before a kernel writes
// them, so a row or chunk slot that no kernel wrote shows up as NaN in the tests.
std::atomic<bool>& poison_outputs();

// The CUDA kernels' launch geometry for this process (csrc/cuda/geometry.h): set from Python
// (_C._cuda_geometry, LBW_CUDA_GEOMETRY) between steps, read by every CUDA launch.
cuda::Geometry& cuda_geometry();

// The CUDA exact gate in one call (ops_cuda.cpp's exact_step_cuda: telemetry, unless its rows
// are given, the update's checks, `decide`, update), for the eager entry
// _C._adamw_exact_. Set when the CUDA kernels are linked in (ops_cuda.cpp registers it at
// load); null in a CPU-only build.
// decide(partials): rules 1-4, enqueued; returns the gradient factor for the update (max_grad_norm) or nothing.
using ExactDecideFn = std::function<std::optional<at::Tensor>(const at::Tensor&)>;
using ExactStepFn = bool (*)(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr_scale, double lr,
                             double beta1, double beta2, double eps, double weight_decay, bool maximize,
                             const std::optional<at::Tensor>& skip, const ExactDecideFn& decide,
                             const std::optional<at::Tensor>& partials);
ExactStepFn& cuda_exact_step();

// The update ops' one-element inputs (lr_scale, skip, grad_factor): float64 on the params'
// device, alike on CPU and CUDA (the CUDA kernels read them through a double pointer; the
// schemas in ops.cpp say so), checked before anything is written, on a skipped call too.
inline void check_scalar(const at::Tensor& t, const at::Device& device, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.device() == device && t.scalar_type() == at::kDouble, "lbw: ", what,
              " must be a 0-dim float64 tensor on ", device, ", got ", t.scalar_type(), " on ", t.device());
}

inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  if (poison_outputs().load(std::memory_order_relaxed)) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline DType dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK(false, "lbw: ", what, " must be float32, float64, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

// Whether the update kernels take grads of `grad` dtype for params of `param` dtype: the
// params' own, or float32 for bfloat16/float16 params (torch >= 2.10's grad_dtype; the math
// is float32 either way).
inline bool update_dtypes_supported(at::ScalarType param, at::ScalarType grad) {
  return grad == param || (grad == at::kFloat && (param == at::kBFloat16 || param == at::kHalf));
}

// Whether the kernels can walk `t` as a flat array: its elements fill numel() consecutive
// slots from data_ptr() (contiguous, or a permutation of that: channels_last, a transpose;
// lbw_kernels/element_order.py). torch keeps the flag: no pass over the strides.
inline bool walkable(const at::Tensor& t) {
  return t.layout() == at::kStrided && (t.is_contiguous() || t.is_non_overlapping_and_dense());
}

// Whether walkable `a` and `b` hold element i in the same slot: equal strides on every dim
// of size > 1 (a size-1 dim's stride says nothing about the order), same shape. The update
// walks p, g, m, v side by side.
inline bool same_element_order(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return a.sizes() == b.sizes();
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != b.size(d) || (a.size(d) > 1 && a.stride(d) != b.stride(d))) return false;
  return true;
}

// The tensors of one update call: one param dtype, one grad dtype (update_dtypes_supported),
// states in the math dtype, all walkable on `device_type` with each param's grad and states
// in the param's element order, steps 0-dim float32 on the same device. In two parts, so an op can check tensor i in the loop that reads its
// pointers (check_update_args is both): on 2000 params x 5 lists, every extra pass over the
// TensorImpls costs cache misses, not math.
struct UpdateCheck {
  at::ScalarType param_dtype = at::kFloat, grad_dtype = at::kFloat, state_dtype = at::kFloat;
  at::Device device = at::kCPU;
};

// The lengths, params[0]'s dtype and device. Call before check_update_at.
inline UpdateCheck check_update_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_sqs, at::TensorList steps, at::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "lbw: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length, got ",
              n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size());
  UpdateCheck c;
  if (n == 0) return c;
  c.param_dtype = params[0].scalar_type();
  dtype_code(params[0], "params");
  c.grad_dtype = grads[0].scalar_type();
  TORCH_CHECK(update_dtypes_supported(c.param_dtype, c.grad_dtype), "lbw: grads[0] must be ", c.param_dtype,
              " (params[0]'s dtype)", c.param_dtype == at::kBFloat16 || c.param_dtype == at::kHalf ? " or Float" : "",
              ", got ", c.grad_dtype);
  c.state_dtype = c.param_dtype == at::kDouble ? at::kDouble : at::kFloat;
  c.device = params[0].device();
  TORCH_CHECK(c.device.type() == device_type, "lbw: params must be on ", device_type, ", got ", c.device);
  return c;
}

// Tensor i of each list.
inline void check_update_at(size_t i, const UpdateCheck& c, at::TensorList params, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps) {
  const at::Tensor* ts[4] = {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]};
  static const char* const names[4] = {"params", "grads", "exp_avgs", "exp_avg_sqs"};
  const at::IntArrayRef shape = params[i].sizes();
  for (int k = 0; k < 4; ++k) {
    const at::Tensor& t = *ts[k];
    TORCH_CHECK(t.device() == c.device, "lbw: ", names[k], "[", i, "] is on ", t.device(), ", params[0] on ",
                c.device);
    TORCH_CHECK(walkable(t), "lbw: ", names[k], "[", i,
                "] must be dense (its elements in numel() consecutive slots, in any order of its dims)");
    // (the shape, not only the element count: a state of another shape would be updated as if
    // it were the param's, element by element, and handed back that way)
    TORCH_CHECK(t.sizes() == shape, "lbw: ", names[k], "[", i, "] has shape ", t.sizes(), ", params[", i, "] ",
                shape);
    TORCH_CHECK(k == 0 || same_element_order(t, params[i]), "lbw: ", names[k], "[", i, "] has strides ", t.strides(),
                ", params[", i, "] ", params[i].strides(), ": the update walks them side by side, in one element order");
    const auto want = k == 0 ? c.param_dtype : k == 1 ? c.grad_dtype : c.state_dtype;
    TORCH_CHECK(t.scalar_type() == want, "lbw: ", names[k], "[", i, "] must be ", want, ", got ", t.scalar_type());
  }
  TORCH_CHECK(steps[i].device() == c.device && steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1,
              "lbw: steps[", i, "] must be a 0-dim float32 tensor on ", c.device);
}

inline void check_update_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList steps, at::DeviceType device_type) {
  const UpdateCheck c = check_update_lists(params, grads, exp_avgs, exp_avg_sqs, steps, device_type);
  for (size_t i = 0; i < params.size(); ++i) check_update_at(i, c, params, grads, exp_avgs, exp_avg_sqs, steps);
}

// Grad i: on the device of grads[0] (of `device_type`), walkable (its sums then run in its
// memory order), a kernel dtype (returned).
inline DType check_grad_at(size_t i, at::TensorList grads, at::DeviceType device_type) {
  const at::Tensor& g = grads[i];
  TORCH_CHECK(g.device().type() == device_type && g.device() == grads[0].device(), "lbw: grads[", i, "] is on ",
              g.device(), ", expected ", grads[0].device());
  TORCH_CHECK(walkable(g), "lbw: grads[", i,
              "] must be dense (its elements in numel() consecutive slots, in any order of its dims)");
  return dtype_code(g, "grads");
}

// The controller ops' common arguments on `device_type`; returns how rule 2's decision is given.
inline controller::Analyze check_decide_args(const at::Tensor& guard, const std::optional<at::Tensor>& analyze,
                                             bool analyze_host, at::ArrayRef<double> config,
                                             at::DeviceType device_type) {
  using namespace controller;
  TORCH_CHECK(config.size() == size_t(CONFIG_SIZE), "lbw: config must hold ", int(CONFIG_SIZE), " numbers, got ",
              config.size());
  const double policy = config[POLICY];
  TORCH_CHECK(policy == POLICY_LBW || policy == POLICY_ZSCORE, "lbw: config[POLICY] must be 0 (lbw) or 1 (zscore), got ",
              policy);
  const int64_t slots = policy == POLICY_ZSCORE ? ZSCORE_STATE_SIZE : STATE_SIZE;
  TORCH_CHECK(guard.device().type() == device_type && guard.scalar_type() == at::kDouble && guard.dim() == 1 &&
                  guard.is_contiguous() && guard.numel() == slots,
              "lbw: guard must be a contiguous float64 vector of ", slots, " slots on ", device_type, ", got ",
              guard.scalar_type(), " ", guard.sizes(), " on ", guard.device());
  const Analyze mode = analyze.has_value() ? Analyze::on_device : analyze_host ? Analyze::yes : Analyze::no;
  if (analyze.has_value())
    TORCH_CHECK(analyze->device() == guard.device() && analyze->scalar_type() == at::kBool && analyze->numel() == 1,
                "lbw: analyze must be a one-element bool tensor on ", guard.device());
  return mode;
}

// guard_decide_'s summary: 4 float64 on the guard's device, when telemetry or the finite check is due.
inline void check_summary_arg(const at::Tensor& guard, const std::optional<at::Tensor>& summary, bool due) {
  if (due)
    TORCH_CHECK(summary.has_value() && summary->device() == guard.device() && summary->scalar_type() == at::kDouble &&
                    summary->is_contiguous() && summary->numel() == 4,
                "lbw: summary must be 4 contiguous float64 values on ", guard.device(),
                " when telemetry or the finite check is due");
}

// summarize_decide_'s telemetry rows: partials [T, 3] and numels [T], contiguous float64 on the
// guard's device, T > 0, when telemetry or the finite check is due. Returns T (0 when not due).
inline int64_t check_rows_args(const at::Tensor& guard, const std::optional<at::Tensor>& partials,
                               const std::optional<at::Tensor>& numels, bool due) {
  if (!due) return 0;
  TORCH_CHECK(partials.has_value() && partials->device() == guard.device() && partials->scalar_type() == at::kDouble &&
                  partials->is_contiguous() && partials->dim() == 2 && partials->size(1) == 3 && partials->size(0) > 0,
              "lbw: partials must be a contiguous float64 [T, 3] tensor (T > 0) on ", guard.device(),
              " when telemetry or the finite check is due");
  const int64_t rows = partials->size(0);
  TORCH_CHECK(numels.has_value() && numels->device() == guard.device() && numels->scalar_type() == at::kDouble &&
                  numels->is_contiguous() && numels->dim() == 1 && numels->size(0) == rows,
              "lbw: numels must be a contiguous float64 vector of ", rows, " element counts (one per partials row) on ",
              guard.device());
  return rows;
}

// How many tables a TableCache keeps (_C.TABLE_CACHE_CAPACITY: the tests that push a step's
// tables out of it step one more layout than this).
//
// A step looks up one table per (param group x dtype) part, plus the grads' telemetry
// table: with 16 entries, a model with layer-wise learning rates (a group per layer, say
// 24-48 of them) rebuilt and re-uploaded every table on every call. Stale tables of a layout
// that changed hold their memory until evicted: O(tensors + chunks) each, ~1 MB for
// 1.1B parameters in 201 tensors at 16384-element chunks.
constexpr size_t kTableCacheCapacity = 64;

// A few recent chunk tables, looked up by key (element counts on CPU; pointers, counts and
// dtypes on CUDA). Rebuilt only when the key changes, i.e. when storage changes. Table is a
// shared_ptr, so an entry evicted by another thread stays alive while a caller uses it.
template <class Key, class Table>
class TableCache {
 public:
  template <class Build>
  Table get(const Key& key, Build&& build) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (Table found = find_locked(key)) return found;
    entries_.emplace_front(key, build());
    if (entries_.size() > kCapacity) entries_.pop_back();
    return entries_.front().second;
  }

  // The table of `key` when cached (made most recent), else an empty Table.
  Table find(const Key& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    return find_locked(key);
  }

 private:
  Table find_locked(const Key& key) {
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->first == key) {
        entries_.splice(entries_.begin(), entries_, it);  // most recent first
        return entries_.front().second;
      }
    }
    return Table();
  }

  static constexpr size_t kCapacity = kTableCacheCapacity;
  std::mutex mutex_;
  std::list<std::pair<Key, Table>> entries_;
};

}  // namespace lbw
