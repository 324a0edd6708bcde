// Expected MoE token loads under a routing model. Shared by the cost model (which costs them)
// and by the communication-schedule tests (which check the exact schedules against them).
#pragma once
#include <cstdint>
#include <vector>

#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/workload_gen.hpp"

namespace mixserve::sim {

// Expected number of distinct tokens, out of `tokens` on one source, that have at least one of
// their top_k experts among a destination group owning `experts_per_group` of `num_experts`
// experts, under uniform routing (k distinct experts drawn without replacement):
//   tokens * (1 - C(E - g, k) / C(E, k)).
// This is what crosses the network once per (token, destination node) in the fused dispatch.
double expected_rows_to_group(double tokens, int num_experts, int top_k, int experts_per_group);

// Routed rows (token, expert pairs) per EP rank: the mean, and the expected maximum over the
// `ep` ranks for `total_tokens` tokens routed with `routing` (the layer waits for the maximum).
struct EpLoad {
  double mean_rows = 0;
  double max_rows = 0;
  double max_over_mean() const { return mean_rows > 0 ? max_rows / mean_rows : 1.0; }
};
EpLoad expected_ep_load(double total_tokens, int num_experts, int top_k, int ep,
                        const RoutingModel& routing);

// Fraction of routed rows that goes to each expert (by expert id) under `routing`; sums to 1.
// uniform: 1/E. zipf: share of popularity rank j proportional to (j+1)^-skew, the popularity
// ranks placed on expert ids by a fixed pseudo-random permutation (hot experts are not
// contiguous in id, so EP ranks get a realistic, deterministic mix). histogram: normalised.
// Throws InputError when the routing model does not fit the expert count.
std::vector<double> expert_shares(int num_experts, const RoutingModel& routing);

// E[max of n independent standard normals] (0 for n = 1), by numerical integration.
double expected_max_std_normal(int n);

// Expected number of experts, out of `local_experts`, that receive at least one of `tokens`
// tokens under uniform top-k routing: local * (1 - (1 - k/E)^tokens).
double expected_active_experts(double tokens, int num_experts, int top_k, int local_experts);

// Per-step MoE load sampler (the serving simulator draws one load per step). For `tokens`
// tokens, each routed to top_k experts, it draws the rows every EP rank receives in every MoE
// layer and returns the most loaded rank's rows over the mean rows per rank, per MoE layer.
// Routing models, as expected_ep_load:
//   uniform: every token picks k distinct experts uniformly (rank counts multivariate
//            hypergeometric per token);
//   zipf / histogram: the tokens * k rows are independent draws from the expert shares
//            (multinomial; k-distinctness is not enforced, as in expected_ep_load). A histogram
//            with per-layer rows draws MoE layer i from row i when the file has one row per MoE
//            layer, from row moe_layer_ids[i] when it has one row per model layer, else from
//            row i mod rows.
// Method: below kExactMeanRows mean rows per rank, exact (token by token: k distinct experts
// by a partial Fisher-Yates shuffle; rows by inverse CDF over the ranks); above, a normal
// approximation with the multinomial's exact covariance: Y_r = sqrt(N q_r) Z_r,
// X_r = N q_r + sqrt(f) (Y_r - q_r sum_s Y_s), N = tokens * k, q_r the rank's share,
// f = (E - k)/(E - 1) for uniform (the hypergeometric correction), 1 otherwise. The ranks'
// counts then sum to N exactly, with Var X_r = f N q_r (1 - q_r). The maximum is clamped to
// [mean, tokens * min(k, E/ep)]. tests/sim checks the sampled mean maximum against exact
// Monte Carlo. Deterministic for a seed.
class MoeLoadSampler {
 public:
  static constexpr double kExactMeanRows = 16;
  // Throws InputError when the shape or routing does not fit (top_k, ep, shares).
  MoeLoadSampler(const MoeLoadShape& shape, uint64_t seed);
  // out.max_over_mean gets num_moe_layers values (all 1 when ep == 1 or tokens == 0).
  void sample(int64_t tokens, MoeStepLoad& out);
  // The exact token-level draw at any size (tests; sample() uses it for small counts).
  void sample_exact(int64_t tokens, MoeStepLoad& out);
  // The normal approximation at any size (tests).
  void sample_normal(int64_t tokens, MoeStepLoad& out);
  int num_moe_layers() const { return shape_.num_moe_layers; }

 private:
  double clamp_ratio(double max_rows, double tokens) const;
  MoeLoadShape shape_;
  bool uniform_ = true;
  std::vector<std::vector<double>> rank_share_;  // per share row: EP rank shares
  std::vector<std::vector<double>> rank_cdf_;    // per share row: cumulative rank shares
  std::vector<int> row_of_layer_;                // MoE layer -> share row
  std::vector<int> perm_;                        // experts, for the partial Fisher-Yates
  std::vector<double> counts_, y_;
  Rng rng_;
};

}  // namespace mixserve::sim
