// Float64 CPU references of the MoE layer kernels (kernels/include/mixserve/kernels/{rmsnorm,
// rope,router,permute,swiglu,combine}.cuh), written from the formulas in those headers, with the
// same conventions: gate is the first half of gate_up, ties in top-k go to the lower id, permuted
// rows are stable by the flat pair index t * top_k + j, ids outside [0, E) are dropped.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "mixserve/kernels/router.cuh"

namespace mixserve::test::moe_ref {

// out[r] = s / rms(s) * w with s = x[r] (+ residual[r]); residual_out = s. Empty residual: none.
struct RmsNormResult {
  std::vector<double> out, residual_out;
};
inline RmsNormResult rmsnorm(const std::vector<double>& x, const std::vector<double>& residual,
                             const std::vector<double>& w, int64_t rows, int width, double eps) {
  RmsNormResult r;
  r.out.resize(rows * width);
  if (!residual.empty()) r.residual_out.resize(rows * width);
  std::vector<double> s(width);
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0;
    for (int c = 0; c < width; ++c) {
      s[c] = x[i * width + c] + (residual.empty() ? 0.0 : residual[i * width + c]);
      if (!residual.empty()) r.residual_out[i * width + c] = s[c];
      ss += s[c] * s[c];
    }
    const double inv = 1.0 / std::sqrt(ss / width + eps);
    for (int c = 0; c < width; ++c) r.out[i * width + c] = s[c] * inv * w[c];
  }
  return r;
}

// Rotate-half RoPE in place on v [tokens, stride] with heads at h * head_dim, h < heads.
inline void rope(std::vector<double>& v, int64_t tokens, int64_t stride, int heads, int head_dim, int rotary_dim,
                 double theta, const std::vector<int32_t>& pos) {
  const int half = rotary_dim / 2;
  for (int64_t t = 0; t < tokens; ++t)
    for (int h = 0; h < heads; ++h) {
      double* x = v.data() + t * stride + int64_t(h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const double a = double(pos[t]) * std::pow(theta, -2.0 * i / rotary_dim);
        const double x1 = x[i], x2 = x[i + half];
        x[i] = x1 * std::cos(a) - x2 * std::sin(a);
        x[i + half] = x2 * std::cos(a) + x1 * std::sin(a);
      }
    }
}

// Router: ids in descending selection score (ties: lower id), weights, and per token the smallest
// gap between consecutive decisions that used computed scores (+inf when selection is on the raw
// logits, which the kernel compares exactly as given). A gap under the fp32 error of the kernel's
// score means either order is right.
struct RouterResult {
  std::vector<int32_t> ids;
  std::vector<double> weights, margin;
};
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline RouterResult router(const std::vector<float>& logits, const std::vector<float>& bias, const kernels::RouterParams& p) {
  using kernels::RouterScoring;
  const int E = p.num_experts, k = p.top_k;
  const double inf = std::numeric_limits<double>::infinity();
  RouterResult r;
  r.ids.resize(p.num_tokens * k);
  r.weights.resize(p.num_tokens * k);
  r.margin.assign(p.num_tokens, inf);
  const bool computed = p.scoring == RouterScoring::sigmoid && (!bias.empty() || p.num_groups > 1);
  auto by_score = [](const std::vector<double>& s) {
    std::vector<int> order(s.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] > s[b]; });  // stable: lower id first
    return order;
  };
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const float* lg = logits.data() + t * E;
    std::vector<double> sel(E);
    for (int e = 0; e < E; ++e)
      sel[e] = computed ? sigmoid(lg[e]) + (bias.empty() ? 0.0 : double(bias[e])) : double(lg[e]);
    if (p.num_groups > 1) {
      const int gs = E / p.num_groups;
      std::vector<double> gscore(p.num_groups);
      for (int g = 0; g < p.num_groups; ++g) {
        std::vector<double> m(sel.begin() + g * gs, sel.begin() + (g + 1) * gs);
        std::sort(m.begin(), m.end(), std::greater<>());
        gscore[g] = gs >= 2 ? m[0] + m[1] : m[0];
      }
      const auto gorder = by_score(gscore);
      for (int i = 0; i + 1 < std::min(p.num_groups, p.topk_groups + 1); ++i)
        r.margin[t] = std::min(r.margin[t], gscore[gorder[i]] - gscore[gorder[i + 1]]);
      std::vector<bool> keep(p.num_groups, false);
      for (int i = 0; i < p.topk_groups; ++i) keep[gorder[i]] = true;
      for (int e = 0; e < E; ++e)
        if (!keep[e / gs]) sel[e] = -inf;
    }
    const auto order = by_score(sel);
    if (computed)
      for (int i = 0; i < std::min(E - 1, k); ++i)
        if (std::isfinite(sel[order[i + 1]])) r.margin[t] = std::min(r.margin[t], sel[order[i]] - sel[order[i + 1]]);
    double mx = -inf, denom = 0, wsum = 0;
    for (int e = 0; e < E; ++e) mx = std::max(mx, double(lg[e]));
    for (int e = 0; e < E; ++e) denom += std::exp(double(lg[e]) - mx);
    std::vector<double> w(k);
    for (int j = 0; j < k; ++j) {
      const int e = order[j];
      r.ids[t * k + j] = e;
      const double x = lg[e];
      switch (p.scoring) {
        case RouterScoring::softmax_topk: w[j] = std::exp(x - mx) / denom; break;
        case RouterScoring::topk_softmax: w[j] = std::exp(x - double(lg[order[0]])); break;
        case RouterScoring::sigmoid: w[j] = sigmoid(x); break;
      }
      wsum += w[j];
    }
    const bool renorm = p.scoring == RouterScoring::topk_softmax || p.renormalize;
    for (int j = 0; j < k; ++j) r.weights[t * k + j] = (renorm ? w[j] / wsum : w[j]) * double(p.routed_scaling);
  }
  return r;
}

// Permute index maps.
struct PermuteResult {
  std::vector<int32_t> counts, offsets, slot_row, permuted_token;
};
inline PermuteResult permute(const std::vector<int32_t>& ids, int64_t tokens, int k, int E) {
  PermuteResult r;
  r.counts.assign(E, 0);
  r.offsets.assign(E + 1, 0);
  r.slot_row.assign(tokens * k, -1);
  r.permuted_token.assign(tokens * k, -1);
  for (int32_t id : ids)
    if (id >= 0 && id < E) ++r.counts[id];
  for (int e = 0; e < E; ++e) r.offsets[e + 1] = r.offsets[e] + r.counts[e];
  std::vector<int32_t> next(r.offsets.begin(), r.offsets.end() - 1);
  for (int64_t i = 0; i < tokens * k; ++i) {  // flat order: stable by token
    const int32_t id = ids[i];
    if (id < 0 || id >= E) continue;
    r.slot_row[i] = next[id]++;
    r.permuted_token[r.slot_row[i]] = int32_t(i / k);
  }
  return r;
}

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i].
inline std::vector<double> swiglu(const std::vector<double>& gu, int64_t rows, int64_t inter) {
  std::vector<double> out(rows * inter);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < inter; ++i) {
      const double g = gu[r * 2 * inter + i], u = gu[r * 2 * inter + inter + i];
      out[r * inter + i] = g / (1.0 + std::exp(-g)) * u;
    }
  return out;
}

// out[t] = sum_j w[t, j] * expert_out[slot_row[t, j]] (+ sigmoid(gate[t]) or 1 times shared[t]).
inline std::vector<double> combine(const std::vector<double>& expert_out, const std::vector<int32_t>& slot_row,
                                   const std::vector<float>& w, const std::vector<double>& shared,
                                   const std::vector<float>& gate, int64_t tokens, int k, int64_t hidden) {
  std::vector<double> out(tokens * hidden, 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < k; ++j) {
      const int32_t row = slot_row[t * k + j];
      if (row < 0) continue;
      for (int64_t c = 0; c < hidden; ++c) out[t * hidden + c] += double(w[t * k + j]) * expert_out[row * hidden + c];
    }
    if (!shared.empty()) {
      const double g = gate.empty() ? 1.0 : sigmoid(gate[t]);
      for (int64_t c = 0; c < hidden; ++c) out[t * hidden + c] += g * shared[t * hidden + c];
    }
  }
  return out;
}

}  // namespace mixserve::test::moe_ref
