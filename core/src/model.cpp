// Parameter, weight and KV-cache accounting, counted from the architecture tensor by tensor
// (the shapes of the Hugging Face implementations of the supported architectures).
#include <fmt/format.h>

#include "mixserve/core/model.hpp"

namespace mixserve {

int ModelSpec::num_moe_layers() const {
  int n = 0;
  for (const auto& l : layers) n += l.moe ? 1 : 0;
  return n;
}

int ModelSpec::num_dense_layers() const { return static_cast<int>(layers.size()) - num_moe_layers(); }

int64_t ModelSpec::q_width() const {
  const auto& a = attention;
  if (a.type == AttentionType::mla)
    return int64_t{a.num_heads} * (a.qk_nope_head_dim + a.qk_rope_head_dim);
  return int64_t{a.num_heads} * a.head_dim;
}

int64_t ParamBreakdown::total() const {
  return embedding + lm_head + attention + norms + dense_ffn + routed_experts + shared_experts +
         router;
}

namespace {

struct AttnCount {
  int64_t proj = 0;   // projection weights, biases and sinks
  int64_t norms = 0;  // norms inside the attention block (MLA latent norms, qk-norms)
};

AttnCount attention_params_per_layer(const ModelSpec& m) {
  const auto& a = m.attention;
  const int64_t h = m.hidden_size;
  const int64_t nh = a.num_heads;
  AttnCount c;
  if (a.type == AttentionType::mla) {
    const int64_t qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim;
    if (a.q_lora_rank > 0) {
      c.proj += h * a.q_lora_rank;             // q_a_proj
      c.norms += a.q_lora_rank;                // q_a_layernorm
      c.proj += int64_t{a.q_lora_rank} * nh * qk_head;  // q_b_proj
    } else {
      c.proj += h * nh * qk_head;              // q_proj (no query LoRA)
    }
    c.proj += h * (a.kv_lora_rank + a.qk_rope_head_dim);  // kv_a_proj_with_mqa
    c.norms += a.kv_lora_rank;                            // kv_a_layernorm
    c.proj += int64_t{a.kv_lora_rank} * nh * (a.qk_nope_head_dim + a.v_head_dim);  // kv_b_proj
    c.proj += nh * a.v_head_dim * h;                      // o_proj
    if (a.o_bias) c.proj += h;
  } else {
    const int64_t q = nh * a.head_dim;
    const int64_t kv = int64_t{a.num_kv_heads} * a.head_dim;
    c.proj += h * q + 2 * h * kv + q * h;  // q, k, v, o
    if (a.qkv_bias) c.proj += q + 2 * kv;
    if (a.o_bias) c.proj += h;
    if (a.qk_norm) {
      // OLMoE normalises the whole projected q and k; Qwen3 normalises each head (weight of
      // head_dim shared by the heads).
      if (m.architecture == "OlmoeForCausalLM") c.norms += q + kv;
      else c.norms += 2 * int64_t{a.head_dim};
    }
  }
  if (a.sinks) c.proj += nh;
  return c;
}

}  // namespace

ParamBreakdown count_params(const ModelSpec& m) {
  ParamBreakdown p;
  const int64_t h = m.hidden_size;
  const int64_t L = m.num_layers;
  const auto& moe = m.moe;
  p.embedding = int64_t{m.vocab_size} * h;
  p.lm_head = m.tie_word_embeddings ? 0 : int64_t{m.vocab_size} * h;

  const AttnCount a = attention_params_per_layer(m);
  p.attention = a.proj * L;
  // Per layer: input_layernorm + post_attention_layernorm (+ attention-internal norms); final norm.
  p.norms = (2 * h + a.norms) * L + h;

  const int64_t moe_layers = m.num_moe_layers();
  const int64_t dense_layers = m.num_dense_layers();
  p.dense_ffn = dense_layers * 3 * h * m.dense_intermediate_size;  // gate, up, down

  const int64_t ie = moe.expert_intermediate_size;
  p.per_expert = 3 * h * ie + (moe.expert_bias ? 2 * ie + h : 0);  // gate_up (+bias), down (+bias)
  p.routed_experts = moe_layers * moe.num_experts * p.per_expert;
  p.shared_experts =
      moe_layers * (3 * h * moe.shared_intermediate_size + (moe.shared_expert_gate ? h : 0));
  int64_t router_per_layer = int64_t{moe.num_experts} * h;
  if (moe.router_bias) router_per_layer += moe.num_experts;
  if (moe.score_correction_bias) router_per_layer += moe.num_experts;
  p.router = moe_layers * router_per_layer;

  p.active = p.total() - p.routed_experts + moe_layers * moe.top_k * p.per_expert;
  return p;
}

double weight_bytes(const ModelSpec& m) {
  const ParamBreakdown p = count_params(m);
  // Quantised checkpoints (fp8, mxfp4) keep embeddings, LM head, norms and router in 16 bits.
  const double wide = dtype_bytes(m.weight_dtype) >= 2.0 ? dtype_bytes(m.weight_dtype) : 2.0;
  const double linear = dtype_bytes(m.weight_dtype);
  const double expert = dtype_bytes(m.expert_weight_dtype);
  return wide * double(p.embedding + p.lm_head + p.norms + p.router) +
         linear * double(p.attention + p.dense_ffn) +
         expert * double(p.routed_experts + p.shared_experts);
}

double kv_bytes_per_token(const ModelSpec& m) {
  const auto& a = m.attention;
  const double per_layer = a.type == AttentionType::mla
                               ? double(a.kv_lora_rank + a.qk_rope_head_dim)
                               : 2.0 * a.num_kv_heads * a.head_dim;
  return per_layer * m.num_layers * dtype_bytes(m.kv_dtype);
}

}  // namespace mixserve
