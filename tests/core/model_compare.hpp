// Field-by-field comparison of two ModelSpecs for the core tests (name and source excepted:
// an imported config names itself after its file).
#pragma once
#include <doctest/doctest.h>

#include "mixserve/core/model.hpp"

inline void check_same_model(const mixserve::ModelSpec& a, const mixserve::ModelSpec& b) {
  CHECK(a.architecture == b.architecture);
  CHECK(a.hidden_size == b.hidden_size);
  CHECK(a.num_layers == b.num_layers);
  CHECK(a.vocab_size == b.vocab_size);
  CHECK(a.tie_word_embeddings == b.tie_word_embeddings);
  CHECK(a.dense_intermediate_size == b.dense_intermediate_size);
  CHECK(a.num_mtp_layers == b.num_mtp_layers);
  CHECK(a.weight_dtype == b.weight_dtype);
  CHECK(a.expert_weight_dtype == b.expert_weight_dtype);
  CHECK(a.activation_dtype == b.activation_dtype);
  CHECK(a.kv_dtype == b.kv_dtype);
  CHECK(a.max_position_embeddings == b.max_position_embeddings);
  CHECK(a.rope_theta == b.rope_theta);
  CHECK(a.rms_norm_eps == b.rms_norm_eps);
  REQUIRE(a.layers.size() == b.layers.size());
  for (size_t i = 0; i < a.layers.size(); ++i) {
    INFO("layer " << i);
    CHECK(a.layers[i].moe == b.layers[i].moe);
    CHECK(a.layers[i].sliding == b.layers[i].sliding);
  }
  const auto &x = a.attention, &y = b.attention;
  CHECK(x.type == y.type);
  CHECK(x.num_heads == y.num_heads);
  CHECK(x.num_kv_heads == y.num_kv_heads);
  CHECK(x.head_dim == y.head_dim);
  CHECK(x.q_lora_rank == y.q_lora_rank);
  CHECK(x.kv_lora_rank == y.kv_lora_rank);
  CHECK(x.qk_nope_head_dim == y.qk_nope_head_dim);
  CHECK(x.qk_rope_head_dim == y.qk_rope_head_dim);
  CHECK(x.v_head_dim == y.v_head_dim);
  CHECK(x.qk_norm == y.qk_norm);
  CHECK(x.qkv_bias == y.qkv_bias);
  CHECK(x.o_bias == y.o_bias);
  CHECK(x.sinks == y.sinks);
  CHECK(x.sliding_window == y.sliding_window);
  const auto &e = a.moe, &f = b.moe;
  CHECK(e.num_experts == f.num_experts);
  CHECK(e.top_k == f.top_k);
  CHECK(e.expert_intermediate_size == f.expert_intermediate_size);
  CHECK(e.num_shared_experts == f.num_shared_experts);
  CHECK(e.shared_intermediate_size == f.shared_intermediate_size);
  CHECK(e.shared_expert_gate == f.shared_expert_gate);
  CHECK(e.scoring == f.scoring);
  CHECK(e.topk_before_softmax == f.topk_before_softmax);
  CHECK(e.norm_topk_prob == f.norm_topk_prob);
  CHECK(e.routed_scaling_factor == f.routed_scaling_factor);
  CHECK(e.n_group == f.n_group);
  CHECK(e.topk_group == f.topk_group);
  CHECK(e.router_bias == f.router_bias);
  CHECK(e.score_correction_bias == f.score_correction_bias);
  CHECK(e.expert_bias == f.expert_bias);
}
