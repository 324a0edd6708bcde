// mixserve-plan simulate --plan plan.yaml [--workload W]: runs the plan's chosen layout through
// the discrete-event serving simulator and reports vLLM's benchmark metrics; optionally a rate
// sweep (--rates) with a latency-throughput plot (--plot), a capacity search (--capacity), the
// result JSON, a per-request CSV and a Chrome trace of the steps.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/planner/cli.hpp"
#include "mixserve/sim/cost_model.hpp"
#include "mixserve/sim/replay.hpp"
#include "mixserve/sim/serving.hpp"
#include "mixserve/sim/serving_report.hpp"
#include "mixserve/sim/workload_gen.hpp"

namespace mixserve::planner {

namespace {

struct SimulateConfig {
  std::string plan, workload, cost_model, profile;
  double rate = 0;                 // 0 = the workload's
  std::vector<double> rates;       // sweep
  int num_requests = 0;            // 0 = the workload's
  int64_t seed = -1;               // -1 = the workload's
  std::string router = "round-robin";
  std::string policy;              // "" = the plan's
  int max_num_seqs = 0;
  int64_t max_num_batched_tokens = 0;
  bool no_chunked_prefill = false;
  double slo_ttft_ms = 0, slo_tpot_ms = 0, slo_e2el_ms = 0;
  bool capacity = false;
  double attainment = 0.9;
  int capacity_requests = 200;
  double trial_seconds = 60;
  std::string output_json, output_csv, trace, plot, plot_metric = "ttft";
  std::string moe_load = "sampled";  // per-step MoE load: sampled | expected
  bool json = false, quiet = false;
};

void print_block(const sim::ServingMetrics& m, const sim::ServingConfig& cfg, double rate,
                 const std::string& title) {
  std::fputs(sim::format_serving_block(m, cfg, rate, title, "simulated").c_str(), stdout);
}

int run_simulate(const SimulateConfig& o) {
  const Plan plan = load_plan(o.plan);
  WorkloadSpec w = o.workload.empty() ? plan.workload : load_workload(o.workload);
  if (o.rate > 0) {
    if (w.arrival != ArrivalKind::poisson && w.arrival != ArrivalKind::gamma)
      throw_input_error("--rate", "rate", "a workload with poisson or gamma arrivals",
                        std::string(to_string(w.arrival)));
    w.rate = o.rate;
  }
  if (o.num_requests > 0) w.num_requests = o.num_requests;
  if (o.seed >= 0) w.seed = static_cast<uint64_t>(o.seed);
  if (o.slo_ttft_ms > 0) w.slo_ttft_ms = o.slo_ttft_ms;
  if (o.slo_tpot_ms > 0) w.slo_tpot_ms = o.slo_tpot_ms;
  if (o.slo_e2el_ms > 0) w.slo_e2el_ms = o.slo_e2el_ms;

  const HardwareProfile profile = load_profile(o.profile.empty() ? plan.profile_name : o.profile);
  sim::CostModelOptions copt;
  copt.routing = sim::routing_from_workload(w);
  const std::string cm_name = !o.cost_model.empty()       ? o.cost_model
                              : !plan.cost_model.empty() ? plan.cost_model
                                                         : "mixserve";
  const Layout& layout = plan.chosen.layout;
  const auto cm = sim::make_cost_model(cm_name, plan.model, plan.cluster, profile, layout, copt);

  RuntimeLimits limits = plan.chosen.limits;
  if (o.max_num_seqs > 0) limits.max_num_seqs = o.max_num_seqs;
  if (o.max_num_batched_tokens > 0) limits.max_num_batched_tokens = o.max_num_batched_tokens;
  if (o.no_chunked_prefill) limits.chunked_prefill = false;
  if (!o.policy.empty()) limits.decode_first = o.policy == sim::kDecodeFirst;
  sim::ServingConfig cfg = sim::serving_config_for(*cm, layout, limits, w);
  if (o.max_num_seqs > 0) cfg.limits.max_num_seqs = o.max_num_seqs;  // the option wins
  cfg.router = *sim::parse_router(o.router);
  cfg.record_steps = !o.trace.empty();
  cfg.sample_moe_load = o.moe_load == "sampled";
  const bool show_progress = !o.quiet && ::isatty(STDERR_FILENO);
  const int gpus = plan.cluster.world_size();
  const std::string title = layout.name();

  if (o.capacity) {
    sim::CapacityOptions copt2;
    copt2.slo_ttft_ms = w.slo_ttft_ms;
    copt2.slo_tpot_ms = w.slo_tpot_ms;
    copt2.slo_e2el_ms = w.slo_e2el_ms;
    copt2.attainment = o.attainment;
    copt2.num_requests = o.capacity_requests;
    copt2.trial_duration_s = o.trial_seconds;
    copt2.max_requests = std::max(copt2.max_requests, o.capacity_requests);
    copt2.start_rate = w.rate;
    if (show_progress)
      copt2.on_trial = [](double rate, int requests, bool sustained) {
        std::fprintf(stderr, "capacity trial: %.3f req/s, %d requests: %s\n", rate, requests,
                     sustained ? "sustained" : "not sustained");
      };
    const sim::CapacityResult c = sim::capacity_search(*cm, cfg, w, copt2, gpus);
    nlohmann::json j = sim::metrics_to_json(c.at_max, cfg);
    j["mixserve_capacity"] = {{"max_rate", c.max_rate},
                              {"max_rate_per_gpu", c.max_rate_per_gpu},
                              {"attainment", o.attainment},
                              {"simulations", c.simulations},
                              {"num_gpus", gpus},
                              {"layout", title}};
    if (!o.output_json.empty()) write_file_atomic(o.output_json, j.dump(2) + "\n");
    if (o.json) {
      std::printf("%s\n", j.dump(2).c_str());
    } else {
      std::printf("Capacity of %s within SLOs (TTFT %g ms, TPOT %g ms, E2EL %g ms; %.0f%% of "
                  "requests): %.3f req/s = %.4f req/s per GPU (%d GPUs, %d simulations)\n",
                  title.c_str(), w.slo_ttft_ms, w.slo_tpot_ms, w.slo_e2el_ms,
                  100 * o.attainment, c.max_rate, c.max_rate_per_gpu, gpus, c.simulations);
    }
    return kExitOk;
  }

  std::vector<double> rates = o.rates;
  if (rates.empty()) rates.push_back(0);  // the workload's own arrivals
  std::vector<sim::CurvePoint> curve;
  nlohmann::json runs = nlohmann::json::array();
  std::optional<sim::SimResult> last;
  for (double rate : rates) {
    WorkloadSpec wr = w;
    if (rate > 0) {
      if (wr.arrival != ArrivalKind::poisson && wr.arrival != ArrivalKind::gamma)
        throw_input_error("--rates", "rates", "a workload with poisson or gamma arrivals",
                          std::string(to_string(wr.arrival)));
      wr.rate = rate;
    }
    if (show_progress) {
      cfg.progress = [rate](const sim::SimProgress& p) {
        std::fprintf(stderr, "\rsimulating%s: t = %.1f s, %lld / %lld requests done, %lld steps",
                     rate > 0 ? fmt::format(" at {:g} req/s", rate).c_str() : "", p.sim_time_s,
                     static_cast<long long>(p.finished), static_cast<long long>(p.total),
                     static_cast<long long>(p.steps));
        if (p.finished == p.total) std::fputc('\n', stderr);
      };
    }
    sim::SimResult r = sim::simulate(*cm, cfg, sim::generate_requests(wr));
    nlohmann::json j = sim::metrics_to_json(r.metrics, cfg);
    const bool has_rate = wr.arrival == ArrivalKind::poisson || wr.arrival == ArrivalKind::gamma;
    j["request_rate"] = has_rate ? nlohmann::json(wr.rate) : nlohmann::json("inf");
    j["mixserve_layout"] = title;
    j["mixserve_cost_model"] = cm_name;
    j["mixserve_workload"] = wr.name;
    j["mixserve_workload_approximate"] = wr.approximate;
    j["num_gpus"] = gpus;
    runs.push_back(j);
    const double y = o.plot_metric == "itl" ? r.metrics.itl.p90 : r.metrics.ttft.p90;
    curve.push_back({title, r.metrics.output_throughput / gpus, y,
                     fmt::format("{:g} req/s", rate > 0 ? rate : wr.rate)});
    if (!o.json) print_block(r.metrics, cfg, rate > 0 ? rate : wr.rate, title);
    last = std::move(r);
  }
  const nlohmann::json doc = runs.size() == 1 ? runs[0] : nlohmann::json{{"runs", runs}};
  if (o.json) std::printf("%s\n", doc.dump(2).c_str());
  if (!o.output_json.empty()) write_file_atomic(o.output_json, doc.dump(2) + "\n");
  if (!o.output_csv.empty()) write_file_atomic(o.output_csv, sim::requests_csv(*last));
  if (!o.trace.empty()) write_file_atomic(o.trace, sim::chrome_trace(*last).dump() + "\n");
  if (!o.plot.empty())
    write_file_atomic(o.plot, sim::pareto_svg(curve,
                                              fmt::format("{} on {}: p90 {} vs throughput",
                                                          plan.model.name, plan.cluster.name,
                                                          o.plot_metric == "itl" ? "ITL" : "TTFT"),
                                              "output tokens/s per GPU",
                                              fmt::format("p90 {} (ms)", o.plot_metric == "itl"
                                                                             ? "ITL"
                                                                             : "TTFT")));
  return kExitOk;
}

}  // namespace

CommandRunner register_simulate(CLI::App& app) {
  auto o = std::make_shared<SimulateConfig>();
  CLI::App* sub = app.add_subcommand(
      "simulate", "run a plan through the discrete-event serving simulator (vLLM-style metrics)");
  sub->add_option("--plan", o->plan, "plan YAML written by mixserve-plan search -o")->required();
  sub->add_option("--workload", o->workload,
                  "shipped workload name (configs/workloads) or YAML path; default: the plan's");
  sub->add_option("--rate", o->rate, "request rate (req/s), overrides the workload's");
  sub->add_option("--rates", o->rates, "sweep these request rates (comma-separated)")
      ->delimiter(',');
  sub->add_option("--num-requests", o->num_requests, "number of requests (default: workload's)");
  sub->add_option("--seed", o->seed, "RNG seed (default: workload's)");
  sub->add_option("--router", o->router, "DP-attention router")
      ->check(CLI::IsMember(sim::router_names()))
      ->capture_default_str();
  sub->add_option("--policy", o->policy, "scheduling order (default: the plan's)")
      ->check(CLI::IsMember({sim::kDecodeFirst, sim::kPrefillFirst}));
  sub->add_option("--max-num-seqs", o->max_num_seqs, "max sequences per replica (batch limit)");
  sub->add_option("--max-num-batched-tokens", o->max_num_batched_tokens,
                  "token budget per replica per step");
  sub->add_flag("--no-chunked-prefill", o->no_chunked_prefill, "prefill prompts in one step");
  sub->add_option("--cost-model", o->cost_model, "step-cost model (default: the plan's)")
      ->check(CLI::IsMember({"mixserve", "paper"}));
  sub->add_option("--profile", o->profile, "hardware profile (default: the plan's)");
  sub->add_option("--slo-ttft", o->slo_ttft_ms, "TTFT SLO in ms for goodput");
  sub->add_option("--slo-tpot", o->slo_tpot_ms, "TPOT SLO in ms for goodput");
  sub->add_option("--slo-e2el", o->slo_e2el_ms, "E2E latency SLO in ms for goodput");
  sub->add_flag("--capacity", o->capacity,
                "search the highest request rate that meets the SLOs (reported per GPU)");
  sub->add_option("--attainment", o->attainment, "fraction of requests that must meet the SLOs")
      ->check(CLI::Range(0.01, 1.0))
      ->capture_default_str();
  sub->add_option("--capacity-requests", o->capacity_requests,
                  "minimum requests per capacity trial")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  sub->add_option("--trial-seconds", o->trial_seconds,
                  "arrival window of each capacity trial (requests = max(minimum, rate * window))")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  sub->add_option("--output-json", o->output_json, "write the result JSON (vLLM key names)");
  sub->add_option("--output-csv", o->output_csv, "write one CSV row per request");
  sub->add_option("--trace", o->trace, "write a Chrome trace of the steps");
  sub->add_option("--plot", o->plot, "write an SVG of p90 latency vs throughput (per rate)");
  sub->add_option("--plot-metric", o->plot_metric, "latency on the plot's y axis")
      ->check(CLI::IsMember({"ttft", "itl"}))
      ->capture_default_str();
  sub->add_option("--moe-load", o->moe_load,
                  "MoE load per step: sampled from the workload's routing each step, or the "
                  "cost model's expected maximum")
      ->check(CLI::IsMember({"sampled", "expected"}))
      ->capture_default_str();
  sub->add_flag("--json", o->json, "print the result JSON on stdout instead of the text block");
  sub->add_flag("--quiet", o->quiet, "no progress line on stderr");
  return [o] { return run_simulate(*o); };
}

}  // namespace mixserve::planner
