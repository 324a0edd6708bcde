// mixserve-plan check plan.yaml: load, validate, print OK and a summary (exit 0); a bad plan is
// an InputError (exit 2) naming the key.
#include <cstdio>
#include <memory>

#include <fmt/format.h>

#include "mixserve/core/io.hpp"
#include "mixserve/core/json.hpp"
#include "mixserve/planner/cli.hpp"

namespace mixserve::planner {

namespace {

struct CheckConfig {
  std::string plan;
  bool json = false;
};

int run_check(const CheckConfig& cfg) {
  const Plan p = load_plan(cfg.plan);
  validate_plan(p, cfg.plan);
  const PlanCandidate& c = p.chosen;
  if (cfg.json) {
    nlohmann::json alts = nlohmann::json::array();
    for (const auto& a : p.alternatives) alts.push_back(to_json(a));
    const nlohmann::json doc{{"command", "check"},
                             {"ok", true},
                             {"file", cfg.plan},
                             {"version", p.version},
                             {"model", p.model.name},
                             {"cluster", p.cluster.name},
                             {"world_size", p.cluster.world_size()},
                             {"profile", {{"name", p.profile_name}, {"source", p.profile_source}}},
                             {"cost_model", p.cost_model},
                             {"objective", p.objective},
                             {"chosen", to_json(c)},
                             {"alternatives", alts}};
    std::printf("%s\n", doc.dump(2).c_str());
    return 0;
  }
  std::string out = fmt::format("OK {}: plan version {}, written by {} on {}\n", cfg.plan,
                                p.version, p.provenance.tool, p.provenance.created);
  out += fmt::format("  model {} on {} ({} x {} {}, {} GPUs)\n", p.model.name, p.cluster.name,
                     p.cluster.num_nodes, p.cluster.gpus_per_node, p.cluster.gpu_model,
                     p.cluster.world_size());
  out += fmt::format("  layout {}\n", c.layout.name());
  out += fmt::format("  limits max_num_seqs {}, max_num_batched_tokens {}, kv_blocks {}\n",
                     c.limits.max_num_seqs, c.limits.max_num_batched_tokens, c.limits.kv_blocks);
  out += fmt::format("  predicted ({} cost model, profile {} [{}]): TTFT {:.2f} ms, ITL {:.2f} ms, "
                     "{:.1f} tok/s\n",
                     p.cost_model, p.profile_name, p.profile_source, c.metrics.ttft_ms,
                     c.metrics.itl_ms, c.metrics.throughput_tok_s);
  out += fmt::format("  rank map: {} ranks consistent with the layout; {} alternatives\n",
                     p.rank_map.size(), p.alternatives.size());
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace

CommandRunner register_check(CLI::App& app) {
  auto cfg = std::make_shared<CheckConfig>();
  CLI::App* sub = app.add_subcommand("check", "validate a plan file");
  sub->add_option("plan", cfg->plan, "plan YAML written by mixserve-plan search -o")->required();
  sub->add_flag("--json", cfg->json, "print one JSON document on stdout");
  return [cfg] { return run_check(*cfg); };
}

}  // namespace mixserve::planner
