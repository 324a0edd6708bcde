// Model files (configs/models/<name>.yaml). Schema (version 1; keys follow
// shared/reference/serving-and-models.md §A.3, with the `extra:` fields typed):
//   version, name, architecture, source, hidden_size, num_layers, vocab_size,
//   layer pattern: exactly one of  num_dense_layers: K        (first K dense, the rest MoE)
//                                  moe_layers: all | "every S from O" | [i, j, ...]
//   sliding_layers: none | all | "every S from O" | [i, ...]   (needs attention.sliding_window)
//   tie_word_embeddings, num_mtp_layers, max_position_embeddings, rope_theta, rms_norm_eps,
//   attention {type mha|gqa|mla, num_heads, num_kv_heads, head_dim, q_lora_rank (null = full q
//              projection), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
//              qk_norm, qkv_bias, o_bias, sinks, sliding_window},
//   moe {num_experts, top_k, expert_intermediate_size, dense_intermediate_size,
//        num_shared_experts, shared_intermediate_size (all shared experts together),
//        shared_expert_gate, scoring softmax|sigmoid, topk_before_softmax, norm_topk_prob,
//        routed_scaling_factor, n_group, topk_group, router_bias, score_correction_bias,
//        expert_bias},
//   dtypes {weights, experts, activations, kv_cache}.
#include <sstream>

#include <fmt/format.h>

#include "mixserve/core/enum_names.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "model_util.hpp"
#include "yaml_util.hpp"

namespace mixserve {

using detail::fmt_num;
using detail::YamlMap;

namespace detail {

std::optional<AttentionType> parse_attention_type(std::string_view s) {
  static constexpr auto kNames = MIXSERVE_ENUM_TABLE(AttentionType, MIXSERVE_ATTENTION_TYPES);
  return enum_parse(kNames, s);
}

std::optional<Scoring> parse_scoring(std::string_view s) {
  static constexpr auto kNames = MIXSERVE_ENUM_TABLE(Scoring, MIXSERVE_SCORING);
  return enum_parse(kNames, s);
}

std::optional<std::vector<bool>> parse_every(const std::string& text, int n) {
  std::istringstream in(text);
  std::string every, from, rest;
  long step = 0, offset = 0;
  if (!(in >> every >> step >> from >> offset) || every != "every" || from != "from" ||
      (in >> rest) || step <= 0 || offset < 0)
    return std::nullopt;
  std::vector<bool> flags(static_cast<size_t>(n), false);
  for (long i = offset; i < n; i += step) flags[static_cast<size_t>(i)] = true;
  return flags;
}

std::string describe_every(const std::vector<bool>& flags) {
  const int n = static_cast<int>(flags.size());
  for (int step = 1; step <= n; ++step)
    for (int offset = 0; offset < n; ++offset) {
      bool ok = true;
      for (int i = 0; i < n && ok; ++i)
        ok = flags[static_cast<size_t>(i)] == (i >= offset && (i - offset) % step == 0);
      if (ok) return fmt::format("every {} from {}", step, offset);
    }
  return "";
}

void validate_model(const ModelSpec& m, const std::string& origin) {
  auto fail = [&](const std::string& key, const std::string& expected, const std::string& got) {
    throw_input_error(origin, key, expected, got);
  };
  if (m.hidden_size <= 0) fail("hidden_size", "an integer > 0", std::to_string(m.hidden_size));
  if (m.num_layers <= 0) fail("num_layers", "an integer > 0", std::to_string(m.num_layers));
  if (m.vocab_size <= 0) fail("vocab_size", "an integer > 0", std::to_string(m.vocab_size));
  if (static_cast<int>(m.layers.size()) != m.num_layers)
    fail("num_layers", fmt::format("the length of the layer pattern ({})", m.layers.size()),
         std::to_string(m.num_layers));
  const auto& a = m.attention;
  if (a.num_heads <= 0) fail("attention.num_heads", "an integer > 0", std::to_string(a.num_heads));
  if (a.num_kv_heads <= 0)
    fail("attention.num_kv_heads", "an integer > 0", std::to_string(a.num_kv_heads));
  if (a.type == AttentionType::mla) {
    if (a.kv_lora_rank <= 0 || a.qk_nope_head_dim <= 0 || a.qk_rope_head_dim <= 0 ||
        a.v_head_dim <= 0)
      fail("attention", "kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim > 0 for mla",
           "");
    if (a.q_lora_rank < 0)
      fail("attention.q_lora_rank", "an integer >= 0 or null", std::to_string(a.q_lora_rank));
    if (a.head_dim != a.qk_nope_head_dim + a.qk_rope_head_dim)
      fail("attention.head_dim", "qk_nope_head_dim + qk_rope_head_dim for mla",
           std::to_string(a.head_dim));
  } else {
    if (a.head_dim <= 0) fail("attention.head_dim", "an integer > 0", std::to_string(a.head_dim));
    if (a.num_heads % a.num_kv_heads != 0)
      fail("attention.num_kv_heads", fmt::format("a divisor of num_heads ({})", a.num_heads),
           std::to_string(a.num_kv_heads));
    if (a.type == AttentionType::mha && a.num_kv_heads != a.num_heads)
      fail("attention.num_kv_heads", "equal to num_heads for mha (use gqa otherwise)",
           std::to_string(a.num_kv_heads));
  }
  if (a.sliding_window < 0)
    fail("attention.sliding_window", "an integer >= 0", std::to_string(a.sliding_window));
  bool any_sliding = false;
  for (const auto& l : m.layers) any_sliding = any_sliding || l.sliding;
  if (any_sliding && a.sliding_window <= 0)
    fail("attention.sliding_window", "> 0 when sliding_layers are given", "0");

  const auto& moe = m.moe;
  if (m.num_moe_layers() > 0) {
    if (moe.num_experts <= 0)
      fail("moe.num_experts", "an integer > 0", std::to_string(moe.num_experts));
    if (moe.top_k <= 0 || moe.top_k > moe.num_experts)
      fail("moe.top_k", fmt::format("an integer in [1, num_experts = {}]", moe.num_experts),
           std::to_string(moe.top_k));
    if (moe.expert_intermediate_size <= 0)
      fail("moe.expert_intermediate_size", "an integer > 0",
           std::to_string(moe.expert_intermediate_size));
    if (moe.n_group <= 0 || moe.num_experts % moe.n_group != 0)
      fail("moe.n_group", fmt::format("a divisor of num_experts ({})", moe.num_experts),
           std::to_string(moe.n_group));
    if (moe.topk_group <= 0 || moe.topk_group > moe.n_group)
      fail("moe.topk_group", fmt::format("an integer in [1, n_group = {}]", moe.n_group),
           std::to_string(moe.topk_group));
  }
  if (moe.num_shared_experts < 0)
    fail("moe.num_shared_experts", "an integer >= 0", std::to_string(moe.num_shared_experts));
  if ((moe.num_shared_experts > 0) != (moe.shared_intermediate_size > 0))
    fail("moe.shared_intermediate_size",
         "> 0 exactly when num_shared_experts > 0 (total width of the shared experts)",
         std::to_string(moe.shared_intermediate_size));
  if (m.num_dense_layers() > 0 && m.dense_intermediate_size <= 0)
    fail("moe.dense_intermediate_size", "an integer > 0 (the model has dense layers)",
         std::to_string(m.dense_intermediate_size));
  if (m.num_mtp_layers < 0)
    fail("num_mtp_layers", "an integer >= 0", std::to_string(m.num_mtp_layers));
}

}  // namespace detail

namespace {

// Reads a layer selection ("all", "none", "every S from O" or a list of indices).
std::vector<bool> read_layer_set(const YamlMap& root, std::string_view key, int n) {
  const YAML::Node node = root.node(key);
  const std::string expected =
      fmt::format("all, none, \"every S from O\" or a list of layer indices in [0, {})", n);
  if (node.IsSequence()) {
    std::vector<bool> flags(static_cast<size_t>(n), false);
    for (size_t i = 0; i < node.size(); ++i) {
      const int64_t idx = root.as_i64(node[i], fmt::format("{}[{}]", root.key_path(key), i));
      if (idx < 0 || idx >= n) root.fail(key, expected, std::to_string(idx));
      flags[static_cast<size_t>(idx)] = true;
    }
    return flags;
  }
  const std::string s = root.str(key);
  if (s == "all") return std::vector<bool>(static_cast<size_t>(n), true);
  if (s == "none") return std::vector<bool>(static_cast<size_t>(n), false);
  auto flags = detail::parse_every(s, n);
  if (!flags) root.fail(key, expected, s);
  return *flags;
}

void emit_layer_set(YAML::Emitter& out, const std::vector<bool>& flags) {
  bool all = true, none = true;
  for (bool f : flags) {
    all = all && f;
    none = none && !f;
  }
  if (all) {
    out << "all";
    return;
  }
  if (none) {
    out << "none";
    return;
  }
  if (const std::string every = detail::describe_every(flags); !every.empty()) {
    out << every;
    return;
  }
  out << YAML::Flow << YAML::BeginSeq;
  for (size_t i = 0; i < flags.size(); ++i)
    if (flags[i]) out << i;
  out << YAML::EndSeq;
}

}  // namespace

ModelSpec parse_model_yaml(const std::string& text, const std::string& origin) {
  const YamlMap root(detail::yaml_parse(text, origin), origin, "");
  root.allow_keys({"version", "name", "architecture", "source", "hidden_size", "num_layers",
                   "num_dense_layers", "moe_layers", "sliding_layers", "vocab_size",
                   "tie_word_embeddings", "num_mtp_layers", "max_position_embeddings",
                   "rope_theta", "rms_norm_eps", "attention", "moe", "dtypes"});
  if (root.has("version") && root.integer("version") != 1)
    root.fail("version", "1", std::to_string(root.integer("version")));
  ModelSpec m;
  m.name = root.str("name");
  m.architecture = root.str("architecture", "");
  m.source = root.str("source", "");
  m.hidden_size = root.positive_int("hidden_size");
  m.num_layers = root.positive_int("num_layers");
  m.vocab_size = root.positive_int("vocab_size");
  m.tie_word_embeddings = root.boolean("tie_word_embeddings", false);
  m.num_mtp_layers = root.nonneg_int("num_mtp_layers", 0);
  m.max_position_embeddings = root.nonneg_int("max_position_embeddings", 0);
  m.rope_theta = root.positive_num("rope_theta", m.rope_theta);
  m.rms_norm_eps = root.positive_num("rms_norm_eps", m.rms_norm_eps);

  // Layer pattern.
  const bool has_k = root.has("num_dense_layers"), has_list = root.has("moe_layers");
  if (has_k == has_list)
    root.fail("num_dense_layers", "exactly one of num_dense_layers or moe_layers",
              has_k ? "both" : "neither");
  std::vector<bool> moe_flags;
  if (has_k) {
    const int k = root.nonneg_int("num_dense_layers", 0);
    if (k > m.num_layers)
      root.fail("num_dense_layers", fmt::format("an integer in [0, num_layers = {}]", m.num_layers),
                std::to_string(k));
    moe_flags.assign(static_cast<size_t>(m.num_layers), true);
    for (int i = 0; i < k; ++i) moe_flags[static_cast<size_t>(i)] = false;
  } else {
    moe_flags = read_layer_set(root, "moe_layers", m.num_layers);
  }
  std::vector<bool> sliding(static_cast<size_t>(m.num_layers), false);
  if (root.has("sliding_layers")) sliding = read_layer_set(root, "sliding_layers", m.num_layers);
  m.layers.resize(static_cast<size_t>(m.num_layers));
  for (size_t i = 0; i < m.layers.size(); ++i) m.layers[i] = {moe_flags[i], sliding[i]};

  // Attention.
  const YamlMap at = root.map("attention");
  at.allow_keys({"type", "num_heads", "num_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank",
                 "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "qk_norm", "qkv_bias",
                 "o_bias", "sinks", "sliding_window"});
  auto& a = m.attention;
  const std::string type = at.str("type");
  const auto t = detail::parse_attention_type(type);
  if (!t) at.fail("type", "mha, gqa or mla", type);
  a.type = *t;
  a.num_heads = at.positive_int("num_heads");
  a.num_kv_heads = at.has("num_kv_heads") ? at.positive_int("num_kv_heads") : a.num_heads;
  if (a.type == AttentionType::mla) {
    a.q_lora_rank = at.nonneg_int("q_lora_rank", 0);  // null / absent: full q projection
    a.kv_lora_rank = at.positive_int("kv_lora_rank");
    a.qk_nope_head_dim = at.positive_int("qk_nope_head_dim");
    a.qk_rope_head_dim = at.positive_int("qk_rope_head_dim");
    a.v_head_dim = at.positive_int("v_head_dim");
    a.head_dim = at.has("head_dim") ? at.positive_int("head_dim")
                                    : a.qk_nope_head_dim + a.qk_rope_head_dim;
  } else {
    for (auto k : {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                   "v_head_dim"})
      if (at.has(k)) at.fail(k, "absent unless type is mla", "present");
    a.head_dim = at.positive_int("head_dim");
  }
  a.qk_norm = at.boolean("qk_norm", false);
  a.qkv_bias = at.boolean("qkv_bias", false);
  a.o_bias = at.boolean("o_bias", false);
  a.sinks = at.boolean("sinks", false);
  a.sliding_window = at.nonneg_int("sliding_window", 0);

  // MoE.
  if (root.has("moe")) {
    const YamlMap mo = root.map("moe");
    mo.allow_keys({"num_experts", "top_k", "expert_intermediate_size", "dense_intermediate_size",
                   "num_shared_experts", "shared_intermediate_size", "shared_expert_gate",
                   "scoring", "topk_before_softmax", "norm_topk_prob", "routed_scaling_factor",
                   "n_group", "topk_group", "router_bias", "score_correction_bias",
                   "expert_bias"});
    auto& e = m.moe;
    e.num_experts = mo.positive_int("num_experts");
    e.top_k = mo.positive_int("top_k");
    e.expert_intermediate_size = mo.positive_int("expert_intermediate_size");
    m.dense_intermediate_size = mo.nonneg_int("dense_intermediate_size", 0);
    e.num_shared_experts = mo.nonneg_int("num_shared_experts", 0);
    e.shared_intermediate_size = mo.nonneg_int("shared_intermediate_size", 0);
    e.shared_expert_gate = mo.boolean("shared_expert_gate", false);
    const std::string sc = mo.str("scoring", "softmax");
    const auto s = detail::parse_scoring(sc);
    if (!s) mo.fail("scoring", "softmax or sigmoid", sc);
    e.scoring = *s;
    e.topk_before_softmax = mo.boolean("topk_before_softmax", false);
    e.norm_topk_prob = mo.boolean("norm_topk_prob", false);
    e.routed_scaling_factor = mo.positive_num("routed_scaling_factor", 1.0);
    e.n_group = mo.has("n_group") ? mo.positive_int("n_group") : 1;
    e.topk_group = mo.has("topk_group") ? mo.positive_int("topk_group") : 1;
    e.router_bias = mo.boolean("router_bias", false);
    e.score_correction_bias = mo.boolean("score_correction_bias", false);
    e.expert_bias = mo.boolean("expert_bias", false);
  } else {
    bool any_moe = false;
    for (bool f : moe_flags) any_moe = any_moe || f;
    if (any_moe) root.fail("moe", "a map (the model has MoE layers)", "missing");
  }

  // Dtypes.
  if (root.has("dtypes")) {
    const YamlMap d = root.map("dtypes");
    d.allow_keys({"weights", "experts", "activations", "kv_cache"});
    m.weight_dtype = d.dtype("weights", m.weight_dtype);
    m.expert_weight_dtype = d.dtype("experts", m.weight_dtype);
    m.activation_dtype = d.dtype("activations", m.activation_dtype);
    m.kv_dtype = d.dtype("kv_cache", m.kv_dtype);
  }
  detail::validate_model(m, origin);
  return m;
}

std::string model_to_yaml(const ModelSpec& m) {
  YAML::Emitter out;
  const auto& a = m.attention;
  const auto& e = m.moe;
  out << YAML::BeginMap;
  out << YAML::Key << "version" << YAML::Value << 1;
  out << YAML::Key << "name" << YAML::Value << m.name;
  out << YAML::Key << "architecture" << YAML::Value << m.architecture;
  out << YAML::Key << "source" << YAML::Value << m.source;
  out << YAML::Key << "hidden_size" << YAML::Value << m.hidden_size;
  out << YAML::Key << "num_layers" << YAML::Value << m.num_layers;
  // First-k-dense patterns as num_dense_layers, anything else as moe_layers.
  const int k = m.num_dense_layers();
  bool first_k = true;
  for (size_t i = 0; i < m.layers.size(); ++i)
    first_k = first_k && m.layers[i].moe == (static_cast<int>(i) >= k);
  if (first_k) {
    out << YAML::Key << "num_dense_layers" << YAML::Value << k;
  } else {
    std::vector<bool> flags;
    for (const auto& l : m.layers) flags.push_back(l.moe);
    out << YAML::Key << "moe_layers" << YAML::Value;
    emit_layer_set(out, flags);
  }
  std::vector<bool> sliding;
  for (const auto& l : m.layers) sliding.push_back(l.sliding);
  out << YAML::Key << "sliding_layers" << YAML::Value;
  emit_layer_set(out, sliding);
  out << YAML::Key << "vocab_size" << YAML::Value << m.vocab_size;
  out << YAML::Key << "tie_word_embeddings" << YAML::Value << m.tie_word_embeddings;
  out << YAML::Key << "num_mtp_layers" << YAML::Value << m.num_mtp_layers;
  out << YAML::Key << "max_position_embeddings" << YAML::Value << m.max_position_embeddings;
  out << YAML::Key << "rope_theta" << YAML::Value << fmt_num(m.rope_theta);
  out << YAML::Key << "rms_norm_eps" << YAML::Value << fmt_num(m.rms_norm_eps);

  out << YAML::Key << "attention" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "type" << YAML::Value << std::string(to_string(a.type));
  out << YAML::Key << "num_heads" << YAML::Value << a.num_heads;
  out << YAML::Key << "num_kv_heads" << YAML::Value << a.num_kv_heads;
  out << YAML::Key << "head_dim" << YAML::Value << a.head_dim;
  if (a.type == AttentionType::mla) {
    out << YAML::Key << "q_lora_rank" << YAML::Value;
    if (a.q_lora_rank > 0) out << a.q_lora_rank;
    else out << YAML::Null;
    out << YAML::Key << "kv_lora_rank" << YAML::Value << a.kv_lora_rank;
    out << YAML::Key << "qk_nope_head_dim" << YAML::Value << a.qk_nope_head_dim;
    out << YAML::Key << "qk_rope_head_dim" << YAML::Value << a.qk_rope_head_dim;
    out << YAML::Key << "v_head_dim" << YAML::Value << a.v_head_dim;
  }
  out << YAML::Key << "qk_norm" << YAML::Value << a.qk_norm;
  out << YAML::Key << "qkv_bias" << YAML::Value << a.qkv_bias;
  out << YAML::Key << "o_bias" << YAML::Value << a.o_bias;
  out << YAML::Key << "sinks" << YAML::Value << a.sinks;
  out << YAML::Key << "sliding_window" << YAML::Value << a.sliding_window;
  out << YAML::EndMap;

  if (m.num_moe_layers() > 0 || e.num_experts > 0) {
    out << YAML::Key << "moe" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "num_experts" << YAML::Value << e.num_experts;
    out << YAML::Key << "top_k" << YAML::Value << e.top_k;
    out << YAML::Key << "expert_intermediate_size" << YAML::Value << e.expert_intermediate_size;
    out << YAML::Key << "dense_intermediate_size" << YAML::Value << m.dense_intermediate_size;
    out << YAML::Key << "num_shared_experts" << YAML::Value << e.num_shared_experts;
    out << YAML::Key << "shared_intermediate_size" << YAML::Value << e.shared_intermediate_size;
    out << YAML::Key << "shared_expert_gate" << YAML::Value << e.shared_expert_gate;
    out << YAML::Key << "scoring" << YAML::Value << std::string(to_string(e.scoring));
    out << YAML::Key << "topk_before_softmax" << YAML::Value << e.topk_before_softmax;
    out << YAML::Key << "norm_topk_prob" << YAML::Value << e.norm_topk_prob;
    out << YAML::Key << "routed_scaling_factor" << YAML::Value << fmt_num(e.routed_scaling_factor);
    out << YAML::Key << "n_group" << YAML::Value << e.n_group;
    out << YAML::Key << "topk_group" << YAML::Value << e.topk_group;
    out << YAML::Key << "router_bias" << YAML::Value << e.router_bias;
    out << YAML::Key << "score_correction_bias" << YAML::Value << e.score_correction_bias;
    out << YAML::Key << "expert_bias" << YAML::Value << e.expert_bias;
    out << YAML::EndMap;
  } else if (m.dense_intermediate_size > 0) {
    out << YAML::Key << "moe" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "dense_intermediate_size" << YAML::Value << m.dense_intermediate_size;
    out << YAML::EndMap;
  }

  out << YAML::Key << "dtypes" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "weights" << YAML::Value << std::string(to_string(m.weight_dtype));
  out << YAML::Key << "experts" << YAML::Value << std::string(to_string(m.expert_weight_dtype));
  out << YAML::Key << "activations" << YAML::Value << std::string(to_string(m.activation_dtype));
  out << YAML::Key << "kv_cache" << YAML::Value << std::string(to_string(m.kv_dtype));
  out << YAML::EndMap;
  out << YAML::EndMap;
  if (!out.good()) throw RuntimeError(fmt::format("model_to_yaml: {}", out.GetLastError()));
  return std::string(out.c_str()) + "\n";
}

std::vector<std::string> shipped_models() { return detail::list_shipped("configs/models"); }

ModelSpec load_model(const std::string& name_or_path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path path;
  if (fs::is_directory(name_or_path, ec)) {
    path = fs::path(name_or_path) / "config.json";
    if (!fs::exists(path, ec))
      throw InputError(fmt::format("{}: directory has no config.json", name_or_path));
  } else {
    path = detail::resolve_shipped(name_or_path, "configs/models", "model");
  }
  const std::string text = read_text_file(path);
  if (path.extension() == ".json") return import_hf_config(text, path.string());
  return parse_model_yaml(text, path.string());
}

}  // namespace mixserve
