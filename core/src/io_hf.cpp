// Import of Hugging Face config.json files of the supported MoE architectures into ModelSpec.
// Each architecture's keys and defaults follow its transformers configuration class; quirks
// handled here are listed in the comment of each branch.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "model_util.hpp"

namespace mixserve {

namespace {

using nlohmann::json;

// Reads typed values of one config.json, naming the file and the key in every error.
class JsonReader {
 public:
  JsonReader(const json& j, std::string origin) : j_(j), origin_(std::move(origin)) {}

  bool has(const std::string& key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  const json& at(const std::string& key) const { return j_.at(key); }
  const std::string& origin() const { return origin_; }

  [[noreturn]] void fail(const std::string& key, const std::string& expected,
                         const std::string& got) const {
    throw_input_error(origin_, key, expected, got);
  }

  int64_t i64(const std::string& key) const {
    if (!has(key)) fail(key, "an integer", "missing");
    return as_i64(j_.at(key), key);
  }
  int64_t i64(const std::string& key, int64_t def) const { return has(key) ? i64(key) : def; }
  int integer(const std::string& key) const { return narrow(i64(key), key); }
  int integer(const std::string& key, int def) const { return has(key) ? integer(key) : def; }
  int positive(const std::string& key) const {
    const int v = integer(key);
    if (v <= 0) fail(key, "an integer > 0", std::to_string(v));
    return v;
  }
  int nonneg(const std::string& key, int def) const {
    const int v = integer(key, def);
    if (v < 0) fail(key, "an integer >= 0", std::to_string(v));
    return v;
  }
  double num(const std::string& key, double def) const {
    if (!has(key)) return def;
    const json& v = j_.at(key);
    if (!v.is_number()) fail(key, "a number", v.dump());
    return v.get<double>();
  }
  bool boolean(const std::string& key, bool def) const {
    if (!has(key)) return def;
    const json& v = j_.at(key);
    if (!v.is_boolean()) fail(key, "true or false", v.dump());
    return v.get<bool>();
  }
  std::string str(const std::string& key, const std::string& def) const {
    if (!has(key)) return def;
    const json& v = j_.at(key);
    if (!v.is_string()) fail(key, "a string", v.dump());
    return v.get<std::string>();
  }
  std::vector<int64_t> int_list(const std::string& key) const {
    std::vector<int64_t> out;
    if (!has(key)) return out;
    const json& v = j_.at(key);
    if (!v.is_array()) fail(key, "a list of integers", v.dump());
    for (size_t i = 0; i < v.size(); ++i) out.push_back(as_i64(v[i], fmt::format("{}[{}]", key, i)));
    return out;
  }
  std::vector<std::string> str_list(const std::string& key) const {
    std::vector<std::string> out;
    if (!has(key)) return out;
    const json& v = j_.at(key);
    if (!v.is_array()) fail(key, "a list of strings", v.dump());
    for (size_t i = 0; i < v.size(); ++i) {
      if (!v[i].is_string()) fail(fmt::format("{}[{}]", key, i), "a string", v[i].dump());
      out.push_back(v[i].get<std::string>());
    }
    return out;
  }

 private:
  int64_t as_i64(const json& v, const std::string& key) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d)) return static_cast<int64_t>(d);
    }
    fail(key, "an integer", v.dump());
  }
  int narrow(int64_t v, const std::string& key) const {
    if (v > INT32_MAX || v < INT32_MIN) fail(key, "an integer that fits 32 bits", std::to_string(v));
    return static_cast<int>(v);
  }
  const json& j_;
  std::string origin_;
};

// torch_dtype of the checkpoint -> the dtype MixServe serves it in. float32 checkpoints are
// served in bf16 (16-bit serving is what engines do with fp32 checkpoints, e.g. vLLM dtype=auto).
DType served_dtype(const JsonReader& r) {
  const std::string key = r.has("torch_dtype") ? "torch_dtype" : "dtype";
  const std::string s = r.str(key, "bfloat16");
  if (s == "bfloat16" || s == "float32") return DType::bf16;
  if (s == "float16") return DType::fp16;
  r.fail(key, "bfloat16, float16 or float32", s);
}

// Common decoder fields.
void read_common(const JsonReader& r, ModelSpec& m) {
  m.hidden_size = r.positive("hidden_size");
  m.num_layers = r.positive("num_hidden_layers");
  m.vocab_size = r.positive("vocab_size");
  m.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  m.max_position_embeddings = r.nonneg("max_position_embeddings", 0);
  m.rope_theta = r.num("rope_theta", 10000.0);
  m.rms_norm_eps = r.num("rms_norm_eps", 1e-6);
  m.weight_dtype = served_dtype(r);
  m.expert_weight_dtype = m.weight_dtype;
  m.activation_dtype = m.weight_dtype;
  m.kv_dtype = m.weight_dtype;
  auto& a = m.attention;
  a.num_heads = r.positive("num_attention_heads");
  // num_key_value_heads absent -> MHA (the transformers default).
  a.num_kv_heads = r.has("num_key_value_heads") ? r.positive("num_key_value_heads") : a.num_heads;
  if (m.hidden_size % a.num_heads != 0 && !r.has("head_dim"))
    r.fail("head_dim", "present when hidden_size is not a multiple of num_attention_heads",
           "missing");
  // head_dim may differ from hidden/heads (Qwen3, gpt-oss): the q width is heads * head_dim.
  a.head_dim = r.has("head_dim") ? r.positive("head_dim") : m.hidden_size / a.num_heads;
  a.type = a.num_kv_heads == a.num_heads ? AttentionType::mha : AttentionType::gqa;
  m.layers.assign(static_cast<size_t>(m.num_layers), LayerSpec{true, false});
}

void read_deepseek(const JsonReader& r, ModelSpec& m, bool v3) {
  auto& a = m.attention;
  a.type = AttentionType::mla;
  a.q_lora_rank = r.nonneg("q_lora_rank", 0);  // null (V2-Lite): full q_proj
  a.kv_lora_rank = r.positive("kv_lora_rank");
  a.qk_nope_head_dim = r.positive("qk_nope_head_dim");
  a.qk_rope_head_dim = r.positive("qk_rope_head_dim");
  a.v_head_dim = r.positive("v_head_dim");
  a.head_dim = a.qk_nope_head_dim + a.qk_rope_head_dim;
  a.qkv_bias = a.o_bias = r.boolean("attention_bias", false);

  auto& e = m.moe;
  e.num_experts = r.positive("n_routed_experts");
  e.top_k = r.positive("num_experts_per_tok");
  e.expert_intermediate_size = r.positive("moe_intermediate_size");
  e.num_shared_experts = r.nonneg("n_shared_experts", 0);
  // The shared experts are one MLP of width n_shared * moe_intermediate_size.
  e.shared_intermediate_size = e.num_shared_experts * e.expert_intermediate_size;
  const std::string scoring = r.str("scoring_func", v3 ? "sigmoid" : "softmax");
  const auto s = detail::parse_scoring(scoring);
  if (!s) r.fail("scoring_func", "softmax or sigmoid", scoring);
  e.scoring = *s;
  const std::string method = r.str("topk_method", v3 ? "noaux_tc" : "greedy");
  if (method != "greedy" && method != "group_limited_greedy" && method != "noaux_tc")
    r.fail("topk_method", "greedy, group_limited_greedy or noaux_tc", method);
  if (method == "greedy") {
    e.n_group = e.topk_group = 1;  // plain top-k: groups play no part
  } else {
    e.n_group = r.has("n_group") ? r.positive("n_group") : 1;
    e.topk_group = r.has("topk_group") ? r.positive("topk_group") : 1;
  }
  e.score_correction_bias = method == "noaux_tc";
  e.norm_topk_prob = r.boolean("norm_topk_prob", false);
  e.routed_scaling_factor = r.num("routed_scaling_factor", 1.0);

  // Layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0.
  const int first_k = r.nonneg("first_k_dense_replace", 0);
  const int freq = r.has("moe_layer_freq") ? r.positive("moe_layer_freq") : 1;
  for (int i = 0; i < m.num_layers; ++i)
    m.layers[static_cast<size_t>(i)].moe = i >= first_k && i % freq == 0;
  if (m.num_dense_layers() > 0) m.dense_intermediate_size = r.positive("intermediate_size");
  m.num_mtp_layers = r.nonneg("num_nextn_predict_layers", 0);

  if (r.has("quantization_config")) {
    const JsonReader q(r.at("quantization_config"), r.origin());
    const std::string method_q = q.str("quant_method", "");
    const auto block = q.int_list("weight_block_size");
    if (method_q != "fp8")
      r.fail("quantization_config.quant_method", "fp8 (the only scheme DeepSeek ships)", method_q);
    const bool block128 = block.size() == 2 && block[0] == 128 && block[1] == 128;
    m.weight_dtype = m.expert_weight_dtype = block128 ? DType::fp8_block : DType::fp8_e4m3;
  }
}

// Qwen2-MoE / Qwen3-MoE layer rule: MoE iff not in mlp_only_layers, num_experts > 0 and
// (i + 1) % decoder_sparse_step == 0. Sliding window on layers >= max_window_layers when
// use_sliding_window is set.
void read_qwen_layers(const JsonReader& r, ModelSpec& m) {
  const int step = r.has("decoder_sparse_step") ? r.positive("decoder_sparse_step") : 1;
  const auto mlp_only = r.int_list("mlp_only_layers");
  const std::set<int64_t> dense(mlp_only.begin(), mlp_only.end());
  for (int i = 0; i < m.num_layers; ++i)
    m.layers[static_cast<size_t>(i)].moe = !dense.count(i) && (i + 1) % step == 0;
  if (m.num_dense_layers() > 0) m.dense_intermediate_size = r.positive("intermediate_size");
  if (r.boolean("use_sliding_window", false)) {
    m.attention.sliding_window = r.positive("sliding_window");
    const int from = r.nonneg("max_window_layers", 0);
    for (int i = from; i < m.num_layers; ++i) m.layers[static_cast<size_t>(i)].sliding = true;
  }
}

void read_qwen3_moe(const JsonReader& r, ModelSpec& m) {
  m.attention.qk_norm = true;  // Qwen3 always normalises q and k per head
  m.attention.qkv_bias = m.attention.o_bias = r.boolean("attention_bias", false);
  auto& e = m.moe;
  e.num_experts = r.positive("num_experts");
  e.top_k = r.positive("num_experts_per_tok");
  e.expert_intermediate_size = r.positive("moe_intermediate_size");
  e.norm_topk_prob = r.boolean("norm_topk_prob", false);
  read_qwen_layers(r, m);
}

void read_qwen2_moe(const JsonReader& r, ModelSpec& m) {
  m.attention.qkv_bias = true;  // Qwen2 q/k/v projections carry biases, o_proj does not
  auto& e = m.moe;
  e.num_experts = r.positive("num_experts");
  e.top_k = r.positive("num_experts_per_tok");
  e.expert_intermediate_size = r.positive("moe_intermediate_size");
  e.norm_topk_prob = r.boolean("norm_topk_prob", false);
  e.shared_intermediate_size = r.nonneg("shared_expert_intermediate_size", 0);
  e.num_shared_experts = e.shared_intermediate_size > 0 ? 1 : 0;
  e.shared_expert_gate = e.num_shared_experts > 0;  // sigmoid(x . w) scales the shared expert
  read_qwen_layers(r, m);
}

void read_mixtral(const JsonReader& r, ModelSpec& m) {
  auto& e = m.moe;
  e.num_experts = r.positive("num_local_experts");
  e.top_k = r.positive("num_experts_per_tok");
  e.expert_intermediate_size = r.positive("intermediate_size");  // per expert
  e.norm_topk_prob = true;  // softmax over all, top-k, renormalised (implicit in Mixtral)
  if (r.has("sliding_window")) {
    m.attention.sliding_window = r.positive("sliding_window");
    for (auto& l : m.layers) l.sliding = true;
  }
}

void read_olmoe(const JsonReader& r, ModelSpec& m) {
  m.attention.qk_norm = true;  // OLMoE normalises the projected q and k
  m.attention.qkv_bias = m.attention.o_bias = r.boolean("attention_bias", false);
  auto& e = m.moe;
  e.num_experts = r.positive("num_experts");
  e.top_k = r.positive("num_experts_per_tok");
  e.expert_intermediate_size = r.positive("intermediate_size");  // per expert
  e.norm_topk_prob = r.boolean("norm_topk_prob", false);
}

void read_gpt_oss(const JsonReader& r, ModelSpec& m) {
  auto& a = m.attention;
  a.qkv_bias = a.o_bias = r.boolean("attention_bias", true);
  a.sinks = true;  // one learned sink logit per head
  auto& e = m.moe;
  e.num_experts = r.positive("num_local_experts");
  // The config carries experts_per_token (and, in newer copies, num_experts_per_tok).
  const std::string k_key = r.has("experts_per_token") ? "experts_per_token" : "num_experts_per_tok";
  e.top_k = r.positive(k_key);
  e.expert_intermediate_size = r.positive("intermediate_size");
  e.topk_before_softmax = true;  // top-k on the router logits, softmax over the k
  e.router_bias = true;
  e.expert_bias = true;
  const auto types = r.str_list("layer_types");
  if (!types.empty()) {
    if (static_cast<int>(types.size()) != m.num_layers)
      r.fail("layer_types", fmt::format("a list of num_hidden_layers ({}) entries", m.num_layers),
             std::to_string(types.size()));
    for (size_t i = 0; i < types.size(); ++i) {
      if (types[i] != "sliding_attention" && types[i] != "full_attention")
        r.fail(fmt::format("layer_types[{}]", i), "sliding_attention or full_attention", types[i]);
      m.layers[i].sliding = types[i] == "sliding_attention";
    }
  }
  if (std::any_of(m.layers.begin(), m.layers.end(), [](const LayerSpec& l) { return l.sliding; }))
    a.sliding_window = r.positive("sliding_window");
  if (r.has("quantization_config")) {
    const JsonReader q(r.at("quantization_config"), r.origin());
    const std::string method = q.str("quant_method", "");
    if (method != "mxfp4")
      r.fail("quantization_config.quant_method", "mxfp4 (the scheme gpt-oss ships)", method);
    m.expert_weight_dtype = DType::mxfp4;  // experts only; attention, router, embeddings stay bf16
  }
}

using Reader = void (*)(const JsonReader&, ModelSpec&);
struct Arch {
  const char* name;
  Reader read;
};
constexpr Arch kArchs[] = {
    {"DeepseekV2ForCausalLM", [](const JsonReader& r, ModelSpec& m) { read_deepseek(r, m, false); }},
    {"DeepseekV3ForCausalLM", [](const JsonReader& r, ModelSpec& m) { read_deepseek(r, m, true); }},
    {"Qwen3MoeForCausalLM", read_qwen3_moe},
    {"Qwen2MoeForCausalLM", read_qwen2_moe},
    {"MixtralForCausalLM", read_mixtral},
    {"OlmoeForCausalLM", read_olmoe},
    {"GptOssForCausalLM", read_gpt_oss},
};

std::string model_name(const JsonReader& r, const std::string& origin) {
  std::string name = r.str("_name_or_path", "");
  if (name.empty()) {
    const std::filesystem::path p(origin);
    name = p.has_parent_path() ? p.parent_path().filename().string() : "";
  } else {
    name = std::filesystem::path(name).filename().string();
  }
  if (name.empty()) name = "imported";
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return name;
}

}  // namespace

std::vector<std::string> supported_hf_architectures() {
  std::vector<std::string> out;
  for (const auto& a : kArchs) out.emplace_back(a.name);
  return out;
}

ModelSpec import_hf_config(const std::string& json_text, const std::string& origin) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::parse_error& e) {
    throw InputError(
        fmt::format("{}: malformed JSON at byte {}: {}", origin, e.byte, e.what()));
  }
  if (!j.is_object()) throw_input_error(origin, "(document)", "a JSON object", j.type_name());
  const JsonReader r(j, origin);
  std::string supported;
  for (const auto& a : kArchs) supported += (supported.empty() ? "" : ", ") + std::string(a.name);
  const auto archs = r.str_list("architectures");
  if (archs.empty()) r.fail("architectures", fmt::format("a list with one of {}", supported), "missing");
  const Arch* arch = nullptr;
  for (const auto& a : kArchs)
    if (archs[0] == a.name) arch = &a;
  if (!arch) r.fail("architectures", fmt::format("one of the supported {}", supported), archs[0]);

  ModelSpec m;
  m.architecture = arch->name;
  m.source = origin;
  m.name = model_name(r, origin);
  read_common(r, m);
  arch->read(r, m);
  detail::validate_model(m, origin);
  return m;
}

}  // namespace mixserve
