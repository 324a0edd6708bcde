#include "mixserve/gpu/groups.hpp"

#include <array>
#include <map>
#include <tuple>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"

namespace mixserve::gpu {

std::string_view to_string(GroupKind g) {
  switch (g) {
#define MIXSERVE_X(e, s, d) \
  case GroupKind::e:        \
    return s;
    MIXSERVE_GROUP_KINDS(MIXSERVE_X)
#undef MIXSERVE_X
  }
  return "?";
}

std::optional<GroupKind> parse_group_kind(std::string_view s) {
#define MIXSERVE_X(e, n, d) \
  if (s == n) return GroupKind::e;
  MIXSERVE_GROUP_KINDS(MIXSERVE_X)
#undef MIXSERVE_X
  return std::nullopt;
}

namespace {
std::tuple<int, int> group_key(const RankInfo& r, GroupKind kind) {
  switch (kind) {
    case GroupKind::world: return {0, 0};
    case GroupKind::attn_tp: return {r.pp_stage, r.attn_dp_rank};
    case GroupKind::attn_dp: return {r.pp_stage, r.attn_tp_rank};
    case GroupKind::moe_tp: return {r.pp_stage, r.moe_ep_rank};
    case GroupKind::moe_ep: return {r.pp_stage, r.moe_tp_rank};
    case GroupKind::rail: return {r.pp_stage, r.local_gpu};
  }
  return {0, 0};
}
}  // namespace

std::vector<int> group_colors(const std::vector<RankInfo>& rank_map, GroupKind kind) {
  std::map<std::tuple<int, int>, int> color_of;
  std::vector<int> colors;
  colors.reserve(rank_map.size());
  for (std::size_t i = 0; i < rank_map.size(); ++i) {
    if (rank_map[i].rank != static_cast<int>(i))
      throw InputError(fmt::format("rank map: entry {} has rank {} (expected ranks 0..{} in order)",
                                   i, rank_map[i].rank, rank_map.size() - 1));
    const auto key = group_key(rank_map[i], kind);
    auto it = color_of.find(key);
    if (it == color_of.end()) it = color_of.emplace(key, static_cast<int>(color_of.size())).first;
    colors.push_back(it->second);
  }
  return colors;
}

std::vector<std::vector<int>> groups_of(const std::vector<RankInfo>& rank_map, GroupKind kind) {
  const auto colors = group_colors(rank_map, kind);
  std::vector<std::vector<int>> groups;
  for (std::size_t r = 0; r < colors.size(); ++r) {
    if (colors[r] >= static_cast<int>(groups.size())) groups.resize(colors[r] + 1);
    groups[colors[r]].push_back(static_cast<int>(r));
  }
  return groups;
}

}  // namespace mixserve::gpu
