// The one timing helper (STYLE.md §16): warm-up, CUDA events around every timed run, the median of
// many runs with the spread reported as noise, a cold L2 (a flush before every timed run, outside
// the events) and optional CUDA-graph capture of the op (launch gaps removed).
#pragma once
#include <functional>
#include <vector>

#include <cuda_runtime_api.h>

#include "mixserve/gpu/runtime.hpp"

namespace mixserve::gpu {

struct TimingOptions {
  int warmup_iters = 10;    // untimed runs first (module load, cuBLAS heuristics, clocks up)
  int timed_iters = 50;     // each timed separately with its own event pair
  bool flush_l2 = true;     // overwrite a buffer of 2x the L2 before each timed run
  bool cuda_graph = false;  // capture the op once and replay the graph
};

struct Stats {
  int count = 0;
  double median = 0, min = 0, max = 0, p10 = 0, p90 = 0, mean = 0;
  // Relative spread (p90 - p10) / median: the noise the profile records.
  double noise() const { return median > 0 ? (p90 - p10) / median : 0; }
};
// Order statistics of samples (linear interpolation between ranks). Empty input gives zeros.
Stats summarize(std::vector<double> samples);

struct TimingResult {
  Stats time_us;
  std::vector<double> samples_us;
};

// Overwrites 2x the device's L2 so the next op starts cold.
class L2Flusher {
 public:
  explicit L2Flusher(int device);
  void flush(cudaStream_t s) const;

 private:
  DeviceBuffer buf_;
};

// Times `op` (which enqueues its work on the stream it is given, and must be capturable when
// cuda_graph is set). `flusher` may be null when flush_l2 is false.
TimingResult time_op(const std::function<void(cudaStream_t)>& op, cudaStream_t stream,
                     const TimingOptions& opt, const L2Flusher* flusher);

// Times `op` that enqueues work on several devices' streams (one process driving several GPUs,
// e.g. an NCCL group): each timed run records an event pair on every stream and its time is the
// largest of them. No L2 flush and no graph capture (collectives: nccl-tests' convention).
TimingResult time_op_multi(const std::function<void()>& op, const std::vector<cudaStream_t>& streams,
                           const std::vector<int>& devices, int warmup_iters, int timed_iters);

}  // namespace mixserve::gpu
