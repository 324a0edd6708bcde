// Expected MoE loads (moe_load.hpp).
//
// Rows per EP rank. Rank r owns the experts [r*E/ep, (r+1)*E/ep) with total share q_r.
//  * uniform: each token picks k distinct experts, so the rows a token sends to one rank are
//    hypergeometric: mean k*g/E, variance k*(g/E)*(1-g/E)*(E-k)/(E-1) with g = E/ep. Over T
//    independent tokens the rank total is ~ Normal(T*k/ep, T*var); all ranks are alike, so
//    E[max] = mean + sigma * E[max of ep standard normals]. The ranks' negative correlation
//    (from the fixed total) is ignored, which errs low by a few percent for few ranks; the
//    Monte-Carlo tests in tests/sim bound the error.
//  * zipf / histogram: the T*k rows are treated as independent draws from the expert shares
//    (multinomial), so rank r holds ~ Normal(T*k*q_r, T*k*q_r*(1-q_r)); E[max] over the
//    non-identical ranks is integrated numerically: E[M] = lo + int_lo^hi (1 - prod_r
//    Phi((x - mu_r)/sigma_r)) dx.
// The normal approximation is checked against Monte Carlo in tests/sim.
#include "mixserve/sim/moe_load.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "mixserve/core/error.hpp"

namespace mixserve::sim {
namespace {

double phi_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

void check_shape(int num_experts, int top_k, int ep) {
  if (num_experts <= 0 || top_k <= 0 || top_k > num_experts)
    throw_input_error("routing model", "moe.top_k",
                      "1 <= top_k <= num_experts (" + std::to_string(num_experts) + ")",
                      std::to_string(top_k));
  if (ep <= 0 || num_experts % ep != 0)
    throw_input_error("layout", "moe_ep", "a divisor of num_experts (" +
                                              std::to_string(num_experts) + ")",
                      std::to_string(ep));
}

// E[max] of independent normals given as (mu, sigma, multiplicity).
double expected_max_normals(const std::vector<std::pair<std::pair<double, double>, int>>& v) {
  double mu_top = -1e300, sigma_max = 0, hi = -1e300;
  for (const auto& [ms, n] : v) {
    mu_top = std::max(mu_top, ms.first);
    sigma_max = std::max(sigma_max, ms.second);
    hi = std::max(hi, ms.first + 10 * ms.second);
  }
  if (sigma_max <= 0) return mu_top;
  const double lo = mu_top - 10 * sigma_max;
  constexpr int kSteps = 400;
  const double dx = (hi - lo) / kSteps;
  double integral = 0;
  for (int i = 0; i <= kSteps; ++i) {
    const double x = lo + i * dx;
    double g = 1;
    for (const auto& [ms, n] : v) {
      const double c = ms.second > 0 ? phi_cdf((x - ms.first) / ms.second)
                                     : (x >= ms.first ? 1.0 : 0.0);
      g *= n == 1 ? c : std::pow(c, n);
      if (g == 0) break;
    }
    integral += (i == 0 || i == kSteps ? 0.5 : 1.0) * (1 - g);
  }
  return lo + integral * dx;
}

}  // namespace

double expected_rows_to_group(double tokens, int num_experts, int top_k, int experts_per_group) {
  if (tokens <= 0 || experts_per_group <= 0) return 0;
  // C(E-g, k) / C(E, k) = prod_{i<k} (E-g-i) / (E-i)
  double miss = 1;
  for (int i = 0; i < top_k; ++i) {
    const double num = double(num_experts - experts_per_group - i);
    if (num <= 0) {
      miss = 0;
      break;
    }
    miss *= num / double(num_experts - i);
  }
  return tokens * (1 - miss);
}

double expected_max_std_normal(int n) {
  if (n <= 1) return 0;
  return expected_max_normals({{{0.0, 1.0}, n}});
}

double expected_active_experts(double tokens, int num_experts, int top_k, int local_experts) {
  if (tokens <= 0 || num_experts <= 0) return 0;
  const double unused = std::pow(1.0 - double(top_k) / num_experts, tokens);
  return local_experts * (1 - unused);
}

std::vector<double> expert_shares(int num_experts, const RoutingModel& routing) {
  if (num_experts <= 0) throw_input_error("routing model", "num_experts", "a positive count");
  std::vector<double> share(size_t(num_experts), 1.0 / num_experts);
  if (routing.kind == "uniform") return share;
  if (routing.kind == "zipf") {
    if (!(routing.skew >= 0) || !std::isfinite(routing.skew))
      throw_input_error("routing model", "skew", "a finite zipf exponent >= 0",
                        std::to_string(routing.skew));
    // Popularity rank j -> expert id perm[j]: Fisher-Yates driven by a fixed-seed mt19937_64
    // (its output sequence is fixed by the standard, so every platform gets the same ids).
    std::vector<int> perm(static_cast<size_t>(num_experts));
    for (int i = 0; i < num_experts; ++i) perm[size_t(i)] = i;
    std::mt19937_64 rng(0x4d69785365727665ULL);
    for (int i = num_experts - 1; i > 0; --i) std::swap(perm[size_t(i)], perm[rng() % uint64_t(i + 1)]);
    double sum = 0;
    for (int j = 0; j < num_experts; ++j) sum += std::pow(j + 1.0, -routing.skew);
    for (int j = 0; j < num_experts; ++j)
      share[size_t(perm[size_t(j)])] = std::pow(j + 1.0, -routing.skew) / sum;
    return share;
  }
  if (routing.kind == "histogram") {
    if (int(routing.expert_share.size()) != num_experts)
      throw_input_error("routing model", "expert_share",
                        std::to_string(num_experts) + " non-negative shares, one per expert",
                        std::to_string(routing.expert_share.size()) + " values");
    double sum = 0;
    for (double s : routing.expert_share) {
      if (!(s >= 0) || !std::isfinite(s))
        throw_input_error("routing model", "expert_share", "non-negative finite shares");
      sum += s;
    }
    if (sum <= 0) throw_input_error("routing model", "expert_share", "a positive total");
    for (int e = 0; e < num_experts; ++e) share[size_t(e)] = routing.expert_share[size_t(e)] / sum;
    return share;
  }
  throw_input_error("routing model", "kind", "one of uniform, zipf, histogram", routing.kind);
}

EpLoad expected_ep_load(double total_tokens, int num_experts, int top_k, int ep,
                        const RoutingModel& routing) {
  check_shape(num_experts, top_k, ep);
  EpLoad out;
  if (total_tokens <= 0) return out;
  const double rows = total_tokens * top_k;
  out.mean_rows = rows / ep;
  if (ep == 1) {
    out.max_rows = out.mean_rows;
    return out;
  }
  const int g = num_experts / ep;
  const double cap = total_tokens * std::min(top_k, g);  // every token sends its max to one rank
  if (routing.kind == "uniform" || (routing.kind == "zipf" && routing.skew == 0)) {
    const double f = double(g) / num_experts;
    const double fpc = num_experts > 1 ? double(num_experts - top_k) / (num_experts - 1) : 0.0;
    const double sigma = std::sqrt(total_tokens * top_k * f * (1 - f) * fpc);
    out.max_rows = std::min(cap, out.mean_rows + sigma * expected_max_std_normal(ep));
    return out;
  }
  const std::vector<double> share = expert_shares(num_experts, routing);
  std::vector<std::pair<std::pair<double, double>, int>> ranks;
  ranks.reserve(size_t(ep));
  for (int r = 0; r < ep; ++r) {
    double q = 0;
    for (int e = r * g; e < (r + 1) * g; ++e) q += share[size_t(e)];
    ranks.push_back({{rows * q, std::sqrt(rows * q * std::max(0.0, 1 - q))}, 1});
  }
  out.max_rows = std::clamp(expected_max_normals(ranks), out.mean_rows, std::max(cap, out.mean_rows));
  return out;
}

MoeLoadSampler::MoeLoadSampler(const MoeLoadShape& shape, uint64_t seed)
    : shape_(shape), rng_(seed ^ 0x6d6f652d6c6f6164ULL) {
  const int E = shape.num_experts, ep = shape.ep;
  check_shape(E, shape.top_k, ep);
  if (shape.num_moe_layers < 1)
    throw_input_error("routing model", "num_moe_layers", "at least one MoE layer",
                      std::to_string(shape.num_moe_layers));
  const RoutingModel& r = shape.routing;
  uniform_ = r.kind == "uniform" || (r.kind == "zipf" && r.skew == 0);
  std::vector<std::vector<double>> expert_rows;
  if (r.kind == "histogram" && !r.layer_expert_share.empty()) {
    for (const auto& row : r.layer_expert_share) {
      double total = 0;
      for (double x : row) total += x;
      RoutingModel one = r;
      if (total > 0) one.expert_share = row;  // an all-zero row (a dense layer): the pooled shares
      expert_rows.push_back(expert_shares(E, one));  // validates and normalises
    }
  } else {
    expert_rows.push_back(expert_shares(E, r));
  }
  const int g = E / ep;
  for (const auto& share : expert_rows) {
    std::vector<double> q(size_t(ep), 0.0), cdf(size_t(ep), 0.0);
    double acc = 0;
    for (int k = 0; k < ep; ++k) {
      for (int e = k * g; e < (k + 1) * g; ++e) q[size_t(k)] += share[size_t(e)];
      acc += q[size_t(k)];
      cdf[size_t(k)] = acc;
    }
    cdf.back() = 1.0;
    rank_share_.push_back(std::move(q));
    rank_cdf_.push_back(std::move(cdf));
  }
  const int rows = int(rank_share_.size());
  int max_id = -1;
  for (int id : shape.moe_layer_ids) max_id = std::max(max_id, id);
  for (int i = 0; i < shape.num_moe_layers; ++i) {
    int row = 0;
    if (rows == shape.num_moe_layers) row = i;
    else if (rows > max_id && i < int(shape.moe_layer_ids.size())) row = shape.moe_layer_ids[size_t(i)];
    else row = i % rows;
    row_of_layer_.push_back(row);
  }
  perm_.resize(size_t(E));
  for (int e = 0; e < E; ++e) perm_[size_t(e)] = e;
  counts_.resize(size_t(ep));
  y_.resize(size_t(ep));
}

double MoeLoadSampler::clamp_ratio(double max_rows, double tokens) const {
  const double mean = tokens * shape_.top_k / shape_.ep;
  const double cap = tokens * std::min(shape_.top_k, shape_.num_experts / shape_.ep);
  return std::clamp(max_rows, mean, std::max(mean, cap)) / mean;
}

void MoeLoadSampler::sample(int64_t tokens, MoeStepLoad& out) {
  if (double(tokens) * shape_.top_k / shape_.ep < kExactMeanRows)
    sample_exact(tokens, out);
  else
    sample_normal(tokens, out);
}

void MoeLoadSampler::sample_exact(int64_t tokens, MoeStepLoad& out) {
  const int L = shape_.num_moe_layers, ep = shape_.ep, k = shape_.top_k, E = shape_.num_experts;
  out.max_over_mean.assign(size_t(L), 1.0);
  if (tokens <= 0 || ep == 1) return;
  const int g = E / ep;
  for (int l = 0; l < L; ++l) {
    std::fill(counts_.begin(), counts_.end(), 0.0);
    if (uniform_) {
      for (int64_t t = 0; t < tokens; ++t)
        for (int j = 0; j < k; ++j) {  // partial Fisher-Yates: perm_[0..k) a uniform k-subset
          const int pick = j + int((rng_.next() >> 32) * uint64_t(E - j) >> 32);
          std::swap(perm_[size_t(j)], perm_[size_t(pick)]);
          counts_[size_t(perm_[size_t(j)] / g)] += 1;
        }
    } else {
      const auto& cdf = rank_cdf_[size_t(row_of_layer_[size_t(l)])];
      const int64_t n = tokens * k;
      for (int64_t i = 0; i < n; ++i) {
        const double u = rng_.uniform();
        const size_t r = size_t(std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
        counts_[std::min(r, size_t(ep - 1))] += 1;
      }
    }
    out.max_over_mean[size_t(l)] =
        clamp_ratio(*std::max_element(counts_.begin(), counts_.end()), double(tokens));
  }
}

void MoeLoadSampler::sample_normal(int64_t tokens, MoeStepLoad& out) {
  const int L = shape_.num_moe_layers, ep = shape_.ep, k = shape_.top_k, E = shape_.num_experts;
  out.max_over_mean.assign(size_t(L), 1.0);
  if (tokens <= 0 || ep == 1) return;
  const double N = double(tokens) * k;
  const double f = uniform_ ? (E > 1 ? double(E - k) / (E - 1) : 0.0) : 1.0;
  const double sf = std::sqrt(f);
  for (int l = 0; l < L; ++l) {
    const auto& q = rank_share_[size_t(row_of_layer_[size_t(l)])];
    double sum = 0;
    for (int r = 0; r < ep; ++r) {
      y_[size_t(r)] = std::sqrt(N * q[size_t(r)]) * rng_.normal();
      sum += y_[size_t(r)];
    }
    double mx = -1e300;
    for (int r = 0; r < ep; ++r)
      mx = std::max(mx, N * q[size_t(r)] + sf * (y_[size_t(r)] - q[size_t(r)] * sum));
    out.max_over_mean[size_t(l)] = clamp_ratio(mx, double(tokens));
  }
}

}  // namespace mixserve::sim
