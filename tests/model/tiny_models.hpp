// Tiny configurations of the four supported architectures, imported from Hugging Face style
// config.json text (so the tests also cover the import path), and test helpers.
#pragma once
#include <cmath>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "mixserve/core/io.hpp"

namespace mixserve::model::test {

// Qwen3-MoE: GQA with head_dim * heads != hidden, per-head QK-norm, a dense first layer
// (mlp_only_layers), renormalised top-k.
inline ModelSpec tiny_qwen3() {
  return import_hf_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 16,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "vocab_size": 37, "intermediate_size": 24, "moe_intermediate_size": 12, "num_experts": 6,
    "num_experts_per_tok": 2, "norm_topk_prob": true, "mlp_only_layers": [0],
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false})",
                          "tiny-qwen3/config.json");
}

// Qwen2-MoE: MHA with QKV bias, shared expert with sigmoid gate, no renormalisation, tied
// embeddings.
inline ModelSpec tiny_qwen2() {
  return import_hf_config(R"({"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "vocab_size": 29, "intermediate_size": 40, "moe_intermediate_size": 8, "num_experts": 5,
    "num_experts_per_tok": 2, "norm_topk_prob": false, "shared_expert_intermediate_size": 20,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true})",
                          "tiny-qwen2/config.json");
}

// Mixtral: GQA, block_sparse_moe names (w1/w3/w2), renormalised top-2.
inline ModelSpec tiny_mixtral() {
  return import_hf_config(R"({"architectures": ["MixtralForCausalLM"], "hidden_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 31, "intermediate_size": 12, "num_local_experts": 4, "num_experts_per_tok": 2,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": false})",
                          "tiny-mixtral/config.json");
}

// OLMoE: MHA, QK-norm over the whole projection, top-3 of 8 without renormalisation.
inline ModelSpec tiny_olmoe() {
  return import_hf_config(R"({"architectures": ["OlmoeForCausalLM"], "hidden_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "vocab_size": 33, "intermediate_size": 8, "num_experts": 8, "num_experts_per_tok": 3,
    "norm_topk_prob": false, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": false})",
                          "tiny-olmoe/config.json");
}

inline std::vector<ModelSpec> tiny_models() {
  return {tiny_qwen3(), tiny_qwen2(), tiny_mixtral(), tiny_olmoe()};
}

// A fresh empty directory under the system temp dir, removed by the destructor.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag) {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("mixserve-model-" + tag + "-" + std::to_string(::getpid()) + "-" +
            std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

// max |a - b| / max |b|: relative to the largest reference value (a nonzero floor: the
// reference's scale), so values near zero do not blow the ratio up.
inline double max_rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::fabs(a[i] - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return a.size() != b.size() ? INFINITY : num / std::max(den, 1e-300);
}

}  // namespace mixserve::model::test
