#include <doctest/doctest.h>

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "model_compare.hpp"

using namespace mixserve;
using nlohmann::json;

namespace {

const std::filesystem::path kFixtures =
    std::filesystem::path(MIXSERVE_SOURCE_DIR) / "tests" / "core" / "fixtures";

std::string fixture_text(const std::string& name) {
  return read_text_file(kFixtures / (name + ".config.json"));
}

json fixture(const std::string& name) { return json::parse(fixture_text(name)); }

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

template <class Fn>
std::string input_error_of(Fn fn) {
  try {
    fn();
  } catch (const InputError& e) {
    return e.what();
  }
  FAIL("no InputError");
  return "";
}

}  // namespace

TEST_CASE("each HF fixture imports to its shipped model") {
  const std::pair<const char*, const char*> cases[] = {
      {"deepseek-v3", "deepseek-v3"},         {"deepseek-v3", "deepseek-r1"},
      {"deepseek-v2-lite", "deepseek-v2-lite"}, {"qwen3-235b-a22b", "qwen3-235b-a22b"},
      {"qwen2-57b-a14b", "qwen2-57b-a14b"},   {"mixtral-8x7b", "mixtral-8x7b"},
      {"olmoe-1b-7b", "olmoe-1b-7b"},         {"gpt-oss-20b", "gpt-oss-20b"},
  };
  for (const auto& [fix, shipped] : cases) {
    INFO(fix << " -> " << shipped);
    const ModelSpec imported = import_hf_config(fixture_text(fix), std::string(fix) + ".json");
    const ModelSpec expected = load_model(shipped);
    check_same_model(expected, imported);
    CHECK(count_params(imported).total() == count_params(expected).total());
  }
  // load_model takes a config.json path and a directory holding config.json.
  CHECK(load_model((kFixtures / "mixtral-8x7b.config.json").string()).num_layers == 32);
  const auto dir = std::filesystem::temp_directory_path() / "mixserve-test-core-hfdir";
  std::filesystem::create_directories(dir);
  write_file_atomic(dir / "config.json", fixture_text("olmoe-1b-7b"));
  const ModelSpec from_dir = load_model(dir.string());
  CHECK(from_dir.architecture == "OlmoeForCausalLM");
  CHECK(from_dir.name == "mixserve-test-core-hfdir");  // no _name_or_path: the folder's name
  std::filesystem::remove_all(dir);
}

TEST_CASE("HF import quirks") {
  SUBCASE("num_key_value_heads defaults to num_attention_heads") {
    json j = fixture("mixtral-8x7b");
    j.erase("num_key_value_heads");
    const ModelSpec m = import_hf_config(j.dump(), "mixtral.json");
    CHECK(m.attention.num_kv_heads == 32);
    CHECK(m.attention.type == AttentionType::mha);
  }
  SUBCASE("head_dim key gives a q width different from hidden") {
    const ModelSpec m = import_hf_config(fixture_text("qwen3-235b-a22b"), "q.json");
    CHECK(m.q_width() == 8192);
    CHECK(m.hidden_size == 4096);
    CHECK(m.attention.qk_norm);
  }
  SUBCASE("Qwen decoder_sparse_step and mlp_only_layers") {
    json j = fixture("qwen3-235b-a22b");
    j["num_hidden_layers"] = 8;
    j["decoder_sparse_step"] = 2;
    j["mlp_only_layers"] = {3};
    const ModelSpec m = import_hf_config(j.dump(), "q.json");
    // MoE iff (i+1) % 2 == 0 and i not in {3}: layers 1, 5, 7.
    CHECK(m.num_moe_layers() == 3);
    CHECK(m.layers[1].moe);
    CHECK_FALSE(m.layers[3].moe);
    CHECK(m.layers[5].moe);
    CHECK(m.layers[7].moe);
    CHECK(m.dense_intermediate_size == 12288);  // dense layers use intermediate_size
  }
  SUBCASE("DeepSeek first_k_dense_replace and moe_layer_freq") {
    json j = fixture("deepseek-v2-lite");
    j["num_hidden_layers"] = 10;
    j["first_k_dense_replace"] = 2;
    j["moe_layer_freq"] = 3;
    const ModelSpec m = import_hf_config(j.dump(), "ds.json");
    // MoE iff i >= 2 and i % 3 == 0: layers 3, 6, 9.
    CHECK(m.num_moe_layers() == 3);
    CHECK(m.layers[3].moe);
    CHECK(m.layers[9].moe);
    CHECK_FALSE(m.layers[4].moe);
  }
  SUBCASE("MLA without query LoRA, shared experts from n_shared_experts") {
    const ModelSpec m = import_hf_config(fixture_text("deepseek-v2-lite"), "lite.json");
    CHECK(m.attention.q_lora_rank == 0);
    CHECK(m.moe.shared_intermediate_size == 2 * 1408);
    CHECK(m.moe.n_group == 1);
    CHECK_FALSE(m.moe.score_correction_bias);
  }
  SUBCASE("DeepSeek-V3 routing and FP8 block quantisation") {
    const ModelSpec m = import_hf_config(fixture_text("deepseek-v3"), "v3.json");
    CHECK(m.moe.scoring == Scoring::sigmoid);
    CHECK(m.moe.score_correction_bias);
    CHECK(m.moe.n_group == 8);
    CHECK(m.moe.topk_group == 4);
    CHECK(m.moe.routed_scaling_factor == 2.5);
    CHECK(m.weight_dtype == DType::fp8_block);
    CHECK(m.num_mtp_layers == 1);
    CHECK(m.name == "deepseek-v3");
  }
  SUBCASE("Qwen2-MoE gated shared expert, sliding_window ignored unless use_sliding_window") {
    const ModelSpec m = import_hf_config(fixture_text("qwen2-57b-a14b"), "q2.json");
    CHECK(m.moe.shared_expert_gate);
    CHECK(m.moe.shared_intermediate_size == 20480);
    CHECK(m.attention.sliding_window == 0);
    json j = fixture("qwen2-57b-a14b");
    j["use_sliding_window"] = true;
    j["max_window_layers"] = 20;
    const ModelSpec s = import_hf_config(j.dump(), "q2.json");
    CHECK(s.attention.sliding_window == 131072);
    CHECK_FALSE(s.layers[19].sliding);
    CHECK(s.layers[20].sliding);
  }
  SUBCASE("gpt-oss layer types, sinks, biases, MXFP4 experts") {
    const ModelSpec m = import_hf_config(fixture_text("gpt-oss-20b"), "oss.json");
    CHECK(m.layers[0].sliding);
    CHECK_FALSE(m.layers[1].sliding);
    CHECK(m.attention.sinks);
    CHECK(m.attention.o_bias);
    CHECK(m.moe.router_bias);
    CHECK(m.moe.topk_before_softmax);
    CHECK(m.expert_weight_dtype == DType::mxfp4);
    CHECK(m.weight_dtype == DType::bf16);
    json j = fixture("gpt-oss-20b");
    j["layer_types"].erase(0);
    const std::string msg = input_error_of([&] { import_hf_config(j.dump(), "oss.json"); });
    CHECK(contains(msg, "oss.json"));
    CHECK(contains(msg, "layer_types"));
  }
  SUBCASE("OLMoE float32 checkpoint is served in bf16, qk-norm over the full width") {
    const ModelSpec m = import_hf_config(fixture_text("olmoe-1b-7b"), "olmoe.json");
    CHECK(m.weight_dtype == DType::bf16);
    CHECK(m.attention.qk_norm);
    // Per layer 2*2048 layer norms + q_norm 2048 + k_norm 2048; final norm 2048.
    CHECK(count_params(m).norms == 16LL * (4 * 2048) + 2048);
  }
}

TEST_CASE("HF import rejects bad configs naming the file and the key") {
  SUBCASE("unsupported architecture lists the supported ones") {
    json j = fixture("mixtral-8x7b");
    j["architectures"] = {"LlamaForCausalLM"};
    const std::string msg = input_error_of([&] { import_hf_config(j.dump(), "llama/config.json"); });
    CHECK(contains(msg, "llama/config.json"));
    CHECK(contains(msg, "architectures"));
    CHECK(contains(msg, "LlamaForCausalLM"));
    for (const auto& a : supported_hf_architectures()) CHECK(contains(msg, a));
  }
  SUBCASE("truncated JSON names the file and the byte position") {
    const std::string text = fixture_text("olmoe-1b-7b");
    const std::string msg =
        input_error_of([&] { import_hf_config(text.substr(0, text.size() / 2), "cut/config.json"); });
    CHECK(contains(msg, "cut/config.json"));
    CHECK(contains(msg, "byte"));
  }
  SUBCASE("wrong type") {
    json j = fixture("olmoe-1b-7b");
    j["hidden_size"] = "2048";
    const std::string msg = input_error_of([&] { import_hf_config(j.dump(), "t.json"); });
    CHECK(contains(msg, "t.json"));
    CHECK(contains(msg, "hidden_size"));
  }
  SUBCASE("missing key") {
    json j = fixture("deepseek-v3");
    j.erase("kv_lora_rank");
    const std::string msg = input_error_of([&] { import_hf_config(j.dump(), "m.json"); });
    CHECK(contains(msg, "m.json"));
    CHECK(contains(msg, "kv_lora_rank"));
  }
  SUBCASE("zero and negative sizes") {
    json j = fixture("mixtral-8x7b");
    j["num_local_experts"] = 0;
    std::string msg = input_error_of([&] { import_hf_config(j.dump(), "z.json"); });
    CHECK(contains(msg, "num_local_experts"));
    j = fixture("mixtral-8x7b");
    j["num_hidden_layers"] = -32;
    msg = input_error_of([&] { import_hf_config(j.dump(), "z.json"); });
    CHECK(contains(msg, "num_hidden_layers"));
  }
  SUBCASE("top-k above the expert count") {
    json j = fixture("mixtral-8x7b");
    j["num_experts_per_tok"] = 9;
    const std::string msg = input_error_of([&] { import_hf_config(j.dump(), "k.json"); });
    CHECK(contains(msg, "k.json"));
    CHECK(contains(msg, "top_k"));
  }
  SUBCASE("directory without config.json and unknown shipped name") {
    std::string msg = input_error_of([&] { load_model(kFixtures.string()); });
    CHECK(contains(msg, "config.json"));
    msg = input_error_of([&] { load_model("no-such-model"); });
    CHECK(contains(msg, "no-such-model"));
    CHECK(contains(msg, "deepseek-r1"));  // lists the shipped names
  }
}
