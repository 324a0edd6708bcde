// Hardware profile files (profiles/<name>.yaml). Schema (version 1):
//   version, name, gpu, source (datasheet|measured), sm_count, memory_GiB,
//   peaks {bf16_tflops, fp8_tflops, fp32_tflops, mem_bw_GBps}, efficiency {gemm, memory},
//   kernel_launch_us,
//   tables {gemm, experts, elementwise, attention, collectives, gemv}: lists of maps whose keys are
//     the field names of GemmPoint, ExpertGemmPoint, ElementwisePoint, AttentionPoint,
//     CollectivePoint, GemvPoint (gemv optional and written only when non-empty, so a profile
//     without GEMV points reads as before),
//   host_overhead {step_us, steps, measured_with} (optional; written when step_us > 0),
//   graph_launch {alone_graph_us, alone_eager_us, chain_us, chain_kernels, [alone_gemv_us,
//     mixed_chain_us,] measured_with, [no_pdl_extra_us, no_pdl_measured_with]}
//     (optional; written when chain_kernels > 0),
//   fused_decode_layer {measured_with, points: [{hidden, q_heads, kv_heads, head_dim, inter, experts,
//     top_k, context, time_us}]} (optional; written when it has points; FusedLayerPoint),
//   versions {name: version}, measured_on, notes, provenance.
#include <optional>

#include <fmt/format.h>

#include "mixserve/core/decode_path.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "yaml_util.hpp"

namespace mixserve {

using detail::fmt_num;
using detail::YamlMap;

namespace {

std::optional<CollOp> parse_coll_op(std::string_view s) {
#define MIXSERVE_X(e, str) \
  if (s == str) return CollOp::e;
  MIXSERVE_COLL_OPS(MIXSERVE_X)
#undef MIXSERVE_X
  return std::nullopt;
}

std::string coll_op_names() {
  std::string out;
#define MIXSERVE_X(e, str) out += (out.empty() ? "" : ", ") + std::string(str);
  MIXSERVE_COLL_OPS(MIXSERVE_X)
#undef MIXSERVE_X
  return out;
}

// Calls fn(YamlMap row) for every element of the list `key` of `tables`.
template <class Fn>
void for_rows(const YamlMap& tables, std::string_view key, Fn fn) {
  const auto rows = tables.list(key, false);
  for (size_t i = 0; i < rows.size(); ++i)
    fn(YamlMap(rows[i], tables.origin(), fmt::format("{}[{}]", tables.key_path(key), i)));
}

// FusedLayerPoint's integer keys, in the order they are written.
constexpr std::pair<const char*, int64_t FusedLayerPoint::*> kFusedLayerIntKeys[] = {
    {"hidden", &FusedLayerPoint::hidden},   {"q_heads", &FusedLayerPoint::q_heads},
    {"kv_heads", &FusedLayerPoint::kv_heads}, {"head_dim", &FusedLayerPoint::head_dim},
    {"inter", &FusedLayerPoint::inter},     {"experts", &FusedLayerPoint::experts},
    {"top_k", &FusedLayerPoint::top_k},     {"context", &FusedLayerPoint::context}};

void read_tables(const YamlMap& t, HardwareProfile& p) {
  t.allow_keys({"gemm", "experts", "elementwise", "attention", "collectives", "gemv"});
  for_rows(t, "gemv", [&](const YamlMap& r) {
    r.allow_keys({"impl", "m", "n", "k", "dtype", "time_us"});
    GemvPoint g;
    g.impl = r.str("impl");
    if (g.impl != kGemvImplPlain && g.impl != kGemvImplSwiglu && g.impl != kGemvImplFp32)
      r.fail("impl", fmt::format("one of {}, {}, {}", kGemvImplPlain, kGemvImplSwiglu, kGemvImplFp32),
             g.impl);
    g.m = r.positive_i64("m");
    g.n = r.positive_i64("n");
    g.k = r.positive_i64("k");
    g.dtype = r.dtype("dtype");
    g.time_us = r.positive_num("time_us");
    p.gemv.push_back(g);
  });
  for_rows(t, "gemm", [&](const YamlMap& r) {
    r.allow_keys({"m", "n", "k", "dtype", "time_us"});
    GemmPoint g;
    g.m = r.positive_i64("m");
    g.n = r.positive_i64("n");
    g.k = r.positive_i64("k");
    g.dtype = r.dtype("dtype");
    g.time_us = r.positive_num("time_us");
    p.gemm.push_back(g);
  });
  for_rows(t, "experts", [&](const YamlMap& r) {
    r.allow_keys({"num_experts", "tokens", "max_tokens", "active_experts", "n", "k", "dtype",
                  "distribution", "time_us"});
    ExpertGemmPoint e;
    e.num_experts = r.positive_int("num_experts");
    e.tokens = r.nonneg_i64("tokens", -1);
    if (e.tokens < 0) r.fail("tokens", "an integer >= 0", "missing");
    e.max_tokens = r.nonneg_i64("max_tokens", 0);
    e.active_experts = r.nonneg_int("active_experts", 0);
    e.n = r.positive_i64("n");
    e.k = r.positive_i64("k");
    e.dtype = r.dtype("dtype");
    e.distribution = r.str("distribution", "");
    e.time_us = r.positive_num("time_us");
    p.experts.push_back(e);
  });
  for_rows(t, "elementwise", [&](const YamlMap& r) {
    r.allow_keys({"bytes", "time_us"});
    ElementwisePoint e;
    e.bytes = r.positive_num("bytes");
    e.time_us = r.positive_num("time_us");
    p.elementwise.push_back(e);
  });
  for_rows(t, "attention", [&](const YamlMap& r) {
    r.allow_keys({"kind", "impl", "batch", "q_len", "kv_len", "num_heads", "num_kv_heads",
                  "head_dim", "time_us"});
    AttentionPoint a;
    a.kind = r.str("kind");
    if (a.kind != "prefill" && a.kind != "decode") r.fail("kind", "prefill or decode", a.kind);
    a.impl = r.str("impl");
    a.batch = r.positive_int("batch");
    a.q_len = r.positive_i64("q_len");
    a.kv_len = r.positive_i64("kv_len");
    a.num_heads = r.positive_int("num_heads");
    a.num_kv_heads = r.positive_int("num_kv_heads");
    a.head_dim = r.positive_int("head_dim");
    a.time_us = r.positive_num("time_us");
    p.attention.push_back(a);
  });
  for_rows(t, "collectives", [&](const YamlMap& r) {
    r.allow_keys({"op", "group_size", "nodes", "group", "bytes", "time_us"});
    CollectivePoint c;
    const std::string op = r.str("op");
    const auto parsed = parse_coll_op(op);
    if (!parsed) r.fail("op", fmt::format("one of {}", coll_op_names()), op);
    c.op = *parsed;
    c.group_size = r.positive_int("group_size");
    c.nodes = r.integer("nodes", 1);
    if (c.nodes <= 0) r.fail("nodes", "an integer > 0", std::to_string(c.nodes));
    c.group = r.str("group", "");
    c.bytes = r.positive_num("bytes");
    c.time_us = r.positive_num("time_us");
    p.collectives.push_back(c);
  });
}

}  // namespace

HardwareProfile parse_profile_yaml(const std::string& text, const std::string& origin) {
  const YamlMap root(detail::yaml_parse(text, origin), origin, "");
  root.allow_keys({"version", "name", "gpu", "source", "sm_count", "memory_GiB", "peaks",
                   "efficiency", "kernel_launch_us", "tables", "versions", "measured_on", "notes",
                   "provenance", "host_overhead", "graph_launch", "fused_decode_layer"});
  HardwareProfile p;
  p.version = root.integer("version");
  if (p.version != 1) root.fail("version", "1", std::to_string(p.version));
  p.name = root.str("name");
  p.gpu = root.str("gpu");
  p.source = root.str("source");
  if (p.source != "datasheet" && p.source != "measured")
    root.fail("source", "datasheet or measured", p.source);
  p.sm_count = root.positive_int("sm_count");
  p.memory_GiB = root.positive_num("memory_GiB");

  const YamlMap peaks = root.map("peaks");
  peaks.allow_keys({"bf16_tflops", "fp8_tflops", "fp32_tflops", "mem_bw_GBps"});
  p.peak_tflops_bf16 = peaks.positive_num("bf16_tflops");
  p.peak_tflops_fp8 = peaks.positive_num("fp8_tflops");
  p.peak_tflops_fp32 = peaks.positive_num("fp32_tflops");
  p.mem_bw_GBps = peaks.positive_num("mem_bw_GBps");

  const YamlMap eff = root.map("efficiency");
  eff.allow_keys({"gemm", "memory"});
  p.gemm_efficiency = eff.positive_num("gemm");
  p.mem_efficiency = eff.positive_num("memory");
  if (p.gemm_efficiency > 1.0) eff.fail("gemm", "a fraction in (0, 1]", fmt_num(p.gemm_efficiency));
  if (p.mem_efficiency > 1.0) eff.fail("memory", "a fraction in (0, 1]", fmt_num(p.mem_efficiency));

  p.kernel_launch_us = root.nonneg_num("kernel_launch_us", 0.0);
  if (root.has("tables")) read_tables(root.map("tables"), p);
  if (root.has("versions")) {
    const YamlMap v = root.map("versions");
    for (const auto& kv : root.node("versions")) {
      const std::string k = kv.first.as<std::string>();
      p.versions[k] = v.as_str(kv.second, v.key_path(k));
    }
  }
  if (root.has("host_overhead")) {
    const YamlMap h = root.map("host_overhead");
    h.allow_keys({"step_us", "steps", "measured_with"});
    p.host_overhead.step_us = h.nonneg_num("step_us", 0.0);
    p.host_overhead.steps = h.positive_i64("steps");
    p.host_overhead.measured_with = h.str("measured_with");
  }
  if (root.has("graph_launch")) {
    const YamlMap g = root.map("graph_launch");
    g.allow_keys({"alone_graph_us", "alone_eager_us", "chain_us", "chain_kernels", "alone_gemv_us", "mixed_chain_us",
                  "no_pdl_extra_us", "no_pdl_measured_with",
                  "measured_with"});
    p.graph_launch.alone_graph_us = g.positive_num("alone_graph_us");
    p.graph_launch.alone_eager_us = g.positive_num("alone_eager_us");
    p.graph_launch.chain_us = g.positive_num("chain_us");
    p.graph_launch.chain_kernels = g.positive_int("chain_kernels");
    p.graph_launch.alone_gemv_us = g.nonneg_num("alone_gemv_us", 0.0);
    p.graph_launch.mixed_chain_us = g.nonneg_num("mixed_chain_us", 0.0);
    p.graph_launch.measured_with = g.str("measured_with");
    p.graph_launch.no_pdl_extra_us = g.nonneg_num("no_pdl_extra_us", 0.0);
    if (p.graph_launch.no_pdl_extra_us > 0) p.graph_launch.no_pdl_measured_with = g.str("no_pdl_measured_with");
  }
  if (root.has("fused_decode_layer")) {
    const YamlMap f = root.map("fused_decode_layer");
    f.allow_keys({"measured_with", "points"});
    p.fused_decode_layer.measured_with = f.str("measured_with");
    for_rows(f, "points", [&](const YamlMap& r) {
      r.allow_keys({"hidden", "q_heads", "kv_heads", "head_dim", "inter", "experts", "top_k", "context", "time_us"});
      FusedLayerPoint q;
      for (const auto& [key, field] : kFusedLayerIntKeys) q.*field = r.positive_i64(key);
      q.time_us = r.positive_num("time_us");
      for (const auto& o : p.fused_decode_layer.points)
        if (o.same_shape(q) && o.context == q.context)
          r.fail("context", "one point per layer shape and context", std::to_string(q.context) + " again");
      p.fused_decode_layer.points.push_back(q);
    });
    if (p.fused_decode_layer.points.empty()) f.fail("points", "at least one point", "none");
  }
  p.measured_on = root.str("measured_on", "");
  p.notes = root.str("notes", "");
  p.provenance = detail::read_provenance(root, "provenance");
  return p;
}

std::string profile_to_yaml(const HardwareProfile& p) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "version" << YAML::Value << p.version;
  out << YAML::Key << "name" << YAML::Value << p.name;
  out << YAML::Key << "gpu" << YAML::Value << p.gpu;
  out << YAML::Key << "source" << YAML::Value << p.source;
  out << YAML::Key << "sm_count" << YAML::Value << p.sm_count;
  out << YAML::Key << "memory_GiB" << YAML::Value << fmt_num(p.memory_GiB);
  out << YAML::Key << "peaks" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "bf16_tflops" << YAML::Value << fmt_num(p.peak_tflops_bf16);
  out << YAML::Key << "fp8_tflops" << YAML::Value << fmt_num(p.peak_tflops_fp8);
  out << YAML::Key << "fp32_tflops" << YAML::Value << fmt_num(p.peak_tflops_fp32);
  out << YAML::Key << "mem_bw_GBps" << YAML::Value << fmt_num(p.mem_bw_GBps);
  out << YAML::EndMap;
  out << YAML::Key << "efficiency" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "gemm" << YAML::Value << fmt_num(p.gemm_efficiency);
  out << YAML::Key << "memory" << YAML::Value << fmt_num(p.mem_efficiency);
  out << YAML::EndMap;
  out << YAML::Key << "kernel_launch_us" << YAML::Value << fmt_num(p.kernel_launch_us);

  out << YAML::Key << "tables" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "gemm" << YAML::Value << YAML::BeginSeq;
  for (const auto& g : p.gemm) {
    out << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "m" << YAML::Value << g.m << YAML::Key << "n" << YAML::Value << g.n;
    out << YAML::Key << "k" << YAML::Value << g.k;
    out << YAML::Key << "dtype" << YAML::Value << std::string(to_string(g.dtype));
    out << YAML::Key << "time_us" << YAML::Value << fmt_num(g.time_us);
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::Key << "experts" << YAML::Value << YAML::BeginSeq;
  for (const auto& e : p.experts) {
    out << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "num_experts" << YAML::Value << e.num_experts;
    out << YAML::Key << "tokens" << YAML::Value << e.tokens;
    out << YAML::Key << "max_tokens" << YAML::Value << e.max_tokens;
    out << YAML::Key << "active_experts" << YAML::Value << e.active_experts;
    out << YAML::Key << "n" << YAML::Value << e.n << YAML::Key << "k" << YAML::Value << e.k;
    out << YAML::Key << "dtype" << YAML::Value << std::string(to_string(e.dtype));
    out << YAML::Key << "distribution" << YAML::Value << e.distribution;
    out << YAML::Key << "time_us" << YAML::Value << fmt_num(e.time_us);
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::Key << "elementwise" << YAML::Value << YAML::BeginSeq;
  for (const auto& e : p.elementwise) {
    out << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "bytes" << YAML::Value << fmt_num(e.bytes);
    out << YAML::Key << "time_us" << YAML::Value << fmt_num(e.time_us);
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::Key << "attention" << YAML::Value << YAML::BeginSeq;
  for (const auto& a : p.attention) {
    out << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "kind" << YAML::Value << a.kind;
    out << YAML::Key << "impl" << YAML::Value << a.impl;
    out << YAML::Key << "batch" << YAML::Value << a.batch;
    out << YAML::Key << "q_len" << YAML::Value << a.q_len;
    out << YAML::Key << "kv_len" << YAML::Value << a.kv_len;
    out << YAML::Key << "num_heads" << YAML::Value << a.num_heads;
    out << YAML::Key << "num_kv_heads" << YAML::Value << a.num_kv_heads;
    out << YAML::Key << "head_dim" << YAML::Value << a.head_dim;
    out << YAML::Key << "time_us" << YAML::Value << fmt_num(a.time_us);
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::Key << "collectives" << YAML::Value << YAML::BeginSeq;
  for (const auto& c : p.collectives) {
    out << YAML::Flow << YAML::BeginMap;
    out << YAML::Key << "op" << YAML::Value << std::string(to_string(c.op));
    out << YAML::Key << "group_size" << YAML::Value << c.group_size;
    out << YAML::Key << "nodes" << YAML::Value << c.nodes;
    out << YAML::Key << "group" << YAML::Value << c.group;
    out << YAML::Key << "bytes" << YAML::Value << fmt_num(c.bytes);
    out << YAML::Key << "time_us" << YAML::Value << fmt_num(c.time_us);
    out << YAML::EndMap;
  }
  out << YAML::EndSeq;
  if (!p.gemv.empty()) {
    out << YAML::Key << "gemv" << YAML::Value << YAML::BeginSeq;
    for (const auto& g : p.gemv) {
      out << YAML::Flow << YAML::BeginMap;
      out << YAML::Key << "impl" << YAML::Value << g.impl;
      out << YAML::Key << "m" << YAML::Value << g.m << YAML::Key << "n" << YAML::Value << g.n;
      out << YAML::Key << "k" << YAML::Value << g.k;
      out << YAML::Key << "dtype" << YAML::Value << std::string(to_string(g.dtype));
      out << YAML::Key << "time_us" << YAML::Value << fmt_num(g.time_us);
      out << YAML::EndMap;
    }
    out << YAML::EndSeq;
  }
  out << YAML::EndMap;  // tables

  if (p.host_overhead.step_us > 0) {
    out << YAML::Key << "host_overhead" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "step_us" << YAML::Value << fmt_num(p.host_overhead.step_us);
    out << YAML::Key << "steps" << YAML::Value << p.host_overhead.steps;
    out << YAML::Key << "measured_with" << YAML::Value << p.host_overhead.measured_with;
    out << YAML::EndMap;
  }
  if (p.graph_launch.chain_kernels > 0) {
    out << YAML::Key << "graph_launch" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "alone_graph_us" << YAML::Value << fmt_num(p.graph_launch.alone_graph_us);
    out << YAML::Key << "alone_eager_us" << YAML::Value << fmt_num(p.graph_launch.alone_eager_us);
    out << YAML::Key << "chain_us" << YAML::Value << fmt_num(p.graph_launch.chain_us);
    out << YAML::Key << "chain_kernels" << YAML::Value << p.graph_launch.chain_kernels;
    if (p.graph_launch.alone_gemv_us > 0 && p.graph_launch.mixed_chain_us > 0) {
      out << YAML::Key << "alone_gemv_us" << YAML::Value << fmt_num(p.graph_launch.alone_gemv_us);
      out << YAML::Key << "mixed_chain_us" << YAML::Value << fmt_num(p.graph_launch.mixed_chain_us);
    }
    out << YAML::Key << "measured_with" << YAML::Value << p.graph_launch.measured_with;
    if (p.graph_launch.no_pdl_extra_us > 0) {
      out << YAML::Key << "no_pdl_extra_us" << YAML::Value << fmt_num(p.graph_launch.no_pdl_extra_us);
      out << YAML::Key << "no_pdl_measured_with" << YAML::Value << p.graph_launch.no_pdl_measured_with;
    }
    out << YAML::EndMap;
  }
  if (!p.fused_decode_layer.points.empty()) {
    out << YAML::Key << "fused_decode_layer" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "measured_with" << YAML::Value << p.fused_decode_layer.measured_with;
    out << YAML::Key << "points" << YAML::Value << YAML::BeginSeq;
    for (const auto& q : p.fused_decode_layer.points) {
      out << YAML::Flow << YAML::BeginMap;
      for (const auto& [key, field] : kFusedLayerIntKeys) out << YAML::Key << key << YAML::Value << q.*field;
      out << YAML::Key << "time_us" << YAML::Value << fmt_num(q.time_us);
      out << YAML::EndMap;
    }
    out << YAML::EndSeq;
    out << YAML::EndMap;
  }
  out << YAML::Key << "versions" << YAML::Value << YAML::BeginMap;
  for (const auto& [k, v] : p.versions) out << YAML::Key << k << YAML::Value << v;
  out << YAML::EndMap;
  out << YAML::Key << "measured_on" << YAML::Value << p.measured_on;
  out << YAML::Key << "notes" << YAML::Value << p.notes;
  out << YAML::Key << "provenance" << YAML::Value;
  detail::emit_provenance(out, p.provenance);
  out << YAML::EndMap;
  if (!out.good()) throw RuntimeError(fmt::format("profile_to_yaml: {}", out.GetLastError()));
  return std::string(out.c_str()) + "\n";
}

HardwareProfile load_profile(const std::string& name_or_path) {
  const auto path = detail::resolve_shipped(name_or_path, "profiles", "profile");
  return parse_profile_yaml(read_text_file(path), path.string());
}

}  // namespace mixserve
