// mixserve-plan describe --model M: parameters (total, active, per component), weight bytes by
// dtype, KV-cache bytes per token.
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/core/json.hpp"
#include "mixserve/planner/cli.hpp"

namespace mixserve::planner {

namespace {

struct DescribeConfig {
  std::string model;
  bool json = false;
};

std::string billions(int64_t n) { return fmt::format("{:.2f} B", static_cast<double>(n) / 1e9); }

int run_describe(const DescribeConfig& cfg) {
  const ModelSpec m = load_model(cfg.model);
  const ParamBreakdown p = count_params(m);
  // Bytes per dtype, by the storage rule of weight_bytes() (model.cpp): quantised checkpoints
  // keep embeddings, LM head, norms and router in 16 bits; attention and dense FFN use
  // weight_dtype; routed and shared experts expert_weight_dtype. The sum must equal
  // weight_bytes(), checked below so the two views cannot drift apart.
  const DType wide = dtype_bytes(m.weight_dtype) >= 2.0 ? m.weight_dtype : DType::bf16;
  std::map<std::string, double> bytes_by_dtype;
  const auto add = [&](DType d, int64_t params) {
    if (params > 0)
      bytes_by_dtype[std::string(to_string(d))] += static_cast<double>(params) * dtype_bytes(d);
  };
  add(wide, p.embedding + p.lm_head + p.norms + p.router);
  add(m.weight_dtype, p.attention + p.dense_ffn);
  add(m.expert_weight_dtype, p.routed_experts + p.shared_experts);
  const double kv = kv_bytes_per_token(m);
  const double total_bytes = weight_bytes(m);
  double listed = 0;
  for (const auto& [d, b] : bytes_by_dtype) listed += b;
  if (std::abs(listed - total_bytes) > 1e-9 * total_bytes)
    throw RuntimeError(fmt::format("describe: bytes by dtype sum to {} but weight_bytes() is {}",
                                   listed, total_bytes));

  if (cfg.json) {
    nlohmann::json by_dtype = nlohmann::json::object();
    for (const auto& [d, b] : bytes_by_dtype) by_dtype[d] = b;
    const nlohmann::json doc{
        {"command", "describe"},
        {"model", m.name},
        {"architecture", m.architecture},
        {"source", m.source},
        {"num_layers", m.num_layers},
        {"num_moe_layers", m.num_moe_layers()},
        {"num_dense_layers", m.num_dense_layers()},
        {"hidden_size", m.hidden_size},
        {"attention", std::string(to_string(m.attention.type))},
        {"num_experts", m.moe.num_experts},
        {"top_k", m.moe.top_k},
        {"total_params", p.total()},
        {"active_params", p.active},
        {"params", to_json(p)},
        {"weight_bytes_by_dtype", by_dtype},
        {"weight_bytes", total_bytes},
        {"kv_bytes_per_token", kv},
        {"kv_dtype", std::string(to_string(m.kv_dtype))},
    };
    std::printf("%s\n", doc.dump(2).c_str());
    return 0;
  }

  std::string out;
  out += fmt::format("model {} ({})\n", m.name, m.architecture);
  if (!m.source.empty()) out += fmt::format("  source: {}\n", m.source);
  out += fmt::format("  {} layers ({} MoE, {} dense), hidden {}, vocab {}\n", m.num_layers,
                     m.num_moe_layers(), m.num_dense_layers(), m.hidden_size, m.vocab_size);
  const auto& a = m.attention;
  out += fmt::format("  attention {}: {} heads, {} KV heads, head dim {}\n", to_string(a.type),
                     a.num_heads, a.num_kv_heads, a.head_dim);
  out += fmt::format("  MoE: {} routed experts (top {}), {} shared, expert width {}\n",
                     m.moe.num_experts, m.moe.top_k, m.moe.num_shared_experts,
                     m.moe.expert_intermediate_size);
  out += "\nparameters\n";
  const std::pair<const char*, int64_t> rows[] = {
      {"embedding", p.embedding},           {"lm_head", p.lm_head},
      {"attention", p.attention},           {"norms", p.norms},
      {"dense_ffn", p.dense_ffn},           {"routed_experts", p.routed_experts},
      {"shared_experts", p.shared_experts}, {"router", p.router}};
  const double total = static_cast<double>(p.total());
  for (const auto& [name, n] : rows)
    out += fmt::format("  {:<16} {:>16} {:>10} {:>6.1f}%\n", name, n, billions(n),
                       total > 0 ? 100.0 * static_cast<double>(n) / total : 0.0);
  out += fmt::format("  {:<16} {:>16} {:>10}\n", "total", p.total(), billions(p.total()));
  out += fmt::format("  {:<16} {:>16} {:>10}  (per token: top {} of {} routed experts)\n",
                     "active", p.active, billions(p.active), m.moe.top_k, m.moe.num_experts);
  out += fmt::format("  {:<16} {:>16} {:>10}\n", "one expert", p.per_expert,
                     fmt::format("{:.1f} M", static_cast<double>(p.per_expert) / 1e6));
  out += "\nweight bytes by dtype\n";
  for (const auto& [d, b] : bytes_by_dtype)
    out += fmt::format("  {:<16} {:>10.1f} GiB\n", d, b / (1024.0 * 1024 * 1024));
  out += fmt::format("  {:<16} {:>10.1f} GiB\n", "total", total_bytes / (1024.0 * 1024 * 1024));
  out += fmt::format("\nKV cache per token: {:.0f} bytes ({:.1f} KiB, {}, all {} layers)\n", kv,
                     kv / 1024.0, to_string(m.kv_dtype), m.num_layers);
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace

CommandRunner register_describe(CLI::App& app) {
  auto cfg = std::make_shared<DescribeConfig>();
  CLI::App* sub = app.add_subcommand("describe", "parameters, weight bytes and KV bytes of a model");
  sub->add_option("--model", cfg->model, "shipped model name, model YAML, or HF config.json")
      ->required();
  sub->add_flag("--json", cfg->json, "print one JSON document on stdout");
  return [cfg] { return run_describe(*cfg); };
}

}  // namespace mixserve::planner
