// Bad model files: each case must throw InputError whose message names the file and the key.
#include <doctest/doctest.h>

#include <string>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"

using namespace mixserve;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string shipped_text(const std::string& name) {
  return read_text_file(data_dir() / "configs" / "models" / (name + ".yaml"));
}

std::string replaced(std::string s, const std::string& from, const std::string& to) {
  const auto pos = s.find(from);
  REQUIRE_MESSAGE(pos != std::string::npos, from);
  s.replace(pos, from.size(), to);
  return s;
}

void expect_model_error(const std::string& text, const std::string& key) {
  const std::string origin = "bad-model.yaml";
  try {
    parse_model_yaml(text, origin);
    FAIL("no InputError for " << key);
  } catch (const InputError& e) {
    INFO(std::string(e.what()));
    CHECK(contains(e.what(), origin));
    CHECK(contains(e.what(), key));
  }
}

}  // namespace

TEST_CASE("model YAML: malformed and truncated documents") {
  const std::string v3 = shipped_text("deepseek-v3");
  // Unclosed flow map.
  expect_model_error(replaced(v3, "attention:\n", "attention: {type: mla,\n"), "line");
  // Truncated in the middle of the attention block: the moe block and kv_lora_rank are gone.
  expect_model_error(v3.substr(0, v3.find("  kv_lora_rank")), "kv_lora_rank");
  expect_model_error("", "document");
  expect_model_error("- just\n- a list\n", "document");
}

TEST_CASE("model YAML: missing keys, wrong types, bad sizes, unknown keys") {
  const std::string q = shipped_text("qwen3-30b-a3b");
  expect_model_error(replaced(q, "hidden_size: 2048\n", ""), "hidden_size");
  expect_model_error(replaced(q, "hidden_size: 2048", "hidden_size: 2048.5"), "hidden_size");
  expect_model_error(replaced(q, "hidden_size: 2048", "hidden_size: wide"), "hidden_size");
  expect_model_error(replaced(q, "num_layers: 48", "num_layers: 0"), "num_layers");
  expect_model_error(replaced(q, "num_heads: 32", "num_heads: -32"), "attention.num_heads");
  expect_model_error(replaced(q, "num_kv_heads: 4", "num_kv_heads: 5"), "attention.num_kv_heads");
  expect_model_error(replaced(q, "top_k: 8", "top_k: 129"), "moe.top_k");
  expect_model_error(replaced(q, "top_k: 8", "top_k: [8]"), "moe.top_k");
  expect_model_error(replaced(q, "qk_norm: true", "qk_norm: maybe"), "attention.qk_norm");
  expect_model_error(replaced(q, "scoring: softmax", "scoring: argmax"), "moe.scoring");
  expect_model_error(replaced(q, "type: gqa", "type: linear"), "attention.type");
  expect_model_error(replaced(q, "weights: bf16", "weights: int3"), "dtypes.weights");
  expect_model_error(replaced(q, "vocab_size:", "vocab_sise:"), "vocab_sise");
  expect_model_error(replaced(q, "num_dense_layers: 0", "num_dense_layers: 49"), "num_dense_layers");
  expect_model_error(replaced(q, "num_dense_layers: 0", "moe_layers: every 0 from 1"), "moe_layers");
  expect_model_error(replaced(q, "num_dense_layers: 0", "moe_layers: [1, 48]"), "moe_layers");
  expect_model_error(replaced(q, "num_dense_layers: 0\n", ""), "num_dense_layers");
  // Dense layers need a dense FFN width.
  expect_model_error(replaced(q, "num_dense_layers: 0", "num_dense_layers: 2"),
                     "moe.dense_intermediate_size");
  // Shared experts need their width.
  expect_model_error(replaced(q, "top_k: 8", "top_k: 8\n  num_shared_experts: 1"),
                     "moe.shared_intermediate_size");
  // Sliding layers need a window.
  expect_model_error(replaced(q, "num_dense_layers: 0", "num_dense_layers: 0\nsliding_layers: all"),
                     "attention.sliding_window");
  const std::string v3 = shipped_text("deepseek-v3");
  expect_model_error(replaced(v3, "head_dim: 192", "head_dim: 128"), "attention.head_dim");
  expect_model_error(replaced(v3, "n_group: 8", "n_group: 7"), "moe.n_group");
  expect_model_error(replaced(v3, "kv_lora_rank: 512", "kv_lora_rank: 0"), "attention.kv_lora_rank");
  // MLA-only keys on a GQA model.
  expect_model_error(replaced(q, "head_dim: 128", "head_dim: 128\n  kv_lora_rank: 512"),
                     "attention.kv_lora_rank");
}

TEST_CASE("model files: nonexistent path and unknown shipped name") {
  try {
    load_model("/nonexistent/dir/model.yaml");
    FAIL("no InputError");
  } catch (const InputError& e) {
    CHECK(contains(e.what(), "/nonexistent/dir/model.yaml"));
  }
  try {
    load_model("deepseek-v9");
    FAIL("no InputError");
  } catch (const InputError& e) {
    const std::string msg = e.what();
    CHECK(contains(msg, "deepseek-v9"));
    for (const auto& n : shipped_models()) CHECK(contains(msg, n));
  }
}
