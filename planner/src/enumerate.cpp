// Search space: objectives, layout enumeration, runtime-limit candidates, legality predicates.
#include <algorithm>
#include <utility>

#include <fmt/format.h>

#include "mixserve/core/enum_names.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/types.hpp"
#include "mixserve/planner/search.hpp"

namespace mixserve::planner {

namespace {
constexpr auto kObjectiveNames = MIXSERVE_ENUM_TABLE(Objective, MIXSERVE_OBJECTIVES);
}  // namespace

std::string_view to_string(Objective o) { return enum_to_string(kObjectiveNames, o); }

std::optional<Objective> parse_objective(std::string_view s) {
  return enum_parse(kObjectiveNames, s);
}

std::vector<std::string> objective_names() { return enum_names(kObjectiveNames); }

namespace {
std::vector<int> pow2_divisors(int n) {
  std::vector<int> out;
  for (int d = 1; d <= n; d *= 2)
    if (n % d == 0) out.push_back(d);
  return out;
}
}  // namespace

std::vector<Layout> enumerate_layouts(int world_size) {
  std::vector<Layout> out;
  if (!is_pow2(world_size)) return out;
  for (int pp : pow2_divisors(world_size)) {
    const int stage = world_size / pp;
    for (int attn_tp : pow2_divisors(stage)) {
      for (int moe_tp : pow2_divisors(stage)) {
        Layout l;
        l.pp = pp;
        l.attn_tp = attn_tp;
        l.attn_dp = stage / attn_tp;
        l.moe_tp = moe_tp;
        l.moe_ep = stage / moe_tp;
        if (l.moe_ep == 1) {
          l.moe_comm = MoeComm::tp_allreduce;
          out.push_back(l);
          continue;
        }
        l.moe_comm = MoeComm::nccl_a2a;
        out.push_back(l);
        if (l.moe_tp > 1 && l.attn_tp == l.moe_tp) {
          l.moe_comm = MoeComm::rs_a2a_ag;
          out.push_back(l);
          l.moe_comm = MoeComm::fused;
          out.push_back(l);
        }
      }
    }
  }
  return out;
}

std::vector<RuntimeLimits> limit_candidates(int max_batch,
                                            const std::vector<int64_t>& batched_tokens,
                                            int64_t max_model_len) {
  std::vector<int> seqs;
  for (int s = 1; s <= max_batch; s *= 2) seqs.push_back(s);
  if (max_batch > 0 && !is_pow2(max_batch)) seqs.push_back(max_batch);
  std::vector<RuntimeLimits> out;
  for (int s : seqs)
    for (int64_t t : batched_tokens) {
      RuntimeLimits r;
      r.max_num_seqs = s;
      r.max_num_batched_tokens = t;
      r.max_model_len = max_model_len;
      out.push_back(r);
    }
  return out;
}

namespace {

bool heads_divisible(const PredicateInput& in) {
  return in.model.attention.num_heads % in.layout.attn_tp == 0;
}

// GQA/MHA: each TP rank holds whole KV heads (kv % tp == 0) or a replicated copy of one
// (tp % kv == 0, as vLLM does when TP exceeds the KV heads). MLA caches one latent per token,
// replicated in the TP group, so any TP works.
bool kv_heads(const PredicateInput& in) {
  const auto& a = in.model.attention;
  if (a.type == AttentionType::mla) return true;
  const int kv = a.num_kv_heads, tp = in.layout.attn_tp;
  return kv > 0 && (kv % tp == 0 || tp % kv == 0);
}

bool experts_divisible(const PredicateInput& in) {
  const int e = in.model.moe.num_experts;
  return e > 0 ? e % in.layout.moe_ep == 0 : in.layout.moe_ep == 1;
}

// Routed and shared experts are TP-sharded over moe_tp; dense FFN layers over the larger of the
// two TP degrees (they run either inside the attention TP group or the MoE TP group).
bool expert_width_divisible(const PredicateInput& in) {
  const auto& m = in.model;
  const int tp = in.layout.moe_tp;
  if (m.moe.expert_intermediate_size % tp != 0) return false;
  if (m.moe.num_shared_experts > 0 && m.moe.shared_intermediate_size % tp != 0) return false;
  const int dense_tp = std::max(in.layout.attn_tp, in.layout.moe_tp);
  return m.dense_intermediate_size % dense_tp == 0;
}

// Stages may hold unequal layer counts (stage_layer_ranges), but each needs at least one layer.
bool layers_divisible_pp(const PredicateInput& in) { return in.layout.pp <= in.model.num_layers; }

bool fits_memory(const PredicateInput& in) { return in.memory != nullptr && in.memory->fits; }

}  // namespace

const std::vector<Predicate>& predicates() {
  static const std::vector<Predicate> table = {
      {"heads_divisible", "query heads % attn_tp == 0", heads_divisible, false},
      {"kv_heads", "KV heads % attn_tp == 0 or attn_tp % KV heads == 0 (replicated)", kv_heads,
       false},
      {"experts_divisible", "routed experts % moe_ep == 0", experts_divisible, false},
      {"expert_width_divisible", "expert/shared width % moe_tp, dense width % max TP",
       expert_width_divisible, false},
      {"layers_divisible_pp", "pp <= layers (uneven stages allowed)", layers_divisible_pp, false},
      {"fits_memory", "weights + activations + buffers + KV for the limits fit", fits_memory,
       true},
  };
  return table;
}

double kv_room(const MemoryBreakdown& mb, const RuntimeLimits& limits) {
  return mb.capacity * limits.gpu_memory_utilization - mb.weights - mb.reserved - mb.activations -
         mb.comm_buffers;
}

std::string memory_shortfall(const MemoryBreakdown& mb, const RuntimeLimits& limits) {
  constexpr double GiB = 1073741824.0;
  const double room = kv_room(mb, limits);
  const std::pair<const char*, double> parts[] = {
      {"activations", mb.activations}, {"comm_buffers", mb.comm_buffers}, {"reserved", mb.reserved}};
  const auto* largest = &parts[0];
  for (const auto& p : parts)
    if (p.second > largest->second) largest = &p;
  std::string out = fmt::format(
      "max_num_seqs {}, max_num_batched_tokens {}: weights {:.1f} GiB + activations {:.1f} GiB + "
      "comm_buffers {:.1f} GiB + reserved {:.1f} GiB ",
      limits.max_num_seqs, limits.max_num_batched_tokens, mb.weights / GiB, mb.activations / GiB,
      mb.comm_buffers / GiB, mb.reserved / GiB);
  if (room <= 0)
    out += fmt::format("exceed {:.1f} GiB ({:.1f} GiB x gpu_memory_utilization {:.2f}) by {:.1f} GiB",
                       mb.capacity * limits.gpu_memory_utilization / GiB, mb.capacity / GiB,
                       limits.gpu_memory_utilization, -room / GiB);
  else
    out += fmt::format("leave {:.1f} GiB for {} KV tokens, fewer than the {} needed", room / GiB,
                       mb.kv_tokens, limits.max_model_len > 0 ? limits.max_model_len
                                                              : limits.max_num_batched_tokens);
  out += fmt::format("; the largest after the weights: {}", largest->first);
  return out;
}

std::optional<std::string_view> first_structural_failure(const ModelSpec& m, const ClusterSpec& c,
                                                         const Layout& l) {
  const PredicateInput in{m, c, l, nullptr};
  for (const auto& p : predicates())
    if (!p.per_candidate && !p.fn(in)) return p.name;
  return std::nullopt;
}

}  // namespace mixserve::planner
