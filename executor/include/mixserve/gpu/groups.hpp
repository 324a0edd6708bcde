// Communicator groups of a plan's rank map (host logic, no CUDA): which ranks share a TP, DP,
// EP or rail communicator. One table names the group kinds (STYLE.md §2).
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "mixserve/core/layout.hpp"

namespace mixserve::gpu {

// X(enum, name, what the ranks of one group share)
#define MIXSERVE_GROUP_KINDS(X)                                                   \
  X(world, "world", "everything")                                                 \
  X(attn_tp, "attn_tp", "pipeline stage and attention DP rank")                   \
  X(attn_dp, "attn_dp", "pipeline stage and attention TP rank")                   \
  X(moe_tp, "moe_tp", "pipeline stage and MoE EP rank")                           \
  X(moe_ep, "moe_ep", "pipeline stage and MoE TP rank")                           \
  X(rail, "rail", "pipeline stage and local GPU index (same GPU slot on every node)")
enum class GroupKind {
#define MIXSERVE_X(e, s, d) e,
  MIXSERVE_GROUP_KINDS(MIXSERVE_X)
#undef MIXSERVE_X
};
std::string_view to_string(GroupKind g);
std::optional<GroupKind> parse_group_kind(std::string_view s);

// Color of every rank for ncclCommSplit: ranks with equal colors form one group (key = rank).
// Colors are dense, numbered by the first rank of each group. Throws InputError when the map's
// ranks are not 0..size-1 in order.
std::vector<int> group_colors(const std::vector<RankInfo>& rank_map, GroupKind kind);
// The groups themselves: lists of world ranks in ascending order.
std::vector<std::vector<int>> groups_of(const std::vector<RankInfo>& rank_map, GroupKind kind);

}  // namespace mixserve::gpu
