// Layout names, MoE communication names and the rank map (layout.hpp states the conventions).
#include "mixserve/core/layout.hpp"

#include <fmt/format.h>

#include "mixserve/core/enum_names.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/types.hpp"

namespace mixserve {

namespace {
constexpr auto kMoeCommNames = MIXSERVE_ENUM_TABLE(MoeComm, MIXSERVE_MOE_COMMS);
}  // namespace

std::string_view to_string(MoeComm c) { return enum_to_string(kMoeCommNames, c); }

// Accepts the printed form ("a2a") and the enum spelling ("nccl_a2a").
std::optional<MoeComm> parse_moe_comm(std::string_view s) {
  return enum_parse(kMoeCommNames, s, EnumMatch::name_or_spelling);
}

std::string Layout::name() const {
  return fmt::format("attn TP{}xDP{} | moe TP{}xEP{} | PP{} | {}", attn_tp, attn_dp, moe_tp,
                     moe_ep, pp, to_string(moe_comm));
}

std::vector<std::pair<int, int>> stage_layer_ranges(int num_layers, int pp) {
  std::vector<std::pair<int, int>> out;
  if (pp <= 0 || num_layers < 0) return out;
  const int base = num_layers / pp, extra = num_layers % pp;
  int begin = 0;
  for (int s = 0; s < pp; ++s) {
    const int n = base + (s < extra ? 1 : 0);
    out.emplace_back(begin, begin + n);
    begin += n;
  }
  return out;
}

std::vector<RankInfo> build_rank_map(const ClusterSpec& c, const ModelSpec& m, const Layout& l) {
  const std::string origin = fmt::format("layout '{}'", l.name());
  const std::pair<const char*, int> degrees[] = {{"attn_tp", l.attn_tp}, {"attn_dp", l.attn_dp},
                                                 {"moe_tp", l.moe_tp},   {"moe_ep", l.moe_ep},
                                                 {"pp", l.pp}};
  for (const auto& [key, v] : degrees)
    if (!is_pow2(v)) throw_input_error(origin, key, "a power of two >= 1", std::to_string(v));
  if (l.moe_tp * l.moe_ep != l.stage_size())
    throw_input_error(origin, "moe_tp*moe_ep",
                      fmt::format("attn_tp*attn_dp = {}", l.stage_size()),
                      std::to_string(l.moe_tp * l.moe_ep));
  if (l.world_size() != c.world_size())
    throw_input_error(origin, "attn_tp*attn_dp*pp",
                      fmt::format("the cluster's world size {} ({} nodes x {} GPUs)",
                                  c.world_size(), c.num_nodes, c.gpus_per_node),
                      std::to_string(l.world_size()));
  const int experts = m.moe.num_experts;
  if (experts > 0 && experts % l.moe_ep != 0)
    throw_input_error(origin, "moe_ep",
                      fmt::format("a divisor of the model's {} experts", experts),
                      std::to_string(l.moe_ep));
  if (experts == 0 && l.moe_ep != 1)
    throw_input_error(origin, "moe_ep", "1 for a model without routed experts",
                      std::to_string(l.moe_ep));
  if (l.pp > m.num_layers)
    throw_input_error(origin, "pp", fmt::format("at most the model's {} layers", m.num_layers),
                      std::to_string(l.pp));

  const auto stages = stage_layer_ranges(m.num_layers, l.pp);
  const int stage = l.stage_size();
  const int per_ep = experts / l.moe_ep;
  std::vector<RankInfo> map(static_cast<size_t>(c.world_size()));
  for (int r = 0; r < c.world_size(); ++r) {
    RankInfo& ri = map[static_cast<size_t>(r)];
    ri.rank = r;
    ri.node = r / c.gpus_per_node;
    ri.local_gpu = r % c.gpus_per_node;
    ri.pp_stage = r / stage;
    const int q = r - ri.pp_stage * stage;
    ri.attn_tp_rank = q % l.attn_tp;
    ri.attn_dp_rank = q / l.attn_tp;
    ri.moe_tp_rank = q % l.moe_tp;
    ri.moe_ep_rank = q / l.moe_tp;
    ri.expert_begin = ri.moe_ep_rank * per_ep;
    ri.expert_end = ri.expert_begin + per_ep;
    ri.layer_begin = stages[static_cast<size_t>(ri.pp_stage)].first;
    ri.layer_end = stages[static_cast<size_t>(ri.pp_stage)].second;
  }
  return map;
}

}  // namespace mixserve
