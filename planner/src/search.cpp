// Search: enumerate -> filter with the predicate table -> cost every (layout, limits) candidate
// with the step-cost model -> keep each layout's best limits -> rank.
#include <algorithm>

#include <fmt/format.h>

#include "mixserve/core/error.hpp"
#include "mixserve/planner/search.hpp"

namespace mixserve::planner {

namespace {

struct LayoutEval {
  std::optional<PlanCandidate> best;
  int64_t evaluations = 0;
  int64_t memory_checked = 0, memory_rejected = 0;
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
  if (!e.best && rejected_by) *rejected_by = std::string(predicates().back().name);
  return e.best;
}

SearchResult search(const SearchInputs& in, const SearchOptions& opt) {
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

}  // namespace mixserve::planner
