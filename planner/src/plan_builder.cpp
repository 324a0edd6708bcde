// From a search result to the plan file's struct, and the layout-name parser used by --explain.
#include <algorithm>
#include <cstdio>

#include "mixserve/planner/search.hpp"

namespace mixserve::planner {

Plan make_plan(const SearchInputs& in, const SearchOptions& opt, const SearchResult& r,
               Provenance provenance) {
  Plan p;
  p.provenance = std::move(provenance);
  p.model = in.model;
  p.cluster = in.cluster;
  p.workload = in.workload;
  p.profile_name = in.profile.name;
  p.profile_source = in.profile.source;
  p.cost_model = opt.cost_model;
  p.objective = std::string(to_string(opt.objective));
  p.chosen = r.ranked.front();
  p.rank_map = build_rank_map(in.cluster, in.model, p.chosen.layout);
  const size_t shown = std::min(r.ranked.size(), static_cast<size_t>(std::max(opt.top, 1)));
  for (size_t i = 1; i < shown; ++i) p.alternatives.push_back(r.ranked[i]);
  for (const BaselineResult& b : r.baselines)
    if (b.candidate) p.alternatives.push_back(*b.candidate);
  return p;
}

std::optional<Layout> parse_layout_name(std::string_view s) {
  Layout l;
  char comm[32] = {0};
  int consumed = 0;
  const std::string text(s);
  if (std::sscanf(text.c_str(), "attn TP%dxDP%d | moe TP%dxEP%d | PP%d | %31s%n", &l.attn_tp,
                  &l.attn_dp, &l.moe_tp, &l.moe_ep, &l.pp, comm, &consumed) != 6 ||
      static_cast<size_t>(consumed) != text.size())
    return std::nullopt;
  const auto c = parse_moe_comm(comm);
  if (!c) return std::nullopt;
  l.moe_comm = *c;
  if (l.name() != text) return std::nullopt;
  return l;
}

Ratios ratios(const PredictedMetrics& chosen, const PredictedMetrics& baseline) {
  Ratios r;
  r.ttft_x = chosen.ttft_ms > 0 ? baseline.ttft_ms / chosen.ttft_ms : 0;
  r.itl_x = chosen.itl_ms > 0 ? baseline.itl_ms / chosen.itl_ms : 0;
  r.throughput_gain_pct = baseline.throughput_tok_s > 0
                              ? (chosen.throughput_tok_s / baseline.throughput_tok_s - 1) * 100
                              : 0;
  r.capacity_gain_pct = baseline.capacity_tok_s > 0
                            ? (chosen.capacity_tok_s / baseline.capacity_tok_s - 1) * 100
                            : 0;
  return r;
}

}  // namespace mixserve::planner
