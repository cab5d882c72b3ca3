// Multi-tensor CUDA kernels: telemetry, the AdamW update and the two fused (single_pass).
//
// Torch-free (the bindings in csrc/bindings/ops_cuda.cpp are the torch side). A pass is one
// launch over a device-side chunk table, for any number of tensors: block b handles chunk b
// (Geometry::chunk elements of one tensor) with 16-byte vector loads of p, g, m, v; the
// launch geometry is geometry.h's (the table must be built with its chunk). Reductions are
// deterministic: each block reduces its chunk in double with a fixed shuffle tree into its
// own workspace slot (with Geometry::warp_partials each warp into its own, folded per chunk by
// a second launch), and a last tiny kernel (a block per tensor, fixed strided order and the
// same tree) sums each tensor's slots.
// The AdamW step counts and coefficients are computed on the device (no host sync).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../guard_math.h"
#include "geometry.h"

namespace lbw {
namespace cuda {

// One entry per tensor of a call. For telemetry only g, dtype, first_chunk, row are read.
struct TensorEntry {
  void* p;
  const void* g;
  void* m;
  void* v;
  float* step;          // 0-dim float32 step count (update passes)
  int64_t numel;
  int64_t first_chunk;  // chunks first_chunk .. first_chunk + nchunks - 1 are this tensor's
  int64_t nchunks;
  int64_t row;          // telemetry row (-1 for a zero-element tensor)
  int32_t dtype;        // DType of g in a telemetry pass's table, of p in an update's
  int32_t aligned;      // p, g, m, v all 16-byte aligned: vector loads
};

struct ChunkEntry {
  int64_t tensor;
  int64_t begin;
};

// Byte sizes of the table a call uploads: entries then chunks, in one buffer.
inline int64_t table_bytes(int64_t ntensors, int64_t nchunks) {
  return ntensors * int64_t(sizeof(TensorEntry)) + nchunks * int64_t(sizeof(ChunkEntry));
}

// Telemetry: out gets one (sum g^2, sum g, nonfinite) row per non-empty tensor; ws holds
// telemetry_workspace_doubles(geo, nchunks). Grads may mix dtypes. cudaErrorInvalidValue for
// an unsupported geometry.
cudaError_t launch_telemetry(const Geometry& geo, const TensorEntry* tensors, int64_t ntensors, const ChunkEntry* chunks,
                             int64_t nchunks, double* ws, double* out, cudaStream_t stream);

struct AdamWArgs {
  DType param_dtype;
  bool f32_grads;          // bf16/f16 params with float32 grads (torch >= 2.10's grad_dtype); else
                           // the grads are of param_dtype
  const double* lr_scale;  // device 0-dim float64: lr_t = lr * *lr_scale
  double lr, beta1, beta2, eps, weight_decay;
  bool maximize;
  const double* skip;      // device 0-dim float64 or nullptr; non-zero: nothing changes
  const double* grad_factor;  // device 0-dim float64 or nullptr: gradients read times it (clipping)
  bool mask_nonfinite;     // single_pass: elements with NaN/Inf grads keep p, m, v
  bool telemetry;          // also write the rows of the grads as read (ws, out)
};

// The update: advances every step (by 0 when skipped), computes the per-tensor coefficients
// into `coeffs` (ntensors entries), then one launch over the chunks.
cudaError_t launch_adamw(const Geometry& geo, const AdamWArgs& args, const TensorEntry* tensors, int64_t ntensors,
                         const ChunkEntry* chunks, int64_t nchunks, AdamWCoeffs<double>* coeffs,
                         double* ws, double* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace lbw
