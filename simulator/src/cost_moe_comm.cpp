// Fused MoE communication volumes and two-stream recurrences (cost_moe_comm.hpp).
#include "mixserve/sim/cost_moe_comm.hpp"

#include <algorithm>
#include <cstddef>

#include "mixserve/sim/moe_load.hpp"

namespace mixserve::sim {

FusedRoundBytes fused_round_bytes(double group_tokens, int hidden, double act_bytes,
                                  int num_experts, int top_k, int moe_tp, int moe_ep, bool dedup) {
  FusedRoundBytes b;
  if (group_tokens <= 0 || moe_ep <= 0) return b;
  const int per_group = num_experts / moe_ep;
  b.rows = dedup ? expected_rows_to_group(group_tokens, num_experts, top_k, per_group)
                 : group_tokens * top_k / moe_ep;
  b.gather_bytes = b.rows * hidden * act_bytes;
  b.p2p_bytes = b.gather_bytes / moe_tp;
  return b;
}

EpA2aBytes ep_a2a_bytes(double group_tokens, double replica_tokens, double ep_index_rows, int hidden,
                        double act_bytes, int top_k, int moe_tp, int attn_tp, bool shared_expert) {
  EpA2aBytes b;
  const double row = hidden * act_bytes;
  b.send_rows = group_tokens / moe_tp * top_k;
  b.recv_rows = ep_index_rows / moe_tp;
  b.a2a_bytes = std::max(b.send_rows, b.recv_rows) * row;
  if (moe_tp > 1) {
    const double ag_shared = shared_expert && moe_tp > attn_tp
                                 ? group_tokens * double(moe_tp - attn_tp) / double(moe_tp - 1)
                                 : 0.0;
    b.tp_ag_bytes = (ep_index_rows + ag_shared) * row;
    b.tp_rs_bytes = (ep_index_rows + (shared_expert ? group_tokens : 0.0)) * row;
  }
  if (attn_tp > 1) b.final_ag_bytes = replica_tokens * row;
  return b;
}

double fused_dispatch_time_us(std::span<const double> p2p_us, std::span<const double> gather_us,
                              double local_ag_us) {
  double p_end = 0, a_end = local_ag_us;
  const size_t n = std::min(p2p_us.size(), gather_us.size());
  for (size_t i = 0; i < n; ++i) {
    p_end += p2p_us[i];
    a_end = std::max(a_end, p_end) + gather_us[i];
  }
  return std::max(a_end, p_end);
}

double fused_combine_time_us(std::span<const double> rs_us, std::span<const double> p2p_us,
                             double local_rs_us) {
  double r_end = 0, p_end = 0;
  const size_t n = std::min(rs_us.size(), p2p_us.size());
  for (size_t i = 0; i < n; ++i) {
    r_end += rs_us[i];
    p_end = std::max(p_end, r_end) + p2p_us[i];
  }
  r_end += local_rs_us;
  return std::max(r_end, p_end);
}

}  // namespace mixserve::sim
