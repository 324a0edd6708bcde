// Router near-ties of the float64 reference, shared by the forward tests (test_forward.cpp,
// test_distributed.cpp).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "mixserve/model/bf16.hpp"
#include "mixserve/model/reference.hpp"
#include "mixserve/model/weights.hpp"

namespace mixserve::test {

// Router near-ties: the GPU's router logits carry the input's relative error ε (<= ~1e-2 deep in
// the model) times O(1) logits (unit-RMS normed input, weights of variance 1/H). A token whose
// reference k-th and (k+1)-th router logits are closer than kTieMargin may pick another expert
// on the GPU, which legitimately changes that token's row by O(1): such rows are left out of
// the comparison from that layer on (counted and printed), as are their logits.
constexpr double kTieMargin = 0.05;

inline std::vector<double> widen(const std::vector<uint16_t>& b) {
  std::vector<double> d(b.size());
  for (std::size_t i = 0; i < b.size(); ++i) d[i] = model::bf16_to_f32(b[i]);
  return d;
}

// Per (row, layer): was the row's routing a near tie in the reference at this MoE layer?
// Recomputes the router logits in float64 from the reference's post-attention residual.
inline std::vector<std::vector<bool>> near_ties(const model::WeightSet& w, const model::StepOutput& ref) {
  const ModelSpec& m = w.spec();
  const int64_t H = m.hidden_size, T = ref.num_tokens;
  const int E = m.moe.num_experts, K = m.moe.top_k;
  std::vector<std::vector<bool>> tie(m.num_layers, std::vector<bool>(T, false));
  const auto fam = w.family();
  for (int l = 0; l < m.num_layers; ++l) {
    if (!m.layers[l].moe || K >= E) continue;
    const auto norm_w = widen(w.at(model::names::post_attn_norm(l)).bf16);
    const auto router = widen(w.at(model::names::router(fam, l)).bf16);
    for (int64_t t = 0; t < T; ++t) {
      const double* x = &ref.attn_hidden[l][t * H];
      double ss = 0;
      for (int64_t c = 0; c < H; ++c) ss += x[c] * x[c];
      const double inv = 1.0 / std::sqrt(ss / double(H) + m.rms_norm_eps);
      std::vector<double> lg(E);
      for (int e = 0; e < E; ++e) {
        double a = 0;
        for (int64_t c = 0; c < H; ++c) a += router[e * H + c] * x[c] * inv * norm_w[c];
        lg[e] = a;
      }
      std::sort(lg.begin(), lg.end(), std::greater<>());
      tie[l][t] = lg[K - 1] - lg[K] < kTieMargin;
    }
  }
  return tie;
}

}  // namespace mixserve::test
