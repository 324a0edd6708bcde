// CPU reference forward: invariants that must hold exactly up to float64 summation order
// (chunked prefill, decode, mixed batches, causality, block-table layout), routing properties,
// and a 1-layer case recomputed here with plain loops, independent of the Eigen code path.
//
// Tolerance: 1e-12 relative to the largest value compared. Both sides do the same float64
// arithmetic on the same bf16 weights; only the order of additions differs (GEMM blocking
// depends on the row count), which moves results by a few ulps (~1e-16 each) over sums of
// < 100 terms and a handful of layers.
#include <doctest/doctest.h>

#include <cmath>
#include <numeric>
#include <random>

#include "mixserve/core/error.hpp"
#include "mixserve/model/bf16.hpp"
#include "mixserve/model/reference.hpp"
#include "tiny_models.hpp"

using namespace mixserve;
using namespace mixserve::model;
using namespace mixserve::model::test;

namespace {

constexpr double kTol = 1e-12;
constexpr KVCacheConfig kKv{4, 16};  // 4-token blocks: sequences of ~10 tokens span 3 blocks

std::vector<int32_t> random_tokens(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> t(size_t(n), 0);
  for (auto& v : t) v = static_cast<int32_t>(rng() % uint32_t(vocab));
  return t;
}

std::vector<int32_t> slice(const std::vector<int32_t>& v, size_t a, size_t b) {
  return {v.begin() + long(a), v.begin() + long(b)};
}

// Rows [r0, r1) of a [rows, width] row-major buffer.
std::vector<double> rows(const std::vector<double>& v, int64_t r0, int64_t r1, int64_t width) {
  return {v.begin() + r0 * width, v.begin() + r1 * width};
}

std::vector<double> concat(std::vector<double> a, const std::vector<double>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

TEST_CASE("reference: chunked prefill equals one-shot prefill (logits and every layer)") {
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    const WeightSet w = synthetic_weights(m, 123);
    const auto toks = random_tokens(10, m.vocab_size, 1);
    ReferenceModel one(w, kKv), two(w, kKv);
    const StepOutput full = one.step({{toks, 0, {0, 1, 2}}});
    const StepOutput a = two.step({{slice(toks, 0, 6), 0, {0, 1, 2}}});
    const StepOutput b = two.step({{slice(toks, 6, 10), 6, {0, 1, 2}}});
    CHECK(full.num_tokens == 10);
    CHECK(max_rel_diff(concat(a.logits, b.logits), full.logits) < kTol);
    REQUIRE(full.attn_hidden.size() == size_t(m.num_layers));
    for (int l = 0; l < m.num_layers; ++l) {
      CHECK(max_rel_diff(concat(a.layer_hidden[size_t(l)], b.layer_hidden[size_t(l)]),
                         full.layer_hidden[size_t(l)]) < kTol);
      CHECK(max_rel_diff(concat(a.attn_hidden[size_t(l)], b.attn_hidden[size_t(l)]),
                         full.attn_hidden[size_t(l)]) < kTol);
    }
    // The reference is not trivially zero.
    double mx = 0.0;
    for (double v : full.logits) mx = std::max(mx, std::fabs(v));
    CHECK(mx > 0.1);
  }
}

TEST_CASE("reference: prefill of n then one decode token equals prefill of n + 1") {
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    const WeightSet w = synthetic_weights(m, 7);
    const auto toks = random_tokens(9, m.vocab_size, 2);
    ReferenceModel one(w, kKv), two(w, kKv);
    const StepOutput full = one.step({{toks, 0, {3, 4, 5}}});
    two.step({{slice(toks, 0, 8), 0, {3, 4, 5}}});
    const StepOutput dec = two.step({{slice(toks, 8, 9), 8, {3, 4, 5}}});
    CHECK(dec.num_tokens == 1);
    CHECK(max_rel_diff(dec.logits, rows(full.logits, 8, 9, m.vocab_size)) < kTol);
  }
}

TEST_CASE("reference: a mixed batch (one sequence prefilling, one decoding) equals each alone") {
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    const WeightSet w = synthetic_weights(m, 99);
    const auto ta = random_tokens(7, m.vocab_size, 3);  // A: prefill chunk of 7
    const auto tb = random_tokens(6, m.vocab_size, 4);  // B: 5 cached + 1 decode
    const int V = m.vocab_size;

    ReferenceModel mixed(w, kKv);
    mixed.step({{slice(tb, 0, 5), 0, {6, 2}}});
    const StepOutput both = mixed.step({{ta, 0, {0, 9}}, {slice(tb, 5, 6), 5, {6, 2}}});
    REQUIRE(both.seq_offsets == std::vector<int64_t>{0, 7, 8});

    ReferenceModel alone_a(w, kKv), alone_b(w, kKv);
    const StepOutput a = alone_a.step({{ta, 0, {0, 9}}});
    alone_b.step({{slice(tb, 0, 5), 0, {6, 2}}});
    const StepOutput b = alone_b.step({{slice(tb, 5, 6), 5, {6, 2}}});
    CHECK(max_rel_diff(rows(both.logits, 0, 7, V), a.logits) < kTol);
    CHECK(max_rel_diff(rows(both.logits, 7, 8, V), b.logits) < kTol);
    for (int l = 0; l < m.num_layers; ++l) {
      CHECK(max_rel_diff(rows(both.layer_hidden[size_t(l)], 0, 7, m.hidden_size),
                         a.layer_hidden[size_t(l)]) < kTol);
      CHECK(max_rel_diff(rows(both.layer_hidden[size_t(l)], 7, 8, m.hidden_size),
                         b.layer_hidden[size_t(l)]) < kTol);
    }
  }
}

TEST_CASE("reference: causal (a later token changes no earlier logits, and does change its own)") {
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    const WeightSet w = synthetic_weights(m, 5);
    auto toks = random_tokens(10, m.vocab_size, 5);
    ReferenceModel r1(w, kKv), r2(w, kKv);
    const StepOutput a = r1.step({{toks, 0, {0, 1, 2}}});
    toks[7] = (toks[7] + 1) % m.vocab_size;
    const StepOutput b = r2.step({{toks, 0, {0, 1, 2}}});
    const int V = m.vocab_size;
    CHECK(max_rel_diff(rows(b.logits, 0, 7, V), rows(a.logits, 0, 7, V)) < kTol);
    CHECK(max_rel_diff(rows(b.logits, 7, 10, V), rows(a.logits, 7, 10, V)) > 1e-6);
  }
}

TEST_CASE("reference: a non-contiguous block table equals a contiguous one") {
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    const WeightSet w = synthetic_weights(m, 8);
    const auto toks = random_tokens(11, m.vocab_size, 6);
    ReferenceModel r1(w, kKv), r2(w, kKv);
    const StepOutput a = r1.step({{slice(toks, 0, 6), 0, {0, 1, 2}}});
    const StepOutput b = r2.step({{slice(toks, 0, 6), 0, {13, 4, 9}}});
    CHECK(max_rel_diff(b.logits, a.logits) < kTol);
    const StepOutput c = r1.step({{slice(toks, 6, 11), 6, {0, 1, 2}}});
    const StepOutput d = r2.step({{slice(toks, 6, 11), 6, {13, 4, 9}}});
    CHECK(max_rel_diff(d.logits, c.logits) < kTol);
  }
}

TEST_CASE("reference: routing weights (renormalised sum to 1; otherwise below 1; descending)") {
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    const WeightSet w = synthetic_weights(m, 17);
    ReferenceModel r(w, kKv);
    const StepOutput o = r.step({{random_tokens(8, m.vocab_size, 7), 0, {0, 1}}});
    const int k = m.moe.top_k;
    int moe_layers = 0;
    for (int l = 0; l < m.num_layers; ++l) {
      const auto& ids = o.topk_ids[size_t(l)];
      const auto& wts = o.topk_weights[size_t(l)];
      if (!m.layers[size_t(l)].moe) {
        CHECK(ids.empty());
        continue;
      }
      ++moe_layers;
      REQUIRE(ids.size() == size_t(o.num_tokens * k));
      for (int64_t t = 0; t < o.num_tokens; ++t) {
        double sum = 0.0;
        for (int j = 0; j < k; ++j) {
          const size_t i = size_t(t * k + j);
          sum += wts[i];
          CHECK(ids[i] >= 0);
          CHECK(ids[i] < m.moe.num_experts);
          if (j > 0) CHECK(wts[i] <= wts[i - 1]);
          for (int jj = 0; jj < j; ++jj) CHECK(ids[i] != ids[size_t(t * k + jj)]);
        }
        if (m.moe.norm_topk_prob) CHECK(std::fabs(sum - 1.0) < kTol);
        else CHECK((sum > 0.0 && sum < 1.0 - 1e-9));  // k < E: the rest of the mass is dropped
      }
    }
    CHECK(moe_layers == m.num_moe_layers());
  }
}

TEST_CASE("route_softmax_topk: lower id wins ties; renormalisation and scaling") {
  const std::vector<double> logits = {1.0, 3.0, 3.0, 0.0, 3.0};
  std::vector<int32_t> ids(2);
  std::vector<double> w(2);
  route_softmax_topk(logits, 2, false, 1.0, ids, w);
  CHECK(ids == std::vector<int32_t>{1, 2});
  const double z = std::exp(1.0) + 3 * std::exp(3.0) + 1.0;
  CHECK(w[0] == doctest::Approx(std::exp(3.0) / z).epsilon(1e-14));
  route_softmax_topk(logits, 2, true, 2.5, ids, w);
  CHECK(w[0] == doctest::Approx(1.25).epsilon(1e-14));
  CHECK(w[1] == doctest::Approx(1.25).epsilon(1e-14));
  std::vector<int32_t> id1(1);
  std::vector<double> w1(1);
  route_softmax_topk(std::vector<double>{0.5, 0.5}, 1, false, 1.0, id1, w1);
  CHECK(id1[0] == 0);
  CHECK_THROWS_AS(route_softmax_topk(logits, 6, false, 1.0, ids, w), RuntimeError);
}

TEST_CASE("reference: synthetic weights keep activations O(1)") {
  for (const ModelSpec& m : tiny_models()) {
    CAPTURE(m.architecture);
    ReferenceModel r(synthetic_weights(m, 3), kKv);
    const StepOutput o = r.step({{random_tokens(12, m.vocab_size, 9), 0, {0, 1, 2}}});
    for (const auto& h : o.layer_hidden) {
      double sq = 0.0;
      for (double v : h) sq += v * v;
      const double rms = std::sqrt(sq / double(h.size()));
      CHECK(rms > 0.3);  // embeddings have unit RMS; layers add O(1) updates
      CHECK(rms < 5.0);
    }
    for (double v : o.logits) CHECK(std::isfinite(v));
  }
}

TEST_CASE("reference: bad batches and unsupported models are InputErrors") {
  const ModelSpec m = tiny_mixtral();
  const WeightSet w = synthetic_weights(m, 1);
  ReferenceModel r(w, kKv);
  CHECK_THROWS_AS(r.step({{{1, 2, 3, 4, 5}, 0, {0}}}), InputError);          // table too short
  CHECK_THROWS_AS(r.step({{{1}, 0, {16}}}), InputError);                     // block out of range
  CHECK_THROWS_AS(r.step({{{1}, 0, {3}}, {{2}, 0, {3}}}), InputError);       // shared block
  CHECK_THROWS_AS(r.step({{{31}, 0, {0}}}), InputError);                     // token out of range
  CHECK_THROWS_AS(r.step({{{}, 0, {0}}}), InputError);                       // no tokens
  CHECK_THROWS_AS(r.step({{{1}, -1, {0}}}), InputError);                     // negative position
  CHECK_THROWS_AS(ReferenceModel(w, KVCacheConfig{0, 4}), InputError);
  ModelSpec sw = m;
  sw.attention.sliding_window = 8;
  sw.layers[1].sliding = true;
  CHECK_THROWS_AS(ReferenceModel(synthetic_weights(sw, 1), kKv), InputError);
}

TEST_CASE("reference: reset_cache forgets earlier steps") {
  const ModelSpec m = tiny_olmoe();
  const WeightSet w = synthetic_weights(m, 4);
  const auto toks = random_tokens(6, m.vocab_size, 10);
  ReferenceModel r(w, kKv), fresh(w, kKv);
  r.step({{toks, 0, {0, 1}}});
  const StepOutput with_cache = r.step({{{toks[0]}, 6, {0, 1}}});
  r.reset_cache();
  // After the reset, positions 0..5 hold zeros: K = 0 gives equal scores, V = 0 adds nothing.
  const StepOutput after = r.step({{{toks[0]}, 6, {0, 1}}});
  CHECK(max_rel_diff(after.logits, with_cache.logits) > 1e-6);
  const StepOutput first = fresh.step({{{toks[0]}, 0, {0}}});
  r.reset_cache();
  CHECK(max_rel_diff(r.step({{{toks[0]}, 0, {0}}}).logits, first.logits) < kTol);
}

// One layer, hidden 4, one head of 4, two experts (top-1, not renormalised), two tokens:
// everything recomputed with plain loops from the bf16 weights.
TEST_CASE("reference: hand-computed 1-layer tiny model") {
  ModelSpec m;
  m.name = "hand";
  m.architecture = "MixtralForCausalLM";
  m.hidden_size = 4;
  m.num_layers = 1;
  m.vocab_size = 5;
  m.attention.type = AttentionType::mha;
  m.attention.num_heads = 1;
  m.attention.num_kv_heads = 1;
  m.attention.head_dim = 4;
  m.moe.num_experts = 2;
  m.moe.top_k = 1;
  m.moe.expert_intermediate_size = 3;
  m.moe.norm_topk_prob = false;
  m.layers = {LayerSpec{true, false}};
  m.rope_theta = 10000.0;
  m.rms_norm_eps = 1e-6;
  const WeightSet w = synthetic_weights(m, 2024);

  auto W = [&](const std::string& name) {
    std::vector<double> v;
    for (uint16_t b : w.at(name).bf16) v.push_back(bf16_to_f32(b));
    return v;
  };
  auto matvec = [](const std::vector<double>& M, const std::vector<double>& x) {
    std::vector<double> y(M.size() / x.size(), 0.0);
    for (size_t o = 0; o < y.size(); ++o)
      for (size_t i = 0; i < x.size(); ++i) y[o] += M[o * x.size() + i] * x[i];
    return y;
  };
  auto rms = [&](std::vector<double> x, const std::vector<double>& g) {
    double ms = 0.0;
    for (double v : x) ms += v * v;
    const double inv = 1.0 / std::sqrt(ms / double(x.size()) + m.rms_norm_eps);
    for (size_t i = 0; i < x.size(); ++i) x[i] *= inv * g[i];
    return x;
  };
  auto rope = [&](std::vector<double> x, int pos) {
    // head_dim 4: pairs (0, 2) with frequency 1 and (1, 3) with frequency theta^(-1/2).
    for (int i = 0; i < 2; ++i) {
      const double ang = pos * std::pow(m.rope_theta, -2.0 * i / 4.0);
      const double a = x[size_t(i)], b = x[size_t(i + 2)];
      x[size_t(i)] = a * std::cos(ang) - b * std::sin(ang);
      x[size_t(i + 2)] = b * std::cos(ang) + a * std::sin(ang);
    }
    return x;
  };

  const std::vector<int32_t> toks = {3, 1};
  const auto E = W("model.embed_tokens.weight");
  std::vector<std::vector<double>> x(2), q(2), k(2), v(2);
  for (int t = 0; t < 2; ++t) {
    x[size_t(t)].assign(E.begin() + toks[size_t(t)] * 4, E.begin() + toks[size_t(t)] * 4 + 4);
    const auto xn = rms(x[size_t(t)], W("model.layers.0.input_layernorm.weight"));
    q[size_t(t)] = rope(matvec(W("model.layers.0.self_attn.q_proj.weight"), xn), t);
    k[size_t(t)] = rope(matvec(W("model.layers.0.self_attn.k_proj.weight"), xn), t);
    v[size_t(t)] = matvec(W("model.layers.0.self_attn.v_proj.weight"), xn);
  }
  std::vector<double> expect_attn, expect_hidden, expect_logits;
  std::vector<int32_t> expect_ids;
  for (int t = 0; t < 2; ++t) {
    std::vector<double> s(size_t(t + 1));
    double mx = -1e300, z = 0.0;
    for (int j = 0; j <= t; ++j) {
      double d = 0.0;
      for (int i = 0; i < 4; ++i) d += q[size_t(t)][size_t(i)] * k[size_t(j)][size_t(i)];
      s[size_t(j)] = d / 2.0;  // 1 / sqrt(head_dim)
      mx = std::max(mx, s[size_t(j)]);
    }
    for (auto& e : s) z += e = std::exp(e - mx);
    std::vector<double> att(4, 0.0);
    for (int j = 0; j <= t; ++j)
      for (int i = 0; i < 4; ++i) att[size_t(i)] += s[size_t(j)] / z * v[size_t(j)][size_t(i)];
    const auto o = matvec(W("model.layers.0.self_attn.o_proj.weight"), att);
    std::vector<double> h(4);
    for (int i = 0; i < 4; ++i) h[size_t(i)] = x[size_t(t)][size_t(i)] + o[size_t(i)];
    expect_attn.insert(expect_attn.end(), h.begin(), h.end());
    const auto hn = rms(h, W("model.layers.0.post_attention_layernorm.weight"));
    const auto lg = matvec(W("model.layers.0.block_sparse_moe.gate.weight"), hn);
    const double p0 = 1.0 / (1.0 + std::exp(lg[1] - lg[0]));  // softmax over two experts
    const int e = lg[1] > lg[0] ? 1 : 0;
    const double pe = e == 0 ? p0 : 1.0 - p0;
    expect_ids.push_back(e);
    const std::string pre = "model.layers.0.block_sparse_moe.experts." + std::to_string(e) + ".";
    const auto g = matvec(W(pre + "w1.weight"), hn);
    const auto u = matvec(W(pre + "w3.weight"), hn);
    std::vector<double> act(3);
    for (int i = 0; i < 3; ++i) act[size_t(i)] = g[size_t(i)] / (1.0 + std::exp(-g[size_t(i)])) * u[size_t(i)];
    const auto y = matvec(W(pre + "w2.weight"), act);
    for (int i = 0; i < 4; ++i) h[size_t(i)] += pe * y[size_t(i)];
    expect_hidden.insert(expect_hidden.end(), h.begin(), h.end());
    const auto lo = matvec(W("lm_head.weight"), rms(h, W("model.norm.weight")));
    expect_logits.insert(expect_logits.end(), lo.begin(), lo.end());
  }

  ReferenceModel r(w, KVCacheConfig{2, 3});
  const StepOutput out = r.step({{toks, 0, {2}}});
  CHECK(out.topk_ids[0] == expect_ids);
  CHECK(max_rel_diff(out.attn_hidden[0], expect_attn) < kTol);
  CHECK(max_rel_diff(out.layer_hidden[0], expect_hidden) < kTol);
  CHECK(max_rel_diff(out.logits, expect_logits) < kTol);
  // Token 1 attends to token 0: its output depends on it (the test is not vacuous).
  ReferenceModel r2(w, KVCacheConfig{2, 3});
  const StepOutput alone = r2.step({{{toks[1]}, 0, {0}}});
  CHECK(max_rel_diff(alone.logits, rows(out.logits, 1, 2, 5)) > 1e-6);
}

namespace {

// An independent forward written with plain loops over std::vector (no Eigen, no cache, no
// block tables): one sequence from position 0, full causal attention. Covers QKV bias, QK-norm
// per head or over the whole projection, GQA, dense layers, shared expert with sigmoid gate,
// tied embeddings. Returns the logits [n, vocab].
std::vector<double> loop_forward(const WeightSet& w, const std::vector<int32_t>& toks) {
  const ModelSpec& m = w.spec();
  const Family f = w.family();
  const auto& a = m.attention;
  const size_t n = toks.size(), h = size_t(m.hidden_size), hd = size_t(a.head_dim);
  const size_t nh = size_t(a.num_heads), nkv = size_t(a.num_kv_heads);
  auto W = [&](const std::string& name) {
    std::vector<double> v;
    if (const Tensor* t = w.find(name))
      for (uint16_t b : t->bf16) v.push_back(bf16_to_f32(b));
    return v;
  };
  auto matvec = [](const std::vector<double>& M, const std::vector<double>& x) {
    std::vector<double> y(M.size() / x.size(), 0.0);
    for (size_t o = 0; o < y.size(); ++o)
      for (size_t i = 0; i < x.size(); ++i) y[o] += M[o * x.size() + i] * x[i];
    return y;
  };
  auto add = [](std::vector<double>& x, const std::vector<double>& b, double s = 1.0) {
    for (size_t i = 0; i < b.size(); ++i) x[i] += s * b[i];
  };
  // RMSNorm over consecutive groups of g.size() values.
  auto rms = [&](std::vector<double> x, const std::vector<double>& g) {
    for (size_t c0 = 0; c0 < x.size(); c0 += g.size()) {
      double ms = 0.0;
      for (size_t i = 0; i < g.size(); ++i) ms += x[c0 + i] * x[c0 + i];
      const double inv = 1.0 / std::sqrt(ms / double(g.size()) + m.rms_norm_eps);
      for (size_t i = 0; i < g.size(); ++i) x[c0 + i] *= inv * g[i];
    }
    return x;
  };
  auto rope = [&](std::vector<double>& x, size_t pos) {
    for (size_t c0 = 0; c0 < x.size(); c0 += hd)
      for (size_t i = 0; i < hd / 2; ++i) {
        const double ang = double(pos) * std::pow(m.rope_theta, -2.0 * double(i) / double(hd));
        const double x1 = x[c0 + i], x2 = x[c0 + i + hd / 2];
        x[c0 + i] = x1 * std::cos(ang) - x2 * std::sin(ang);
        x[c0 + i + hd / 2] = x2 * std::cos(ang) + x1 * std::sin(ang);
      }
  };
  auto swiglu = [&](const std::string& g, const std::string& u, const std::string& d,
                    const std::vector<double>& x) {
    auto gv = matvec(W(g), x);
    const auto uv = matvec(W(u), x);
    for (size_t i = 0; i < gv.size(); ++i) gv[i] = gv[i] / (1.0 + std::exp(-gv[i])) * uv[i];
    return matvec(W(d), gv);
  };
  const auto E = W(names::embed());
  std::vector<std::vector<double>> x(n);
  for (size_t t = 0; t < n; ++t)
    x[t].assign(E.begin() + long(size_t(toks[t]) * h), E.begin() + long(size_t(toks[t] + 1) * h));
  for (int l = 0; l < m.num_layers; ++l) {
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (size_t t = 0; t < n; ++t) {
      const auto xn = rms(x[t], W(names::input_norm(l)));
      q[t] = matvec(W(names::attn(l, "q_proj")), xn);
      k[t] = matvec(W(names::attn(l, "k_proj")), xn);
      v[t] = matvec(W(names::attn(l, "v_proj")), xn);
      add(q[t], W(names::attn(l, "q_proj", "bias")));
      add(k[t], W(names::attn(l, "k_proj", "bias")));
      add(v[t], W(names::attn(l, "v_proj", "bias")));
      if (a.qk_norm) {
        q[t] = rms(q[t], W(names::attn(l, "q_norm")));
        k[t] = rms(k[t], W(names::attn(l, "k_norm")));
      }
      rope(q[t], t);
      rope(k[t], t);
    }
    for (size_t t = 0; t < n; ++t) {
      std::vector<double> att(nh * hd, 0.0);
      for (size_t hh = 0; hh < nh; ++hh) {
        const size_t g = hh / (nh / nkv);
        std::vector<double> s(t + 1);
        double mx = -1e300, z = 0.0;
        for (size_t j = 0; j <= t; ++j) {
          double d = 0.0;
          for (size_t i = 0; i < hd; ++i) d += q[t][hh * hd + i] * k[j][g * hd + i];
          s[j] = d / std::sqrt(double(hd));
          mx = std::max(mx, s[j]);
        }
        for (auto& e : s) z += e = std::exp(e - mx);
        for (size_t j = 0; j <= t; ++j)
          for (size_t i = 0; i < hd; ++i) att[hh * hd + i] += s[j] / z * v[j][g * hd + i];
      }
      auto o = matvec(W(names::attn(l, "o_proj")), att);
      add(o, W(names::attn(l, "o_proj", "bias")));
      add(x[t], o);
      const auto xn = rms(x[t], W(names::post_attn_norm(l)));
      if (!m.layers[size_t(l)].moe) {
        add(x[t], swiglu(names::dense(l, FfnProj::gate), names::dense(l, FfnProj::up),
                         names::dense(l, FfnProj::down), xn));
        continue;
      }
      const auto lg = matvec(W(names::router(f, l)), xn);
      double mx = -1e300, z = 0.0;
      for (double e : lg) mx = std::max(mx, e);
      std::vector<double> p(lg.size());
      for (size_t e = 0; e < p.size(); ++e) z += p[e] = std::exp(lg[e] - mx);
      for (auto& e : p) e /= z;
      // Top-k by repeated argmax (first maximum = lower id).
      std::vector<bool> taken(p.size(), false);
      std::vector<size_t> sel;
      double kept = 0.0;
      for (int j = 0; j < m.moe.top_k; ++j) {
        size_t best = p.size();
        for (size_t e = 0; e < p.size(); ++e)
          if (!taken[e] && (best == p.size() || p[e] > p[best])) best = e;
        taken[best] = true;
        sel.push_back(best);
        kept += p[best];
      }
      for (size_t e : sel) {
        const double wt = (m.moe.norm_topk_prob ? p[e] / kept : p[e]) * m.moe.routed_scaling_factor;
        add(x[t],
            swiglu(names::expert(f, l, int(e), FfnProj::gate), names::expert(f, l, int(e), FfnProj::up),
                   names::expert(f, l, int(e), FfnProj::down), xn),
            wt);
      }
      if (m.moe.shared_intermediate_size > 0) {
        double gate = 1.0;
        if (m.moe.shared_expert_gate) {
          double d = 0.0;
          const auto sg = W(names::shared_expert_gate(l));
          for (size_t i = 0; i < h; ++i) d += sg[i] * xn[i];
          gate = 1.0 / (1.0 + std::exp(-d));
        }
        add(x[t],
            swiglu(names::shared_expert(l, FfnProj::gate), names::shared_expert(l, FfnProj::up),
                   names::shared_expert(l, FfnProj::down), xn),
            gate);
      }
    }
  }
  const auto lm = W(m.tie_word_embeddings ? names::embed() : names::lm_head());
  std::vector<double> logits;
  for (size_t t = 0; t < n; ++t) {
    const auto lo = matvec(lm, rms(x[t], W(names::final_norm())));
    logits.insert(logits.end(), lo.begin(), lo.end());
  }
  return logits;
}

}  // namespace

TEST_CASE("reference: equals an independent plain-loop forward on all four architectures") {
  for (ModelSpec m : tiny_models()) {
    for (bool bias : {false, true}) {
      // Qwen3 and OLMoE also exist with attention_bias (q, k, v and o biases).
      if (bias && m.architecture != "Qwen3MoeForCausalLM" && m.architecture != "OlmoeForCausalLM")
        continue;
      m.attention.qkv_bias = m.attention.o_bias = bias;
      CAPTURE(m.architecture);
      CAPTURE(bias);
      const WeightSet w = synthetic_weights(m, 31);
      const auto toks = random_tokens(7, m.vocab_size, 12);
      ReferenceModel r(w, kKv);
      const StepOutput o = r.step({{toks, 0, {5, 1}}});
      CHECK(max_rel_diff(o.logits, loop_forward(w, toks)) < kTol);
    }
  }
}
