// Host execution of the communication schedules with ranks as threads (comm_schedule.hpp).
// Every rank is a std::thread (the fused schedule gives it two: the "inter" stream that runs the
// rail rounds and the "intra" stream that runs the all-gathers / reduce-scatters, synchronised
// by per-round flags like CUDA events) with its own buffers; an in-process mailbox transport
// implements send/recv, and all-gather / reduce-scatter are built from it. The experts are a toy
// MoE FFN in exact arithmetic (small integers and power-of-two weights in doubles), TP-sharded
// like the real one so partial sums must be reduced. The CPU tests compare the outputs with
// reference_moe() and expect 0 wrong elements; the executor also counts the bytes it moved so the
// schedule's byte summary can be checked against what was actually sent.
#pragma once
#include <span>
#include <vector>

#include "mixserve/sim/comm_schedule.hpp"

namespace mixserve::sim {

// Toy expert e on a row x of width h: an FFN with intermediate width kToyIntermediate,
//   u_m = sum_j A[m][j] x[j],  f_e(x)[c] = (e + 1) x[c] + sum_m B[e][m][c] u_m,
// A, B small integers. TP rank t of T holds u_m for m in its 1/T of the intermediate (column
// parallel: needs all of x) and its row-parallel share of the down projection, plus the
// (e + 1) x[c] term for c in its hidden slice; the T partials sum to f_e(x).
inline constexpr int kToyIntermediate = 8;
void toy_expert_full(int expert, std::span<const double> x, std::span<double> y);
// Adds rank tp_rank's partial of f_e(x) to y. Requires kToyIntermediate % tp == 0, h % tp == 0.
void toy_expert_partial_add(int expert, int tp_rank, int tp, std::span<const double> x,
                            double scale, std::span<double> y);

// Single-device reference: y[tok] = sum over its top-k slots (id >= 0) of w * f_id(x[tok]),
// plus f_{shared_expert}(x[tok]) when shared_expert >= 0 (the executors' shared expert is toy
// expert num_experts, weight 1, when geo.shared_expert). x, result: [num_tokens, hidden].
std::vector<double> reference_moe(const ReplicaRouting& routing, int top_k, int hidden,
                                  std::span<const double> x, int shared_expert = -1);

struct HostExecResult {
  // Per rank: the MoE output rows of its attention replica as the next layer sees them,
  // [num_tokens, hidden] (full rows on every rank of the replica).
  std::vector<std::vector<double>> rank_output;
  // Bytes each rank actually sent, per round (fused: [P][Q]; EP: [P][1]), counted as
  // elements * geo.elem_bytes. Counts exchanged by the EP schedule are not included.
  std::vector<std::vector<RankRoundBytes>> dispatch_bytes, combine_bytes;
  // Fused only: the combine's final all-gather, [P] (the split EP's is in combine_bytes).
  std::vector<RankRoundBytes> final_ag_bytes;
};

// inputs[q]: replica q's token rows [num_tokens, hidden] (replicated on its ranks); routing must
// be the one the schedule was built from. Throws InputError on inputs of the wrong shape,
// RuntimeError when a rank fails or waits on a message or stream flag for more than timeout_s.
HostExecResult run_fused_on_host(const FusedSchedule& s, std::span<const ReplicaRouting> routing,
                                 std::span<const std::vector<double>> inputs,
                                 double timeout_s = 60);
// EP with moe_tp > 1: the moe-TP all-gather is booked in dispatch_bytes, its reduce-scatter in
// combine_bytes (round 0 of both, as the schedule's EpRankPlan books them).
HostExecResult run_ep_on_host(const EpSchedule& s, std::span<const ReplicaRouting> routing,
                              std::span<const std::vector<double>> inputs, double timeout_s = 60);

}  // namespace mixserve::sim
