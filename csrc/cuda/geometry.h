// Launch geometry of the chunked CUDA kernels (multi_tensor_cuda.cu), one per process: the
// default, or another supported one for tuning runs (LBW_CUDA_GEOMETRY, parsed by
// lbw_kernels/cpp_backend.py; bench/device_check.sh times a few beside the default).
// Plain C++ without CUDA headers: the bindings hold the current geometry in every build.
#pragma once

#include <cstdint>

namespace lbw {
namespace cuda {

// (threads, ilp): (512, 1), (512, 2), (256, 2) or (256, 4); each is a set of kernel
// instantiations (nvcc time), and 512 x 4 spills registers for bf16/fp16 params.
struct Geometry {
  // Threads per block.
  int threads = 512;
  // Vectors of each stream (p, g, m, v) a thread loads before it uses any. With 1 the loop is
  // unrolled twice and the compiler schedules the loads; 2 and 4 put 8 or 16 loads of 16
  // bytes in flight per thread explicitly, at the cost of registers (fewer blocks per SM).
  // On the H200 runs 512 x 2 came within ~1% of 512 x 1 either way, 256 x 2 and 256 x 4
  // 2-3% slower (nvidia-h200-cuda-geometry-20261126.json).
  int ilp = 1;
  // Elements per block (per chunk): a power of two from 4096 to 1 << 20, so a multiple of
  // every vector width and chunks of aligned tensors start aligned. 16384 (8 loop trips of
  // 512 threads x 4 fp32) against 65536, TinyLlama layout on an H200, two runs
  // (bench/results/nvidia-h200-cuda-geometry-20261126.json, ms exact / single_pass): 8.54 /
  // 7.63 vs 8.68 / 7.71, then 8.62 / 7.79 vs 8.72 / 7.72. The exact gate gains ~1% in both;
  // single_pass moves within the runs' noise (~1%). 8192 gave 8.58 / 7.67 (its telemetry-only
  // pass pays the block reduction twice as often). On one 268M-element tensor
  // (memory_floor) the update alone runs at 4.07 TB/s at 16384, 4.04 at 65536.
  int64_t chunk = 16384;
  // Telemetry partials per chunk: 0, one per block (a shuffle tree per warp, then a barrier and
  // warp 0's tree); 1, one per warp (the tree, then lane 0 writes; no barrier), folded into
  // one per chunk by a second launch before the per-tensor sums. On one 268M-element tensor
  // (bench/memory_floor.cu) the single_pass kernel with per-block partials ran 1.6% slower
  // than the update alone at 16384-element chunks, 0.5% at 65536, while the update alone ran
  // faster as chunks shrank: per-warp partials are for smaller chunks without that cost. A
  // kernel argument, not another instantiation. Its workspace is 16 slots of 16 B per chunk
  // (512 threads): ~17 MB per telemetry call for 1.1B parameters at 16384-element chunks,
  // against ~1 MB with per-block partials (DESIGN.md counts partials as O(chunks) state).
  // Timed on an H200 (2026-11-27, TinyLlama layout; bench/results/nvidia-h200-geometry-20261127.json):
  // 1-2% slower than per-block partials at 16384-element chunks, 0.6-1.4% at 8192.
  int warp_partials = 0;
};

inline bool geometry_supported(const Geometry& g) {
  const bool pow2 = g.chunk > 0 && (g.chunk & (g.chunk - 1)) == 0;
  const bool kernels = g.threads == 512 ? (g.ilp == 1 || g.ilp == 2) : g.threads == 256 && (g.ilp == 2 || g.ilp == 4);
  return kernels && pow2 && g.chunk >= 4096 && g.chunk <= (int64_t(1) << 20) &&
         (g.warp_partials == 0 || g.warp_partials == 1);
}

// Doubles of telemetry workspace a pass over `nchunks` chunks needs: 2 per chunk, and with
// warp_partials 2 per warp of each chunk besides.
inline int64_t telemetry_workspace_doubles(const Geometry& g, int64_t nchunks) {
  return 2 * nchunks * (1 + (g.warp_partials ? g.threads / 32 : 0));
}

}  // namespace cuda
}  // namespace lbw
