// Parallel layout of one model on one cluster (DESIGN.md "The parallel layouts").
// Attention and MoE fold onto the same P/PP GPUs of a pipeline stage:
//   attn_tp * attn_dp == moe_tp * moe_ep == world / pp.
// Ranks are node-major (rank = node * G + local). Stage s owns ranks [s*S, (s+1)*S), S = world/pp.
// Inside a stage, with q = rank - s*S: attention tp index = q % attn_tp, dp index = q / attn_tp;
// MoE tp index = q % moe_tp, ep index = q / moe_tp. Experts: ep index e owns
// [e*E/moe_ep, (e+1)*E/moe_ep), each TP-sharded over its moe_tp ranks.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "mixserve/core/cluster.hpp"
#include "mixserve/core/model.hpp"

namespace mixserve {

// Communication algorithm of the MoE block (the attention block always all-reduces over attn_tp).
#define MIXSERVE_MOE_COMMS(X)                                                                  \
  X(tp_allreduce, "allreduce")  /* moe_ep == 1: experts TP-sharded, one all-reduce */          \
  X(nccl_a2a, "a2a")            /* NCCL all-to-all dispatch/combine over the EP group */       \
  X(rs_a2a_ag, "rs-a2a-ag")     /* hybrid TP x EP, RS / A2A / AG issued one after another */   \
  X(fused, "fused")             /* MixServe fused AG-Dispatch + RS-Combine, overlapped */
enum class MoeComm {
#define MIXSERVE_X(e, s) e,
  MIXSERVE_MOE_COMMS(MIXSERVE_X)
#undef MIXSERVE_X
};
std::string_view to_string(MoeComm c);
std::optional<MoeComm> parse_moe_comm(std::string_view s);

struct Layout {
  int attn_tp = 1, attn_dp = 1;
  int moe_tp = 1, moe_ep = 1;
  int pp = 1;
  MoeComm moe_comm = MoeComm::tp_allreduce;

  int stage_size() const { return attn_tp * attn_dp; }
  int world_size() const { return stage_size() * pp; }
  // Compact name, e.g. "attn TP4xDP4 | moe TP4xEP4 | PP1 | fused".
  std::string name() const;
  bool operator==(const Layout&) const = default;
};

struct RankInfo {
  int rank = 0, node = 0, local_gpu = 0;
  int pp_stage = 0;
  int attn_tp_rank = 0, attn_dp_rank = 0;
  int moe_tp_rank = 0, moe_ep_rank = 0;
  int expert_begin = 0, expert_end = 0;  // owned routed experts [begin, end)
  int layer_begin = 0, layer_end = 0;    // decoder layers of its pipeline stage [begin, end)
};

// Rank map for a layout that already passed the legality predicates. Throws InputError otherwise.
std::vector<RankInfo> build_rank_map(const ClusterSpec& c, const ModelSpec& m, const Layout& l);

// Layers of each pipeline stage: as even as possible, earlier stages get the remainder.
std::vector<std::pair<int, int>> stage_layer_ranges(int num_layers, int pp);

}  // namespace mixserve
