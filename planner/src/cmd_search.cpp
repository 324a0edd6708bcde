// mixserve-plan search: enumerate, filter, rank; print the top N, the predicate rejections and
// the paper's baselines with ratios; --explain prints one layout's per-op breakdown; -o writes
// the plan atomically (after every check has passed, so a failure leaves no file behind).
// --objective goodput re-scores the analytic top K with the serving simulator's capacity search
// (search.hpp GoodputOptions); --pareto-svg plots their tail latency against throughput.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>

#include <fmt/format.h>

#include "cli_common.hpp"
#include "mixserve/core/error.hpp"
#include "mixserve/core/io.hpp"
#include "mixserve/core/json.hpp"
#include "mixserve/planner/cli.hpp"
#include "mixserve/sim/serving_report.hpp"

namespace mixserve::planner {

namespace {

struct SearchConfig {
  InputOptions inputs;
  std::string objective = "throughput";
  std::string cost_model = "mixserve";
  int top = 10;
  std::string explain;
  std::string layout;
  std::vector<std::string> baselines;
  bool json = false;
  std::string output;
  // Goodput objective.
  double slo_ttft_ms = 0, slo_tpot_ms = 0;  // 0 = the workload's slo fields
  double slo_percentile = 90;
  int rescore_top = 20;
  double trial_seconds = 60;
  std::string pareto_svg;
  bool progress = false;
};

constexpr int kParetoRates = 4;  // rates per candidate on the --pareto-svg plot

// FILE.svg -> FILE.itl.svg (the ITL companion of the TTFT plot).
std::string itl_plot_path(const std::string& path) {
  const std::string ext = ".svg";
  if (path.size() > ext.size() && path.compare(path.size() - ext.size(), ext.size(), ext) == 0)
    return path.substr(0, path.size() - ext.size()) + ".itl.svg";
  return path + ".itl.svg";
}

nlohmann::json goodput_json(const GoodputScore& g) {
  const auto& m = g.at_max;
  return {{"simulations", g.simulations},
          {"start_rate", g.start_rate},
          {"completed", m.completed},
          {"slo_attainment", m.slo_attainment},
          {"request_goodput", m.request_goodput},
          {"output_throughput", m.output_throughput},
          {"p90_ttft_ms", m.ttft.p90},
          {"p90_tpot_ms", m.tpot.p90},
          {"p90_itl_ms", m.itl.p90},
          {"mean_ttft_ms", m.ttft.mean},
          {"mean_tpot_ms", m.tpot.mean}};
}

void put_goodput(nlohmann::json& j, const GoodputScore& g) {
  j["max_rate_req_s"] = g.max_rate_req_s;
  j["max_rate_per_gpu"] = g.max_rate_per_gpu;
  j["goodput"] = goodput_json(g);
}

std::string goodput_row(const std::string& tag, const PlanCandidate& c, const GoodputScore* g) {
  if (g == nullptr)
    return fmt::format("{:<16} {:<47} {:>5} {:>6} {:>9} {:>9} {:>9} {:>8} {:>5}", tag,
                       c.layout.name(), c.limits.max_num_seqs, c.limits.max_num_batched_tokens,
                       "-", "-", "-", "-", "-");
  return fmt::format("{:<16} {:<47} {:>5} {:>6} {:>9.2f} {:>9.3f} {:>9.1f} {:>8.2f} {:>5}", tag,
                     c.layout.name(), c.limits.max_num_seqs, c.limits.max_num_batched_tokens,
                     g->max_rate_req_s, g->max_rate_per_gpu, g->at_max.ttft.p90,
                     g->at_max.tpot.p90, g->simulations);
}

std::string goodput_header(const char* first) {
  return fmt::format("{:<16} {:<47} {:>5} {:>6} {:>9} {:>9} {:>9} {:>8} {:>5}\n", first, "layout",
                     "seqs", "tokens", "max rate", "rate/GPU", "p90 TTFT", "p90 TPOT", "sims") +
         fmt::format("{:<16} {:<47} {:>5} {:>6} {:>9} {:>9} {:>9} {:>8} {:>5}\n", "", "", "", "",
                     "(req/s)", "(req/s)", "(ms)", "(ms)", "");
}

// Each re-scored candidate's p90 latency against output tokens/s per GPU at kParetoRates rates.
std::string pareto_plot(const SearchInputs& in, const SearchResult& r, bool itl) {
  std::vector<sim::CurvePoint> pts;
  const double gpus = in.cluster.world_size();
  for (size_t i = 0; i < r.goodput.size(); ++i)
    for (const CurveSample& s : r.goodput[i].curve)
      pts.push_back({fmt::format("#{} {}", i + 1, r.ranked[i].layout.name()),
                     s.metrics.output_throughput / gpus,
                     itl ? s.metrics.itl.p90 : s.metrics.ttft.p90,
                     fmt::format("{:.3g} req/s", s.rate)});
  for (const auto& b : r.baselines)
    if (b.goodput)
      for (const CurveSample& s : b.goodput->curve)
        pts.push_back({"baseline " + b.name, s.metrics.output_throughput / gpus,
                       itl ? s.metrics.itl.p90 : s.metrics.ttft.p90,
                       fmt::format("{:.3g} req/s", s.rate)});
  const char* what = itl ? "ITL" : "TTFT";
  return sim::pareto_svg(pts,
                         fmt::format("{} on {}, {}: p90 {} vs throughput (goodput search)",
                                     in.model.name, in.cluster.name, in.workload.name, what),
                         "output tokens/s per GPU", fmt::format("p90 {} (ms)", what));
}

// --explain: a 1-based rank of the list, a baseline name, or a layout name.
PlanCandidate find_explained(const std::string& what, const SearchResult& r,
                             const SearchInputs& in, const SearchOptions& opt) {
  char* end = nullptr;
  const long rank = std::strtol(what.c_str(), &end, 10);
  if (!what.empty() && end && *end == '\0') {
    if (rank < 1 || rank > static_cast<long>(r.ranked.size()))
      throw_input_error("--explain", "rank",
                        fmt::format("a rank in 1..{}", r.ranked.size()), what);
    PlanCandidate c = r.ranked[static_cast<size_t>(rank - 1)];
    if (c.breakdown.empty())
      if (auto e = evaluate_layout(in, opt, c.layout)) c = *e, c.rank = static_cast<int>(rank);
    return c;
  }
  for (const auto& b : r.baselines)
    if (b.name == what) {
      if (!b.candidate)
        throw_input_error("--explain", "baseline",
                          "a baseline that is legal on this cluster", what + ": " + b.rejected_by);
      return *b.candidate;
    }
  const auto l = parse_layout_name(what);
  if (!l)
    throw_input_error("--explain", "layout",
                      "a rank, a baseline name, or a layout name such as "
                      "'attn TP8xDP2 | moe TP8xEP2 | PP1 | fused'",
                      what);
  std::string why;
  auto c = evaluate_layout(in, opt, *l, &why);
  if (!c) throw_input_error("--explain", "layout", "a legal layout of this cluster", what + ": rejected by " + why);
  for (const auto& rc : r.ranked)
    if (rc.layout == *l) c->rank = rc.rank;
  return *c;
}

std::string breakdown_table(const PlanCandidate& c) {
  std::string out = fmt::format("per-op breakdown of {} (max_num_seqs {}, max_num_batched_tokens {})\n",
                                c.layout.name(), c.limits.max_num_seqs,
                                c.limits.max_num_batched_tokens);
  for (const char* phase : {"prefill", "decode"}) {
    double total = 0;
    for (const auto& o : c.breakdown)
      if (o.phase == phase) total += o.time_us;
    out += fmt::format("  {} step ({:.1f} us)\n", phase, total);
    out += fmt::format("    {:<24} {:>12} {:>7}  {}\n", "op", "time(us)", "share", "source");
    for (const auto& o : c.breakdown)
      if (o.phase == phase)
        out += fmt::format("    {:<24} {:>12.1f} {:>6.1f}%  {}\n", o.op, o.time_us,
                           total > 0 ? 100 * o.time_us / total : 0.0, to_string(o.source));
  }
  return out;
}

std::string candidate_row(const std::string& tag, const PlanCandidate& c) {
  const double used = fixed_memory_bytes(c.memory) + c.memory.kv_cache;
  return fmt::format("{:<16} {:<47} {:>5} {:>6} {:>9.1f} {:>8.2f} {:>10.1f} {:>10.1f} {:>8.1f} {:>8.1f}",
                     tag, c.layout.name(), c.limits.max_num_seqs, c.limits.max_num_batched_tokens,
                     c.metrics.ttft_ms, c.metrics.itl_ms, c.metrics.throughput_tok_s,
                     c.metrics.capacity_tok_s, to_gib(c.memory.weights), to_gib(used));
}

std::string table_header(const char* first) {
  return fmt::format("{:<16} {:<47} {:>5} {:>6} {:>9} {:>8} {:>10} {:>10} {:>8} {:>8}\n", first,
                     "layout", "seqs", "tokens", "TTFT", "ITL", "throughput", "capacity", "weights",
                     "mem/GPU") +
         fmt::format("{:<16} {:<47} {:>5} {:>6} {:>9} {:>8} {:>10} {:>10} {:>8} {:>8}\n", "", "", "", "",
                     "(ms)", "(ms)", "(tok/s)", "(tok/s)", "(GiB)", "(GiB)");
}

int run_search(const SearchConfig& cfg) {
  LoadedInputs loaded = load_inputs(cfg.inputs);
  const bool goodput = cfg.objective == kGoodputObjective;
  SearchOptions opt;
  if (goodput) {
    WorkloadSpec& lw = loaded.in.workload;
    GoodputOptions g;
    g.slo_ttft_ms = cfg.slo_ttft_ms > 0 ? cfg.slo_ttft_ms : lw.slo_ttft_ms;
    g.slo_tpot_ms = cfg.slo_tpot_ms > 0 ? cfg.slo_tpot_ms : lw.slo_tpot_ms;
    if (!(cfg.slo_percentile > 0 && cfg.slo_percentile <= 100))
      throw_input_error("--slo-percentile", "slo_percentile", "a percentile in (0, 100]",
                        fmt::format("{:g}", cfg.slo_percentile));
    if (!(g.slo_ttft_ms > 0) && !(g.slo_tpot_ms > 0))
      throw_input_error("--slo-ttft", "slo_ttft_ms",
                        "--slo-ttft and/or --slo-tpot in ms (the workload '" + lw.name +
                            "' sets no slo.ttft_ms / slo.tpot_ms)");
    g.slo_percentile = cfg.slo_percentile;
    g.rescore_top = cfg.rescore_top;
    g.trial_duration_s = cfg.trial_seconds;
    g.curve_points = cfg.pareto_svg.empty() ? 0 : kParetoRates;
    if (cfg.progress || ::isatty(STDERR_FILENO))  // stderr only: --json stdout stays clean
      g.progress = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
    // The plan records the SLOs it was ranked under (simulate --plan then uses them).
    lw.slo_ttft_ms = g.slo_ttft_ms;
    lw.slo_tpot_ms = g.slo_tpot_ms;
    opt.goodput = std::move(g);
    opt.objective = Objective::throughput;  // the analytic pre-filter (at saturation)
  } else {
    for (const auto& [name, set] : {std::pair{"--slo-ttft", cfg.slo_ttft_ms > 0},
                                    std::pair{"--slo-tpot", cfg.slo_tpot_ms > 0},
                                    std::pair{"--pareto-svg", !cfg.pareto_svg.empty()}})
      if (set)
        throw_input_error(name, "objective", "--objective goodput with this option",
                          cfg.objective);
    opt.objective = *parse_objective(cfg.objective);  // CLI11 IsMember checked it
  }
  const SearchInputs& in = loaded.in;
  opt.cost_model = cfg.cost_model;
  opt.top = cfg.top;
  opt.baselines = cfg.baselines;
  if (!cfg.layout.empty()) {
    // A baseline name or a layout name: pin the search to it (e.g. to write a baseline's plan).
    bool is_baseline = false;
    for (const auto& n : baseline_names()) is_baseline = is_baseline || n == cfg.layout;
    opt.only_layout = is_baseline ? baseline_layout(cfg.layout, in.cluster)
                                  : parse_layout_name(cfg.layout);
    if (!opt.only_layout)
      throw_input_error("--layout", "layout",
                        is_baseline ? std::string("a baseline that applies to this cluster")
                                    : std::string("a baseline name or a layout name such as "
                                                  "'attn TP8xDP2 | moe TP8xEP2 | PP1 | fused'"),
                        cfg.layout);
  }
  const WorkloadSpec& w = in.workload;
  if (w.routing == "zipf") {
    opt.routing.kind = "zipf";
    opt.routing.skew = w.routing_skew;
  } else if (w.routing != "uniform") {
    throw_input_error(cfg.inputs.workload, "routing",
                      "uniform or zipf for the planner (histogram routing is simulate-only)",
                      w.routing);
  }
  opt.max_batch = w.max_num_seqs > 0 ? w.max_num_seqs : 256;
  opt.max_model_len = w.max_seq_len;

  const auto t0 = std::chrono::steady_clock::now();
  const SearchResult r = search(in, opt);
  const double wall_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const PlanCandidate& best = r.ranked.front();

  std::optional<PlanCandidate> explained;
  if (!cfg.explain.empty()) explained = find_explained(cfg.explain, r, in, opt);

  // Build and validate the plan before printing anything: a plan that would not pass `check`
  // is a bug, and no file is written unless it passes.
  std::string plan_text;
  if (!cfg.output.empty()) {
    std::vector<std::pair<std::string, std::string>> texts = loaded.texts;
    Plan plan = make_plan(in, opt, r, make_provenance("mixserve-plan", texts));
    if (goodput) plan.objective = std::string(kGoodputObjective);
    validate_plan(plan, cfg.output);
    plan_text = plan_to_yaml(plan);
  }

  const std::string note = datasheet_note(in.profile);
  const size_t shown = std::min(r.ranked.size(), static_cast<size_t>(std::max(cfg.top, 1)));
  if (cfg.json) {
    nlohmann::json ranked = nlohmann::json::array();
    for (size_t i = 0; i < shown; ++i) {
      nlohmann::json j = to_json(r.ranked[i]);
      if (i < r.goodput.size()) put_goodput(j, r.goodput[i]);
      ranked.push_back(j);
    }
    nlohmann::json baselines = nlohmann::json::array();
    for (const auto& b : r.baselines) {
      nlohmann::json j = b.candidate ? to_json(*b.candidate) : nlohmann::json::object();
      j["name"] = b.name;
      j["description"] = b.description;
      j["legal"] = b.candidate.has_value();
      if (b.layout) j["layout"] = to_json(*b.layout);
      if (!b.candidate) j["rejected_by"] = b.rejected_by;
      if (b.candidate) {
        const Ratios q = ratios(best.metrics, b.candidate->metrics);
        j["ratios"] = {{"ttft_x", q.ttft_x},
                       {"itl_x", q.itl_x},
                       {"throughput_gain_pct", q.throughput_gain_pct},
                       {"capacity_gain_pct", q.capacity_gain_pct}};
        if (b.goodput) {
          put_goodput(j, *b.goodput);
          j["ratios"]["goodput_x"] = b.goodput->max_rate_per_gpu > 0
                                         ? nlohmann::json(r.goodput.front().max_rate_per_gpu /
                                                          b.goodput->max_rate_per_gpu)
                                         : nlohmann::json(nullptr);
        }
      }
      baselines.push_back(j);
    }
    nlohmann::json rejections = nlohmann::json::array();
    for (const auto& c : r.rejections)
      rejections.push_back({{"predicate", c.name},
                            {"rule", c.rule},
                            {"rejected", c.rejected},
                            {"checked", c.checked},
                            {"unit", c.per_candidate ? "candidates" : "layouts"}});
    nlohmann::json doc{
        {"command", "search"},
        {"model", in.model.name},
        {"cluster", in.cluster.name},
        {"world_size", in.cluster.world_size()},
        {"workload", w.name},
        {"profile", {{"name", in.profile.name}, {"source", in.profile.source}}},
        {"datasheet_estimates", in.profile.is_datasheet()},
        {"multi_gpu_unvalidated", in.cluster.world_size() > 1},
        {"objective", cfg.objective},
        {"cost_model", cfg.cost_model},
        {"routing", opt.routing.kind == "zipf" ? fmt::format("zipf:{}", opt.routing.skew) : "uniform"},
        {"max_batch", opt.max_batch},
        {"max_model_len", opt.max_model_len},
        {"layouts", r.layouts},
        {"evaluations", r.evaluations},
        {"wall_s", wall_s},
        {"rejections", rejections},
        {"chosen", to_json(best)},
        {"ranked", ranked},
        {"baselines", baselines},
        {"plan_file", cfg.output.empty() ? nlohmann::json(nullptr) : nlohmann::json(cfg.output)}};
    if (!note.empty()) doc["note"] = note;
    if (explained) doc["explain"] = to_json(*explained);
    if (goodput) {
      const GoodputOptions& g = *opt.goodput;
      put_goodput(doc["chosen"], r.goodput.front());
      doc["goodput"] = {{"slo_ttft_ms", g.slo_ttft_ms},
                        {"slo_tpot_ms", g.slo_tpot_ms},
                        {"slo_percentile", g.slo_percentile},
                        {"rescore_top", g.rescore_top},
                        {"rescored", r.goodput.size()},
                        {"trial_seconds", g.trial_duration_s},
                        {"wall_s", r.goodput_wall_s},
                        {"pareto_svg", cfg.pareto_svg.empty() ? nlohmann::json(nullptr)
                                                              : nlohmann::json(cfg.pareto_svg)}};
    }
    if (!plan_text.empty()) write_file_atomic(cfg.output, plan_text);
    if (!cfg.pareto_svg.empty()) {
      write_file_atomic(cfg.pareto_svg, pareto_plot(in, r, false));
      write_file_atomic(itl_plot_path(cfg.pareto_svg), pareto_plot(in, r, true));
    }
    std::printf("%s\n", doc.dump(2).c_str());
    return 0;
  }

  const ClusterSpec& c = in.cluster;
  std::string out = fmt::format(
      "mixserve-plan search: {} on {} ({} x {} {}, {:.0f} GiB), workload {} (rate {} req/s, "
      "input ~{:.0f}, output ~{:.0f} tokens)\n",
      in.model.name, c.name, c.num_nodes, c.gpus_per_node, c.gpu_model, c.gpu_memory_GiB, w.name,
      w.rate, w.input.expected(), w.output.expected());
  if (!note.empty()) out += note + "\n";
  out += fmt::format("objective {}, cost model {}, routing {}, batch limit {}, max model len {}\n",
                     cfg.objective, cfg.cost_model,
                     opt.routing.kind == "zipf" ? fmt::format("zipf:{}", opt.routing.skew)
                                                : std::string("uniform"),
                     opt.max_batch, opt.max_model_len > 0 ? std::to_string(opt.max_model_len)
                                                           : std::string("model max"));
  if (c.world_size() > 1)
    out += "fidelity: multi-GPU predictions are not yet checked against measured runs the way the\n"
           "  single-GPU ones are (docs/fidelity.md); mixserve-run's sharded executor (no CUDA graphs or\n"
           "  decode kernels) measured slower than predicted on two H200s (docs/distributed.md)\n";
  out += fmt::format("searched {} layouts, {} (layout, limits) evaluations in {:.3f} s\n\n",
                     r.layouts, r.evaluations, wall_s);

  out += "legality predicates (each rule counted on its own; a layout may fail several)\n";
  for (const auto& p : r.rejections)
    out += fmt::format("  {:<24} rejected {:>6} of {:>6} {:<10}  {}\n", p.name, p.rejected,
                       p.checked, p.per_candidate ? "candidates" : "layouts", p.rule);

  if (goodput) {
    const GoodputOptions& g = *opt.goodput;
    out += fmt::format(
        "\ngoodput: the analytic top {} (by saturated throughput) and the baselines re-scored by "
        "the serving simulator: highest request rate with {:g}% of requests within TTFT {} and "
        "TPOT {} ({} s trials), {:.2f} s\n",
        r.goodput.size(), g.slo_percentile,
        g.slo_ttft_ms > 0 ? fmt::format("{:g} ms", g.slo_ttft_ms) : std::string("(none)"),
        g.slo_tpot_ms > 0 ? fmt::format("{:g} ms", g.slo_tpot_ms) : std::string("(none)"),
        g.trial_duration_s, r.goodput_wall_s);
    out += fmt::format("\ntop {} of {} legal layouts by goodput (max request rate per GPU within "
                       "the SLOs; latencies at that rate)\n", shown, r.ranked.size());
    out += goodput_header("#");
    for (size_t i = 0; i < shown; ++i)
      out += goodput_row(fmt::format("{}{}", i + 1, i == 0 ? " chosen" : ""), r.ranked[i],
                         i < r.goodput.size() ? &r.goodput[i] : nullptr) + "\n";
  } else {
    out += fmt::format("\ntop {} of {} legal layouts by {} (each at its best limits)\n", shown,
                       r.ranked.size(), cfg.objective);
    out += table_header("#");
    for (size_t i = 0; i < shown; ++i)
      out += candidate_row(fmt::format("{}{}", i + 1, i == 0 ? " chosen" : ""), r.ranked[i]) + "\n";
  }

  out += "\nbaselines (paper Table II, generalised to this cluster)\n";
  out += goodput ? goodput_header("name") : table_header("name");
  for (const auto& b : r.baselines) {
    if (b.candidate) {
      out += (goodput ? goodput_row(b.name, *b.candidate, b.goodput ? &*b.goodput : nullptr)
                      : candidate_row(b.name, *b.candidate)) + "\n";
    } else {
      out += fmt::format("{:<16} {:<47} {}\n", b.name, b.layout ? b.layout->name() : "-",
                         b.rejected_by == "not applicable" ? "not applicable to this cluster"
                                                           : "illegal: " + b.rejected_by);
    }
  }
  if (goodput) {
    out += "\nchosen vs baselines (max request rate per GPU within the SLOs: chosen / baseline)\n";
    for (const auto& b : r.baselines) {
      if (!b.candidate || !b.goodput) continue;
      out += b.goodput->max_rate_per_gpu > 0
                 ? fmt::format("  {:<16} {:>8.2f}x\n", b.name,
                               r.goodput.front().max_rate_per_gpu / b.goodput->max_rate_per_gpu)
                 : fmt::format("  {:<16} {:>9}\n", b.name, "(baseline meets the SLOs at no rate)");
    }
  } else {
    out += "\nchosen vs baselines (TTFT and ITL: baseline / chosen; throughput at the workload's rate and\n"
           "saturated capacity: chosen / baseline - 1)\n";
    out += fmt::format("  {:<16} {:>9} {:>8} {:>12} {:>12}\n", "baseline", "TTFT", "ITL", "throughput",
                       "capacity");
    for (const auto& b : r.baselines) {
      if (!b.candidate) continue;
      const Ratios q = ratios(best.metrics, b.candidate->metrics);
      // A saturated baseline (TTFT infinite: its queue does not drain at this rate) has no ratio.
      const std::string ttft = std::isfinite(q.ttft_x) ? fmt::format("{:.2f}x", q.ttft_x)
                                                       : std::string("saturated");
      out += fmt::format("  {:<16} {:>9} {:>7.2f}x {:>+11.1f}% {:>+11.1f}%\n", b.name, ttft, q.itl_x,
                         q.throughput_gain_pct, q.capacity_gain_pct);
    }
  }
  if (explained) out += "\n" + breakdown_table(*explained);
  if (!plan_text.empty()) {
    write_file_atomic(cfg.output, plan_text);
    out += fmt::format("\nplan written to {} (check it with: mixserve-plan check {})\n", cfg.output,
                       cfg.output);
  }
  if (!cfg.pareto_svg.empty()) {
    write_file_atomic(cfg.pareto_svg, pareto_plot(in, r, false));
    write_file_atomic(itl_plot_path(cfg.pareto_svg), pareto_plot(in, r, true));
    out += fmt::format("Pareto plots written to {} (p90 TTFT) and {} (p90 ITL)\n", cfg.pareto_svg,
                       itl_plot_path(cfg.pareto_svg));
  }
  std::fputs(out.c_str(), stdout);
  return 0;
}

}  // namespace

CommandRunner register_search(CLI::App& app) {
  auto cfg = std::make_shared<SearchConfig>();
  CLI::App* sub = app.add_subcommand("search", "search the parallel layouts of a model on a cluster");
  add_input_options(*sub, cfg->inputs);
  sub->add_option("--objective", cfg->objective,
                  "what to optimise (goodput: the serving simulator re-scores the analytic top "
                  "K by the highest request rate per GPU within the SLOs)")
      ->check(CLI::IsMember(search_objective_names()))
      ->capture_default_str();
  sub->add_option("--slo-ttft", cfg->slo_ttft_ms,
                  "goodput: TTFT SLO in ms (default: the workload's slo.ttft_ms)")
      ->check(positive());
  sub->add_option("--slo-tpot", cfg->slo_tpot_ms,
                  "goodput: TPOT SLO in ms (default: the workload's slo.tpot_ms)")
      ->check(positive());
  sub->add_option("--slo-percentile", cfg->slo_percentile,
                  "goodput: percent of requests that must meet every SLO (p90 by default)")
      ->check(positive())
      ->capture_default_str();
  sub->add_option("--rescore-top", cfg->rescore_top,
                  "goodput: analytic top K re-scored by the simulator")
      ->check(positive())
      ->capture_default_str();
  sub->add_option("--trial-seconds", cfg->trial_seconds,
                  "goodput: arrival window of each capacity trial (requests = max(200, rate x "
                  "window))")
      ->check(positive())
      ->capture_default_str();
  sub->add_option("--pareto-svg", cfg->pareto_svg,
                  "goodput: write an SVG of each re-scored candidate's p90 TTFT vs throughput "
                  "(and FILE.itl.svg with p90 ITL), the Pareto front dashed");
  sub->add_flag("--progress", cfg->progress,
                "goodput: progress lines on stderr even when stderr is not a terminal");
  sub->add_option("--cost-model", cfg->cost_model, "step-cost model")
      ->check(CLI::IsMember(std::vector<std::string>{"mixserve", "paper"}))
      ->capture_default_str();
  sub->add_option("--top", cfg->top, "layouts to print (and keep as plan alternatives)")
      ->check(positive())
      ->capture_default_str();
  sub->add_option("--explain", cfg->explain,
                  "print the per-op breakdown of a layout: its rank, a baseline name or a "
                  "layout name");
  sub->add_option("--layout", cfg->layout,
                  "evaluate only this layout (a baseline name or a layout name), e.g. to write "
                  "its plan for simulate");
  sub->add_option("--baseline", cfg->baselines, "baselines to compare (default: all of Table II)")
      ->check(CLI::IsMember(baseline_names()));
  sub->add_flag("--json", cfg->json, "print one JSON document on stdout");
  sub->add_option("-o,--output", cfg->output, "write the plan YAML here (atomically)");
  return [cfg] { return run_search(*cfg); };
}

}  // namespace mixserve::planner
