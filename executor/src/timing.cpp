#include "mixserve/gpu/timing.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "mixserve/gpu/check.hpp"

namespace mixserve::gpu {

namespace {
double quantile_sorted(const std::vector<double>& s, double q) {
  if (s.empty()) return 0;
  const double pos = q * static_cast<double>(s.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(pos));
  const auto hi = std::min(lo + 1, s.size() - 1);
  const double frac = pos - static_cast<double>(lo);
  return s[lo] + (s[hi] - s[lo]) * frac;
}
}  // namespace

Stats summarize(std::vector<double> samples) {
  Stats st;
  if (samples.empty()) return st;
  std::sort(samples.begin(), samples.end());
  st.count = static_cast<int>(samples.size());
  st.min = samples.front();
  st.max = samples.back();
  st.median = quantile_sorted(samples, 0.5);
  st.p10 = quantile_sorted(samples, 0.1);
  st.p90 = quantile_sorted(samples, 0.9);
  st.mean = std::accumulate(samples.begin(), samples.end(), 0.0) / static_cast<double>(samples.size());
  return st;
}

L2Flusher::L2Flusher(int device) {
  int l2 = 0;
  MIXSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  buf_ = DeviceBuffer(static_cast<std::size_t>(std::max(l2, 1 << 20)) * 2);
}

void L2Flusher::flush(cudaStream_t s) const {
  MIXSERVE_CUDA_CHECK(cudaMemsetAsync(buf_.get(), 0x5a, buf_.bytes(), s));
}

TimingResult time_op(const std::function<void(cudaStream_t)>& op, cudaStream_t stream,
                     const TimingOptions& opt, const L2Flusher* flusher) {
  if (opt.flush_l2 && flusher == nullptr)
    throw RuntimeError("time_op: flush_l2 requested without an L2Flusher");
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (opt.cuda_graph) {
    op(stream);  // first run outside capture: lazy module loading and library setup
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(stream));
    MIXSERVE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    op(stream);
    MIXSERVE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    MIXSERVE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  }
  auto run = [&] {
    if (exec) {
      MIXSERVE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    } else {
      op(stream);
    }
  };
  for (int i = 0; i < opt.warmup_iters; ++i) run();
  const int n = std::max(opt.timed_iters, 1);
  std::vector<Event> start(n), stop(n);
  for (int i = 0; i < n; ++i) {
    if (opt.flush_l2) flusher->flush(stream);
    start[i].record(stream);
    run();
    stop[i].record(stream);
  }
  MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(stream));
  TimingResult r;
  r.samples_us.reserve(n);
  for (int i = 0; i < n; ++i) r.samples_us.push_back(1000.0 * Event::elapsed_ms(start[i], stop[i]));
  if (exec) {
    MIXSERVE_CUDA_CHECK(cudaGraphExecDestroy(exec));
    MIXSERVE_CUDA_CHECK(cudaGraphDestroy(graph));
  }
  r.time_us = summarize(r.samples_us);
  return r;
}

TimingResult time_op_multi(const std::function<void()>& op, const std::vector<cudaStream_t>& streams,
                           const std::vector<int>& devices, int warmup_iters, int timed_iters) {
  if (streams.size() != devices.size() || streams.empty())
    throw RuntimeError("time_op_multi: one stream per device required");
  for (int i = 0; i < warmup_iters; ++i) op();
  const int n = std::max(timed_iters, 1);
  const std::size_t d = streams.size();
  std::vector<std::vector<Event>> start(d), stop(d);
  for (std::size_t j = 0; j < d; ++j) {
    MIXSERVE_CUDA_CHECK(cudaSetDevice(devices[j]));
    start[j].resize(n);
    stop[j].resize(n);
  }
  for (int i = 0; i < n; ++i) {
    for (std::size_t j = 0; j < d; ++j) {
      MIXSERVE_CUDA_CHECK(cudaSetDevice(devices[j]));
      start[j][i].record(streams[j]);
    }
    op();
    for (std::size_t j = 0; j < d; ++j) {
      MIXSERVE_CUDA_CHECK(cudaSetDevice(devices[j]));
      stop[j][i].record(streams[j]);
    }
  }
  TimingResult r;
  r.samples_us.assign(n, 0.0);
  for (std::size_t j = 0; j < d; ++j) {
    MIXSERVE_CUDA_CHECK(cudaSetDevice(devices[j]));
    MIXSERVE_CUDA_CHECK(cudaStreamSynchronize(streams[j]));
    for (int i = 0; i < n; ++i)
      r.samples_us[i] = std::max(r.samples_us[i], 1000.0 * Event::elapsed_ms(start[j][i], stop[j][i]));
  }
  r.time_us = summarize(r.samples_us);
  return r;
}

}  // namespace mixserve::gpu
