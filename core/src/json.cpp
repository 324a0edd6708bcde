// JSON views of the core structs, with the same key names as the YAML files.
#include "mixserve/core/json.hpp"

#include <cmath>

namespace mixserve {

using nlohmann::json;

json to_json(const ParamBreakdown& p) {
  return json{{"embedding", p.embedding},
              {"lm_head", p.lm_head},
              {"attention", p.attention},
              {"norms", p.norms},
              {"dense_ffn", p.dense_ffn},
              {"routed_experts", p.routed_experts},
              {"shared_experts", p.shared_experts},
              {"router", p.router},
              {"total", p.total()},
              {"active", p.active},
              {"per_expert", p.per_expert}};
}

json to_json(const Layout& l) {
  return json{{"attn_tp", l.attn_tp}, {"attn_dp", l.attn_dp},
              {"moe_tp", l.moe_tp},   {"moe_ep", l.moe_ep},
              {"pp", l.pp},           {"moe_comm", std::string(to_string(l.moe_comm))},
              {"name", l.name()},     {"world_size", l.world_size()}};
}

json to_json(const MemoryBreakdown& m) {
  return json{{"weights_bytes", m.weights},
              {"kv_cache_bytes", m.kv_cache},
              {"activations_bytes", m.activations},
              {"comm_buffers_bytes", m.comm_buffers},
              {"reserved_bytes", m.reserved},
              {"capacity_bytes", m.capacity},
              {"kv_tokens", m.kv_tokens},
              {"fits", m.fits}};
}

json to_json(const PredictedMetrics& m) {
  return json{{"ttft_ms", m.ttft_ms},
              {"itl_ms", m.itl_ms},
              {"tpot_ms", m.tpot_ms},
              {"throughput_tok_s", m.throughput_tok_s},
              {"capacity_tok_s", m.capacity_tok_s},
              {"output_tok_s", m.output_tok_s},
              {"request_rate", m.request_rate}};
}

json to_json(const OpCost& o) {
  return json{{"op", o.op},
              {"phase", o.phase},
              {"time_us", o.time_us},
              {"source", std::string(to_string(o.source))}};
}

json to_json(const RuntimeLimits& r) {
  return json{{"max_num_seqs", r.max_num_seqs},
              {"max_num_batched_tokens", r.max_num_batched_tokens},
              {"chunked_prefill", r.chunked_prefill},
              {"decode_first", r.decode_first},
              {"kv_block_tokens", r.kv_block_tokens},
              {"kv_blocks", r.kv_blocks},
              {"gpu_memory_utilization", r.gpu_memory_utilization},
              {"max_model_len", r.max_model_len}};
}

// The metrics are repeated at the top level (ttft_ms, itl_ms, throughput_tok_s,
// memory_per_gpu_bytes) so scripts can read a ranked list without descending.
json to_json(const PlanCandidate& c) {
  json ops = json::array();
  for (const auto& o : c.breakdown) ops.push_back(to_json(o));
  return json{{"rank", c.rank},
              {"label", c.label},
              {"layout", to_json(c.layout)},
              {"limits", to_json(c.limits)},
              {"predicted", to_json(c.metrics)},
              {"memory", to_json(c.memory)},
              {"ttft_ms", c.metrics.ttft_ms},  // null when infinite (saturated)
              {"saturated", !std::isfinite(c.metrics.ttft_ms)},
              {"itl_ms", c.metrics.itl_ms},
              {"throughput_tok_s", c.metrics.throughput_tok_s},
              {"memory_per_gpu_bytes", c.memory.weights + c.memory.kv_cache +
                                           c.memory.activations + c.memory.comm_buffers +
                                           c.memory.reserved},
              {"breakdown", ops}};
}

json to_json(const RankInfo& r) {
  return json{{"rank", r.rank},
              {"node", r.node},
              {"local_gpu", r.local_gpu},
              {"pp_stage", r.pp_stage},
              {"attn_tp_rank", r.attn_tp_rank},
              {"attn_dp_rank", r.attn_dp_rank},
              {"moe_tp_rank", r.moe_tp_rank},
              {"moe_ep_rank", r.moe_ep_rank},
              {"expert_begin", r.expert_begin},
              {"expert_end", r.expert_end},
              {"layer_begin", r.layer_begin},
              {"layer_end", r.layer_end}};
}

}  // namespace mixserve
