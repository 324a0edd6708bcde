// Hardware profile: measured (mixserve-profile) or datasheet-derived operator costs.
// The simulator interpolates these tables in log space and falls back to a roofline / alpha-beta
// model outside them, saying which it used (CostSource).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "mixserve/core/types.hpp"

namespace mixserve {

// How a cost was obtained. Every predicted op carries one, and plans report them.
#define MIXSERVE_COST_SOURCES(X)                                                          \
  X(measured, "measured")         /* a profile point at this exact shape */               \
  X(interpolated, "interpolated") /* between measured points */                           \
  X(extrapolated, "extrapolated") /* scaled from the nearest measured point */           \
  X(roofline, "roofline")         /* compute/memory ceilings of the profile */            \
  X(alpha_beta, "alpha-beta")     /* link latency + bytes / bandwidth */                  \
  X(datasheet, "datasheet")       /* roofline whose ceilings are datasheet numbers */
enum class CostSource {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_COST_SOURCES(MIXSERVE_X)
#undef MIXSERVE_X
};
std::string_view to_string(CostSource s);

#define MIXSERVE_COLL_OPS(X)                              \
  X(all_reduce, "all_reduce")                             \
  X(reduce_scatter, "reduce_scatter")                     \
  X(all_gather, "all_gather")                             \
  X(all_to_all, "all_to_all")                             \
  X(send_recv, "send_recv")                               \
  X(fused_ag_dispatch, "fused_ag_dispatch")               \
  X(fused_rs_combine, "fused_rs_combine")
enum class CollOp {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_COLL_OPS(MIXSERVE_X)
#undef MIXSERVE_X
};
std::string_view to_string(CollOp op);

struct GemmPoint {          // C[m,n] = A[m,k] * B[k,n]
  int64_t m = 0, n = 0, k = 0;
  DType dtype = DType::bf16;
  double time_us = 0;
};

// The executor's bandwidth GEMV (decode steps, core/decode_path.hpp) at one shape: out[m, n] =
// act[m, k] * W[k, n], timed inside a CUDA graph as a decode step runs it (mixserve-profile gemv).
// impl: "gemv" (bf16 out), "gemv_swiglu" (SwiGLU applied to its [m, 2k] input), "gemv_fp32"
// (fp32 out, the router logits).
struct GemvPoint {
  std::string impl = "gemv";
  int64_t m = 0, n = 0, k = 0;
  DType dtype = DType::bf16;
  double time_us = 0;
};

struct ExpertGemmPoint {    // one grouped expert GEMM over all local experts
  int num_experts = 0;      // local experts (groups)
  int64_t tokens = 0;       // total routed rows over all groups
  int64_t max_tokens = 0;   // rows of the most loaded expert
  int active_experts = 0;   // experts with at least one row
  int64_t n = 0, k = 0;     // per-expert weight [k, n]
  DType dtype = DType::bf16;
  std::string distribution; // "uniform", "zipf:1.2", "one-hot", ...
  double time_us = 0;
};

struct ElementwisePoint {   // achieved bandwidth of a read+write kernel
  double bytes = 0;         // bytes read + written
  double time_us = 0;
};

struct AttentionPoint {
  std::string kind;         // "prefill" | "decode"
  std::string impl;         // "gqa" | "mla"
  int batch = 0;            // sequences
  int64_t q_len = 0;        // query tokens per sequence (1 for decode)
  int64_t kv_len = 0;       // context per sequence
  int num_heads = 0, num_kv_heads = 0, head_dim = 0;
  double time_us = 0;
};

struct CollectivePoint {
  CollOp op = CollOp::all_reduce;
  int group_size = 0;       // ranks in the collective
  int nodes = 1;            // nodes it spans (1 = intra-node); emulated structures say so in `group`
  std::string group;        // "1x8", "2x4", "rail:2x4", ...
  double bytes = 0;         // nccl-tests convention: per-rank buffer size
  double time_us = 0;
};

// Host time per engine step outside the GPU's busy time (scheduler, metadata upload, launches or
// graph capture, waiting for and copying back the sampled ids, bookkeeping): the median of
// (host cycle - CUDA-event GPU time) over the steps of an online run of the executor
// (mixserve-run bench --workload W --host-overhead-to PROFILE, online.hpp HostPhases). The cost
// model adds step_us once per step. Absent (step_us 0): not added.
struct HostOverhead {
  double step_us = 0;
  int64_t steps = 0;           // steps the median is over
  std::string measured_with;   // the command, device and date
};

// Kernels back to back inside a CUDA graph (a decode step's graph: programmatic dependent launch,
// no events between them) cost less each than one kernel timed alone, as every table point is:
// the launch and the ramp of the next kernel overlap the tail of the previous one. Measured by
// mixserve-profile gemv: a minimal kernel (an RMSNorm of one 2048-wide row) alone as a graph of one
// launch (as the GEMV and expert GEMV points are timed) and eagerly (as the elementwise points
// are), and per kernel in a graph of `chain_kernels` back-to-back launches; saving_us() = the
// smaller alone time less the chained one, taken off each launch of a step the executor runs as a
// graph (core/decode_path.hpp decode_step_graphed) by the cost model. Absent (chain_kernels 0): no
// saving. Also recorded, not used: a 16 MiB GEMV alone and norm+GEMV pairs back to back
// (mixed_chain_us per kernel); the GEMV streams its weights before it waits on the previous
// kernel, so pairs save more per launch than a kernel whose inputs all depend on its predecessor
// (router, permute, expert GEMV, attention) can (docs/fidelity.md).
struct GraphLaunch {
  double alone_graph_us = 0, alone_eager_us = 0, chain_us = 0;
  int chain_kernels = 0;
  double alone_gemv_us = 0, mixed_chain_us = 0;  // 0: not measured (older profiles)
  std::string measured_with;  // the command, device and date
  // Per launch made WITHOUT programmatic dependent launch inside a graphed decode step, what it
  // costs more than a launch with it (so saves that much less): measured on the executor's real
  // decode chain, the same graphed step with and without PDL over its PDL launches. 0: not
  // measured (every launch gets saving_us()). no_pdl_measured_with: the command, device and date.
  double no_pdl_extra_us = 0;
  std::string no_pdl_measured_with;
  double saving_no_pdl_us() const {
    const double s = saving_us() - no_pdl_extra_us;
    return s > 0 ? s : 0;
  }
  double saving_us() const {
    if (chain_kernels <= 0) return 0;
    const double alone = alone_graph_us < alone_eager_us ? alone_graph_us : alone_eager_us;
    return alone > chain_us ? alone - chain_us : 0;
  }
  double mixed_saving_us() const {  // informational (see above)
    const double alone = alone_graph_us < alone_eager_us ? alone_graph_us : alone_eager_us;
    const double s = (alone + alone_gemv_us) / 2 - mixed_chain_us;
    return (alone_gemv_us > 0 && mixed_chain_us > 0 && s > 0) ? s : 0;
  }
};

// The fused batch-1 decode layer (executor gpu/decode_layer.hpp, `mixserve-run bench
// --fused-decode-layer`): one layer's time at one context length for one layer shape, measured by
// `mixserve-profile fused-layer` as the difference of two graphed decode steps of the same model
// with L1 and L2 layers divided by L2 - L1 (the step's embedding, final norm and LM head cancel).
// The fused layer runs on every SM, so its time is a measured whole, not a sum of table ops.
struct FusedLayerPoint {
  int64_t hidden = 0, q_heads = 0, kv_heads = 0, head_dim = 0;
  int64_t inter = 0, experts = 0, top_k = 0;  // routed experts' width, count, experts per token
  int64_t context = 0;                        // tokens the decode step attends to
  double time_us = 0;                         // per layer
  bool same_shape(const FusedLayerPoint& o) const {
    return hidden == o.hidden && q_heads == o.q_heads && kv_heads == o.kv_heads && head_dim == o.head_dim &&
           inter == o.inter && experts == o.experts && top_k == o.top_k;
  }
};
struct FusedLayerTable {
  std::vector<FusedLayerPoint> points;
  std::string measured_with;  // the command, device and date
};

struct HardwareProfile {
  int version = 1;
  std::string name;                  // "h200-datasheet", "h200"
  std::string gpu;                   // "H200"
  std::string source = "datasheet";  // "datasheet" | "measured"
  int sm_count = 0;
  double memory_GiB = 0;
  // Roofline ceilings (measured peaks when source == measured).
  double peak_tflops_bf16 = 0;
  double peak_tflops_fp8 = 0;
  double peak_tflops_fp32 = 0;
  double mem_bw_GBps = 0;
  // Datasheet fudge, stated: achievable fraction of each ceiling (1.0 for measured peaks).
  double gemm_efficiency = 1.0;
  double mem_efficiency = 1.0;
  double kernel_launch_us = 0;       // fixed cost per kernel (launch + tail)
  std::vector<GemmPoint> gemm;
  std::vector<ExpertGemmPoint> experts;
  std::vector<GemvPoint> gemv;       // tables.gemv, written only when non-empty
  std::vector<ElementwisePoint> elementwise;
  std::vector<AttentionPoint> attention;
  std::vector<CollectivePoint> collectives;
  HostOverhead host_overhead;        // host_overhead {step_us, steps, measured_with}; optional
  GraphLaunch graph_launch;          // graph_launch {alone_graph_us, ...}; optional
  FusedLayerTable fused_decode_layer;  // fused_decode_layer {points, measured_with}; optional
  std::map<std::string, std::string> versions;  // driver, cuda, cublas, nccl
  std::string measured_on;           // host / date
  std::string notes;                 // e.g. "collectives are alpha-beta until measured"
  Provenance provenance;

  bool is_datasheet() const { return source == "datasheet"; }
};

}  // namespace mixserve
