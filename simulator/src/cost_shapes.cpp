// Layout geometry shared by the cost models (cost_shapes.hpp).
#include "mixserve/sim/cost_shapes.hpp"

#include <algorithm>
#include <string>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"

namespace mixserve::sim {

CommGroup comm_group(int stride, int count, int gpus_per_node) {
  CommGroup g;
  g.size = count;
  const long span = long(stride) * count;
  g.nodes = span <= gpus_per_node ? 1 : int(std::min<long>(count, span / gpus_per_node));
  return g;
}

RankWeights rank_weights(const ModelSpec& m, const Layout& l) {
  RankWeights w;
  const double wb = dtype_bytes(m.weight_dtype);
  const double eb = dtype_bytes(m.expert_weight_dtype);
  const double ab = dtype_bytes(m.activation_dtype);  // embeddings, norms, router stay in bf16
  const double h = m.hidden_size;
  const AttentionSpec& a = m.attention;
  const double heads = double(a.num_heads) / l.attn_tp;
  if (a.type == AttentionType::mla) {
    const double qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
    double q = a.q_lora_rank > 0 ? h * a.q_lora_rank + a.q_lora_rank * heads * qk : h * heads * qk;
    const double kv_a = h * (a.kv_lora_rank + a.qk_rope_head_dim);
    const double kv_b = a.kv_lora_rank * heads * (a.qk_nope_head_dim + a.v_head_dim);
    const double o = heads * a.v_head_dim * h;
    w.attention_layer = (q + kv_a + kv_b + o) * wb;
    w.norms_layer = (2 * h + a.kv_lora_rank + a.q_lora_rank) * ab;
  } else {
    const double kv_heads = std::max(1.0, double(a.num_kv_heads) / l.attn_tp);
    w.attention_layer =
        (h * heads * a.head_dim + 2 * h * kv_heads * a.head_dim + heads * a.head_dim * h) * wb;
    w.norms_layer = (2 * h + (a.qk_norm ? 2.0 * a.head_dim : 0.0)) * ab;
  }
  const MoESpec& e = m.moe;
  if (e.num_experts > 0) {
    w.router_layer = h * e.num_experts * ab;
    w.experts_layer = double(e.num_experts / l.moe_ep) * 3 * h * e.expert_intermediate_size /
                      l.moe_tp * eb;
    w.shared_layer = 3 * h * double(e.shared_intermediate_size) / l.moe_tp * eb;
  }
  w.dense_layer = 3 * h * double(m.dense_intermediate_size) / l.attn_tp * wb;
  w.embedding = double(m.vocab_size) * h / l.attn_tp * ab;
  w.lm_head = (m.tie_word_embeddings && l.pp == 1) ? 0.0 : double(m.vocab_size) * h / l.attn_tp * ab;
  return w;
}

double kv_bytes_per_token_layer(const ModelSpec& m, const Layout& l) {
  const AttentionSpec& a = m.attention;
  const double kb = dtype_bytes(m.kv_dtype);
  if (a.type == AttentionType::mla) return double(a.kv_lora_rank + a.qk_rope_head_dim) * kb;
  const double kv_heads = std::max(1.0, double(a.num_kv_heads) / l.attn_tp);
  return 2 * kv_heads * a.head_dim * kb;
}

void check_layout(const ModelSpec& m, const ClusterSpec& c, const Layout& l) {
  const std::string where = fmt::format("layout '{}'", l.name());
  for (auto [key, v] : {std::pair<const char*, int>{"attn_tp", l.attn_tp}, {"attn_dp", l.attn_dp},
                        {"moe_tp", l.moe_tp}, {"moe_ep", l.moe_ep}, {"pp", l.pp}})
    if (!is_pow2(v)) throw_input_error(where, key, "a power of two", std::to_string(v));
  if (l.attn_tp * l.attn_dp != l.moe_tp * l.moe_ep)
    throw_input_error(where, "moe_tp*moe_ep", "equal to attn_tp*attn_dp",
                      std::to_string(l.moe_tp * l.moe_ep));
  if (l.world_size() != c.world_size())
    throw_input_error(where, "attn_tp*attn_dp*pp",
                      fmt::format("the cluster's {} GPUs", c.world_size()),
                      std::to_string(l.world_size()));
  if (m.hidden_size <= 0 || m.num_layers <= 0 || int(m.layers.size()) != m.num_layers)
    throw_input_error(m.name, "layers", "hidden_size > 0 and one LayerSpec per layer");
  if (m.attention.num_heads % l.attn_tp != 0)
    throw_input_error(where, "attn_tp",
                      fmt::format("a divisor of the {} attention heads", m.attention.num_heads),
                      std::to_string(l.attn_tp));
  if (l.pp > m.num_layers)
    throw_input_error(where, "pp", fmt::format("at most {} layers", m.num_layers),
                      std::to_string(l.pp));
  const bool has_moe = m.num_moe_layers() > 0;
  if (has_moe) {
    if (m.moe.num_experts % l.moe_ep != 0)
      throw_input_error(where, "moe_ep",
                        fmt::format("a divisor of the {} experts", m.moe.num_experts),
                        std::to_string(l.moe_ep));
    if (m.moe.expert_intermediate_size % l.moe_tp != 0)
      throw_input_error(where, "moe_tp",
                        fmt::format("a divisor of the expert width {}",
                                    m.moe.expert_intermediate_size),
                        std::to_string(l.moe_tp));
  }
  const bool tp_only = l.moe_ep == 1;
  if (tp_only != (l.moe_comm == MoeComm::tp_allreduce))
    throw_input_error(where, "moe_comm",
                      tp_only ? "allreduce when moe_ep == 1" : "a2a, rs-a2a-ag or fused when moe_ep > 1",
                      std::string(to_string(l.moe_comm)));
}

}  // namespace mixserve::sim
