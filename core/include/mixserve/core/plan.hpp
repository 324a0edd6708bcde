// The plan file: what mixserve-plan writes and mixserve-run replays (DESIGN.md "Files").
#pragma once
#include <string>
#include <vector>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/profile.hpp"
#include "mixserve/core/workload.hpp"

namespace mixserve {

// One predicted or measured op: the same names in the simulator and in the executor's results.
struct OpCost {
  std::string op;        // "attn.qkv_proj", "attn.core", "attn.allreduce", "moe.router",
                         // "moe.dispatch", "moe.experts", "moe.combine", "moe.shared", "lm_head"...
  std::string phase;     // "prefill" | "decode"
  double time_us = 0;    // per step, summed over layers of the whole model (critical path)
  CostSource source = CostSource::roofline;
};

struct MemoryBreakdown {   // bytes per GPU (the most loaded GPU)
  double weights = 0;
  double kv_cache = 0;     // what remains for KV after everything else, at gpu_memory_utilization
  double activations = 0;
  double comm_buffers = 0;
  double reserved = 0;     // CUDA context, cuBLAS workspace, NCCL
  double capacity = 0;
  int64_t kv_tokens = 0;   // tokens of KV cache per DP replica
  bool fits = false;
};

struct PredictedMetrics {
  double ttft_ms = 0;          // mean
  double itl_ms = 0;           // mean decode step
  double tpot_ms = 0;
  double throughput_tok_s = 0; // total (input + output) tokens/s, whole cluster
  double capacity_tok_s = 0;   // total tokens/s the layout serves when saturated (analytic;
                               // throughput_tok_s is this capped at the offered load); 0 = unknown
  double output_tok_s = 0;
  double request_rate = 0;     // req/s the layout was evaluated at (0 = saturated batch)
};

struct PlanCandidate {
  Layout layout;
  RuntimeLimits limits;
  PredictedMetrics metrics;
  MemoryBreakdown memory;
  std::vector<OpCost> breakdown;   // prefill and decode ops
  std::string label;               // "chosen", "baseline: vLLM TP+PP", ...
  int rank = 0;                    // 1-based position in the ranking (0 = unranked baseline)
};

struct Plan {
  int version = 1;
  Provenance provenance;
  ModelSpec model;                 // embedded so the plan is self-contained
  ClusterSpec cluster;
  WorkloadSpec workload;
  std::string profile_name;
  std::string profile_source;      // "datasheet" | "measured"
  std::string cost_model;          // "mixserve" | "paper"
  std::string objective;           // "ttft" | "itl" | "throughput" | "goodput"
  PlanCandidate chosen;
  std::vector<RankInfo> rank_map;
  std::vector<PlanCandidate> alternatives;  // ranked, then named baselines
};

}  // namespace mixserve
