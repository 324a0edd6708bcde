// Search: enumerate -> filter with the predicate table -> cost every (layout, limits) candidate
// with the step-cost model -> keep each layout's best limits -> rank. Goodput objective: the
// analytic ranking at saturation pre-filters, the serving simulator's capacity search re-scores
// the top K and the baselines (search.hpp GoodputOptions).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/planner/search.hpp"
#include "mixserve/sim/workload_gen.hpp"

namespace mixserve::planner {

namespace {

struct LayoutEval {
  std::optional<PlanCandidate> best;
  int64_t evaluations = 0;
  int64_t memory_checked = 0, memory_rejected = 0;
  // The rejected limits closest to fitting (most KV space) and their breakdown.
  std::optional<std::pair<RuntimeLimits, MemoryBreakdown>> closest_rejected;
};

// Best limits of one structurally legal layout.
LayoutEval eval_layout(const SearchInputs& in, const SearchOptions& opt, const Layout& l,
                       const std::vector<RuntimeLimits>& limits, bool breakdown) {
  sim::CostModelOptions cmo;
  cmo.routing = opt.routing;
  cmo.want_breakdown = false;
  const auto cm = sim::make_cost_model(opt.cost_model, in.model, in.cluster, in.profile, l, cmo);
  LayoutEval out;
  for (const RuntimeLimits& lim0 : limits) {
    ++out.memory_checked;
    const MemoryBreakdown mem = cm->memory(lim0);
    const PredicateInput pin{in.model, in.cluster, l, &mem};
    if (!predicates().back().fn(pin)) {
      ++out.memory_rejected;
      if (!out.closest_rejected || kv_room(mem, lim0) > kv_room(out.closest_rejected->second,
                                                                out.closest_rejected->first))
        out.closest_rejected.emplace(lim0, mem);
      continue;
    }
    PlanCandidate cand;
    cand.layout = l;
    cand.limits = lim0;
    if (lim0.kv_block_tokens > 0) cand.limits.kv_blocks = mem.kv_tokens / lim0.kv_block_tokens;
    cand.memory = mem;
    cand.metrics = sim::analytic_metrics(*cm, l, in.workload, cand.limits);
    ++out.evaluations;
    if (!out.best || better(cand, *out.best, opt.objective, in.cluster)) out.best = cand;
  }
  if (breakdown && out.best) {
    auto& b = *out.best;
    b.metrics = sim::analytic_metrics(*cm, l, in.workload, b.limits, &b.breakdown);
  }
  return out;
}

std::vector<RuntimeLimits> limits_of(const SearchOptions& opt) {
  if (opt.max_batch < 1)
    throw_input_error("--max-batch", "max_batch", "an integer >= 1", std::to_string(opt.max_batch));
  if (opt.batched_tokens.empty())
    throw_input_error("search options", "batched_tokens", "at least one token budget");
  return limit_candidates(opt.max_batch, opt.batched_tokens, opt.max_model_len);
}

}  // namespace

std::optional<PlanCandidate> evaluate_layout(const SearchInputs& in, const SearchOptions& opt,
                                             const Layout& l, std::string* rejected_by) {
  if (l.world_size() != in.cluster.world_size()) {
    if (rejected_by) *rejected_by = "world size";
    return std::nullopt;
  }
  if (auto f = first_structural_failure(in.model, in.cluster, l)) {
    if (rejected_by) *rejected_by = std::string(*f);
    return std::nullopt;
  }
  auto e = eval_layout(in, opt, l, limits_of(opt), true);
  if (!e.best && rejected_by) {
    *rejected_by = std::string(predicates().back().name);
    if (e.closest_rejected)
      *rejected_by += " (" + memory_shortfall(e.closest_rejected->second, e.closest_rejected->first) + ")";
  }
  return e.best;
}

namespace {
SearchResult search_analytic(const SearchInputs& in, const SearchOptions& opt);
void rescore_goodput(const SearchInputs& in, const SearchOptions& opt, SearchResult& res);
}  // namespace

std::vector<std::string> search_objective_names() {
  std::vector<std::string> v = objective_names();
  v.emplace_back(kGoodputObjective);
  return v;
}

PredictedMetrics metrics_from_simulation(const sim::ServingMetrics& m, double rate) {
  PredictedMetrics p;
  p.ttft_ms = m.ttft.mean;
  p.itl_ms = m.itl.mean;
  p.tpot_ms = m.tpot.mean;
  p.throughput_tok_s = m.total_token_throughput;
  p.output_tok_s = m.output_throughput;
  p.request_rate = rate;
  return p;
}

GoodputScore score_goodput(const SearchInputs& in, const SearchOptions& opt,
                           const PlanCandidate& cand, const GoodputOptions& g) {
  const WorkloadSpec& w = in.workload;
  sim::CostModelOptions cmo;
  cmo.routing = sim::routing_from_workload(w);
  const auto cm =
      sim::make_cost_model(opt.cost_model, in.model, in.cluster, in.profile, cand.layout, cmo);
  sim::ServingConfig cfg = sim::serving_config_for(*cm, cand.layout, cand.limits, w);
  // Start the bracketing at 3/4 of the analytic saturated request rate: the SLOs usually bind
  // below saturation, and a close start saves the doubling / halving trials.
  WorkloadSpec sat = w;
  sat.arrival = ArrivalKind::burst;
  const PredictedMetrics pm = sim::analytic_metrics(*cm, cand.layout, sat, cfg.limits);
  const double per_request = std::max(1.0, w.input.expected()) + std::max(1.0, w.output.expected());
  double start = 0.75 * pm.throughput_tok_s / per_request;
  if (!(start > 0) || !std::isfinite(start)) start = 1.0;
  sim::CapacityOptions co;
  co.slo_ttft_ms = g.slo_ttft_ms;
  co.slo_tpot_ms = g.slo_tpot_ms;
  co.attainment = g.slo_percentile / 100.0;
  co.num_requests = g.min_requests;
  co.max_requests = std::max(co.max_requests, g.min_requests);
  co.trial_duration_s = g.trial_duration_s;
  co.start_rate = start;
  // The sustained trials ran to completion: they are points of the latency-throughput curve.
  std::vector<CurveSample> trials;
  if (g.curve_points > 0)
    co.on_trial_metrics = [&trials](double rate, const sim::ServingMetrics& m, bool sustained) {
      if (sustained) trials.push_back({rate, m});
    };
  const int gpus = in.cluster.world_size();
  const sim::CapacityResult cap = sim::capacity_search(*cm, cfg, w, co, gpus);
  GoodputScore out;
  out.max_rate_req_s = cap.max_rate;
  out.max_rate_per_gpu = cap.max_rate_per_gpu;
  out.at_max = cap.at_max;
  out.simulations = cap.simulations;
  out.start_rate = start;
  if (g.curve_points > 0 && cap.max_rate > 0) {
    // Fill up to curve_points with runs at fractions of the max rate not yet covered (no
    // trial within 10% of it).
    out.curve = std::move(trials);
    cfg.slo_ttft_ms = g.slo_ttft_ms;
    cfg.slo_tpot_ms = g.slo_tpot_ms;
    cfg.slo_e2el_ms = 0;
    for (int i = 1; i <= g.curve_points && int(out.curve.size()) < g.curve_points; ++i) {
      WorkloadSpec wr = w;
      wr.rate = cap.max_rate * i / g.curve_points;
      if (std::any_of(out.curve.begin(), out.curve.end(), [&](const CurveSample& c) {
            return std::abs(c.rate - wr.rate) < 0.1 * wr.rate;
          }))
        continue;
      wr.num_requests = static_cast<int>(std::clamp(std::ceil(wr.rate * g.trial_duration_s),
                                                    double(co.num_requests),
                                                    double(co.max_requests)));
      out.curve.push_back({wr.rate, sim::simulate(*cm, cfg, sim::generate_requests(wr)).metrics});
      ++out.simulations;
    }
    std::sort(out.curve.begin(), out.curve.end(),
              [](const CurveSample& a, const CurveSample& b) { return a.rate < b.rate; });
  }
  return out;
}

SearchResult search(const SearchInputs& in, const SearchOptions& opt) {
  if (!opt.goodput) return search_analytic(in, opt);
  // Capacity is what the simulator measures next, so the pre-filter ranks by the analytic
  // saturated throughput: the workload's arrivals replaced by a saturating burst.
  SearchInputs saturated = in;
  saturated.workload.arrival = ArrivalKind::burst;
  SearchResult res = search_analytic(saturated, opt);
  rescore_goodput(in, opt, res);
  return res;
}

namespace {

void rescore_goodput(const SearchInputs& in, const SearchOptions& opt, SearchResult& res) {
  const GoodputOptions& g = *opt.goodput;
  if (!(g.slo_ttft_ms > 0) && !(g.slo_tpot_ms > 0))
    throw_input_error("--slo-ttft", "slo_ttft_ms",
                      "an SLO > 0 for TTFT or TPOT (--slo-ttft / --slo-tpot, or the workload's "
                      "slo.ttft_ms / slo.tpot_ms)");
  if (!(g.slo_percentile > 0 && g.slo_percentile <= 100))
    throw_input_error("--slo-percentile", "slo_percentile", "a percentile in (0, 100]",
                      std::to_string(g.slo_percentile));
  if (g.rescore_top < 1)
    throw_input_error("--rescore-top", "rescore_top", "an integer >= 1",
                      std::to_string(g.rescore_top));
  const auto t0 = std::chrono::steady_clock::now();
  const size_t K = std::min(res.ranked.size(), static_cast<size_t>(g.rescore_top));
  int legal_baselines = 0;
  for (const auto& b : res.baselines) legal_baselines += b.candidate ? 1 : 0;
  const int total = int(K) + legal_baselines;
  int done = 0;
  auto report = [&](const std::string& what, const Layout& l, const GoodputScore& s) {
    ++done;
    if (!g.progress) return;
    const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    g.progress(fmt::format("goodput [{}/{}] {} {}: {:.2f} req/s = {:.3f} req/s per GPU ({} "
                           "simulations, {:.1f} s elapsed)",
                           done, total, what, l.name(), s.max_rate_req_s, s.max_rate_per_gpu,
                           s.simulations, el));
  };
  std::vector<GoodputScore> scores;
  for (size_t i = 0; i < K; ++i) {
    scores.push_back(score_goodput(in, opt, res.ranked[i], g));
    report(fmt::format("#{}", i + 1), res.ranked[i].layout, scores.back());
  }
  // Re-rank the re-scored candidates by capacity per GPU; equal capacities keep the analytic
  // order (stable sort), which is the first tie-break.
  std::vector<size_t> order(K);
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return scores[a].max_rate_per_gpu > scores[b].max_rate_per_gpu;
  });
  std::vector<PlanCandidate> head;
  res.goodput.clear();
  for (size_t i : order) {
    head.push_back(std::move(res.ranked[i]));
    res.goodput.push_back(std::move(scores[i]));
  }
  const size_t shown = std::min(res.ranked.size(), static_cast<size_t>(std::max(opt.top, 1)));
  for (size_t i = 0; i < K; ++i) {
    PlanCandidate& c = head[i];
    const GoodputScore& s = res.goodput[i];
    if (s.max_rate_req_s > 0) {
      const double capacity = c.metrics.capacity_tok_s;  // analytic: the simulation has none
      c.metrics = metrics_from_simulation(s.at_max, s.max_rate_req_s);
      c.metrics.capacity_tok_s = capacity;
    }
    c.label.clear();
    if (i < shown && c.breakdown.empty()) {  // moved into the shown rows: its per-op breakdown
      sim::CostModelOptions cmo;
      cmo.routing = opt.routing;
      const auto cm = sim::make_cost_model(opt.cost_model, in.model, in.cluster, in.profile,
                                           c.layout, cmo);
      sim::analytic_metrics(*cm, c.layout, in.workload, c.limits, &c.breakdown);
    }
    res.ranked[i] = std::move(c);
  }
  for (size_t i = 0; i < res.ranked.size(); ++i) res.ranked[i].rank = static_cast<int>(i) + 1;
  res.ranked.front().label = "chosen";
  for (auto& b : res.baselines) {
    if (!b.candidate) continue;
    b.goodput = score_goodput(in, opt, *b.candidate, g);
    if (b.goodput->max_rate_req_s > 0) {
      const double capacity = b.candidate->metrics.capacity_tok_s;
      b.candidate->metrics = metrics_from_simulation(b.goodput->at_max, b.goodput->max_rate_req_s);
      b.candidate->metrics.capacity_tok_s = capacity;
    }
    report("baseline " + b.name, b.candidate->layout, *b.goodput);
  }
  res.goodput_wall_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

SearchResult search_analytic(const SearchInputs& in, const SearchOptions& opt) {
  const ClusterSpec& c = in.cluster;
  const int world = c.world_size();
  const std::string origin = in.cluster_origin.empty() ? c.name : in.cluster_origin;
  if (!is_pow2(world))
    throw_input_error(origin, "num_nodes * gpus_per_node", "a power of two (degrees are powers of two)",
                      std::to_string(world));
  const auto limits = limits_of(opt);

  SearchResult res;
  for (const auto& p : predicates())
    res.rejections.push_back({std::string(p.name), std::string(p.rule), 0, 0, p.per_candidate});
  PredicateCount& mem_count = res.rejections.back();

  std::vector<Layout> layouts = enumerate_layouts(world);
  if (opt.only_layout) {
    if (std::find(layouts.begin(), layouts.end(), *opt.only_layout) == layouts.end())
      throw_input_error("--layout", "layout",
                        fmt::format("a layout of the {}-GPU search space (degrees fold onto the "
                                    "world size; fused / rs-a2a-ag need attn_tp == moe_tp > 1)",
                                    world),
                        opt.only_layout->name());
    if (auto f = first_structural_failure(in.model, c, *opt.only_layout))
      throw_input_error("--layout", "layout",
                        fmt::format("a layout that passes every predicate ({} rejects it)", *f),
                        opt.only_layout->name());
    layouts = {*opt.only_layout};
  }
  res.layouts = static_cast<int64_t>(layouts.size());
  for (const Layout& l : layouts) {
    // Every structural predicate is judged, so each count is what that rule alone rejects.
    const PredicateInput pin{in.model, c, l, nullptr};
    bool legal = true;
    for (size_t i = 0; i < predicates().size(); ++i) {
      const Predicate& p = predicates()[i];
      if (p.per_candidate) continue;
      ++res.rejections[i].checked;
      if (!p.fn(pin)) {
        ++res.rejections[i].rejected;
        legal = false;
      }
    }
    if (!legal) continue;
    LayoutEval e = eval_layout(in, opt, l, limits, false);
    res.evaluations += e.evaluations;
    mem_count.checked += e.memory_checked;
    mem_count.rejected += e.memory_rejected;
    if (e.best) res.ranked.push_back(std::move(*e.best));
  }
  if (res.ranked.empty())
    throw_input_error(origin, "num_nodes",
                      fmt::format("enough GPUs for model '{}': none of the {} layouts on {} x {} "
                                  "{} ({:.0f} GiB each) passes every predicate, fits_memory "
                                  "rejected {} of {} candidates",
                                  in.model.name, res.layouts, c.num_nodes, c.gpus_per_node,
                                  c.gpu_model, c.gpu_memory_GiB, mem_count.rejected,
                                  mem_count.checked),
                      std::to_string(c.num_nodes));

  std::stable_sort(res.ranked.begin(), res.ranked.end(),
                   [&](const PlanCandidate& a, const PlanCandidate& b) {
                     return better(a, b, opt.objective, c);
                   });
  // Breakdowns only for the shown candidates: the search itself stays at analytic speed.
  const size_t shown = std::min(res.ranked.size(), static_cast<size_t>(std::max(opt.top, 1)));
  for (size_t i = 0; i < res.ranked.size(); ++i) {
    PlanCandidate& cand = res.ranked[i];
    cand.rank = static_cast<int>(i) + 1;
    if (i < shown) {
      sim::CostModelOptions cmo;
      cmo.routing = opt.routing;
      cmo.want_breakdown = true;
      const auto cm =
          sim::make_cost_model(opt.cost_model, in.model, c, in.profile, cand.layout, cmo);
      cand.metrics = sim::analytic_metrics(*cm, cand.layout, in.workload, cand.limits,
                                           &cand.breakdown);
    }
  }
  res.ranked.front().label = "chosen";

  const std::vector<std::string> names = opt.baselines.empty() ? baseline_names() : opt.baselines;
  for (const auto& name : names) {
    BaselineResult b;
    b.name = name;
    for (const auto& d : baseline_defs())
      if (d.name == name) b.description = std::string(d.description);
    const auto l = baseline_layout(name, c);
    if (!l) {
      b.rejected_by = "not applicable";
    } else {
      b.layout = *l;
      b.candidate = evaluate_layout(in, opt, *l, &b.rejected_by);
      if (b.candidate) {
        b.candidate->label = "baseline: " + name;
        b.candidate->rank = 0;
      }
    }
    res.baselines.push_back(std::move(b));
  }
  return res;
}

}  // namespace

}  // namespace mixserve::planner
