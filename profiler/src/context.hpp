// Shared state of the profiler's benchmarks on one device (internal header).
#pragma once
#include <algorithm>
#include <cstdint>
#include <ostream>
#include <string>

#include <fmt/format.h>
#include <fmt/ostream.h>

#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/gemm.hpp"
#include "mixserve/gpu/runtime.hpp"
#include "mixserve/gpu/timing.hpp"
#include "mixserve/kernels/fill.cuh"
#include "mixserve/profiler/profiler.hpp"

namespace mixserve::profiler {

inline int select_device(int d) {
  MIXSERVE_CUDA_CHECK(cudaSetDevice(d));
  return d;
}

struct GpuContext {
  explicit GpuContext(int dev)
      : device(select_device(dev)), stream(dev), workspace(gpu::LtGemm::kWorkspaceBytes), flusher(dev) {}
  int device;
  gpu::Stream stream;
  gpu::LtHandle lt;
  gpu::DeviceBuffer workspace;
  gpu::L2Flusher flusher;
};

inline void fill(void* p, int64_t n, DType d, uint64_t seed, float lo, float hi, cudaStream_t s) {
  kernels::FillParams f;
  f.data = p;
  f.num_elements = n;
  f.dtype = d;
  f.seed = seed;
  f.lo = lo;
  f.hi = hi;
  kernels::launch_fill_uniform(f, s);
}

// Timed runs for an op of about `est_us`: long ops get fewer runs, never fewer than min_iters.
inline gpu::TimingOptions timing_for(const ProfileConfig& cfg, double est_us, bool graph) {
  gpu::TimingOptions t = cfg.timing;
  const int want = static_cast<int>(cfg.target_ms_per_point * 1000.0 / std::max(est_us, 1.0));
  t.timed_iters = std::clamp(want, cfg.min_iters, std::max(cfg.min_iters, cfg.timing.timed_iters));
  t.warmup_iters = std::clamp(want / 4, 2, std::max(2, cfg.timing.warmup_iters));
  t.cuda_graph = graph;
  return t;
}

// "[  i/n   ] what" on the progress stream of the new families (attention, expert_gemv).
inline void progress_line(Output& out, const std::string& what, std::size_t i, std::size_t n) {
  fmt::print(out.progress, "[{:>4}/{:<4}] {}\n", i, n, what);
  out.progress.flush();
}

// Rough roofline guess used only to choose iteration counts and for --dry-run.
inline double guess_us(double flops, double bytes, DType d) {
  const double tflops = d == DType::bf16 ? 700.0 : 1200.0;
  return 5.0 + std::max(flops / (tflops * 1e6), bytes / 3.5e6);
}

}  // namespace mixserve::profiler
