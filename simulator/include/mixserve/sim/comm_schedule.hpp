// Communication schedules of the MoE block: who sends which rows and hidden slices to whom, in
// which round. Plain host structs (vectors of ints and offsets, no threads, no devices), built
// once per step from the routing. The simulator costs them (bytes per round, per rank), the
// host executor (host_exec.hpp) runs them with ranks as threads, the GPU executor runs the same
// structs with NCCL. docs/comm-schedules.md has a worked 2 nodes x 2 GPUs example.
//
// Two schedules:
//  * FusedSchedule — MixServe hybrid TP x EP (MoeComm::fused, and rs_a2a_ag, which moves the
//    same bytes with the two streams serialised; MoeComm::tp_allreduce is its moe_ep == 1 case).
//    Ranks form Q = moe_ep groups of T = moe_tp consecutive ranks; group q is attention DP
//    replica q (attn_tp == moe_tp, attn_dp == moe_ep) and owns experts [q*E/Q, (q+1)*E/Q).
//    With T == G a group is a node and the rails are the NICs; with T < G some rails stay
//    inside a node (counted as intra-node bytes).
//    AG-Dispatch, round i = 1..Q-1: rank (q, t) sends hidden slice t, [t*h/T, (t+1)*h/T), of the
//    distinct tokens of replica q routed to group (q+i) mod Q to rank ((q+i) mod Q, t), receives
//    the same from ((q-i) mod Q, t), then the group all-gathers the received slices.
//    Round 0 is the group's own tokens: already replicated, nothing moves.
//    RS-Combine ("RS-first"), round i = 0..Q-1: the group reduce-scatters the partial sums of
//    the rows whose home is group (q+i) mod Q, rank t sends its reduced slice t back along the
//    rail to ((q+i) mod Q, t) (nothing for i = 0), receives from ((q-i) mod Q, t) and
//    scatter-adds into its home slice Y_t; a final all-gather restores full rows. Rounds are
//    issued in combine_order = 1, ..., Q-1, 0: the local rows need no rail, so they go last and
//    the first rail send starts as early as possible.
//    Tokens with several experts in one group cross the rail once each way: the group's top-k
//    weights are applied on the expert side when the (token, expert) outputs are folded back
//    into the token's row (ExpertSide::row_pair_*), before the reduce-scatter.
//  * EpSchedule — EP by all-to-all (MoeComm::nccl_a2a, any moe_tp, moe_tp * moe_ep == P):
//    per-expert counts exchanged, then one grouped send/recv over the EP group of (token,
//    expert) rows, full h, no dedup: rank (e, m) = e * moe_tp + m sends the rows for the
//    experts of EP index d to rank (d, m). With moe_tp > 1 the members (e, 0..moe_tp-1) of an
//    EP index all-gather what each received, every member runs its 1/moe_tp TP slice of the
//    experts on all of them, a reduce-scatter returns member m the summed rows it received;
//    combine sends the rows back and the home rank scatter-adds w * row.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/layout.hpp"
#include "mixserve/core/model.hpp"

namespace mixserve::sim {

// Sizes that fix a schedule. Ranks are node-major: node(r) = r / gpus_per_node.
struct CommGeometry {
  int num_ranks = 1;          // ranks of one pipeline stage (the MoE and attention groups)
  int gpus_per_node = 1;      // only to tell intra- from inter-node transfers
  int attn_tp = 1, attn_dp = 1;
  int moe_tp = 1, moe_ep = 1;
  int num_experts = 1, top_k = 1;
  int hidden = 1;             // elements per token row
  double elem_bytes = 2;      // bytes per element on the wire (activation dtype)
  // The model has a shared expert, TP-sharded over moe_tp like the routed ones: every rank
  // computes its TP slice of it on the tokens its moe-TP group owns, and the schedule's
  // reduce-scatter sums the slices. Fused: route(q -> q) holds every token of replica q (block 0
  // of the expert side is the whole replica). EP: the EP index's gathered rows start with its
  // members' source tokens (EpRankPlan::shared_*).
  bool shared_expert = false;

  int node_of(int rank) const { return rank / gpus_per_node; }
  // Experts owned by one EP index (a group of moe_tp ranks).
  int experts_per_ep_rank() const { return num_experts / moe_ep; }
};

// Geometry of one pipeline stage of `l` on `c` for model `m`. Throws InputError when the layout
// does not fold (attn_tp * attn_dp != moe_tp * moe_ep) or experts do not divide.
CommGeometry make_comm_geometry(const ClusterSpec& c, const ModelSpec& m, const Layout& l);

// Routing of the tokens of one attention DP replica (the router runs on every rank of the
// replica and gives the same answer, so there is one table per replica).
struct ReplicaRouting {
  int num_tokens = 0;
  std::vector<int32_t> topk_ids;     // [num_tokens * top_k], global expert id, -1 = empty slot
  std::vector<double> topk_weights;  // [num_tokens * top_k]
};

// Bytes one rank moves in one round, split by domain (sent bytes; what it receives is the same
// schedule seen from the peer). All-gather and reduce-scatter over T ranks count the
// (T-1)/T * rows * h * elem_bytes a rank sends (nccl-tests busbw convention).
struct RankRoundBytes {
  double inter_bytes = 0;   // to a rank on another node
  double intra_bytes = 0;   // to a rank on the same node (rails inside a node, AG, RS)
};

// Per round, over the ranks: what the cost model needs (the round waits for its slowest rank).
struct RoundBytesSummary {
  double inter_bytes_max = 0, inter_bytes_mean = 0;
  double intra_bytes_max = 0, intra_bytes_mean = 0;
};

// ----------------------------------------------------------------------------- fused (hybrid)

// The expert side of one group: the rows it received in dispatch, the (row, local expert)
// pairs the grouped expert GEMM runs, and how pair outputs fold back into rows for combine.
struct ExpertSide {
  // Received rows in dispatch round order: block i (i = 0..Q-1) holds the tokens of source
  // group (q - i) mod Q, in FusedSchedule::route order; rows [block_row_offset[i],
  // block_row_offset[i+1]). Row r is full-h after the dispatch: [num_rows, hidden].
  std::vector<int64_t> block_row_offset;   // [Q + 1]
  std::vector<int32_t> row_src_token;      // [num_rows] token index in its source replica
  // Grouped by local expert (0..E/Q-1): pairs [expert_pair_offset[e], expert_pair_offset[e+1]).
  std::vector<int64_t> expert_pair_offset; // [E/Q + 1]
  std::vector<int64_t> pair_row;           // [num_pairs] received row the pair reads
  std::vector<double> pair_weight;         // [num_pairs] top-k weight of (token, expert)
  // Fold back: row r's output = sum over its pairs of weight * expert output,
  // pairs row_pairs[row_pair_offset[r] .. row_pair_offset[r+1]).
  std::vector<int64_t> row_pair_offset;    // [num_rows + 1]
  std::vector<int64_t> row_pairs;          // [num_pairs] indices into the grouped pair list

  int64_t num_rows() const { return block_row_offset.empty() ? 0 : block_row_offset.back(); }
  int64_t num_pairs() const { return static_cast<int64_t>(pair_row.size()); }
};

// One round of one rank. Dispatch and combine use the same peers (send to +i, receive from -i).
struct FusedStep {
  int round = 0;              // 0 = the group's own rows (no rail transfer)
  int send_peer = -1;         // global rank; -1 in round 0
  int recv_peer = -1;
  int send_group = 0;         // (q + i) mod Q
  int recv_group = 0;         // (q - i) mod Q
  // Rows of each transfer (rank (q, t) moves hidden slice t of them). Round 0 moves nothing
  // over the rail: its dispatch rows are 0 and its combine rows only go through the RS.
  int64_t dispatch_send_rows = 0;  // |route(q -> send_group)|
  int64_t dispatch_recv_rows = 0;  // |route(recv_group -> q)|, into expert-side block `round`
  int64_t combine_rs_rows = 0;     // |route(send_group -> q)|: reduce-scattered in the group
  int64_t combine_send_rows = 0;   // same rows, reduced slice t sent to send_peer (0 in round 0)
  int64_t combine_recv_rows = 0;   // |route(q -> recv_group)|: scatter-added into the home slice
                                   // (round 0: straight from the local RS)
  bool send_inter_node = false;
  bool recv_inter_node = false;
  // Combine reduces and sends the rows of expert-side block `combine_send_block`
  // (= (Q - i) mod Q: the rows that came from home send_group).
  int combine_send_block = 0;
  RankRoundBytes dispatch_bytes;  // rail send of round i + its all-gather (none in round 0)
  RankRoundBytes combine_bytes;   // reduce-scatter of round i + its rail send
};

struct FusedSchedule {
  CommGeometry geo;
  int num_groups = 1;         // Q = moe_ep
  int group_size = 1;         // T = moe_tp
  int slice_elems = 1;        // h / T
  // route[s * Q + d]: ascending distinct token indices of replica s with at least one expert in
  // group d. The rows of every transfer between s and d, in this order, both ways. With a shared
  // expert, route(q -> q) is every token of replica q (its shared expert runs in group q).
  std::vector<std::vector<int32_t>> route;
  std::vector<ExpertSide> expert_side;        // [Q]
  std::vector<std::vector<FusedStep>> steps;  // [num_ranks][Q], steps[r][i].round == i
  std::vector<int> combine_order;             // combine rounds in issue order: 1..Q-1, 0
  // Per round (index i = 0..Q-1) over ranks.
  std::vector<RoundBytesSummary> dispatch_rounds, combine_rounds;
  // The combine's final all-gather of the home rows, after the last scatter-add.
  std::vector<RankRoundBytes> final_ag_bytes;  // [num_ranks]
  RoundBytesSummary final_ag;

  int group_of(int rank) const { return rank / group_size; }
  int slice_of(int rank) const { return rank % group_size; }
  const std::vector<int32_t>& route_rows(int src, int dst) const {
    return route[static_cast<size_t>(src) * num_groups + dst];
  }
};

// Requires moe_tp * moe_ep == num_ranks, attn_tp == moe_tp, attn_dp == moe_ep, hidden % moe_tp
// == 0, gpus_per_node % moe_tp == 0 (a TP group inside one node), num_experts % moe_ep == 0; routing.size() == moe_ep with ids in [-1, E). Throws
// InputError naming the field otherwise.
FusedSchedule build_fused_schedule(const CommGeometry& geo,
                                   std::span<const ReplicaRouting> routing);

// Rows each group must be able to receive in dispatch for a step of at most
// `max_tokens_per_replica` tokens per replica (every source's tokens all routed to it):
// the preallocation bound of the receive and partial-sum buffers, [rows, hidden].
int64_t fused_capacity_rows(const CommGeometry& geo, int64_t max_tokens_per_replica);

// ----------------------------------------------------------------------------- EP (all-to-all)

// How the tokens of an attention replica (replicated on its attn_tp ranks) enter the A2A.
enum class EpSource {
  split,       // rank a of the replica dispatches tokens [a*n/A, (a+1)*n/A); the combined rows
               // are all-gathered in the replica at the end
  replicated,  // every rank dispatches every token of its replica (the paper's Eq. 12 baseline)
};

// One rank's transfers. Rows are (token, top-k slot) pairs of the rank's source tokens; the
// rows for one destination are sorted by (local expert, token, slot).
struct EpRankPlan {
  int replica = 0;                       // attention DP replica of the rank
  int32_t token_begin = 0, token_end = 0;// source tokens [begin, end) of the replica
  std::vector<int64_t> send_offset;      // [P + 1] rows for rank d: [send_offset[d], send_offset[d+1])
  std::vector<int32_t> send_token;       // [rows] token index in the replica
  std::vector<int32_t> send_slot;        // [rows] top-k slot (expert id and weight)
  // Counts exchanged first: rows for (dest rank d, local expert e) at d * (E/moe_ep) + e
  // (zero for a d of another moe-TP index). Below E/P stands for E/moe_ep.
  std::vector<int64_t> send_counts;      // [P * E/P]
  std::vector<int64_t> recv_counts;      // [P * E/P]: rows from (source s, local expert e)
  int64_t recv_rows() const;
  // The EP index's rows after the moe-TP all-gather, [gather_rows, hidden]: with a shared
  // expert first the members' source tokens (member 0's [token_begin, token_end), then member
  // 1's, ...; this rank's at shared_begin, shared_rows of them; total shared_total), then the
  // received rows of member 0, member 1, ...; this rank's own at [gather_begin, gather_begin +
  // recv_rows()). Without a shared expert shared_total = 0; moe_tp == 1: shared rows (if any)
  // then recv_rows().
  int64_t shared_begin = 0;
  int64_t shared_rows = 0;   // token_end - token_begin with a shared expert, else 0
  int64_t shared_total = 0;
  int64_t gather_begin = 0;
  int64_t gather_rows = 0;
  // Sent bytes, by domain (node of the peer):
  //   dispatch: the rows to each EP peer (rows * hidden * elem_bytes), then the all-gather of
  //     this rank's received rows to each of the moe_tp - 1 other members, and of its source
  //     tokens (shared expert) to the members of other attention replicas (those of its own
  //     replica hold them already);
  //   combine: the reduce-scatter (each other member u gets this rank's partial sums of u's
  //     received rows and, shared expert, of u's source tokens), the rows back to their
  //     sources, the split source's final all-gather.
  RankRoundBytes dispatch_bytes;
  RankRoundBytes combine_bytes;
};

struct EpSchedule {
  CommGeometry geo;
  EpSource source = EpSource::split;
  std::vector<EpRankPlan> ranks;         // [P]
  RoundBytesSummary dispatch, combine;   // one grouped send/recv each
};

// Requires moe_tp * moe_ep == attn_tp * attn_dp == num_ranks, E % moe_ep == 0;
// routing.size() == attn_dp. Throws InputError otherwise.
// Members of a moe-TP group and EP peers of rank r: ranks (r / moe_tp) * moe_tp + u and
// d * moe_tp + r % moe_tp (the rank map of core/layout.cpp).
EpSchedule build_ep_schedule(const CommGeometry& geo, std::span<const ReplicaRouting> routing,
                             EpSource source = EpSource::split);

// Rows one rank must be able to receive in the EP dispatch and hold after the moe-TP
// all-gather (and for the combine) for a step of at most `max_tokens_per_replica` tokens per
// replica: every source token sends min(top_k, E/moe_ep) rows to its EP index;
// `replicated` multiplies by attn_tp; a shared expert adds moe_tp * max_tokens_per_replica (the
// members' source tokens). [rows, hidden].
int64_t ep_capacity_rows(const CommGeometry& geo, int64_t max_tokens_per_replica,
                         EpSource source = EpSource::split);

}  // namespace mixserve::sim
