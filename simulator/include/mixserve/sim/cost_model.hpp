// Step-cost model: how long one forward step of a layout takes for a given batch composition.
// The planner calls it for uniform analytic batches; the serving simulator for the exact
// batches its scheduler forms. Two implementations behind one interface (STYLE.md §4):
//   "mixserve" — per-op costs from the hardware profile (tables, roofline, alpha-beta), fused
//                schedules costed round by round, MoE load at the most loaded rank;
//   "paper"    — the MixServe paper's Eqs. 4-11, for comparison.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/plan.hpp"
#include "mixserve/core/profile.hpp"
#include "mixserve/core/workload.hpp"
#include "mixserve/sim/op_timer.hpp"

namespace mixserve::sim {

// What one DP-attention replica runs in one step (vLLM-style mixed batch).
struct ReplicaBatch {
  int64_t prefill_tokens = 0;      // new tokens of prefill chunks this step
  int num_prefill_seqs = 0;
  double prefill_attn_pairs = 0;   // sum over chunks of chunk_len * (context_before + (chunk_len+1)/2):
                                   // (query, key) pairs of causal attention for the chunks
  int num_decode = 0;              // decode sequences (one new token each)
  int64_t decode_context = 0;      // sum of context lengths the decodes attend to
  int64_t tokens() const { return prefill_tokens + num_decode; }
  bool empty() const { return tokens() == 0; }
};

// Routing load model for the MoE block.
struct RoutingModel {
  std::string kind = "uniform";    // "uniform" | "zipf" (power-law skew) | "histogram"
  double skew = 0;                 // zipf exponent (0 = uniform)
  std::vector<double> expert_share;// histogram: fraction of routed tokens per expert (sums to 1)
  // histogram: the file's rows (one per layer), each normalised to sum to 1; expert_share is
  // their pooled total. The per-step load sampler (moe_load.hpp) draws layer l from row l.
  std::vector<std::vector<double>> layer_expert_share;
};

// A sampled MoE load for one step (moe_load.hpp MoeLoadSampler): the most loaded EP rank's
// routed rows divided by the mean rows per rank (>= 1), one value per MoE layer in model order,
// or a single value for every MoE layer. Empty: the model's expected maximum.
struct MoeStepLoad {
  std::vector<double> max_over_mean;
};

// What a per-step load sampler needs to know about a model and layout (num_experts 0: the
// cost model has no load term, so nothing to sample).
struct MoeLoadShape {
  int num_experts = 0, top_k = 0, ep = 1;
  int num_moe_layers = 0;
  std::vector<int> moe_layer_ids;  // model layer index of each MoE layer
  RoutingModel routing;
};

struct StepCost {
  double time_us = 0;              // wall time of the step (all PP stages of one micro-batch)
  double stage_time_us = 0;        // slowest pipeline stage
  std::vector<OpCost> ops;         // filled when breakdown requested
  // Kernel launches the executor makes for this step ("mixserve" model; 0 for "paper"): its own
  // kernels and one per cuBLASLt GEMM, NCCL collectives not counted. launches: the whole step
  // (all PP stages of one micro-batch, embedding and LM head included); moe_layer_launches /
  // dense_layer_launches: one MoE / dense decoder layer with full attention (its closing residual
  // add counted as the executor runs it: fused into the next norm under the decode kernels, the
  // stage's last layer's add then counted once per stage in `launches`).
  double launches = 0;
  double moe_layer_launches = 0;
  double dense_layer_launches = 0;
};

struct CostModelOptions {
  RoutingModel routing;
  // The executor's GpuModelConfig::decode_kernels (core/decode_path.hpp): taken only for an
  // unsharded layout (world size 1), like the executor.
  bool decode_kernels = true;
  // The executor's device greedy sampling (StepOptions::greedy): one argmax launch over the
  // logits rows after the LM head. false: not counted (the logits are copied back instead).
  bool device_greedy = false;
  // The executor's CUDA graphs of decode-only steps (core/decode_path.hpp decode_step_graphed):
  // such a step's launches each cost the profile's graph_launch.saving_us() less than their table
  // points (timed alone). false: every step as the tables time it (--no-cuda-graph).
  bool decode_graphs = true;
  // The executor's fused batch-1 decode layer (GpuModelConfig::fused_decode_layer, `mixserve-run
  // bench --fused-decode-layer`): a step of one sequence and one token on an unsharded model with
  // the decode kernels runs each MoE layer as one launch, costed from the profile's
  // fused_decode_layer points of the model's layer shape (fused_layer_time). Without a point of
  // that shape, or for a model whose layers the executor does not fuse, the unfused kernels.
  bool fused_decode_layer = false;
  bool want_breakdown = false;
};

// The model's layer as the profile's fused_decode_layer points key it (context and time 0).
FusedLayerPoint fused_layer_shape(const ModelSpec& m);
// Whether the executor runs this model's MoE layers as the fused batch-1 layer when asked
// (model_forward.cpp fused_layer_params and decode_layer.cu's checks of the widths): GQA / MHA
// attention without q/k/v or o bias, q/k norms per head or none, no sliding window, MoE layers
// with softmax top-k routing (top_k <= 8, <= 256 experts) and no shared expert, head_dim 64 or 128,
// hidden and expert widths multiples of 8. The shared-memory fit is checked on the device.
bool fused_layer_model_ok(const ModelSpec& m);
// One fused layer's time at `context` tokens from the profile's points of `shape`: linear in the
// context between the two points around it (interpolated; measured at a point's own context),
// along the last two points beyond the largest context (extrapolated, never decreasing), the
// smallest context's time below it (extrapolated). nullopt: no point of this shape.
std::optional<OpTime> fused_layer_time(const HardwareProfile& p, const FusedLayerPoint& shape, double context);
// Whether the "mixserve" model made with these arguments costs the MoE layers of 1-sequence decode
// steps as the fused layer: the option set, the decode kernels on an unsharded layout, a model the
// executor fuses, and a point of its layer shape in the profile.
bool fused_layer_costed(const ModelSpec& m, const Layout& l, const HardwareProfile& p, const CostModelOptions& opt);

class StepCostModel {
 public:
  virtual ~StepCostModel() = default;
  virtual std::string name() const = 0;
  // per_replica.size() == layout.attn_dp; replicas step together through MoE layers.
  virtual StepCost step(std::span<const ReplicaBatch> per_replica, bool breakdown) const = 0;
  // The same step with a sampled MoE load: models with a load-imbalance term ("mixserve") cost
  // the given most loaded EP rank per layer instead of the expected one; the others ("paper")
  // ignore it. load.max_over_mean must be empty, of size 1, or of num_moe_layers.
  StepCost step(std::span<const ReplicaBatch> per_replica, bool breakdown,
                const MoeStepLoad& load) const {
    return step_with_load(per_replica, breakdown, load);
  }
  // What to sample for this model and layout; num_experts 0 when the model ignores the load.
  virtual MoeLoadShape moe_load_shape() const { return {}; }
  // Memory per GPU for these limits; fills kv_tokens / kv_blocks capacity.
  virtual MemoryBreakdown memory(const RuntimeLimits& limits) const = 0;

 protected:
  virtual StepCost step_with_load(std::span<const ReplicaBatch> per_replica, bool breakdown,
                                  const MoeStepLoad&) const {
    return step(per_replica, breakdown);
  }
};

// name: "mixserve" | "paper". Throws InputError on an unknown name.
std::unique_ptr<StepCostModel> make_cost_model(const std::string& name, const ModelSpec& m,
                                               const ClusterSpec& c, const HardwareProfile& p,
                                               const Layout& l, const CostModelOptions& opt);

// Analytic serving metrics for a steady batch (no simulation): TTFT of a prefill of mean input
// length (plus queueing at the workload's rate if finite), ITL of a decode step at the batch
// limit with mean context, throughput of the saturated batch. Used to rank layouts.
PredictedMetrics analytic_metrics(const StepCostModel& cm, const Layout& l,
                                  const WorkloadSpec& w, const RuntimeLimits& limits,
                                  std::vector<OpCost>* breakdown = nullptr);

}  // namespace mixserve::sim
