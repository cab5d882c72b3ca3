// CUDA implementations of the lbw ops: argument checks, the device-side chunk table (cached,
// rebuilt only when the tensors' storage changes), workspaces, then the launchers in
// csrc/cuda. Nothing here waits for the device.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <mutex>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "../cuda/controller_cuda.cuh"
#include "../cuda/multi_tensor_cuda.cuh"
#include "common.h"

namespace lbw {
namespace {

using cuda::ChunkEntry;
using cuda::TensorEntry;

// A chunk table on the device, and the pinned host copy it was uploaded from (kept alive:
// the copy is asynchronous, and a CUDA graph that captured it replays from it).
struct DeviceTable {
  at::Tensor host;
  at::Tensor device;
  // The stream the upload was enqueued on, and an event recorded after it (none for a table
  // built during a capture: it serves that graph alone). Other streams that launched from the
  // table are in `others` (see use_on).
  cudaStream_t home = nullptr;
  cudaEvent_t uploaded = nullptr;
  mutable std::mutex others_mutex;
  mutable std::vector<cudaStream_t> others;
  ~DeviceTable() {
    if (uploaded != nullptr) cudaEventDestroy(uploaded);  // (released once the event completes)
  }
  int64_t ntensors = 0;
  int64_t nchunks = 0;
  int64_t nrows = 0;  // telemetry rows: the tensors with elements
  const TensorEntry* tensors() const { return reinterpret_cast<const TensorEntry*>(device.data_ptr()); }
  const ChunkEntry* chunks() const {
    return reinterpret_cast<const ChunkEntry*>(static_cast<const uint8_t*>(device.data_ptr()) +
                                               ntensors * sizeof(TensorEntry));
  }
};
using TablePtr = std::shared_ptr<const DeviceTable>;

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

TablePtr upload(std::vector<TensorEntry> entries, const at::Device& device, int64_t chunk, cudaStream_t stream,
                bool capturing) {
  std::vector<ChunkEntry> chunks;
  int64_t row = 0;
  for (size_t t = 0; t < entries.size(); ++t) {
    TensorEntry& e = entries[t];
    e.first_chunk = int64_t(chunks.size());
    for (int64_t b = 0; b < e.numel; b += chunk) chunks.push_back(ChunkEntry{int64_t(t), b});
    e.nchunks = int64_t(chunks.size()) - e.first_chunk;
    e.row = e.numel > 0 ? row++ : -1;
  }
  auto table = std::make_shared<DeviceTable>();
  table->ntensors = int64_t(entries.size());
  table->nchunks = int64_t(chunks.size());
  table->nrows = row;
  const int64_t bytes = cuda::table_bytes(table->ntensors, table->nchunks);
  table->host = at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = table->host.data_ptr<uint8_t>();
  std::memcpy(h, entries.data(), entries.size() * sizeof(TensorEntry));
  std::memcpy(h + entries.size() * sizeof(TensorEntry), chunks.data(), chunks.size() * sizeof(ChunkEntry));
  table->device = at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions().dtype(at::kByte).device(device));
  table->device.copy_(table->host, /*non_blocking=*/true);  // (on `stream`, the current one)
  table->home = stream;
  if (!capturing) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&table->uploaded, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(table->uploaded, stream));
  }
  return table;
}

// Before a launch from a cached table on a stream other than the one it was uploaded on (a
// step on a side stream after one on the default stream): that stream waits for the upload
// (without it, only the caller's own stream sync orders them), and the allocator is told the
// stream uses the table's memory (Tensor::record_stream). Without that, a table evicted from
// the cache returns its block to the upload stream's pool at once, and an allocation there can
// take and overwrite it while a launch queued on the other stream has yet to read it. Once per
// table and stream; nothing for a table's own stream. Streams are told apart by raw handle
// (torch's live as long as the process; an external stream re-created at a freed one's
// address, or CUDA's per-thread default stream, would pass for one already handled). Not
// during a capture: a captured wait on an event recorded outside it is an error, and tables a
// graph uses are kept for good. `stream`: the device's current stream (the callers' launch stream).
void use_on(const DeviceTable& table, const at::Device& device, cudaStream_t stream) {
  if (stream == table.home) return;
  std::lock_guard<std::mutex> lock(table.others_mutex);
  if (std::find(table.others.begin(), table.others.end(), stream) != table.others.end()) return;
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
  TORCH_CHECK(current.stream() == stream, "lbw: use_on expects the device's current stream");
  if (table.uploaded != nullptr) C10_CUDA_CHECK(cudaStreamWaitEvent(stream, table.uploaded, 0));
  table.device.record_stream(current);
  table.others.push_back(stream);
}

// The cache key: the device, the chunk size and the entries as a call fills them (pointers,
// sizes, dtypes, alignment; upload fills the chunk fields of its own copy). Compared bytewise:
// TensorEntry has no padding, and entries are zero-initialised.
static_assert(std::has_unique_object_representations_v<TensorEntry>, "TensorEntry is compared with memcmp");
struct TableKey {
  int64_t device = 0;
  int64_t chunk = 0;
  std::vector<TensorEntry> entries;
  bool operator==(const TableKey& o) const {
    return device == o.device && chunk == o.chunk && entries.size() == o.entries.size() &&
           std::memcmp(entries.data(), o.entries.data(), entries.size() * sizeof(TensorEntry)) == 0;
  }
};

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(stream, &status);
  if (err != cudaSuccess) {
    // (e.g. the legacy default stream while another stream captures in global mode) Cleared,
    // so that the next launch's cudaGetLastError does not report it as a failed launch.
    (void)cudaGetLastError();
    TORCH_CHECK(false, "lbw: cannot tell whether the current CUDA stream is being captured (cudaStreamIsCapturing: ",
                cudaGetErrorString(err), ")");
  }
  return status == cudaStreamCaptureStatusActive;
}

// A CUDA graph captured with a table keeps its device pointer: such tables must outlive any
// eviction from the cache, so tables used while the stream captures are kept for good.
void keep(const TablePtr& table) {
  static std::mutex mutex;
  static auto* kept = new std::vector<TablePtr>();  // leaked on purpose: see table_for
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& t : *kept)
    if (t == table) return;
  kept->push_back(table);
}

TablePtr table_for(const TableKey& key, const at::Device& device, cudaStream_t stream) {
  // Leaked on purpose, as torch leaks its own device caches: a static destructor would free
  // these CUDA tensors at exit, after the CUDA runtime and torch's allocator are torn down
  // (seen: a segfault at exit of every process that had used the CUDA backend).
  static auto* cache = new TableCache<TableKey, TablePtr>();
  const bool captured = capturing(stream);
  auto build = [&] { return upload(key.entries, device, key.chunk, stream, captured); };
  if (!captured) {
    TablePtr table = cache->get(key, build);
    use_on(*table, device, stream);
    return table;
  }
  // A table first needed during a capture (no eager step with these tensors before it) is
  // uploaded by a copy the graph records but does not run: it holds nothing until the first
  // replay, so it serves that graph alone and is not cached, where an eager call could find it.
  TablePtr table = cache->find(key);
  if (!table) {
    try {
      table = build();
    } catch (const c10::Error& e) {  // e.g. pinning host memory, which a capture may not allow
      TORCH_CHECK(false, "lbw: the CUDA backend could not build its chunk table while a CUDA graph was being "
                  "captured; run one step() eagerly with the same params and grads before capturing (", e.what_without_backtrace(), ")");
    }
  }
  keep(table);
  return table;
}

// The chunk partials of a telemetry pass (geometry.h: per block or per warp), O(chunks).
at::Tensor telemetry_workspace(const cuda::Geometry& geo, const DeviceTable& table, const at::TensorOptions& opts) {
  return new_output({std::max<int64_t>(cuda::telemetry_workspace_doubles(geo, table.nchunks), 2)}, opts);
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err != cudaErrorNoKernelImageForDevice,
              "lbw: CUDA launch failed: the extension holds no kernel this GPU can run (built for other architectures: "
              "rebuild with TORCH_CUDA_ARCH_LIST naming this GPU's, or \"...+PTX\"; or use backend='triton')");
  TORCH_CHECK(err == cudaSuccess, "lbw: CUDA launch failed: ", cudaGetErrorString(err));
}

// The telemetry op's pass over its table: its [nrows, 3] rows, the device guard of `opts`'
// device set by the caller.
at::Tensor telemetry_rows(const cuda::Geometry& geo, const DeviceTable& table, const at::TensorOptions& opts,
                          cudaStream_t stream) {
  at::Tensor out = new_output({table.nrows, 3}, opts);
  at::Tensor ws = telemetry_workspace(geo, table, opts);
  check_launch(cuda::launch_telemetry(geo, table.tensors(), table.ntensors, table.chunks(), table.nchunks,
                                      ws.data_ptr<double>(), out.data_ptr<double>(), stream));
  return out;
}

at::Tensor telemetry_cuda(at::TensorList grads) {
  const auto device = grads.empty() ? at::Device(at::kCUDA) : grads[0].device();
  const cuda::Geometry geo = cuda_geometry();
  // One pass: each grad checked where its entry is filled.
  TableKey key{device.index(), geo.chunk, std::vector<TensorEntry>(grads.size())};
  for (size_t i = 0; i < grads.size(); ++i) {
    TensorEntry& e = key.entries[i];
    e.dtype = int32_t(check_grad_at(i, grads, at::kCUDA));
    e.g = grads[i].const_data_ptr();
    e.numel = grads[i].numel();
    e.aligned = aligned16(e.g);
  }
  const c10::cuda::CUDAGuard guard(device);
  const auto opts = at::TensorOptions().dtype(at::kDouble).device(device);
  if (grads.empty()) return new_output({0, 3}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  return telemetry_rows(geo, *table_for(key, device, stream), opts, stream);
}

const double* scalar_ptr(const at::Tensor& t, const at::Device& device, const char* what) {
  check_scalar(t, device, what);
  return t.data_ptr<double>();
}

// An update pass checked, its table found and its workspaces allocated, not yet launched
// (update_cuda, exact_step_cuda: whatever can fail, an allocation included, fails before the
// exact gate's decide writes the guard).
struct PreparedUpdate {
  TablePtr table;
  cuda::AdamWArgs args{};
  cuda::Geometry geo;
  at::TensorOptions opts;  // float64 on the params' device
  cudaStream_t stream = nullptr;
  at::Tensor coeffs;       // O(tensors): the per-tensor coefficients
  at::Tensor ws, out;      // with args.telemetry: the chunk partials and the rows
};

std::optional<PreparedUpdate> prepare_update(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                             at::TensorList exp_avg_sqs, at::TensorList steps,
                                             const at::Tensor& lr_scale, double lr, double beta1, double beta2,
                                             double eps, double weight_decay, bool maximize,
                                             const std::optional<at::Tensor>& skip,
                                             const std::optional<at::Tensor>& grad_factor, bool telemetry, bool mask) {
  // One pass: tensor i of each list checked where its entry is filled.
  const UpdateCheck check = check_update_lists(params, grads, exp_avgs, exp_avg_sqs, steps, at::kCUDA);
  const auto device = params.empty() ? lr_scale.device() : check.device;
  const cuda::Geometry geo = cuda_geometry();
  const int32_t param_code = params.empty() ? 0 : int32_t(dtype_code(params[0], "params"));
  const int32_t grad_code = params.empty() ? 0 : int32_t(dtype_code(grads[0], "grads"));
  TableKey key{device.index(), geo.chunk, std::vector<TensorEntry>(params.size())};
  for (size_t i = 0; i < params.size(); ++i) {
    check_update_at(i, check, params, grads, exp_avgs, exp_avg_sqs, steps);
    TensorEntry& e = key.entries[i];
    e.p = params[i].data_ptr();
    e.g = grads[i].const_data_ptr();
    e.m = exp_avgs[i].data_ptr();
    e.v = exp_avg_sqs[i].data_ptr();
    e.step = steps[i].data_ptr<float>();
    e.numel = params[i].numel();
    e.dtype = param_code;
    e.aligned = aligned16(e.p) && aligned16(e.g) && aligned16(e.m) && aligned16(e.v);
  }
  // (the scalars too when there are no params, as on CPU)
  const double* lr_scale_ptr = scalar_ptr(lr_scale, device, "lr_scale");
  const double* skip_ptr = skip.has_value() ? scalar_ptr(*skip, device, "skip") : nullptr;
  const double* factor_ptr = grad_factor.has_value() ? scalar_ptr(*grad_factor, device, "grad_factor") : nullptr;
  if (params.empty()) return std::nullopt;
  const c10::cuda::CUDAGuard guard(device);
  PreparedUpdate u;
  u.geo = geo;
  u.opts = at::TensorOptions().dtype(at::kDouble).device(device);
  u.args.param_dtype = DType(param_code);
  u.args.f32_grads = grad_code != param_code;  // (check_update_lists allows float32 grads of bf16/fp16 params only)
  u.args.lr_scale = lr_scale_ptr;
  u.args.lr = lr;
  u.args.beta1 = beta1;
  u.args.beta2 = beta2;
  u.args.eps = eps;
  u.args.weight_decay = weight_decay;
  u.args.maximize = maximize;
  u.args.skip = skip_ptr;
  u.args.grad_factor = factor_ptr;
  u.args.mask_nonfinite = mask;
  u.args.telemetry = telemetry;
  u.stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  u.table = table_for(key, device, u.stream);
  const DeviceTable& table = *u.table;
  if (telemetry) u.out = new_output({table.nrows, 3}, u.opts);
  // Workspaces are O(tensors + chunks): coefficients, then the chunk partials.
  const int64_t coeff_doubles = table.ntensors * int64_t(sizeof(AdamWCoeffs<double>) / sizeof(double));
  u.coeffs = new_output({coeff_doubles}, u.opts);
  if (telemetry) u.ws = telemetry_workspace(u.geo, table, u.opts);
  return u;
}

// Launches a prepared update; with args.telemetry, returns the rows of the grads as read.
std::optional<at::Tensor> launch_update(const PreparedUpdate& u) {
  const c10::cuda::CUDAGuard guard(u.opts.device());
  const DeviceTable& table = *u.table;
  check_launch(cuda::launch_adamw(u.geo, u.args, table.tensors(), table.ntensors, table.chunks(), table.nchunks,
                                  reinterpret_cast<AdamWCoeffs<double>*>(u.coeffs.data_ptr<double>()),
                                  u.args.telemetry ? u.ws.data_ptr<double>() : nullptr,
                                  u.args.telemetry ? u.out.data_ptr<double>() : nullptr, u.stream));
  return u.args.telemetry ? std::optional<at::Tensor>(u.out) : std::nullopt;
}

std::optional<at::Tensor> update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                      at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr_scale,
                                      double lr, double beta1, double beta2, double eps, double weight_decay,
                                      bool maximize, const std::optional<at::Tensor>& skip,
                                      const std::optional<at::Tensor>& grad_factor, bool telemetry, bool mask) {
  const auto u = prepare_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr, beta1, beta2, eps,
                                weight_decay, maximize, skip, grad_factor, telemetry, mask);
  if (!u.has_value()) {  // no params
    const auto opts = at::TensorOptions().dtype(at::kDouble).device(lr_scale.device());
    return telemetry ? std::optional<at::Tensor>(new_output({0, 3}, opts)) : std::nullopt;
  }
  return launch_update(*u);
}

// The exact gate in one call from Python (python_module.cpp's _C._adamw_exact_): the telemetry
// op over the grads (its own table, keyed by the grads alone), then the update's checks and
// table, then `decide` (the caller's rules 1-4, enqueued on the same stream; it returns
// max_grad_norm's factor for the update, or nothing), then the update. The telemetry launch
// comes before the update's checks and key on purpose: those read the addresses of five lists,
// and in a step timed alone the device sits idle through them (on the H200 on 2026-11-27, with
// them first, the step's first kernel started ~0.3 ms later than the Triton backend's, which
// launches its telemetry before its update's key; bench/results/nvidia-h200-timeline-20261127.txt).
// Launched first, the telemetry kernel runs meanwhile: where it outlasts that host work
// (TinyLlama: ~1 ms of telemetry against 1,000 tensors' checks) the update starts earlier by
// that work less the grads' second key (~4/5 of it); where it does not (2000 small tensors:
// 0.13 ms against 10,000 tensors' checks and the decision) the update's launch is what the
// device waits for, and it comes no sooner. Its rows are the telemetry op's, so the call is
// bitwise the passes run one by one (CudaBackend's fallback) for any alignment of params,
// grads and states. Nothing is written but the rows before `decide` returns: an error in the
// update's checks or allocations changes no param, state or guard. `partials`: the telemetry op's rows of
// these grads, launched already (the optimizer's early telemetry pass), taken instead.
bool exact_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList steps, const at::Tensor& lr_scale, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool maximize, const std::optional<at::Tensor>& skip,
                     const ExactDecideFn& decide, const std::optional<at::Tensor>& partials) {
  RECORD_FUNCTION("lbw::exact_step", std::vector<c10::IValue>());  // (not a dispatcher op: the profiler's name)
  TORCH_CHECK(!params.empty(), "lbw: exact_step_cuda needs params");
  // (kept alive until the update is enqueued; the allocator frees it in stream order after)
  const at::Tensor rows = partials.has_value() ? *partials : telemetry_cuda(grads);
  auto u = prepare_update(params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr, beta1, beta2, eps,
                          weight_decay, maximize, skip, std::nullopt, false, false);
  std::optional<at::Tensor> factor = decide(rows);
  // decide has written the guard: from here nothing refuses what can be made to serve. A factor
  // of another dtype or device (a decide computing it in float32) is converted on the stream
  // (`to` returns the factor itself where it is float64 on the device already) rather than
  // refused with the guard moved and no update; one of several elements is a broken decide,
  // which scalar_ptr refuses. (The conversion is kept alive until the update is enqueued.)
  if (factor.has_value()) {
    if (factor->numel() == 1) factor = factor->to(u->opts.device(), at::kDouble);
    u->args.grad_factor = scalar_ptr(*factor, u->opts.device(), "grad_factor");
  }
  launch_update(*u);
  return true;
}

const bool exact_step_registered = (cuda_exact_step() = &exact_step_cuda, true);

void adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList steps, const at::Tensor& lr_scale, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool maximize, const std::optional<at::Tensor>& skip,
                const std::optional<at::Tensor>& grad_factor) {
  update_cuda(params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr, beta1, beta2, eps, weight_decay, maximize,
              skip, grad_factor, false, false);
}

at::Tensor adamw_telemetry_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr_scale,
                                double lr, double beta1, double beta2, double eps, double weight_decay,
                                bool maximize, bool mask_nonfinite) {
  return *update_cuda(params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr, beta1, beta2, eps, weight_decay,
                      maximize, std::nullopt, std::nullopt, true, mask_nonfinite);
}

cuda::ControllerConfig controller_config(at::ArrayRef<double> config) {
  cuda::ControllerConfig values{};
  std::copy(config.begin(), config.end(), values.values);
  return values;
}

void guard_decide_cuda(const at::Tensor& guard, const std::optional<at::Tensor>& summary,
                       const std::optional<at::Tensor>& analyze, bool analyze_host, bool check_finite,
                       at::ArrayRef<double> config) {
  const auto mode = check_decide_args(guard, analyze, analyze_host, config, at::kCUDA);
  check_summary_arg(guard, summary, mode != controller::Analyze::no || check_finite);
  const c10::cuda::CUDAGuard device_guard(guard.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(guard.device().index()).stream();
  check_launch(cuda::launch_guard_decide(guard.data_ptr<double>(), int(guard.numel()),
                                         summary.has_value() ? summary->data_ptr<double>() : nullptr, mode,
                                         analyze.has_value() ? analyze->data_ptr<bool>() : nullptr, check_finite,
                                         controller_config(config), stream));
}

at::Tensor summarize_decide_cuda(const at::Tensor& guard, const std::optional<at::Tensor>& partials,
                                 const std::optional<at::Tensor>& numels, bool use_max_rms,
                                 const std::optional<at::Tensor>& analyze, bool analyze_host, bool check_finite,
                                 at::ArrayRef<double> config) {
  const auto mode = check_decide_args(guard, analyze, analyze_host, config, at::kCUDA);
  const bool due = mode != controller::Analyze::no || check_finite;
  const int64_t rows = check_rows_args(guard, partials, numels, due);
  const c10::cuda::CUDAGuard device_guard(guard.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(guard.device().index()).stream();
  at::Tensor summary = at::empty({due ? 4 : 0}, guard.options());
  const bool* flag = analyze.has_value() ? analyze->data_ptr<bool>() : nullptr;
  if (due)
    check_launch(cuda::launch_summarize_decide(guard.data_ptr<double>(), int(guard.numel()),
                                               partials->data_ptr<double>(), numels->data_ptr<double>(), rows,
                                               use_max_rms, summary.data_ptr<double>(), mode, flag, check_finite,
                                               controller_config(config), stream));
  else
    check_launch(cuda::launch_guard_decide(guard.data_ptr<double>(), int(guard.numel()), nullptr, mode, flag,
                                           check_finite, controller_config(config), stream));
  return summary;
}

}  // namespace
}  // namespace lbw

TORCH_LIBRARY_IMPL(lbw, CUDA, m) {
  m.impl("telemetry", &lbw::telemetry_cuda);
  m.impl("adamw_", &lbw::adamw_cuda);
  m.impl("adamw_telemetry_", &lbw::adamw_telemetry_cuda);
  m.impl("guard_decide_", &lbw::guard_decide_cuda);
  m.impl("summarize_decide_", &lbw::summarize_decide_cuda);
}
