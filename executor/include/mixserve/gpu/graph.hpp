// CUDA graphs of decode steps, shared by the offline and online benchmarks (bench.cpp, online.cpp).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/gpu/check.hpp"
#include "mixserve/gpu/model_forward.hpp"

namespace mixserve::gpu {

// Whether the benchmarks run a decode step of `tokens` sequences as a CUDA graph: the model has no
// MoE layer, or its expert path has no host sync (device GEMV, grouped GEMM) and, when automatic,
// picks the device GEMV for the step (the case measured with graphs, docs/forward.md).
inline bool decode_step_graphable(const ModelSpec& m, const GpuModelConfig& gc, int64_t tokens) {
  if (m.num_moe_layers() == 0) return true;
  switch (gc.expert_path) {
    case ExpertPath::cublaslt: return false;  // host copy of the counts + sync per MoE layer
    case ExpertPath::device_gemv:
    case ExpertPath::grouped_gemm: return true;
    case ExpertPath::automatic: break;
  }
  // The rule the cost model reads (core/decode_path.hpp); this process's model is unsharded here.
  return decode_step_graphed(true, false, true, tokens, m.moe.top_k, gc.device_gemv_max_rows);
}

// One executable graph, re-captured per step: capture() records `enqueue` on `s` and updates the
// executable graph in place when the topology is unchanged (cudaGraphExecUpdate), else instantiates
// it again. Kernel arguments (token counts, buffer pointers) come from the capture, so a step
// must be captured after its prepare(). The first capture of a shape should follow an eager run of
// it (cuBLASLt plans are made outside the capture).
class StepGraph {
 public:
  StepGraph() = default;
  ~StepGraph() {
    if (exec_) cudaGraphExecDestroy(exec_);
  }
  StepGraph(const StepGraph&) = delete;
  StepGraph& operator=(const StepGraph&) = delete;

  template <class F>
  void capture(cudaStream_t s, F&& enqueue) {
    cudaGraph_t g = nullptr;
    MIXSERVE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    enqueue(s);
    MIXSERVE_CUDA_CHECK(cudaStreamEndCapture(s, &g));
    bool updated = false;
    if (exec_) {
      cudaGraphExecUpdateResultInfo info{};
      updated = cudaGraphExecUpdate(exec_, g, &info) == cudaSuccess;
      if (!updated) {
        (void)cudaGetLastError();  // clear the failed update's error
        MIXSERVE_CUDA_CHECK(cudaGraphExecDestroy(exec_));
        exec_ = nullptr;
      }
    }
    if (!updated) MIXSERVE_CUDA_CHECK(cudaGraphInstantiate(&exec_, g, 0));
    MIXSERVE_CUDA_CHECK(cudaGraphDestroy(g));
  }
  bool ready() const { return exec_ != nullptr; }
  void launch(cudaStream_t s) const { MIXSERVE_CUDA_CHECK(cudaGraphLaunch(exec_, s)); }

 private:
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace mixserve::gpu
