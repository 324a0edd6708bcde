// Ranking: the objective as the primary cost, then commented tie-breaks (STYLE.md §3).
#include <cmath>
#include <limits>

#include "mixserve/planner/search.hpp"

namespace mixserve::planner {

int cross_node_gpus(const Layout& l, const ClusterSpec& c) {
  const int g = c.gpus_per_node;
  const int stage = l.stage_size();
  if (stage <= g) return 0;  // every stage-local group lives inside one node
  // A group crosses nodes when it is wider than a node (TP) or, for EP, when the EP group
  // (ranks q with equal moe_tp index, stride moe_tp) spans the stage, which spans nodes.
  const bool tp_cross = l.attn_tp > g || l.moe_tp > g;
  const bool ep_cross = l.moe_ep > 1 && l.moe_tp < stage;
  return (tp_cross || ep_cross) ? l.world_size() : 0;
}

double fixed_memory_bytes(const MemoryBreakdown& m) {
  return m.weights + m.activations + m.comm_buffers + m.reserved;
}

namespace {

// Objective value with "lower is better" orientation; non-finite (unstable queue) is worst.
double cost_of(const PredictedMetrics& m, Objective o) {
  double v = 0;
  switch (o) {
    case Objective::ttft: v = m.ttft_ms; break;
    case Objective::itl: v = m.itl_ms; break;
    // Throughput: what the layout can serve (its saturated capacity), not the offered load it
    // serves at the workload's rate, which every layout that keeps up serves alike.
    case Objective::throughput: v = -(m.capacity_tok_s > 0 ? m.capacity_tok_s : m.throughput_tok_s); break;
  }
  return std::isfinite(v) ? v : std::numeric_limits<double>::infinity();
}

// Two costs within this relative distance count as a tie: far below the cost model's accuracy,
// so the tie-breaks decide instead of floating-point noise.
constexpr double kTieRelative = 1e-9;

}  // namespace

bool better(const PlanCandidate& a, const PlanCandidate& b, Objective o, const ClusterSpec& c) {
  // First, before any objective: a candidate that keeps up with the workload's rate (finite
  // TTFT) beats one whose queue grows without bound. Otherwise minimising ITL would pick
  // max_num_seqs = 1 and a queue that never drains.
  const bool sa_ok = std::isfinite(a.metrics.ttft_ms), sb_ok = std::isfinite(b.metrics.ttft_ms);
  if (sa_ok != sb_ok) return sa_ok;
  // Both saturated: the one that serves more tokens/s is better, whatever the objective.
  if (!sa_ok && a.metrics.throughput_tok_s != b.metrics.throughput_tok_s)
    return a.metrics.throughput_tok_s > b.metrics.throughput_tok_s;
  const double ca = cost_of(a.metrics, o), cb = cost_of(b.metrics, o);
  const double scale = std::max(std::abs(ca), std::abs(cb));
  if (std::isfinite(scale) ? std::abs(ca - cb) > kTieRelative * scale : ca != cb) return ca < cb;
  // Tie-break 1: a latency: TTFT ties break on ITL, ITL and throughput ties on TTFT (of two
  // layouts equally good at the objective, the one that answers sooner is better).
  const Objective second = o == Objective::ttft ? Objective::itl : Objective::ttft;
  const double sa = cost_of(a.metrics, second), sb = cost_of(b.metrics, second);
  const double s2 = std::max(std::abs(sa), std::abs(sb));
  if (std::isfinite(s2) ? std::abs(sa - sb) > kTieRelative * s2 : sa != sb) return sa < sb;
  // Tie-break 2: fewer GPUs in groups that communicate across nodes (less exposure to the
  // slower, shared inter-node fabric than the model assumes).
  const int xa = cross_node_gpus(a.layout, c), xb = cross_node_gpus(b.layout, c);
  if (xa != xb) return xa < xb;
  // Tie-break 3: less fixed memory per GPU (more room for KV, more headroom).
  const double ma = fixed_memory_bytes(a.memory), mb = fixed_memory_bytes(b.memory);
  if (ma != mb) return ma < mb;
  // Tie-break 4 (determinism): the smaller batch limit, then the name.
  if (a.limits.max_num_seqs != b.limits.max_num_seqs)
    return a.limits.max_num_seqs < b.limits.max_num_seqs;
  if (a.limits.max_num_batched_tokens != b.limits.max_num_batched_tokens)
    return a.limits.max_num_batched_tokens < b.limits.max_num_batched_tokens;
  return a.layout.name() < b.layout.name();
}

}  // namespace mixserve::planner
