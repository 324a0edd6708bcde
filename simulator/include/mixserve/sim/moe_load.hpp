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

}  // namespace mixserve::sim
