// Discrete-event serving simulator (docs/simulator.md).
//
// Engine model, per DP-attention replica, after vLLM's scheduler: continuous batching with
// max_num_seqs and a token budget max_num_batched_tokens per step, chunked prefill, decode-first
// (vLLM V1) or prefill-first order, a KV cache of kv_block_tokens-sized blocks, and preemption by
// recompute (the newest running request is evicted, its blocks freed, and it re-prefills its
// prompt plus the tokens generated so far) when a step cannot get the blocks it needs.
// Replicas of one EP group step together: every step costs cm.step() of all replicas' batches
// (idle replicas run empty batches), so the slowest rank sets the pace. With PP > 1 there are pp
// micro-batch slots (vLLM's virtual engines, each with its own sequences and 1/pp of the KV
// blocks); a micro-batch enters the pipeline stage_time_us after the previous one and completes
// time_us after it entered.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "mixserve/core/workload.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/workload_gen.hpp"

namespace mixserve::sim {

#define MIXSERVE_ROUTERS(X)                                                          \
  X(round_robin, "round-robin")   /* requests to replicas in turn */               \
  X(least_loaded, "least-loaded") /* fewest unfinished requests, lowest index on ties */
enum class RouterKind {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_ROUTERS(MIXSERVE_X)
#undef MIXSERVE_X
};
std::string_view to_string(RouterKind r);
std::optional<RouterKind> parse_router(std::string_view s);
std::vector<std::string> router_names();

// Scheduling order names (RuntimeLimits::decode_first true / false), for the CLI and reports.
inline constexpr const char* kDecodeFirst = "decode-first";
inline constexpr const char* kPrefillFirst = "prefill-first";
inline std::string_view policy_name(bool decode_first) {
  return decode_first ? kDecodeFirst : kPrefillFirst;
}

struct SimProgress {
  double sim_time_s = 0;
  int64_t finished = 0, total = 0;
  int64_t steps = 0;
};

struct ServingConfig {
  int num_replicas = 1;            // attention DP degree (layout.attn_dp)
  int pp = 1;                      // pipeline stages (micro-batches in flight)
  RuntimeLimits limits;            // per replica; limits.kv_blocks * kv_block_tokens = KV capacity
  RouterKind router = RouterKind::round_robin;
  bool record_steps = false;       // keep every step (Chrome trace)
  // SLOs for goodput (0 = not set): a request is good when it meets every SLO that is set.
  double slo_ttft_ms = 0, slo_tpot_ms = 0, slo_e2el_ms = 0;
  std::function<void(const SimProgress&)> progress;  // called about every progress_every steps
  int64_t progress_every = 20000;
  // > 0: stop as soon as this many requests have missed an SLO (the capacity search's verdict
  // is already "not sustained"); the result then holds only the finished requests.
  int64_t stop_after_bad = 0;
  // MoE load per step: true = drawn each step from the cost model's routing model for the
  // step's token count (moe_load.hpp MoeLoadSampler, seeded with moe_load_seed), when the cost
  // model has a load term and EP > 1; false = the cost model's expected maximum every step.
  bool sample_moe_load = true;
  uint64_t moe_load_seed = 0;      // serving_config_for: the workload's seed
};

// Derives the config of a plan's layout: DP replicas, PP, the limits, KV blocks from the cost
// model's memory() when limits.kv_blocks is 0, and the workload's max_num_seqs / max_seq_len
// and SLOs where set. Throws InputError when no KV block fits.
ServingConfig serving_config_for(const StepCostModel& cm, const Layout& layout,
                                 const RuntimeLimits& limits, const WorkloadSpec& w);

struct RequestResult {
  int64_t id = 0;
  int replica = 0;
  double arrival_s = 0;
  double first_token_s = 0;
  double finish_s = 0;
  int64_t input_tokens = 0, output_tokens = 0;
  int preemptions = 0;
  double ttft_ms() const { return (first_token_s - arrival_s) * 1e3; }
  double e2el_ms() const { return (finish_s - arrival_s) * 1e3; }
  // vLLM: (e2el - ttft) / (output - 1), defined for output > 1 (0 otherwise, as for goodput).
  double tpot_ms() const {
    return output_tokens > 1 ? (finish_s - first_token_s) * 1e3 / double(output_tokens - 1) : 0.0;
  }
};

struct StepRecord {
  double start_s = 0, time_us = 0;
  int micro_batch = 0;                 // PP slot
  std::vector<ReplicaBatch> batches;   // per replica
  std::vector<double> moe_max_over_mean;  // the sampled load per MoE layer (empty: expected)
};

struct LatencyStats {                  // milliseconds
  double mean = 0, median = 0, stddev = 0, p90 = 0, p99 = 0;
};
// numpy-style percentiles (linear interpolation between order statistics), as vLLM reports.
LatencyStats latency_stats(std::vector<double> values_ms);
double percentile(std::span<const double> sorted, double q);  // q in [0, 100]

struct ServingMetrics {
  int64_t completed = 0;
  double duration_s = 0;               // first arrival (t = 0) to last completion
  int64_t total_input_tokens = 0, total_output_tokens = 0;
  double request_throughput = 0, output_throughput = 0, total_token_throughput = 0;
  double request_goodput = 0;          // good requests / duration (0 when no SLO is set)
  int64_t good_requests = 0;
  double slo_attainment = 0;           // good / completed (1 when no SLO is set)
  double max_output_tokens_per_s = 0;  // peak over 1-second buckets
  int64_t max_concurrent_requests = 0; // peak of arrived-but-unfinished requests
  LatencyStats ttft, tpot, itl, e2el;
  // Ours.
  int64_t num_steps = 0, num_preemptions = 0;
  int64_t num_empty_replica_steps = 0; // replica-steps run with an empty batch (DP-attention)
  double mean_step_time_ms = 0, mean_tokens_per_step = 0;
  double busy_fraction = 0;            // time with a step in flight / duration
  int64_t kv_blocks_per_replica = 0;
  // Mean over steps and MoE layers of the sampled most-loaded EP rank's rows / mean rows
  // (0 when loads were not sampled).
  double mean_moe_max_over_mean = 0;
};

struct SimResult {
  std::vector<RequestResult> requests;   // by request id
  std::vector<double> itls_ms;           // every inter-token gap of every request
  std::vector<StepRecord> steps;         // when record_steps
  ServingMetrics metrics;
  bool stopped_early = false;            // stop_after_bad was reached
};

// Runs the stream to completion. Throws InputError when a request can never be served (longer
// than the KV cache of a replica, or than the token budget without chunked prefill).
SimResult simulate(const StepCostModel& cm, const ServingConfig& cfg, const RequestStream& stream);

// Metrics of finished requests (also used by simulate); SLOs from cfg.
ServingMetrics compute_metrics(const SimResult& r, const ServingConfig& cfg);

// --- Capacity search (goodput objective) ---------------------------------------------------
struct CapacityOptions {
  double slo_ttft_ms = 0, slo_tpot_ms = 0, slo_e2el_ms = 0;  // at least one > 0
  double attainment = 0.9;     // fraction of requests that must meet every SLO (DistServe)
  // Each trial draws max(num_requests, rate * trial_duration_s) requests (capped at
  // max_requests) from the workload (its lengths and seed): the arrivals must span long enough
  // for an overloaded system to show a growing queue, not just fill its batch slots.
  int num_requests = 200;
  double trial_duration_s = 60;
  int max_requests = 50000;
  double rel_tol = 0.03;       // stop when (hi - lo) / hi < rel_tol
  double start_rate = 1.0;     // req/s; the search doubles / halves from here to bracket
  int max_simulations = 30;
  // Called after every trial (rate, requests, sustained?) -- e.g. a progress line.
  std::function<void(double rate, int requests, bool sustained)> on_trial;
  // Called after every trial with its metrics (a trial that was not sustained may have been
  // stopped early: its metrics then cover the requests finished so far).
  std::function<void(double rate, const ServingMetrics& m, bool sustained)> on_trial_metrics;
};
struct CapacityResult {
  double max_rate = 0;           // req/s the layout sustains within the SLOs (0 = none found)
  double max_rate_per_gpu = 0;
  ServingMetrics at_max;         // metrics of the run at max_rate
  int simulations = 0;
};
// Binary search on the Poisson (or gamma) rate of `w` for the highest rate whose trial meets
// the SLO attainment (a trial stops early once too many requests missed an SLO). Throws
// InputError for closed-loop, burst or trace workloads.
CapacityResult capacity_search(const StepCostModel& cm, const ServingConfig& cfg,
                               const WorkloadSpec& w, const CapacityOptions& opt, int num_gpus);

}  // namespace mixserve::sim
