// The paper's Table II baselines (paper.md §7.5), generalised from the 2x8 H20 and 4x8 Ascend
// clusters to N nodes x G GPUs: vLLM TP+PP puts TP over a node and PP over nodes; vLLM DP+EP
// runs attention TP{8,4} x DP and EP over every GPU; Tutel TP+EP folds attention TP{8,4} x DP
// onto MoE TP{8,4} x EP with RS / A2A / AG issued one after another (no fusion).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "mixserve/core/error.hpp"
#include "mixserve/planner/search.hpp"

namespace mixserve::planner {

namespace {

std::optional<Layout> tp_pp(const ClusterSpec& c) {
  Layout l;
  l.attn_tp = l.moe_tp = c.gpus_per_node;
  l.pp = c.num_nodes;
  l.moe_comm = MoeComm::tp_allreduce;
  return l;
}

std::optional<Layout> dp_ep(const ClusterSpec& c, int tp) {
  const int p = c.world_size();
  if (tp > p || p % tp != 0) return std::nullopt;
  Layout l;
  l.attn_tp = tp;
  l.attn_dp = p / tp;
  l.moe_ep = p;
  l.moe_comm = p > 1 ? MoeComm::nccl_a2a : MoeComm::tp_allreduce;
  return l;
}

std::optional<Layout> tp_ep(const ClusterSpec& c, int tp) {
  const int p = c.world_size();
  if (tp > p || p % tp != 0 || p / tp < 2) return std::nullopt;  // needs EP >= 2
  Layout l;
  l.attn_tp = l.moe_tp = tp;
  l.attn_dp = l.moe_ep = p / tp;
  l.moe_comm = MoeComm::rs_a2a_ag;
  return l;
}

struct Entry {
  BaselineDef def;
  std::optional<Layout> (*make)(const ClusterSpec&);
};

const std::vector<Entry>& entries() {
  static const std::vector<Entry> table = {
      {{"vllm-tp-pp", "vLLM TP+PP: TP=G per node, PP=N (Table II row 1)"}, tp_pp},
      {{"vllm-dp-ep-tp8", "vLLM DP+EP: attn TP8 x DP, MoE EP=P, NCCL all-to-all"},
       [](const ClusterSpec& c) { return dp_ep(c, 8); }},
      {{"vllm-dp-ep-tp4", "vLLM DP+EP: attn TP4 x DP, MoE EP=P, NCCL all-to-all"},
       [](const ClusterSpec& c) { return dp_ep(c, 4); }},
      {{"tutel-tp-ep-tp8", "Tutel TP+EP: attn TP8 x DP, MoE TP8 x EP, RS/A2A/AG unfused"},
       [](const ClusterSpec& c) { return tp_ep(c, 8); }},
      {{"tutel-tp-ep-tp4", "Tutel TP+EP: attn TP4 x DP, MoE TP4 x EP, RS/A2A/AG unfused"},
       [](const ClusterSpec& c) { return tp_ep(c, 4); }},
  };
  return table;
}

}  // namespace

const std::vector<BaselineDef>& baseline_defs() {
  static const std::vector<BaselineDef> defs = [] {
    std::vector<BaselineDef> d;
    for (const auto& e : entries()) d.push_back(e.def);
    return d;
  }();
  return defs;
}

std::vector<std::string> baseline_names() {
  std::vector<std::string> out;
  for (const auto& e : entries()) out.emplace_back(e.def.name);
  return out;
}

std::optional<Layout> baseline_layout(std::string_view name, const ClusterSpec& c) {
  for (const auto& e : entries())
    if (e.def.name == name) return e.make(c);
  throw_input_error("--baseline", "NAME", fmt::format("one of {}", fmt::join(baseline_names(), ", ")),
                    std::string(name));
}

}  // namespace mixserve::planner
