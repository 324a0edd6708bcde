// Volumes and round-by-round timing of the MixServe fused MoE communication (paper.md §6,
// §13.4; DESIGN.md steps 3 and 5). The StepCostModel uses these; tests check them by hand.
#pragma once
#include <span>

namespace mixserve::sim {

// What one rank moves per round of the fused AG-Dispatch / RS-Combine.
struct FusedRoundBytes {
  double rows = 0;          // rows one MoE TP group sends to one other EP group
  double p2p_bytes = 0;     // per rank per rail round: rows x hidden/moe_tp slice
  double gather_bytes = 0;  // intra-group all-gather output (dispatch) / reduce-scatter input
                            // (combine) per round: rows x full hidden
};

// `group_tokens` source tokens of one MoE TP group (full hidden, replicated in the group).
// dedup: a token with several of its top-k experts in one destination group crosses once
// (expected_rows_to_group); otherwise every (token, expert) pair is a row (tokens*k/moe_ep
// per destination), which is the volume of the paper's Eq. 13.
FusedRoundBytes fused_round_bytes(double group_tokens, int hidden, double act_bytes,
                                  int num_experts, int top_k, int moe_tp, int moe_ep, bool dedup);

// What the step-cost model costs for MoeComm::nccl_a2a (the EpSchedule of comm_schedule.hpp,
// split source), each a buffer size in bytes handed to a collective of the op timer (a member
// of T sends (T-1)/T of it):
//   a2a_bytes  — all-to-all over the EP group, max(send, receive) rows x row bytes; a rank
//                dispatches group_tokens / moe_tp tokens x top_k rows (its 1/attn_tp share of
//                its replica) and receives ep_index_rows / moe_tp;
//   tp_ag_bytes, tp_rs_bytes — moe_tp > 1: all-gather / reduce-scatter over the moe-TP group of
//                the EP index's rows; a shared expert adds the group's tokens to the
//                reduce-scatter and, when the group spans attention replicas (moe_tp >
//                attn_tp), a (moe_tp - attn_tp) / (moe_tp - 1) share of them to the all-gather
//                (the members of a token's own replica hold it already);
//   final_ag_bytes — attn_tp > 1: all-gather over attention TP of the replica's combined rows.
struct EpA2aBytes {
  double send_rows = 0, recv_rows = 0;
  double a2a_bytes = 0, tp_ag_bytes = 0, tp_rs_bytes = 0, final_ag_bytes = 0;
};
EpA2aBytes ep_a2a_bytes(double group_tokens, double replica_tokens, double ep_index_rows, int hidden,
                        double act_bytes, int top_k, int moe_tp, int attn_tp, bool shared_expert);

// Fused AG-Dispatch on two streams. Inter stream: p2p[0..n) back to back. Intra stream: an
// optional all-gather of the group's own tokens (local_ag_us, needs nothing), then gather[i]
// once p2p[i] has arrived and gather[i-1] is done. Returns the time the last gather ends:
//   p_end(i) = p_end(i-1) + p2p[i];  a_end(i) = max(a_end(i-1), p_end(i)) + gather[i].
// With equal rounds this is T_p2p + sum max(T_p2p, T_AG) + T_AG (paper.md §6.4).
double fused_dispatch_time_us(std::span<const double> p2p_us, std::span<const double> gather_us,
                              double local_ag_us);

// Fused RS-Combine ("RS-first", paper.md §6.3). Intra stream: reduce-scatter of the rows of
// each remote home group, then the local one (local_rs_us). Inter stream: the reduced slice of
// round i leaves once its reduce-scatter is done and the previous send has left:
//   r_end(i) = r_end(i-1) + rs[i];  p_end(i) = max(p_end(i-1), r_end(i)) + p2p[i].
// Returns max(last send, local reduce-scatter); the final all-gather is added by the caller.
double fused_combine_time_us(std::span<const double> rs_us, std::span<const double> p2p_us,
                             double local_rs_us);

}  // namespace mixserve::sim
