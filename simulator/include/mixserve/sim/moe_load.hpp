// Expected MoE token loads under a routing model. Shared by the cost model (which costs them)
// and by the communication-schedule tests (which check the exact schedules against them).
#pragma once
#include "mixserve/sim/cost_model.hpp"

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

}  // namespace mixserve::sim
