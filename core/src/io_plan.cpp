// The plan file: writer, reader and semantic validation (DESIGN.md "Files", STYLE.md §5, §11).
// The model, cluster and workload are embedded as nested mappings produced by their own writers
// and read back through their own readers, so the plan is self-contained and one schema holds.
#include <yaml-cpp/yaml.h>

#include <cmath>
#include <limits>
#include <map>
#include <set>

#include <fmt/format.h>

#include "mixserve/core/enum_names.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "yaml_util.hpp"

namespace mixserve {

namespace {

using detail::fmt_num;
using detail::YamlMap;

// --- writing ----------------------------------------------------------------------------------

// A file written by another writer, embedded as a mapping.
void emit_embedded(YAML::Emitter& out, const std::string& key, const std::string& yaml_text) {
  out << YAML::Key << key << YAML::Value << YAML::Load(yaml_text);
}

void emit_layout(YAML::Emitter& out, const Layout& l) {
  out << YAML::Flow << YAML::BeginMap;
  out << YAML::Key << "attn_tp" << YAML::Value << l.attn_tp;
  out << YAML::Key << "attn_dp" << YAML::Value << l.attn_dp;
  out << YAML::Key << "moe_tp" << YAML::Value << l.moe_tp;
  out << YAML::Key << "moe_ep" << YAML::Value << l.moe_ep;
  out << YAML::Key << "pp" << YAML::Value << l.pp;
  out << YAML::Key << "moe_comm" << YAML::Value << std::string(to_string(l.moe_comm));
  out << YAML::EndMap;
}

// Communication algorithm per site: attention all-reduce over attn_tp, the MoE algorithm over
// its TP x EP groups, pipeline send/recv between stages.
void emit_comm(YAML::Emitter& out, const Layout& l) {
  out << YAML::BeginMap;
  out << YAML::Key << "attention" << YAML::Value << YAML::Flow << YAML::BeginMap
      << YAML::Key << "op" << YAML::Value << (l.attn_tp > 1 ? "all_reduce" : "none")
      << YAML::Key << "group" << YAML::Value << "attn_tp" << YAML::Key << "size" << YAML::Value
      << l.attn_tp << YAML::EndMap;
  // The operations the MoE block issues (the simulator's cost model costs the same ones).
  std::string moe_ops;
  switch (l.moe_comm) {
    case MoeComm::tp_allreduce:
      moe_ops = l.moe_tp == 1 ? "none"
                : l.attn_dp > 1 ? "all_gather of the DP replicas' tokens, reduce_scatter after"
                                : "all_reduce";
      break;
    case MoeComm::nccl_a2a:
      moe_ops = l.moe_tp > 1 ? "all_to_all dispatch, all_gather/reduce_scatter over moe_tp, "
                               "all_to_all combine"
                             : "all_to_all dispatch, all_to_all combine";
      if (l.attn_tp > 1) moe_ops += ", all_gather over attn_tp";
      break;
    case MoeComm::rs_a2a_ag: moe_ops = "reduce_scatter, all_to_all, all_gather (sequential)"; break;
    case MoeComm::fused: moe_ops = "fused_ag_dispatch, fused_rs_combine (overlapped rounds)"; break;
  }
  out << YAML::Key << "moe" << YAML::Value << YAML::Flow << YAML::BeginMap << YAML::Key
      << "algorithm" << YAML::Value << std::string(to_string(l.moe_comm)) << YAML::Key << "ops"
      << YAML::Value << moe_ops << YAML::Key << "tp" << YAML::Value << l.moe_tp << YAML::Key
      << "ep" << YAML::Value << l.moe_ep << YAML::EndMap;
  out << YAML::Key << "pipeline" << YAML::Value << YAML::Flow << YAML::BeginMap << YAML::Key
      << "op" << YAML::Value << (l.pp > 1 ? "send_recv" : "none") << YAML::Key << "stages"
      << YAML::Value << l.pp << YAML::EndMap;
  out << YAML::EndMap;
}

void emit_limits(YAML::Emitter& out, const RuntimeLimits& r) {
  out << YAML::Flow << YAML::BeginMap;
  out << YAML::Key << "max_num_seqs" << YAML::Value << r.max_num_seqs;
  out << YAML::Key << "max_num_batched_tokens" << YAML::Value << r.max_num_batched_tokens;
  out << YAML::Key << "chunked_prefill" << YAML::Value << r.chunked_prefill;
  out << YAML::Key << "decode_first" << YAML::Value << r.decode_first;
  out << YAML::Key << "kv_block_tokens" << YAML::Value << r.kv_block_tokens;
  out << YAML::Key << "kv_blocks" << YAML::Value << r.kv_blocks;
  out << YAML::Key << "gpu_memory_utilization" << YAML::Value << fmt_num(r.gpu_memory_utilization);
  out << YAML::Key << "max_model_len" << YAML::Value << r.max_model_len;
  out << YAML::EndMap;
}

// Infinite predictions (an unstable queue) are written as YAML's .inf.
std::string num_or_inf(double v) { return std::isinf(v) ? (v > 0 ? ".inf" : "-.inf") : fmt_num(v); }

void emit_metrics(YAML::Emitter& out, const PredictedMetrics& m) {
  out << YAML::Flow << YAML::BeginMap;
  out << YAML::Key << "ttft_ms" << YAML::Value << num_or_inf(m.ttft_ms);
  out << YAML::Key << "itl_ms" << YAML::Value << num_or_inf(m.itl_ms);
  out << YAML::Key << "tpot_ms" << YAML::Value << num_or_inf(m.tpot_ms);
  out << YAML::Key << "throughput_tok_s" << YAML::Value << num_or_inf(m.throughput_tok_s);
  out << YAML::Key << "capacity_tok_s" << YAML::Value << num_or_inf(m.capacity_tok_s);
  out << YAML::Key << "output_tok_s" << YAML::Value << num_or_inf(m.output_tok_s);
  out << YAML::Key << "request_rate" << YAML::Value << num_or_inf(m.request_rate);
  out << YAML::EndMap;
}

void emit_memory(YAML::Emitter& out, const MemoryBreakdown& m) {
  out << YAML::Flow << YAML::BeginMap;
  out << YAML::Key << "weights_bytes" << YAML::Value << fmt_num(m.weights);
  out << YAML::Key << "kv_cache_bytes" << YAML::Value << fmt_num(m.kv_cache);
  out << YAML::Key << "activations_bytes" << YAML::Value << fmt_num(m.activations);
  out << YAML::Key << "comm_buffers_bytes" << YAML::Value << fmt_num(m.comm_buffers);
  out << YAML::Key << "reserved_bytes" << YAML::Value << fmt_num(m.reserved);
  out << YAML::Key << "capacity_bytes" << YAML::Value << fmt_num(m.capacity);
  out << YAML::Key << "kv_tokens" << YAML::Value << m.kv_tokens;
  out << YAML::Key << "fits" << YAML::Value << m.fits;
  out << YAML::EndMap;
}

void emit_candidate(YAML::Emitter& out, const PlanCandidate& c) {
  out << YAML::BeginMap;
  out << YAML::Key << "rank" << YAML::Value << c.rank;
  out << YAML::Key << "label" << YAML::Value << c.label;
  out << YAML::Key << "name" << YAML::Value << c.layout.name();
  out << YAML::Key << "layout" << YAML::Value;
  emit_layout(out, c.layout);
  out << YAML::Key << "comm" << YAML::Value;
  emit_comm(out, c.layout);
  out << YAML::Key << "limits" << YAML::Value;
  emit_limits(out, c.limits);
  out << YAML::Key << "predicted" << YAML::Value;
  emit_metrics(out, c.metrics);
  out << YAML::Key << "memory" << YAML::Value;
  emit_memory(out, c.memory);
  out << YAML::Key << "breakdown" << YAML::Value << YAML::BeginSeq;
  for (const OpCost& o : c.breakdown) {
    out << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "op" << YAML::Value << o.op;
    out << YAML::Key << "phase" << YAML::Value << o.phase;
    out << YAML::Key << "time_us" << YAML::Value << fmt_num(o.time_us);
    out << YAML::Key << "source" << YAML::Value << std::string(to_string(o.source));
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::EndMap;
}

void emit_rank(YAML::Emitter& out, const RankInfo& r) {
  out << YAML::Flow << YAML::BeginMap;
  out << YAML::Key << "rank" << YAML::Value << r.rank;
  out << YAML::Key << "node" << YAML::Value << r.node;
  out << YAML::Key << "local_gpu" << YAML::Value << r.local_gpu;
  out << YAML::Key << "pp_stage" << YAML::Value << r.pp_stage;
  out << YAML::Key << "attn_tp_rank" << YAML::Value << r.attn_tp_rank;
  out << YAML::Key << "attn_dp_rank" << YAML::Value << r.attn_dp_rank;
  out << YAML::Key << "moe_tp_rank" << YAML::Value << r.moe_tp_rank;
  out << YAML::Key << "moe_ep_rank" << YAML::Value << r.moe_ep_rank;
  out << YAML::Key << "expert_begin" << YAML::Value << r.expert_begin;
  out << YAML::Key << "expert_end" << YAML::Value << r.expert_end;
  out << YAML::Key << "layer_begin" << YAML::Value << r.layer_begin;
  out << YAML::Key << "layer_end" << YAML::Value << r.layer_end;
  out << YAML::EndMap;
}

// Which ops of the chosen candidate come from measurements and which are estimates.
bool is_measured(CostSource s) {
  return s == CostSource::measured || s == CostSource::interpolated;
}

// --- reading ----------------------------------------------------------------------------------

Layout read_layout(const YamlMap& m) {
  m.allow_keys({"attn_tp", "attn_dp", "moe_tp", "moe_ep", "pp", "moe_comm"});
  Layout l;
  l.attn_tp = m.positive_int("attn_tp");
  l.attn_dp = m.positive_int("attn_dp");
  l.moe_tp = m.positive_int("moe_tp");
  l.moe_ep = m.positive_int("moe_ep");
  l.pp = m.positive_int("pp");
  const std::string comm = m.str("moe_comm");
  const auto c = parse_moe_comm(comm);
  if (!c) m.fail("moe_comm", "one of allreduce, a2a, rs-a2a-ag, fused", comm);
  l.moe_comm = *c;
  return l;
}

RuntimeLimits read_limits(const YamlMap& m) {
  m.allow_keys({"max_num_seqs", "max_num_batched_tokens", "chunked_prefill", "decode_first",
                "kv_block_tokens", "kv_blocks", "gpu_memory_utilization", "max_model_len"});
  RuntimeLimits r;
  r.max_num_seqs = m.positive_int("max_num_seqs");
  r.max_num_batched_tokens = m.positive_i64("max_num_batched_tokens");
  r.chunked_prefill = m.boolean("chunked_prefill", r.chunked_prefill);
  r.decode_first = m.boolean("decode_first", r.decode_first);
  r.kv_block_tokens = m.positive_int("kv_block_tokens");
  r.kv_blocks = m.nonneg_i64("kv_blocks", 0);
  r.gpu_memory_utilization = m.positive_num("gpu_memory_utilization");
  if (r.gpu_memory_utilization > 1)
    m.fail("gpu_memory_utilization", "a fraction in (0, 1]", fmt_num(r.gpu_memory_utilization));
  r.max_model_len = m.nonneg_i64("max_model_len", 0);
  return r;
}

PredictedMetrics read_metrics(const YamlMap& m) {
  m.allow_keys({"ttft_ms", "itl_ms", "tpot_ms", "throughput_tok_s", "capacity_tok_s",
                "output_tok_s", "request_rate"});
  // Each is a number >= 0 or .inf (a queue that does not drain at the workload's rate).
  const auto value = [&m](std::string_view key) {
    const YAML::Node n = m.node(key);
    if (n && n.IsScalar() && n.Scalar() == ".inf") return std::numeric_limits<double>::infinity();
    return m.nonneg_num(key, 0);
  };
  PredictedMetrics p;
  p.ttft_ms = value("ttft_ms");
  p.itl_ms = value("itl_ms");
  p.tpot_ms = value("tpot_ms");
  p.throughput_tok_s = value("throughput_tok_s");
  if (m.node("capacity_tok_s")) p.capacity_tok_s = value("capacity_tok_s");  // optional (v0.1 plans)
  p.output_tok_s = value("output_tok_s");
  p.request_rate = value("request_rate");
  return p;
}

MemoryBreakdown read_memory(const YamlMap& m) {
  m.allow_keys({"weights_bytes", "kv_cache_bytes", "activations_bytes", "comm_buffers_bytes",
                "reserved_bytes", "capacity_bytes", "kv_tokens", "fits"});
  MemoryBreakdown b;
  b.weights = m.nonneg_num("weights_bytes", 0);
  b.kv_cache = m.nonneg_num("kv_cache_bytes", 0);
  b.activations = m.nonneg_num("activations_bytes", 0);
  b.comm_buffers = m.nonneg_num("comm_buffers_bytes", 0);
  b.reserved = m.nonneg_num("reserved_bytes", 0);
  b.capacity = m.nonneg_num("capacity_bytes", 0);
  b.kv_tokens = m.nonneg_i64("kv_tokens", 0);
  b.fits = m.boolean("fits");
  return b;
}

CostSource read_source(const YamlMap& m, std::string_view key) {
  static constexpr auto kNames = MIXSERVE_ENUM_TABLE(CostSource, MIXSERVE_COST_SOURCES);
  const std::string s = m.str(key);
  if (const auto c = enum_parse(kNames, s)) return *c;
  m.fail(key, "one of " + enum_names_joined(kNames), s);
}

PlanCandidate read_candidate(const YamlMap& m) {
  m.allow_keys({"rank", "label", "name", "layout", "comm", "limits", "predicted", "memory",
                "breakdown"});
  PlanCandidate c;
  c.rank = m.nonneg_int("rank", 0);
  c.label = m.str("label", "");
  c.layout = read_layout(m.map("layout"));
  // "name" is informational (Layout::name() of the layout, rewritten on every write); the
  // layout mapping is what counts.
  c.limits = read_limits(m.map("limits"));
  c.metrics = read_metrics(m.map("predicted"));
  c.memory = read_memory(m.map("memory"));
  const auto ops = m.list("breakdown", false);
  for (size_t i = 0; i < ops.size(); ++i) {
    const YamlMap o(ops[i], m.origin(), fmt::format("{}[{}]", m.key_path("breakdown"), i));
    o.allow_keys({"op", "phase", "time_us", "source"});
    OpCost cost;
    cost.op = o.str("op");
    cost.phase = o.str("phase");
    if (cost.phase != "prefill" && cost.phase != "decode")
      o.fail("phase", "prefill or decode", cost.phase);
    cost.time_us = o.nonneg_num("time_us", 0);
    if (!o.has("time_us")) o.fail("time_us", "a number >= 0 (microseconds)");
    cost.source = read_source(o, "source");
    c.breakdown.push_back(std::move(cost));
  }
  return c;
}

RankInfo read_rank(const YamlMap& m) {
  m.allow_keys({"rank", "node", "local_gpu", "pp_stage", "attn_tp_rank", "attn_dp_rank",
                "moe_tp_rank", "moe_ep_rank", "expert_begin", "expert_end", "layer_begin",
                "layer_end"});
  RankInfo r;
  r.rank = static_cast<int>(m.i64("rank"));
  r.node = static_cast<int>(m.i64("node"));
  r.local_gpu = static_cast<int>(m.i64("local_gpu"));
  r.pp_stage = static_cast<int>(m.i64("pp_stage"));
  r.attn_tp_rank = static_cast<int>(m.i64("attn_tp_rank"));
  r.attn_dp_rank = static_cast<int>(m.i64("attn_dp_rank"));
  r.moe_tp_rank = static_cast<int>(m.i64("moe_tp_rank"));
  r.moe_ep_rank = static_cast<int>(m.i64("moe_ep_rank"));
  r.expert_begin = static_cast<int>(m.i64("expert_begin"));
  r.expert_end = static_cast<int>(m.i64("expert_end"));
  r.layer_begin = static_cast<int>(m.i64("layer_begin"));
  r.layer_end = static_cast<int>(m.i64("layer_end"));
  return r;
}

// An embedded file, re-emitted as text for its own reader.
std::string embedded_text(const YamlMap& m, std::string_view key) {
  const YAML::Node n = m.node(key);
  if (!n || !n.IsMap()) m.fail(key, "a mapping (the embedded spec)", n ? detail::yaml_describe(n) : "");
  YAML::Emitter out;
  out << n;
  return out.c_str();
}

}  // namespace

std::string plan_to_yaml(const Plan& p) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "version" << YAML::Value << p.version;
  out << YAML::Key << "provenance" << YAML::Value;
  detail::emit_provenance(out, p.provenance);
  out << YAML::Key << "profile" << YAML::Value << YAML::Flow << YAML::BeginMap << YAML::Key
      << "name" << YAML::Value << p.profile_name << YAML::Key << "source" << YAML::Value
      << p.profile_source << YAML::EndMap;
  out << YAML::Key << "cost_model" << YAML::Value << p.cost_model;
  out << YAML::Key << "objective" << YAML::Value << p.objective;
  out << YAML::Key << "chosen" << YAML::Value;
  emit_candidate(out, p.chosen);
  // Which of the chosen plan's costs were measured and which estimated (derived from the
  // breakdown; informational, recomputed on every write).
  std::set<std::string> measured, estimated;
  for (const OpCost& o : p.chosen.breakdown)
    (is_measured(o.source) ? measured : estimated).insert(o.op);
  out << YAML::Key << "cost_sources" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "measured" << YAML::Value << YAML::Flow
      << std::vector<std::string>(measured.begin(), measured.end());
  out << YAML::Key << "estimated" << YAML::Value << YAML::Flow
      << std::vector<std::string>(estimated.begin(), estimated.end());
  out << YAML::EndMap;
  out << YAML::Key << "rank_map" << YAML::Value << YAML::BeginSeq;
  for (const RankInfo& r : p.rank_map) emit_rank(out, r);
  out << YAML::EndSeq;
  out << YAML::Key << "alternatives" << YAML::Value << YAML::BeginSeq;
  for (const PlanCandidate& c : p.alternatives) emit_candidate(out, c);
  out << YAML::EndSeq;
  emit_embedded(out, "model", model_to_yaml(p.model));
  emit_embedded(out, "cluster", cluster_to_yaml(p.cluster));
  emit_embedded(out, "workload", workload_to_yaml(p.workload));
  out << YAML::EndMap;
  if (!out.good()) throw RuntimeError(fmt::format("plan_to_yaml: {}", out.GetLastError()));
  return std::string("# MixServe plan (mixserve-plan). Check with: mixserve-plan check <file>\n") +
         out.c_str() + "\n";
}

Plan parse_plan_yaml(const std::string& text, const std::string& origin) {
  const YAML::Node root = detail::yaml_parse(text, origin);
  const YamlMap m(root, origin, "");
  m.allow_keys({"version", "provenance", "profile", "cost_model", "objective", "chosen",
                "cost_sources", "rank_map", "alternatives", "model", "cluster", "workload"});
  Plan p;
  p.version = m.integer("version");
  if (p.version != 1) m.fail("version", "1", std::to_string(p.version));
  p.provenance = detail::read_provenance(m, "provenance");
  const YamlMap prof = m.map("profile");
  prof.allow_keys({"name", "source"});
  p.profile_name = prof.str("name");
  p.profile_source = prof.str("source");
  p.cost_model = m.str("cost_model");
  p.objective = m.str("objective");
  p.chosen = read_candidate(m.map("chosen"));
  const auto ranks = m.list("rank_map");
  for (size_t i = 0; i < ranks.size(); ++i)
    p.rank_map.push_back(read_rank(YamlMap(ranks[i], origin, fmt::format("rank_map[{}]", i))));
  const auto alts = m.list("alternatives", false);
  for (size_t i = 0; i < alts.size(); ++i)
    p.alternatives.push_back(
        read_candidate(YamlMap(alts[i], origin, fmt::format("alternatives[{}]", i))));
  p.model = parse_model_yaml(embedded_text(m, "model"), origin + " (embedded model)");
  p.cluster = parse_cluster_yaml(embedded_text(m, "cluster"), origin + " (embedded cluster)");
  p.workload = parse_workload_yaml(embedded_text(m, "workload"), origin + " (embedded workload)");
  return p;
}

Plan load_plan(const std::string& path) { return parse_plan_yaml(read_text_file(path), path); }

namespace {

void validate_layout(const Layout& l, const Plan& p, const std::string& origin,
                     const std::string& key) {
  const std::pair<const char*, int> degrees[] = {{"attn_tp", l.attn_tp}, {"attn_dp", l.attn_dp},
                                                 {"moe_tp", l.moe_tp},   {"moe_ep", l.moe_ep},
                                                 {"pp", l.pp}};
  for (const auto& [k, v] : degrees)
    if (!is_pow2(v))
      throw_input_error(origin, fmt::format("{}.{}", key, k), "a power of two >= 1",
                        std::to_string(v));
  if (l.moe_tp * l.moe_ep != l.attn_tp * l.attn_dp)
    throw_input_error(origin, key + ".moe_ep",
                      fmt::format("{} (moe_tp * moe_ep == attn_tp * attn_dp = {})",
                                  l.stage_size() / l.moe_tp, l.stage_size()),
                      std::to_string(l.moe_ep));
  const int world = p.cluster.world_size();
  if (l.world_size() != world)
    throw_input_error(origin, key + ".pp",
                      fmt::format("attn_tp * attn_dp * pp == {} GPUs of cluster '{}'", world,
                                  p.cluster.name),
                      fmt::format("{} ({} GPUs)", l.pp, l.world_size()));
  const bool hybrid = l.moe_comm == MoeComm::fused || l.moe_comm == MoeComm::rs_a2a_ag;
  if ((l.moe_comm == MoeComm::tp_allreduce) != (l.moe_ep == 1) ||
      (hybrid && (l.moe_tp == 1 || l.attn_tp != l.moe_tp)))
    throw_input_error(origin, key + ".moe_comm",
                      l.moe_ep == 1 ? std::string("allreduce (moe_ep == 1)")
                                    : std::string("a2a, or rs-a2a-ag / fused when "
                                                  "attn_tp == moe_tp > 1"),
                      std::string(to_string(l.moe_comm)));
  const int experts = p.model.moe.num_experts;
  if (experts > 0 && experts % l.moe_ep != 0)
    throw_input_error(origin, key + ".moe_ep",
                      fmt::format("a divisor of the model's {} experts", experts),
                      std::to_string(l.moe_ep));
  if (p.model.attention.num_heads % l.attn_tp != 0)
    throw_input_error(origin, key + ".attn_tp",
                      fmt::format("a divisor of the model's {} heads", p.model.attention.num_heads),
                      std::to_string(l.attn_tp));
  if (l.pp > p.model.num_layers)
    throw_input_error(origin, key + ".pp",
                      fmt::format("at most the model's {} layers", p.model.num_layers),
                      std::to_string(l.pp));
}

void validate_metrics(const PlanCandidate& c, const std::string& origin, const std::string& key) {
  const std::pair<const char*, double> vals[] = {
      {"ttft_ms", c.metrics.ttft_ms}, {"itl_ms", c.metrics.itl_ms},
      {"throughput_tok_s", c.metrics.throughput_tok_s}};
  for (const auto& [k, v] : vals)
    if (std::isnan(v) || v < 0)  // .inf is legal: a queue that does not drain at the rate
      throw_input_error(origin, fmt::format("{}.predicted.{}", key, k), "a number >= 0 or .inf",
                        fmt_num(v));
}

}  // namespace

void validate_plan(const Plan& p, const std::string& origin) {
  if (p.version != 1) throw_input_error(origin, "version", "1", std::to_string(p.version));
  if (p.objective != "ttft" && p.objective != "itl" && p.objective != "throughput" &&
      p.objective != "goodput")
    throw_input_error(origin, "objective", "one of ttft, itl, throughput, goodput", p.objective);
  if (p.cost_model != "mixserve" && p.cost_model != "paper")
    throw_input_error(origin, "cost_model", "mixserve or paper", p.cost_model);
  if (p.profile_source != "datasheet" && p.profile_source != "measured")
    throw_input_error(origin, "profile.source", "datasheet or measured", p.profile_source);
  if (p.cluster.num_nodes < 1 || p.cluster.gpus_per_node < 1)
    throw_input_error(origin, "cluster.num_nodes", "a cluster of at least one GPU",
                      fmt::format("{} x {}", p.cluster.num_nodes, p.cluster.gpus_per_node));

  validate_layout(p.chosen.layout, p, origin, "chosen.layout");
  validate_metrics(p.chosen, origin, "chosen");
  if (!p.chosen.memory.fits)
    throw_input_error(origin, "chosen.memory.fits", "true (the chosen layout must fit)", "false");
  for (size_t i = 0; i < p.alternatives.size(); ++i) {
    const std::string key = fmt::format("alternatives[{}]", i);
    validate_layout(p.alternatives[i].layout, p, origin, key + ".layout");
    validate_metrics(p.alternatives[i], origin, key);
  }

  // Rank map: exactly the map the layout defines (layout.hpp), rank by rank, field by field.
  const std::vector<RankInfo> want = build_rank_map(p.cluster, p.model, p.chosen.layout);
  if (p.rank_map.size() != want.size())
    throw_input_error(origin, "rank_map", fmt::format("{} entries (one per GPU)", want.size()),
                      std::to_string(p.rank_map.size()));
  for (size_t i = 0; i < want.size(); ++i) {
    const RankInfo& g = p.rank_map[i];
    const RankInfo& w = want[i];
    const std::pair<const char*, std::pair<int, int>> fields[] = {
        {"rank", {w.rank, g.rank}},
        {"node", {w.node, g.node}},
        {"local_gpu", {w.local_gpu, g.local_gpu}},
        {"pp_stage", {w.pp_stage, g.pp_stage}},
        {"attn_tp_rank", {w.attn_tp_rank, g.attn_tp_rank}},
        {"attn_dp_rank", {w.attn_dp_rank, g.attn_dp_rank}},
        {"moe_tp_rank", {w.moe_tp_rank, g.moe_tp_rank}},
        {"moe_ep_rank", {w.moe_ep_rank, g.moe_ep_rank}},
        {"expert_begin", {w.expert_begin, g.expert_begin}},
        {"expert_end", {w.expert_end, g.expert_end}},
        {"layer_begin", {w.layer_begin, g.layer_begin}},
        {"layer_end", {w.layer_end, g.layer_end}},
    };
    for (const auto& [k, v] : fields)
      if (v.first != v.second)
        throw_input_error(origin, fmt::format("rank_map[{}].{}", i, k), std::to_string(v.first),
                          std::to_string(v.second));
  }
  // Experts: each EP group (one per MoE TP index and stage) owns every routed expert once.
  const int experts = p.model.moe.num_experts;
  std::map<std::pair<int, int>, std::vector<int>> owned;
  for (const RankInfo& r : p.rank_map) {
    auto& v = owned[{r.pp_stage, r.moe_tp_rank}];
    v.resize(static_cast<size_t>(experts), 0);
    for (int e = r.expert_begin; e < r.expert_end && e < experts; ++e) ++v[static_cast<size_t>(e)];
  }
  for (const auto& [group, v] : owned)
    for (int e = 0; e < experts; ++e)
      if (v[static_cast<size_t>(e)] != 1)
        throw_input_error(origin, "rank_map",
                          fmt::format("expert {} owned exactly once in the EP group of stage {}, "
                                      "moe_tp_rank {}",
                                      e, group.first, group.second),
                          fmt::format("{} owners", v[static_cast<size_t>(e)]));
}

}  // namespace mixserve
