// Layout search (STYLE.md §3): enumerate every (attn TP x DP, MoE TP x EP, PP, MoE comm) of a
// cluster, filter with named legality predicates, rank by an objective with commented
// tie-breaks, and evaluate the paper's Table II baselines beside the winner.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"
#include "mixserve/core/plan.hpp"
#include "mixserve/core/profile.hpp"
#include "mixserve/core/workload.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/serving.hpp"

namespace mixserve::planner {

// What the search minimises (ttft, itl) or maximises (throughput). One table feeds the enum,
// its name and the CLI choices.
#define MIXSERVE_OBJECTIVES(X)                                      \
  X(ttft, "ttft")             /* mean time to first token, lower */ \
  X(itl, "itl")               /* mean decode step, lower */         \
  X(throughput, "throughput") /* total tokens/s, higher */
enum class Objective {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_OBJECTIVES(MIXSERVE_X)
#undef MIXSERVE_X
};
std::string_view to_string(Objective o);
std::optional<Objective> parse_objective(std::string_view s);
std::vector<std::string> objective_names();

// The goodput objective is not an analytic metric: the analytic ranking (by throughput)
// pre-filters, the serving simulator re-scores the top K with a capacity search (GoodputOptions).
inline constexpr std::string_view kGoodputObjective = "goodput";
// The --objective choices: objective_names() and goodput.
std::vector<std::string> search_objective_names();

// --- Enumeration ----------------------------------------------------------------------------
// Every layout of a world of `world_size` GPUs: powers of two with
// attn_tp * attn_dp == moe_tp * moe_ep == world_size / pp, and the MoE comm algorithms that
// apply to the MoE degrees:
//   tp_allreduce            only when moe_ep == 1;
//   nccl_a2a                whenever moe_ep > 1;
//   rs_a2a_ag and fused     when moe_ep > 1, moe_tp > 1 and attn_tp == moe_tp: the hybrid
//                           schedules shard the hidden dimension over the MoE TP group, which
//                           needs the tokens replicated in that group, i.e. the attention TP
//                           group is the MoE TP group.
// Degrees may exceed GPUs per node (TP across nodes stays legal, as in AIConfigurator; the cost
// model prices the inter-node links).
std::vector<Layout> enumerate_layouts(int world_size);

// Runtime-limit candidates: max_num_seqs = 1, 2, 4, ... up to max_batch (max_batch itself
// included when it is not a power of two) times each max_num_batched_tokens choice.
std::vector<RuntimeLimits> limit_candidates(int max_batch,
                                            const std::vector<int64_t>& batched_tokens,
                                            int64_t max_model_len);

// --- Legality predicates ----------------------------------------------------------------------
struct PredicateInput {
  const ModelSpec& model;
  const ClusterSpec& cluster;
  const Layout& layout;
  const MemoryBreakdown* memory = nullptr;  // only fits_memory reads it
};
using PredicateFn = bool (*)(const PredicateInput&);
struct Predicate {
  std::string_view name;
  std::string_view rule;     // one line, printed beside the rejection count
  PredicateFn fn;
  bool per_candidate;        // false: judged once per layout; true: per (layout, limits)
};
// The one table: heads_divisible, kv_heads, experts_divisible, expert_width_divisible,
// layers_divisible_pp, fits_memory (last; needs the cost model's memory breakdown).
const std::vector<Predicate>& predicates();
// Name of the first structural (per-layout) predicate the layout fails, or nullopt.
// Bytes left for the KV cache at `limits` (negative: over by that much): capacity x
// gpu_memory_utilization - weights - reserved - activations - comm_buffers.
double kv_room(const MemoryBreakdown& mb, const RuntimeLimits& limits);
// Why a breakdown fails fits_memory, naming its parts in GiB and the largest part after the
// weights (e.g. "comm_buffers 40.1 GiB ... the largest after the weights: comm_buffers").
std::string memory_shortfall(const MemoryBreakdown& mb, const RuntimeLimits& limits);

std::optional<std::string_view> first_structural_failure(const ModelSpec& m, const ClusterSpec& c,
                                                         const Layout& l);

// --- Baselines (paper.md §7.5 Table II), generalised to N nodes x G GPUs ------------------------
struct BaselineDef {
  std::string_view name;         // CLI name
  std::string_view description;  // what the paper ran
};
const std::vector<BaselineDef>& baseline_defs();
std::vector<std::string> baseline_names();
// The layout of a named baseline on this cluster, or nullopt when it does not apply (e.g. TP8 on
// fewer than 8 GPUs). Throws InputError for an unknown name.
std::optional<Layout> baseline_layout(std::string_view name, const ClusterSpec& c);

// --- Search -----------------------------------------------------------------------------------
// --- Goodput objective ----------------------------------------------------------------------
// Each of the analytic top `rescore_top` (and every legal baseline) gets the serving simulator's
// capacity search (sim::capacity_search): the highest Poisson / gamma rate of the workload at
// which at least slo_percentile % of the requests meet every SLO set (DistServe's SLO
// attainment; it implies that the slo_percentile-th percentile of TTFT and of TPOT are each
// within their SLO), reported per GPU as Vidur-Search's QPS per dollar. The re-scored
// candidates are re-ranked by max_rate_per_gpu (ties: the analytic order).
struct GoodputOptions {
  double slo_ttft_ms = 0, slo_tpot_ms = 0;  // at least one > 0
  double slo_percentile = 90;               // in (0, 100]
  int rescore_top = 20;
  double trial_duration_s = 60;             // sim::CapacityOptions::trial_duration_s
  int min_requests = 200;                   // sim::CapacityOptions::num_requests
  // > 0: keep a latency-throughput curve of at least this many rates per re-scored candidate
  // (GoodputScore::curve): the capacity search's sustained trials, plus runs at i/curve_points
  // of the max rate where no trial came within 10% of that rate.
  int curve_points = 0;
  // Called with one line per finished candidate (progress display); never required.
  std::function<void(const std::string&)> progress;
};

// One point of a candidate's latency-throughput curve.
struct CurveSample {
  double rate = 0;            // offered req/s
  sim::ServingMetrics metrics;
};

struct GoodputScore {
  double max_rate_req_s = 0;       // 0: no rate tried met the SLOs
  double max_rate_per_gpu = 0;
  sim::ServingMetrics at_max;      // the simulation at max_rate_req_s
  int simulations = 0;
  double start_rate = 0;           // where the capacity search started (analytic estimate)
  std::vector<CurveSample> curve;  // >= curve_points rates, ascending
};

// The predicted metrics of a simulation at `rate` req/s (means, whole cluster): what the plan
// file records for a candidate ranked by goodput.
PredictedMetrics metrics_from_simulation(const sim::ServingMetrics& m, double rate);

struct SearchOptions {
  Objective objective = Objective::throughput;
  std::string cost_model = "mixserve";
  sim::RoutingModel routing;
  int max_batch = 256;                                   // max_num_seqs ceiling per DP replica
  std::vector<int64_t> batched_tokens = {1024, 2048, 4096, 8192, 16384, 32768};
  int64_t max_model_len = 0;                             // 0 = model max
  int top = 10;                                          // candidates that get a breakdown
  std::vector<std::string> baselines;                    // empty = all of Table II
  std::optional<Layout> only_layout;                     // --layout: evaluate just this one
  // Set: the goodput objective (objective is then the analytic pre-filter, throughput).
  std::optional<GoodputOptions> goodput;
};

struct SearchInputs {
  ModelSpec model;
  ClusterSpec cluster;
  HardwareProfile profile;
  WorkloadSpec workload;
  std::string cluster_origin;  // file or name the cluster came from, for error messages
};

struct PredicateCount {
  std::string name;
  std::string rule;
  int64_t rejected = 0;
  int64_t checked = 0;
  bool per_candidate = false;
};

struct BaselineResult {
  std::string name;
  std::string description;
  std::optional<Layout> layout;            // nullopt: not applicable to this cluster
  std::optional<PlanCandidate> candidate;  // nullopt: not applicable or illegal
  std::string rejected_by;                 // predicate name or "not applicable"
  std::optional<GoodputScore> goodput;     // goodput objective, legal baselines
};

struct SearchResult {
  std::vector<PlanCandidate> ranked;       // best limits per legal layout, best first
  std::vector<BaselineResult> baselines;
  std::vector<PredicateCount> rejections;  // one per predicate, table order
  int64_t layouts = 0;                     // enumerated
  int64_t evaluations = 0;                 // (layout, limits) pairs costed
  // Goodput objective: one score per re-scored candidate, ranked[i] <-> goodput[i] (the first
  // goodput.size() entries of ranked, re-ranked by max_rate_per_gpu; their metrics are the
  // simulation's at that rate).
  std::vector<GoodputScore> goodput;
  double goodput_wall_s = 0;
};

// The capacity search of one candidate (what search() runs for the goodput objective).
GoodputScore score_goodput(const SearchInputs& in, const SearchOptions& opt,
                           const PlanCandidate& cand, const GoodputOptions& g);

// Full search. Throws InputError naming the cluster when no layout fits.
SearchResult search(const SearchInputs& in, const SearchOptions& opt);

// One layout at its best limits for the objective (used for baselines and --explain), with
// the per-op breakdown. nullopt plus the failing predicate's name when illegal.
std::optional<PlanCandidate> evaluate_layout(const SearchInputs& in, const SearchOptions& opt,
                                             const Layout& l, std::string* rejected_by = nullptr);

// The plan file of a search: the winner, its rank map, the shown alternatives and the baselines.
Plan make_plan(const SearchInputs& in, const SearchOptions& opt, const SearchResult& r,
               Provenance provenance);

// Parses Layout::name() ("attn TP8xDP2 | moe TP8xEP2 | PP1 | fused"); nullopt if malformed.
std::optional<Layout> parse_layout_name(std::string_view s);

// Ratios of the chosen plan against a baseline: TTFT and ITL as baseline / chosen (> 1 means
// the chosen plan is faster), throughput (at the workload's rate) and capacity (saturated) as
// chosen / baseline - 1 in percent.
struct Ratios {
  double ttft_x = 0, itl_x = 0, throughput_gain_pct = 0, capacity_gain_pct = 0;
};
Ratios ratios(const PredictedMetrics& chosen, const PredictedMetrics& baseline);

// True when a is better than b for the objective, with the tie-breaks applied.
bool better(const PlanCandidate& a, const PlanCandidate& b, Objective o, const ClusterSpec& c);

// GPUs that belong to a TP or EP group spanning more than one node (first tie-break).
int cross_node_gpus(const Layout& l, const ClusterSpec& c);

// Bytes per GPU that do not depend on the KV budget (second tie-break).
double fixed_memory_bytes(const MemoryBreakdown& m);

}  // namespace mixserve::planner
