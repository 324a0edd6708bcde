// Shared helpers of the comm tests: seeded routings and exact-valued inputs.
#pragma once
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "mixserve/sim/comm_schedule.hpp"

namespace mixserve::test {

// Routing families of the test matrix.
enum class RoutingKind {
  uniform,        // k distinct experts, uniformly
  skewed,         // k distinct experts, P(e) ~ 1 / (e + 1)^1.2 (power law)
  one_expert,     // every token: slot 0 -> expert 0, other slots -1 (all tokens to one expert)
  same_experts,   // every token: slot j -> expert j (experts >= k get nothing)
  empty_ranks,    // uniform on even replicas, odd replicas have no tokens
};
inline const char* to_string(RoutingKind k) {
  switch (k) {
    case RoutingKind::uniform: return "uniform";
    case RoutingKind::skewed: return "skewed";
    case RoutingKind::one_expert: return "one_expert";
    case RoutingKind::same_experts: return "same_experts";
    case RoutingKind::empty_ranks: return "empty_ranks";
  }
  return "?";
}
inline constexpr RoutingKind kAllRoutings[] = {RoutingKind::uniform, RoutingKind::skewed,
                                               RoutingKind::one_expert, RoutingKind::same_experts,
                                               RoutingKind::empty_ranks};

// Power-of-two weights: products and sums with small integers stay exact in doubles.
inline double pow2_weight(std::mt19937_64& rng) {
  static constexpr double kW[] = {0.25, 0.5, 1.0, 2.0};
  return kW[rng() % 4];
}

// k distinct experts out of E; `cdf` empty = uniform, else sampled from the cumulative weights.
inline void draw_distinct(std::mt19937_64& rng, int E, int k, const std::vector<double>& cdf,
                          int32_t* out) {
  if (cdf.empty() && 4 * k <= E) {  // rejection: cheap when collisions are rare
    for (int j = 0; j < k;) {
      const int32_t e = static_cast<int32_t>(rng() % static_cast<uint64_t>(E));
      bool dup = false;
      for (int i = 0; i < j; ++i) dup |= out[i] == e;
      if (!dup) out[j++] = e;
    }
    return;
  }
  if (cdf.empty()) {
    std::vector<int32_t> perm(E);
    for (int e = 0; e < E; ++e) perm[e] = e;
    for (int j = 0; j < k; ++j) {  // partial Fisher-Yates
      const int pick = j + static_cast<int>(rng() % static_cast<uint64_t>(E - j));
      std::swap(perm[j], perm[pick]);
      out[j] = perm[j];
    }
    return;
  }
  std::vector<bool> taken(E, false);
  for (int j = 0; j < k; ++j) {
    while (true) {
      const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * cdf.back();
      int e = 0;
      while (e < E - 1 && cdf[e] <= u) ++e;
      if (!taken[e]) {
        taken[e] = true;
        out[j] = e;
        break;
      }
    }
  }
}

inline sim::ReplicaRouting make_routing(RoutingKind kind, int replica, int num_tokens, int E,
                                        int k, std::mt19937_64& rng) {
  sim::ReplicaRouting rt;
  rt.num_tokens = (kind == RoutingKind::empty_ranks && replica % 2 == 1) ? 0 : num_tokens;
  rt.topk_ids.assign(static_cast<size_t>(rt.num_tokens) * k, -1);
  rt.topk_weights.assign(rt.topk_ids.size(), 0.0);
  std::vector<double> cdf;
  if (kind == RoutingKind::skewed) {
    double acc = 0;
    for (int e = 0; e < E; ++e) cdf.push_back(acc += 1.0 / std::pow(e + 1.0, 1.2));
  }
  for (int tok = 0; tok < rt.num_tokens; ++tok) {
    int32_t* ids = &rt.topk_ids[static_cast<size_t>(tok) * k];
    switch (kind) {
      case RoutingKind::one_expert: ids[0] = 0; break;
      case RoutingKind::same_experts:
        for (int j = 0; j < k; ++j) ids[j] = j;
        break;
      default: draw_distinct(rng, E, k, cdf, ids);
    }
    for (int j = 0; j < k; ++j)
      rt.topk_weights[static_cast<size_t>(tok) * k + j] = pow2_weight(rng);
  }
  return rt;
}

// Token rows tagged by replica, token and hidden index: small integers in [-30, 30].
inline std::vector<double> make_input(int replica, int num_tokens, int hidden) {
  std::vector<double> x(static_cast<size_t>(num_tokens) * hidden);
  for (int t = 0; t < num_tokens; ++t)
    for (int c = 0; c < hidden; ++c)
      x[static_cast<size_t>(t) * hidden + c] =
          static_cast<double>((replica * 7919 + t * 131 + c * 17) % 61 - 30);
  return x;
}

// Hybrid geometry: N nodes x G GPUs, attention TP = moe_tp = G, DP = moe_ep = N.
inline sim::CommGeometry hybrid_geometry(int N, int G, int E, int k, int hidden) {
  sim::CommGeometry g;
  g.num_ranks = N * G;
  g.gpus_per_node = G;
  g.attn_tp = g.moe_tp = G;
  g.attn_dp = g.moe_ep = N;
  g.num_experts = E;
  g.top_k = k;
  g.hidden = hidden;
  g.elem_bytes = 2;
  return g;
}

// Plain EP over the same ranks with the same attention layout: moe_tp = 1, moe_ep = N * G.
inline sim::CommGeometry ep_geometry(int N, int G, int E, int k, int hidden) {
  sim::CommGeometry g = hybrid_geometry(N, G, E, k, hidden);
  g.moe_tp = 1;
  g.moe_ep = N * G;
  return g;
}

// EP by all-to-all with TP inside the experts: moe_tp = tp (a divisor of N * G), moe_ep =
// N * G / tp, attention as in hybrid_geometry (attn_tp = G, attn_dp = N).
inline sim::CommGeometry ep_tp_geometry(int N, int G, int tp, int E, int k, int hidden) {
  sim::CommGeometry g = hybrid_geometry(N, G, E, k, hidden);
  g.moe_tp = tp;
  g.moe_ep = N * G / tp;
  return g;
}

}  // namespace mixserve::test
